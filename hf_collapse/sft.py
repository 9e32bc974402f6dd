"""The penalty on TRL's `SFTTrainer`: `CollapseSFTTrainer` and `CollapseSFTConfig` (needs the `trl` extra)."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .config import MSWArguments
from .trainer import MSWPenaltyMixin

__all__ = ["CollapseSFTConfig", "CollapseSFTTrainer"]


@dataclass
class CollapseSFTConfig(MSWArguments, SFTConfig):
    r"""TRL's [`~trl.SFTConfig`] plus the [`MSWArguments`] fields (penalty, target depth, fading, distillation).

    Distillation needs the student's logits, which TRL's fused LM head does not build: keep `distill_weight` 0
    with the default loss.
    """


class CollapseSFTTrainer(MSWPenaltyMixin, SFTTrainer):
    """TRL's [`~trl.SFTTrainer`] with LaCoOT's MSW penalty ([`MSWPenaltyMixin`]); takes a [`CollapseSFTConfig`]."""

    _tag_names = [*SFTTrainer._tag_names, "hf-collapse", "lacoot"]
