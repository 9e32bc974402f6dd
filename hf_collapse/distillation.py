"""Distillation from a frozen teacher into the student being trained: logits (KL with temperature) and, for a
collapsed student, the hidden states of its kept layers against the teacher's at the same original layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .layers import find_layer_stacks, unwrap_model

__all__ = ["check_teacher", "distillation_loss", "hidden_state_loss", "layer_outputs", "teacher_layer_map"]


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


def _record(model: torch.nn.Module) -> tuple[set[int], int | None]:
    config = unwrap_model(model).config
    removed, original = getattr(config, "collapsed_layers", None), getattr(config, "original_num_hidden_layers", None)
    if isinstance(removed, dict) or isinstance(original, dict):
        raise ValueError("distillation from a teacher of another depth handles one-stack models (this one is an encoder-decoder)")
    return set(removed or []), original


def teacher_layer_map(student: torch.nn.Module, teacher: torch.nn.Module) -> list[tuple[int, int]]:
    """`(student layer, teacher layer)` for every layer of a collapsed student: its index now and the index of the
    same original layer in the teacher (both may have been collapsed; the teacher no more than the student).

    Raises:
        `ValueError`: a teacher whose depth does not match the student's collapse record (teacher layers ≠ student
            layers + the layers removed since the teacher), or a teacher that lacks layers the student still has.
    """
    (s_stack, *more) = find_layer_stacks(unwrap_model(student))
    (t_stack, *more_t) = find_layer_stacks(unwrap_model(teacher))
    if more or more_t:
        raise ValueError("distillation from a teacher of another depth handles one-stack models (this one is an encoder-decoder)")
    removed, original = _record(student)
    t_removed, _ = _record(teacher)
    original = original if original is not None else len(s_stack) + len(removed)
    if not t_removed <= removed:
        raise ValueError(
            f"the teacher lacks layers {sorted(t_removed - removed)} that the student still has (its config.collapsed_layers "
            f"is {sorted(t_removed)}, the student's {sorted(removed)}): distil from the model as it was before the removal"
        )
    expected = len(s_stack) + len(removed - t_removed)
    if len(t_stack) != expected:
        raise ValueError(
            f"the teacher has {len(t_stack)} layers, but the student's collapse record says the model it was cut from "
            f"had {expected} ({len(s_stack)} kept + {len(removed - t_removed)} removed, config.collapsed_layers="
            f"{sorted(removed)}): distil from the model as it was just before the removal"
        )
    position = {layer: index for index, layer in enumerate(i for i in range(original) if i not in t_removed)}
    kept = [i for i in range(original) if i not in removed]
    return [(index, position[layer]) for index, layer in enumerate(kept)]


@contextlib.contextmanager
def layer_outputs(model: torch.nn.Module, store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, every forward pass of `model` leaves each layer's output hidden state in `store[index]`
    (the last pass wins; gradients flow through them)."""
    (stack, *_) = find_layer_stacks(unwrap_model(model))

    def keep(index):
        def hook(module, args, output):
            store[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(stack.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_loss(
    student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], pairs: list[tuple[int, int]],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean over `pairs` of the mean squared difference between the student's hidden state after its layer `s`
    and the teacher's after layer `t`, over real tokens (`mask`, 1 = real) and channels. Zero when they are equal;
    the gradient reaches only the student."""
    losses = []
    for s, t in pairs:
        a, b = student[s].float(), teacher[t].detach().float()
        squared = (a - b).pow(2).mean(-1)
        if mask is not None and mask.shape == squared.shape:
            weights = mask.to(squared.dtype)
            losses.append((squared * weights).sum() / weights.sum().clamp_min(1))
        else:
            losses.append(squared.mean())
    return torch.stack(losses).mean()
