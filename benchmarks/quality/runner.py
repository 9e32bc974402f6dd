"""Run a study arm by arm into JSON files, resumably, after checking every input before any training."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers

from .arms import ARMS
from .studies import Study

__all__ = ["StudyError", "check_study", "result_path", "run_study"]

CONFIG_FILE = "study.json"


class StudyError(ValueError):
    """A study that cannot run as asked; the message says what to change."""


def result_path(out_dir: Path, arm: str, seed: int, k: int) -> Path:
    return Path(out_dir) / arm / f"seed{seed}_k{k}.json"


def _num_layers(study: Study) -> int:
    import hf_collapse

    path = hf_collapse.resolve_model(study.model).path
    return int(transformers.AutoConfig.from_pretrained(path).get_text_config().num_hidden_layers)


def check_study(study: Study, out_dir: Path) -> int:
    """Refuse unknown arms, bad ks or seeds, and an output folder made under another protocol. Returns the
    model's layer count."""
    unknown = [a for a in study.arms if a not in ARMS]
    if unknown:
        raise StudyError(f"unknown arm(s) {unknown}: the arms are {', '.join(ARMS)}")
    if not study.ks:
        raise StudyError("no k given: name at least one number of layers to remove")
    if not study.seeds:
        raise StudyError("no seed given")
    try:
        num_layers = _num_layers(study)
    except (ValueError, OSError) as error:  # an unknown offline alias or an unreadable model folder
        raise StudyError(f"cannot use the model {study.model!r}: {error}") from error
    bad = [k for k in study.ks if not isinstance(k, int) or k < 1 or k >= num_layers]
    if bad:
        raise StudyError(
            f"k = {bad} is not possible on {study.model} ({num_layers} layers): each k must be 1 to {num_layers - 1}, "
            "so that at least one layer is left"
        )
    if study.heal_steps < 1 or study.heal_steps >= study.steps:
        raise StudyError(f"heal_steps={study.heal_steps} must be between 1 and steps - 1 = {study.steps - 1}")
    config = Path(out_dir) / CONFIG_FILE
    if config.is_file():
        recorded = json.loads(config.read_text()).get("protocol")
        if recorded != json.loads(json.dumps(study.protocol())):
            diff = sorted(k for k in set(recorded or {}) | set(study.protocol()) if (recorded or {}).get(k) != json.loads(json.dumps(study.protocol())).get(k))
            raise StudyError(
                f"{out_dir} holds results of a different configuration (fields that differ: {', '.join(diff)}): "
                "choose another --output folder or delete that one"
            )
    return num_layers


def _units(study: Study) -> list[tuple[int, str, int]]:
    """(seed, arm, k) in run order: seed by seed, so a seed's shared fine-tunes are made once and then dropped."""
    units = []
    for seed in study.seeds:
        for name in study.arms:
            for k in (0,) if ARMS[name].full_depth else study.ks:
                units.append((seed, name, k))
    return units


def run_study(study: Study, out_dir: str | Path, log=print) -> list[Path]:
    """Run every (arm, seed, k) of `study` whose JSON is not in `out_dir` yet; returns all result paths."""
    out_dir = Path(out_dir)
    check_study(study, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(
        json.dumps({"protocol": study.protocol(), "study": study.to_dict()}, indent=2) + "\n"
    )
    units = _units(study)
    todo = [u for u in units if not result_path(out_dir, u[1], u[0], u[2]).is_file()]
    log(f"{study.name}: {len(units) - len(todo)} of {len(units)} results already in {out_dir}; {len(todo)} to run")
    if not todo:
        return [result_path(out_dir, a, s, k) for s, a, k in units]

    # quiet while the study runs; the caller's logging settings come back afterwards (tests share the process)
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        _run_units(study, out_dir, todo, log)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return [result_path(out_dir, a, s, k) for s, a, k in units]


def _run_units(study: Study, out_dir: Path, todo: list[tuple[int, str, int]], log) -> None:
    from .context import Context

    started = time.perf_counter()
    ctx = Context(study, log=log, cache_dir=out_dir / "cache")
    current_seed = None
    for seed, name, k in todo:
        if current_seed is not None and seed != current_seed:
            ctx.forget(current_seed)
        current_seed = seed
        start = time.perf_counter()
        outcome = ARMS[name].fn(ctx, seed, k)
        outcome.update(
            arm=name,
            family=ARMS[name].family,
            description=ARMS[name].description,
            seed=seed,
            k=k,
            metric=ctx.metric_name,
            seconds=round(time.perf_counter() - start, 2),
            environment={
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "device": ctx.device,
                "threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "machine": platform.machine(),
            },
        )
        path = result_path(out_dir, name, seed, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(outcome, indent=2) + "\n")
        partial.replace(path)  # atomic: a killed run never leaves a half-written result
        metric = outcome["test"][ctx.metric_name]
        log(f"{name} seed {seed} k {k}: test {ctx.metric_name} {metric:.4f}, layers {outcome.get('layers')} ({outcome['seconds']:.0f} s)")
    log(f"{study.name}: ran {len(todo)} results in {time.perf_counter() - started:.0f} s")
