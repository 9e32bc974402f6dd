"""`CollapseConfig`: `TrainingArguments` plus the settings of the MSW penalty."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .msw import SEARCH_MODES

__all__ = ["CollapseConfig"]

NORMALIZATIONS = ("none", "input_rms")


@dataclass
class CollapseConfig(TrainingArguments):
    r"""
    Configuration of [`CollapseTrainer`]: every [`~transformers.TrainingArguments`] field, plus the
    Max-Sliced Wasserstein (MSW) penalty of LaCoOT. The training loss is

        task loss + msw_weight · mean over regularised layers of MSW(layer input, layer output)

    where the clouds are the non-padding tokens of the batch.

    Parameters:
        msw_weight (`float`, *optional*, defaults to `1.0`):
            λ, the weight of the penalty. 0 trains without it (distances are still logged). The paper
            used 0.1–9 depending on the model.
        msw_search (`str`, *optional*, defaults to `"refine"`):
            How the slicing direction is chosen: `"random"` (max over `msw_num_projections` fresh random
            directions, as the paper's code does) or `"refine"` (the best of them, and of the direction kept
            from the previous step, improved by `msw_refine_steps` power-iteration steps).
        msw_num_projections (`int`, *optional*, defaults to `16`):
            Random unit directions drawn per layer and step. With `"refine"` and kept directions, 16 reach the
            long-search maximum on MiniLM and SmolLM2 (`benchmarks/msw_directions.py`); the paper's
            `"random"` search used 50, and reaches about a tenth of the maximum.
        msw_refine_steps (`int`, *optional*, defaults to `2`):
            Refinement steps per layer and step (only with `msw_search="refine"`).
        msw_search_tokens (`int`, *optional*, defaults to `512`):
            The direction is searched on a random subset of at most this many tokens of the batch (the
            distance itself always uses every token). Sorting the projections of every token dominates the
            cost; 0 searches on all tokens.
        msw_keep_directions (`bool`, *optional*, defaults to `True`):
            Offer each layer's best direction of the previous step as a candidate again.
        msw_layers (`list[int]`, *optional*):
            0-based indices of the layers whose distance enters the penalty; default all. Every layer's
            distance is logged either way.
        msw_warmup_steps (`int`, *optional*, defaults to `0`):
            λ grows linearly from 0 to `msw_weight` over this many optimizer steps.
        msw_normalization (`str`, *optional*, defaults to `"none"`):
            `"none"` (raw MSW, as in the paper) or `"input_rms"` (MSW divided by the root-mean-square norm
            of the layer's input tokens, so that layers with massive activations do not dominate the mean).
    """

    msw_weight: float = field(
        default=1.0,
        metadata={"help": "Weight (lambda) of the mean per-layer MSW penalty added to the task loss; 0 or more."},
    )
    msw_search: str = field(
        default="refine",
        metadata={
            "help": "Direction search: 'random' (max over random directions, as in the paper's code) or "
            "'refine' (improve the best one with power-iteration steps).",
            "choices": list(SEARCH_MODES),
        },
    )
    msw_num_projections: int = field(
        default=16,
        metadata={
            "help": "Random unit directions per layer and step; at least 1. 16 is enough with 'refine'; "
            "the paper's 'random' search used 50."
        },
    )
    msw_refine_steps: int = field(
        default=2, metadata={"help": "Refinement steps per layer and step with msw_search=refine; 0 or more."}
    )
    msw_search_tokens: int = field(
        default=512,
        metadata={
            "help": "Search the direction on a random subset of at most this many tokens (the distance itself "
            "always uses every token); 0 searches on all tokens."
        },
    )
    msw_keep_directions: bool = field(
        default=True, metadata={"help": "Reuse each layer's best direction of the previous step as a candidate."}
    )
    msw_layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based indices of the regularised layers (default: all layers)."},
    )
    msw_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which the penalty weight ramps up from 0; 0 or more."}
    )
    msw_normalization: str = field(
        default="none",
        metadata={
            "help": "'none' (raw MSW) or 'input_rms' (MSW divided by the RMS norm of the layer input tokens).",
            "choices": list(NORMALIZATIONS),
        },
    )

    def __post_init__(self):
        if self.msw_weight is None or not self.msw_weight >= 0:  # also rejects NaN
            raise ValueError(f"msw_weight must be a number >= 0, got {self.msw_weight}")
        if self.msw_search not in SEARCH_MODES:
            raise ValueError(f"msw_search must be one of {', '.join(SEARCH_MODES)}; got {self.msw_search!r}")
        if self.msw_num_projections < 1:
            raise ValueError(
                f"msw_num_projections must be at least 1 (the number of random directions), got {self.msw_num_projections}"
            )
        if self.msw_refine_steps < 0:
            raise ValueError(f"msw_refine_steps must be 0 or more, got {self.msw_refine_steps}")
        if self.msw_search_tokens < 0 or self.msw_search_tokens == 1:
            raise ValueError(
                f"msw_search_tokens must be at least 2 (or 0 to search on all tokens), got {self.msw_search_tokens}"
            )
        if self.msw_warmup_steps < 0:
            raise ValueError(f"msw_warmup_steps must be 0 or more, got {self.msw_warmup_steps}")
        if self.msw_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"msw_normalization must be one of {', '.join(NORMALIZATIONS)}; got {self.msw_normalization!r}"
            )
        if self.msw_layers is not None:
            if len(self.msw_layers) == 0:
                raise ValueError("msw_layers is empty: leave it unset to regularise every layer, or name at least one")
            if any(i < 0 for i in self.msw_layers):
                raise ValueError(f"msw_layers are 0-based layer indices and cannot be negative: {self.msw_layers}")
            if len(set(self.msw_layers)) != len(self.msw_layers):
                raise ValueError(f"msw_layers names a layer twice: {self.msw_layers}")
        super().__post_init__()
