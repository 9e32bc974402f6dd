"""One SGD step of CollapseTrainer with the MSW penalty, launched by `accelerate launch` with a shipped DeepSpeed
config made for CPU (tests/test_deepspeed.py), and as one plain process for the reference.

Writes each rank's own metric means and, from rank 0, the logged metrics and the whole parameters after the step.
Under ZeRO-3 the parameters are sharded: they are gathered with accelerate's `get_state_dict`, collectively.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_step import Recording  # noqa: E402  (keeps each rank's own metric means)
from test_trainer import FixedDirection, config, lm_dataset, tiny_llama  # noqa: E402

import datasets  # noqa: E402
from hf_collapse.launch import end_processes, leave  # noqa: E402


def main(out_dir: str, batch: int) -> None:
    out = Path(out_dir)
    pair = lm_dataset(2, seed=3)
    model = tiny_llama()  # before the arguments: the same initial weights with or without DeepSpeed
    # gradient clipping 1.0: the shipped DeepSpeed configs' value, which the Trainer requires to match
    args = config(
        out / "run", max_steps=1, per_device_train_batch_size=batch, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, msw_weight=5.0,
    )
    trainer = Recording(model=model, args=args, train_dataset=datasets.concatenate_datasets([pair, pair]))
    trainer._search = FixedDirection(32)
    trainer.train()
    rank = trainer.args.process_index
    engine = trainer.model_wrapped
    state = trainer.accelerator.get_state_dict(engine) if trainer.is_deepspeed_enabled else model.state_dict()
    (out / f"local_{rank}.json").write_text(json.dumps({
        "local": trainer.local_means, "world_size": trainer.args.world_size,
        "engine": type(engine).__name__, "stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
        if trainer.is_deepspeed_enabled else None,
    }))
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, out / "params.pt")
        (out / "logs.json").write_text(json.dumps(trainer.state.log_history))
    if end_processes(wait=True):
        leave(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
