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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.distill_weight > 0:  # refused now, not at the first distillation step after the warm-up
            raise ValueError(
                "distill_weight > 0 needs the student's logits, which CollapseSFTTrainer's loss (TRL's fused LM head) "
                "never builds: set distill_weight: 0, or distil with CollapseTrainer"
            )
