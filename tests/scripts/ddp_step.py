"""One SGD step of CollapseTrainer; run under `torchrun --nproc_per_node 2` by tests/test_ddp.py.

Writes the parameters after the step and the logged metrics (rank 0) plus each rank's own,
pre-reduction metric means to OUT_DIR.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trainer import FixedDirection, SequentialCollapseTrainer, config, lm_dataset, tiny_llama  # noqa: E402

import datasets  # noqa: E402
from hf_collapse.launch import end_processes, leave  # noqa: E402


class Recording(SequentialCollapseTrainer):
    local_means: list = []

    def _flush_metrics(self, mode):
        metrics = self._msw_metrics[mode]
        self.local_means.append({k: sum(v) / len(v) for k, v in metrics.items()})
        return super()._flush_metrics(mode)


def main(out_dir: str, batch: int) -> None:
    out = Path(out_dir)
    pair = lm_dataset(2, seed=3)
    data = datasets.concatenate_datasets([pair, pair])
    model = tiny_llama()
    args = config(
        out / "run", max_steps=1, per_device_train_batch_size=batch, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, msw_weight=5.0,
    )
    trainer = Recording(model=model, args=args, train_dataset=data)
    trainer._search = FixedDirection(32)
    trainer.train()
    rank = trainer.args.process_index
    (out / f"local_{rank}.json").write_text(json.dumps(trainer.local_means))
    if rank == 0:
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, out / "params.pt")
        (out / "logs.json").write_text(json.dumps(trainer.state.log_history))
        (out / "world.json").write_text(json.dumps(trainer.args.world_size))
    # both ranks leave together, tear the group down themselves and skip the interpreter's shutdown
    if end_processes(wait=True):
        leave(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
