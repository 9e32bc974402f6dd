"""One CollapseTrainer step launched by `accelerate launch` with recipes/accelerate/fsdp2.yaml made for CPU;
run by tests/test_fsdp.py. Each rank writes how accelerate set it up and its own penalty metrics; rank 0 writes
the logged metrics."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_step import Recording  # noqa: E402  (the DDP step's trainer, which keeps each rank's own metric means)
from test_trainer import FixedDirection, config, lm_dataset, tiny_llama  # noqa: E402

import datasets  # noqa: E402
from hf_collapse.launch import end_processes, leave  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    pair = lm_dataset(2, seed=3)
    args = config(out / "run", max_steps=1, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd", msw_weight=5.0)
    trainer = Recording(model=tiny_llama(), args=args, train_dataset=datasets.concatenate_datasets([pair, pair]))
    trainer._search = FixedDirection(32)
    trainer.train()
    rank = trainer.args.process_index
    (out / f"rank_{rank}.json").write_text(json.dumps({
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "fsdp": trainer.is_fsdp_enabled,
        "wrapper": type(trainer.model_wrapped).__name__,
        "local": trainer.local_means,
    }))
    if rank == 0:
        (out / "logs.json").write_text(json.dumps(trainer.state.log_history))
    if end_processes(wait=True):
        leave(0)


if __name__ == "__main__":
    main(sys.argv[1])
