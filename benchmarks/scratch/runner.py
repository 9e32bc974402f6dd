"""Run a from-scratch study arm by arm and seed by seed into JSON files, resumably."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers

from .data import Splits, digits_splits, shakespeare_splits
from .removal import measure_removal
from .studies import ScratchError, ScratchStudy
from .train import train_arm

__all__ = ["CONFIG_FILE", "load_splits", "result_path", "run_study"]

CONFIG_FILE = "study.json"


def result_path(out_dir: Path, arm: str, seed: int) -> Path:
    return Path(out_dir) / arm / f"seed{seed}.json"


def load_splits(study: ScratchStudy) -> Splits:
    if study.kind == "decoder":
        return shakespeare_splits(
            study.block_size, study.validation_rows, study.test_rows, study.calibration_rows, study.eval_batch_size
        )
    return digits_splits(study.validation_rows, study.test_rows, study.calibration_rows, study.eval_batch_size)


def _check_folder(study: ScratchStudy, out_dir: Path) -> None:
    config = out_dir / CONFIG_FILE
    if config.is_file():
        recorded = json.loads(config.read_text()).get("protocol") or {}
        wanted = study.protocol()
        if recorded != wanted:
            diff = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
            raise ScratchError(
                f"{out_dir} holds results of a different configuration (fields that differ: {', '.join(diff)}): "
                "choose another --output folder or delete that one"
            )


def run_study(study: ScratchStudy, out_dir: str | Path, log=print) -> list[Path]:
    """Train and measure every (arm, seed) whose JSON is not in `out_dir` yet; returns every result path."""
    out_dir = Path(out_dir)
    _check_folder(study, out_dir)
    arms = study.arms()
    units = [(seed, arm) for seed in study.seeds for arm in arms]
    todo = [(s, a) for s, a in units if not result_path(out_dir, a, s).is_file()]
    log(f"{study.name}: {len(units) - len(todo)} of {len(units)} results already in {out_dir}; {len(todo)} to run")
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(json.dumps({"protocol": study.protocol(), "study": study.to_dict()}, indent=2) + "\n")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            splits = load_splits(study)
            for seed, arm in todo:
                _run_one(study, splits, seed, arm, arms[arm], out_dir, log)
        finally:
            transformers.logging.set_verbosity(verbosity)
    return [result_path(out_dir, a, s) for s, a in units]


def _run_one(study: ScratchStudy, splits: Splits, seed: int, arm: str, fields: dict | None, out_dir: Path, log) -> None:
    start = time.perf_counter()
    model, curves, train_seconds = train_arm(study, splits, seed, fields)
    removal = measure_removal(model, splits, study)
    outcome = {
        "arm": arm, "seed": seed, "penalty": fields, "steps": study.steps, "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2), "curves": curves, **removal,
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "machine": platform.machine(),
        },
    }
    path = result_path(out_dir, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(outcome, indent=1) + "\n")
    partial.replace(path)  # atomic: a killed run never leaves a half-written result
    chosen = removal["chosen"]["tolerance"]
    log(f"{arm} seed {seed}: full {removal['metric']} {removal['full']['test']:.4g}, {chosen['removable']} layers "
        f"within tolerance ({chosen['rule']}), collapsed {removal['collapsed_layers']} "
        f"({train_seconds:.0f} s training, {outcome['seconds']:.0f} s in all)")
