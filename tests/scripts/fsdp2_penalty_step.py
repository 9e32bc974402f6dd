"""One SGD step with CollapseTrainer's loss (task + MSW penalty) on a model sharded with FSDP2 (`fully_shard`).

Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU), and as one plain process for the
reference. accelerate does not build FSDP on CPU, so the sharding is done here with torch's own `fully_shard`,
each decoder layer a unit as accelerate's TRANSFORMER_BASED_WRAP does; the loss is the trainer's `compute_loss`.
Writes each rank's penalty metrics and whether its parameters were sharded; rank 0 writes the full parameters.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trainer import FixedDirection, config, lm_dataset, tiny_llama  # noqa: E402

from hf_collapse import CollapseTrainer  # noqa: E402
from hf_collapse.launch import end_processes, leave  # noqa: E402


def main(out_dir: str, weight: float) -> None:
    out = Path(out_dir)
    distributed = "RANK" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    pair = lm_dataset(2, seed=3)[:]
    # each rank takes the same 2 rows ([a, b]); one process takes [a, b, a, b]: the same tokens and gradient
    batch = {k: torch.tensor(v * (2 if world == 1 else 1)) for k, v in pair.items()}
    model = tiny_llama()
    trainer = CollapseTrainer(model=model, args=config(out / "run", msw_weight=weight))
    trainer._search = FixedDirection(32)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    optimizer.step()
    sharded = [type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel() for p in model.parameters()]
    metrics = {k: sum(v) / len(v) for k, v in trainer._msw_metrics["train"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}.json").write_text(json.dumps(
        {"world_size": world, "loss": loss.item(), "metrics": metrics, "sharded": sum(sharded), "params": len(sharded)}
    ))
    out.mkdir(parents=True, exist_ok=True)
    full = {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(full, out / "params.pt")
    if distributed and end_processes(wait=True):
        leave(0)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
