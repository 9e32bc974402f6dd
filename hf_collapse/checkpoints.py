"""Checkpoints of a penalised training run: which folder to resume from, and the penalty state saved in each.

The penalty state is written into every checkpoint folder next to the Trainer's own files, before them: a checkpoint
whose `trainer_state.json` exists therefore also has the penalty state (see [`latest_checkpoint`]).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers.utils import logging

from .config import MSWArguments

__all__ = [
    "PenaltyState", "latest_checkpoint", "load_penalty_state", "load_teacher", "penalty_settings", "resolve_resume",
    "save_penalty_state",
]

logger = logging.get_logger(__name__)

PENALTY_STATE_FILE = "hf_collapse_state.json"
PENALTY_TENSORS_FILE = "hf_collapse_state.safetensors"
TEACHER_FILE = "hf_collapse_teacher.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None when it can)."""
    if not folder.is_dir():
        return "it is not a folder"
    missing = [name for name in (TRAINER_STATE_FILE, PENALTY_STATE_FILE) if not (folder / name).is_file()]
    if missing:
        return f"it has no {' and no '.join(missing)} (a checkpoint interrupted while being written, or not written by an hf-collapse trainer)"
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The highest-numbered *complete* `checkpoint-N` folder in ``output_dir``.

    A checkpoint that a killed run left half-written (no `trainer_state.json` or no penalty state) is skipped
    with a warning, where `transformers.trainer_utils.get_last_checkpoint` would pick it and fail.

    Raises:
        `FileNotFoundError`: no complete checkpoint in ``output_dir`` (the message lists the incomplete ones).
    """
    folder = Path(output_dir)
    found = sorted(
        (int(m.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else [])
        if (m := _CHECKPOINT.match(path.name)) and path.is_dir()
    )
    skipped = []
    for _, path in reversed(found):
        problem = _checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning(f"resuming from {path.name}; skipped incomplete {', '.join(skipped)}")
            return path
        skipped.append(path.name)
    detail = f" (incomplete: {', '.join(skipped)})" if skipped else ""
    raise FileNotFoundError(
        f"resume_from_checkpoint: true, but {folder} has no complete checkpoint-N folder{detail}: train without "
        "resume_from_checkpoint, or name a checkpoint folder"
    )


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> Path | None:
    """`resume_from_checkpoint` as given (`True`/"true"/"latest", a folder, or nothing) -> the checkpoint folder.

    Raises:
        `FileNotFoundError`: no complete checkpoint where it says.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "latest")):
        return latest_checkpoint(output_dir)
    path = Path(value)
    problem = _checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(
            f"cannot resume from {path}: {problem}. Name a checkpoint-N folder written by hf-collapse, or "
            "resume_from_checkpoint: true for the latest complete one in output_dir"
        )
    return path


def penalty_settings(args: MSWArguments) -> dict:
    """The settings that shape a penalised training run (the healing fields only act after it), as JSON values."""
    after = ("heal_steps", "heal_scope", "distill_hidden_weight")
    return {f.name: _jsonable(getattr(args, f.name)) for f in dataclasses.fields(MSWArguments) if f.name not in after}


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class PenaltyState:
    """What the penalty of one process needs to continue exactly.

    Attributes:
        global_step (`int`): the optimizer step of the checkpoint.
        settings (`dict`): [`penalty_settings`] of the run; a resume with other settings is refused.
        schedule (`dict`): `TargetSchedule.state_dict()`.
        teacher (`str`, *optional*): `"taken"` (a copy of the model at the target choice, saved with the
            checkpoint), `"given"` (a `teacher_model`, which must be passed again), or None.
        pending_metrics (`dict[str, list[float]]`): the logging window's unflushed training values.
        directions (`dict[str, torch.Tensor]`): `DirectionSearch.state_dict()` (kept directions and generators).
    """

    global_step: int
    settings: dict
    schedule: dict
    teacher: str | None
    pending_metrics: dict[str, list[float]]
    directions: dict[str, torch.Tensor]


def _state_names(process: int | None) -> tuple[str, str]:
    if process is not None:  # several processes: each keeps its own directions and generator
        return f"hf_collapse_state_{process}.json", f"hf_collapse_state_{process}.safetensors"
    return PENALTY_STATE_FILE, PENALTY_TENSORS_FILE


def save_penalty_state(
    folder: str | os.PathLike, state: PenaltyState, *, process: int | None = None, teacher: torch.nn.Module | None = None
) -> None:
    """Write `state` into the checkpoint `folder` (and `teacher`, the copy taken at the target choice, when given).

    Args:
        process (`int`, *optional*): the process index in a multi-process run (each writes its own files).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_name, tensors_name = _state_names(process)
    if teacher is not None:
        save_model(teacher, str(folder / TEACHER_FILE))
    save_file(state.directions, str(folder / tensors_name))
    record = {
        "global_step": state.global_step,
        "settings": state.settings,
        **state.schedule,
        "teacher": state.teacher,
        "pending_metrics": state.pending_metrics,
    }
    (folder / json_name).write_text(json.dumps(record, indent=1), encoding="utf-8")


def load_penalty_state(
    folder: str | os.PathLike, settings: dict, *, process: int | None = None, teacher_given: bool = False
) -> PenaltyState:
    """Read what [`save_penalty_state`] wrote, refusing a checkpoint of a run with other `settings`.

    Raises:
        `FileNotFoundError`: no penalty state of this process in `folder`.
        `ValueError`: other penalty settings, or a run that distilled from a given teacher resumed without one.
    """
    folder = Path(folder)
    json_name, tensors_name = _state_names(process)
    if not (folder / json_name).is_file():
        raise FileNotFoundError(
            f"cannot resume from {folder}: it has no {json_name} (not written by an hf-collapse trainer, or by a "
            "run with another number of processes); resume from a checkpoint of the same run"
        )
    record = json.loads((folder / json_name).read_text(encoding="utf-8"))
    changed = sorted(k for k, v in record["settings"].items() if k in settings and settings[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {record['settings'][k]!r} -> {settings[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume from {folder}: the penalty settings differ from the checkpoint's ({detail}); resume "
            "with the settings of the interrupted run, or start a new run without resume_from_checkpoint"
        )
    if record["teacher"] == "given" and not teacher_given:
        raise ValueError(
            f"cannot resume from {folder}: the run distilled from a given teacher_model, which checkpoints do not "
            "hold; pass the same teacher_model= to the trainer again"
        )
    fixed = ("global_step", "settings", "teacher", "pending_metrics")
    return PenaltyState(
        global_step=record["global_step"], settings=record["settings"], teacher=record["teacher"],
        pending_metrics=record["pending_metrics"], schedule={k: v for k, v in record.items() if k not in fixed},
        directions=load_file(str(folder / tensors_name)),
    )


def load_teacher(folder: str | os.PathLike, like: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """The frozen teacher saved in checkpoint `folder`: a copy of the model `like` with the saved weights."""
    path = Path(folder) / TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume from {folder}: its distillation teacher {TEACHER_FILE} is missing")
    teacher = copy.deepcopy(like)
    load_model(teacher, str(path), device=str(device))
    return teacher.to(device).eval().requires_grad_(False)
