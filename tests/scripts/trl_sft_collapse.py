"""Fine-tune with TRL's SFTTrainer plus LaCoOT's MSW penalty, then remove the most collapsed layers and export.

    python trl_sft_collapse.py --model HuggingFaceTB/SmolLM2-135M --dataset trl-lib/Capybara --out smollm2-collapsed

The README's TRL example; the tests run it on a tiny model with a few texts (`--texts`).
"""

import argparse

from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_collapse import CollapseSFTConfig, CollapseSFTTrainer, collapse_model, export_collapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M")
    parser.add_argument("--dataset", default="trl-lib/Capybara")
    parser.add_argument("--texts", nargs="+", help="Train on these texts instead of --dataset.")
    parser.add_argument("--out", default="smollm2-collapsed")
    parser.add_argument("--output_dir", default="sft-msw")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--num_layers", type=int, default=2, help="How many layers to remove.")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU (TRL's configs default to bf16 on GPU).")
    cli = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(cli.model)
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    data = Dataset.from_dict({"text": cli.texts}) if cli.texts else load_dataset(cli.dataset, split="train")

    # 1. SFT with the penalty: TRL's SFTConfig fields plus the msw_* fields
    args = CollapseSFTConfig(output_dir=cli.output_dir, max_steps=cli.max_steps, msw_weight=0.3, report_to="none", use_cpu=cli.cpu)
    trainer = CollapseSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()

    # 2. score the layers on some training rows, remove the lowest-scoring ones, 3. export with the model card
    calibration = trainer.train_dataset.select(range(min(64, len(trainer.train_dataset))))
    model, report = collapse_model(trainer.model.eval(), num_layers=cli.num_layers, strategy="ranked", calibration=calibration)
    export_collapsed(model, cli.out, report=report, processing_class=tokenizer)
    print(f"removed layers {report.removed_layers}; the model is in {cli.out}")


if __name__ == "__main__":
    main()
