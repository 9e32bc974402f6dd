"""What a multi-process launch asks of a recipe, read from the environment `accelerate launch` sets for each rank.

Two things are settled here, before anything is loaded or written:

- mixed precision under DeepSpeed: the Trainer refuses to start when the accelerate config's `mixed_precision` and
  the recipe's `bf16` / `fp16` differ. A recipe that sets neither takes the launcher's ([`precision_overrides`]);
  one that contradicts it is refused with the fix named ([`launch_problem`]);
- `collapse: true` when the parameters are sharded (DeepSpeed ZeRO-3, FSDP): scoring and surgery need the whole
  weights in one process, so the run is refused before training with the two-step command to run instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["end_processes", "launch_problem", "leave", "precision_overrides", "sharded_launch"]


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _deepspeed(environ: Mapping[str, str]) -> bool:
    return _true(environ.get("ACCELERATE_USE_DEEPSPEED"))


def precision_overrides(given: set[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Command-line overrides that make the recipe's precision the DeepSpeed launch's, when the recipe sets none.

    `accelerate launch` with `mixed_precision: bf16` (as the shipped DeepSpeed configs have) hands DeepSpeed bf16;
    the Trainer then requires `bf16: true` in the training arguments. A recipe silent on `bf16` and `fp16` gets it.
    """
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if not _deepspeed(environ) or precision not in ("bf16", "fp16") or given & {"bf16", "fp16"}:
        return []
    return [f"--{precision}", "true"]


def sharded_launch(config, environ: Mapping[str, str] = os.environ) -> str | None:
    """`"DeepSpeed ZeRO-3"` or `"FSDP"` when this process holds only a shard of each parameter, else `None`."""
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds_config = getattr(config, "hf_deepspeed_config", None)
    if (_deepspeed(environ) and stage == "3") or (ds_config is not None and ds_config.is_zero3()):
        return "DeepSpeed ZeRO-3"
    if _true(environ.get("ACCELERATE_USE_FSDP")) or getattr(config, "fsdp", None):
        return "FSDP"
    return None


def launch_problem(recipe, config, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why this launch cannot run the recipe, in one sentence that says what to run instead; `None` when it can.

    Two cases: a recipe precision that contradicts DeepSpeed's, and a collapse in one go while the parameters are
    sharded. The recipe's preflight raises the sentence as a `RecipeError`.
    """
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if _deepspeed(environ) and precision in ("bf16", "fp16") and not getattr(config, precision):
        other = "fp16" if precision == "bf16" else "bf16"
        said = f"{other}: true" if getattr(config, other) else f"{precision}: false"
        return (
            f"the accelerate config sets mixed_precision: {precision} but the recipe sets {said}, which DeepSpeed "
            f"refuses: set {precision}: true in the recipe (or drop its {said.split(':')[0]} line), or "
            "mixed_precision: 'no' in the accelerate config"
        )
    sharded = sharded_launch(config, environ)
    if sharded and recipe.collapse:
        out = config.output_dir
        if config.collapse_layers is not None:
            choice = "--layers " + ",".join(str(i) for i in config.collapse_layers)
        else:
            choice = f"--num-layers {config.collapse_num_layers or 'K'} --data D"
        return (
            f"collapse: true needs the whole weights in one process to score and remove layers, but {sharded} "
            "shards them: train with collapse: false and without collapse_layers / collapse_num_layers / heal_steps "
            f"to save the whole fine-tuned model in {out}, then run: hf-collapse collapse {out} SLIM {choice}"
        )
    return None


def end_processes(*, wait: bool = False) -> bool:
    """Tear down the process group of a multi-process launch, if one was set up (after a barrier with `wait`: only
    where every rank reaches this point soon, gloo's barrier times out after 30 minutes). Returns whether there was one.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    return True


def leave(code: int) -> None:
    """End a rank of a multi-process launch whose work is done and whose group is torn down ([`end_processes`]),
    without the interpreter's shutdown: there gloo's leftover worker state can abort the process ("terminate called
    without an active exception", SIGABRT) after all the work succeeded, which the launcher reports as a failure and
    answers by killing the other ranks. Logs and the standard streams are flushed first."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)

