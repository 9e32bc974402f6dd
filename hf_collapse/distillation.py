"""Logit distillation from a frozen teacher into the student being trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_teacher", "distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, averaged over rows (and unmasked positions).

    Zero when the two logits are equal; the gradient reaches only the student (the teacher is detached).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"the teacher's logits have shape {tuple(teacher_logits.shape)} but the student's {tuple(student_logits.shape)}: "
            "distillation needs a teacher with the same vocabulary / labels"
        )
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    per_row = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        weights = mask.to(per_row.dtype)
        return temperature**2 * (per_row * weights).sum() / weights.sum().clamp_min(1)
    return temperature**2 * per_row.mean()


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Refuse a teacher whose outputs cannot be compared with the student's (another architecture or output width).

    Raises:
        `ValueError`: what differs.
    """
    s, t = getattr(student, "config", None), getattr(teacher, "config", None)
    if s is None or t is None:
        raise ValueError("teacher_model must be a transformers model with a config, like the student")
    if s.model_type != t.model_type:
        raise ValueError(f"the teacher is a {t.model_type} model but the student a {s.model_type}: use the same architecture")
    for name in ("vocab_size", "num_labels"):
        a, b = getattr(s.get_text_config(), name, None), getattr(t.get_text_config(), name, None)
        if a != b:
            raise ValueError(f"the teacher's {name} is {b} but the student's is {a}: distillation needs the same outputs")
