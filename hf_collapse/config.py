"""The settings of the MSW penalty and of target-depth training, as a mixin for any `TrainingArguments`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .choice import LayerChoice, check_layer_list, check_num_layers, check_protect
from .msw import NORMALIZATIONS, SEARCH_MODES
from .repair import REPAIRS
from .scoring import SCORING_METHODS

__all__ = ["MSW_WEIGHT_MAX", "CollapseConfig", "MSWArguments", "shown", "steps_of"]

# The largest λ a config accepts (the adaptation never doubles it past this either). The paper used 0.1–9; far
# above this bound the penalty swamps the task loss and λ · penalty can overflow the loss's float type.
MSW_WEIGHT_MAX = 1e4
SHOWN_MAX = 80
TARGET_CHOICES = ("measured", "score", "block", "post_hoc")
HEAL_SCOPES = ("full", "lora", "adjacent")


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """`repr(value)` cut to `limit` characters, for quoting a user's value in an error message (a value built from
    YAML aliases can be huge; the message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def steps_of(value: float, total: int) -> int:
    """A step count given as an integer (>= 1) or as a fraction of `total` (in [0, 1)), as `warmup_steps` is."""
    return int(value) if value >= 1 else math.ceil(total * value)


@dataclass
class MSWArguments:
    r"""
    The fields of LaCoOT's Max-Sliced Wasserstein (MSW) penalty and of target-depth training, to be mixed
    into any [`~transformers.TrainingArguments`] subclass (`CollapseConfig` = this + `TrainingArguments`;
    `CollapseSFTConfig` = this + TRL's `SFTConfig`). The training loss is

        task loss + λ · mean over regularised layers of MSW(layer input, layer output)
                  [+ distill_weight · T² · KL(teacher ‖ student)]

    where the clouds are the non-padding tokens of the batch.

    Without a target depth every layer (or `msw_layers`) is regularised alike, as in the paper. With a target
    depth (`collapse_num_layers` or `collapse_layers`), training prepares *those* layers for removal: from
    `target_choice_steps` on, only the targets are penalised (λ ramped over `msw_warmup_steps` and, with
    `msw_adaptive`, adapted to their measured bypass cost), their residual update can be faded to exactly
    zero (`fade_steps`), and the rest of the network can be distilled from the model as it was when the
    targets were chosen (`distill_weight`). What training targeted is what the collapse removes.

    Parameters:
        msw_weight (`float`, *optional*, defaults to `0.03`):
            λ, the weight of the penalty (the starting λ when it adapts). 0 trains without it (distances are
            still logged). The paper used 0.1–9 (raw distances, CNNs trained from scratch). The default, with
            `msw_normalization="input_rms"`, is the strongest uniform penalty that kept SmolLM2-135M's validation
            perplexity within 10 % of a vanilla fine-tune (`benchmarks/penalty_default.py`: test 1.06×; λ 0.1
            already 1.6×; raw λ 0.3 9.8×).
        msw_search (`str`, *optional*, defaults to `"refine"`):
            How the slicing direction is chosen: `"random"` (max over `msw_num_projections` fresh random
            directions, as the paper's code does) or `"refine"` (the best of them, and of the direction kept
            from the previous step, improved by `msw_refine_steps` power-iteration steps).
        msw_num_projections (`int`, *optional*, defaults to `16`):
            Random unit directions drawn per layer and step (`benchmarks/msw_directions.py` compares them).
        msw_refine_steps (`int`, *optional*, defaults to `2`):
            Refinement steps per layer and step (only with `msw_search="refine"`).
        msw_search_tokens (`int`, *optional*, defaults to `512`):
            The direction is searched on a random subset of at most this many tokens of the batch (the
            distance itself always uses every token); 0 searches on all tokens.
        msw_keep_directions (`bool`, *optional*, defaults to `True`):
            Offer each layer's best direction of the previous step as a candidate again.
        msw_layers (`list[int]`, *optional*):
            0-based indices of the layers whose distance enters the uniform penalty; default all. Every
            layer's distance is logged either way. Not used with a target depth (the targets are penalised).
        msw_warmup_steps (`int`, *optional*, defaults to `0`):
            λ grows linearly from 0 over this many optimizer steps (counted from the target choice when
            there is a target depth).
        msw_normalization (`str`, *optional*, defaults to `"input_rms"`):
            `"input_rms"` (MSW divided by the root-mean-square norm of the layer's input tokens, so that layers
            with massive activations do not dominate the mean) or `"none"` (raw MSW, as in the paper; on an LLM
            its scale is set by a few layers, and at the paper's λ it wrecks the model).
        msw_mask_key (`str`, *optional*):
            The input that marks real tokens (1) and padding (0); default the model's (`attention_mask`).
            Without that input in a batch (padding-free packing), every token is a sample.
        collapse_num_layers (`int`, *optional*):
            Target depth: how many layers to remove. With `target_choice` other than `"post_hoc"`, training
            chooses that many targets at `target_choice_steps` and prepares them for removal.
        collapse_layers (`list[int]`, *optional*):
            The layers to remove (0-based), given explicitly; training targets them from `target_choice_steps`.
        collapse_protect_first, collapse_protect_last (`int`, *optional*, defaults to `0`):
            Never target or remove the first / last this many layers.
        target_choice (`str`, *optional*, defaults to `"measured"`):
            How targets are chosen when only their number is given: `"measured"` (greedily, the layer whose
            bypass raises the task loss least on `target_choice_samples` evaluation rows), `"score"` (the lowest
            MSW distances on those rows), `"block"` (every run of `collapse_num_layers` consecutive allowed layers,
            measured by the task loss on those rows with the run bypassed and, with `target_repair`, its map, fitted
            for every run in one pass over the repair rows, applied; the best run is targeted and, with a repair,
            folded with the very map it was measured with: ReplaceMe's setting, `collapse_strategy: block` at the
            choice step) or `"post_hoc"` (no targeting: uniform penalty, layers chosen after training, as in the
            paper).
        target_score (`str`, *optional*, defaults to `"msw"`):
            The score that `target_choice="score"` ranks by: `"msw"`, `"block_influence"` (ShortGPT) or `"angular"`.
            With `target_choice_steps=0` and `fade_steps=1` this is prune-then-fine-tune: the lowest-scoring layers
            of the pretrained model are bypassed from the first step and removed at the end.
        target_choice_steps (`float`, *optional*, defaults to `0.3`):
            When targeting starts: an optimizer step (>= 1) or a fraction of the training steps (< 1). Before
            it the model is fine-tuned without the penalty (every layer's distance is still logged).
        target_choice_samples (`int`, *optional*, defaults to `128`):
            Evaluation rows on which bypass costs are measured (target choice and λ adaptation).
        target_choice_candidates (`int`, *optional*, defaults to `8`):
            After the first round of single-layer costs, each further greedy round measures only this many of
            the cheapest remaining layers (so a 30-layer model costs tens of evaluations, not hundreds).
        msw_adaptive (`bool`, *optional*, defaults to `True`):
            With targets, adapt λ every `msw_adapt_steps`: double it while bypassing the targets still raises the
            evaluation loss by more than `msw_adapt_tolerance` (relative), halve it when the full model's
            evaluation loss has risen by more than that since the choice. The applied schedule is recorded.
        msw_adapt_steps (`int`, *optional*, defaults to `20`):
            Optimizer steps between two adaptations.
        msw_adapt_tolerance (`float`, *optional*, defaults to `0.02`):
            Relative loss increase treated as "costs too much" by the adaptation.
        fade_steps (`float`, *optional*, defaults to `0`):
            Fade the targets' residual update `out - in` linearly to exactly zero over this many optimizer steps
            (or fraction of training) starting at the target choice, so the rest of the network learns to work
            without them inside the budget; 0 does not fade. Must end by the last training step.
        target_repair (`str`, *optional*, defaults to `"none"`):
            Repair the cut at the target choice, then fine-tune without the targets (prune, repair, fine-tune):
            fit a map for each targeted span on `target_repair_samples` training rows (`"scale"`, `"linear"` or
            `"transport"`, see [`fit_repair`]), fold it into the last kept layer before the span (verified on a probe),
            and bypass the targets from the choice step itself; the collapse after training removes them without a
            second repair. Needs `fade_steps=1` (the cut is immediate). The map is folded only if the choice rows
            score the repaired cut no worse than the unrepaired one (else it is undone and recorded as declined).
            Refused for quantized weights, DeepSpeed and FSDP (the fold edits full-precision weights in place).
        target_repair_samples (`int`, *optional*, defaults to `256`):
            Training rows the repair at the choice is fitted on (a `linear` or `transport` map needs at least one
            token per hidden channel).
        distill_weight (`float`, *optional*, defaults to `0`):
            Weight of a logit distillation term (KL with temperature) from a frozen teacher: the model as it was
            at the target choice (or the `teacher_model` given to the trainer). Costs one frozen copy of the
            weights and one no-grad forward per step. 0 = no distillation.
        distill_temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of the distillation term.
        heal_steps (`int`, *optional*, defaults to `0`):
            Optimizer steps of fine-tuning after the layers are removed ([`heal`]); they come on top of
            `max_steps` and are recorded in the card. 0 = no healing.
        distill_hidden_weight (`float`, *optional*, defaults to `0`):
            During healing from a teacher: weight of the mean squared difference between the hidden state after
            each kept layer of the student and the teacher's after the same layer (at its index before the
            removal), on real tokens. Used only while nothing is targeted (healing); 0 = logits only.
        heal_scope (`str`, *optional*):
            What healing trains: `"full"` (every weight), `"lora"` (LoRA adapters, merged back; needs the run's
            `peft_config`) or `"adjacent"` (only the kept layers next to each removed span, and the head: final norm,
            `lm_head` or classifier; see [`adjacent_parameter_names`]). Unset: `"lora"` when the run trains LoRA
            adapters, else `"full"`.
    """

    msw_weight: float = field(
        default=0.03,
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
        metadata={"help": "0-based indices of the layers of the uniform penalty (default: all layers)."},
    )
    msw_warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps over which the penalty weight ramps up from 0; 0 or more."}
    )
    msw_normalization: str = field(
        default="input_rms",
        metadata={
            "help": "'input_rms' (MSW divided by the RMS norm of the layer input tokens) or 'none' (raw MSW).",
            "choices": list(NORMALIZATIONS),
        },
    )
    msw_mask_key: str | None = field(
        default=None,
        metadata={"help": "Input that marks real tokens (default: the model's attention_mask); absent = all real."},
    )
    collapse_num_layers: int | None = field(
        default=None, metadata={"help": "Target depth: remove this many layers (training prepares them)."}
    )
    collapse_layers: list[int] | None = field(
        default=None, metadata={"help": "Remove exactly these 0-based layers (training targets them)."}
    )
    collapse_protect_first: int = field(default=0, metadata={"help": "Never target or remove the first this many layers."})
    collapse_protect_last: int = field(default=0, metadata={"help": "Never target or remove the last this many layers."})
    target_choice: str = field(
        default="measured",
        metadata={
            "help": "How targets are chosen: measured (least bypass cost), score (lowest MSW), block (the run of "
            "consecutive layers with the least bypass cost, its target_repair applied), or post_hoc (no targeting; "
            "choose after training).",
            "choices": list(TARGET_CHOICES),
        },
    )
    target_score: str = field(
        default="msw",
        metadata={"help": "The score of target_choice: score (msw, block_influence or angular).", "choices": list(SCORING_METHODS)},
    )
    target_choice_steps: float = field(
        default=0.3, metadata={"help": "When targeting starts: a step (>= 1) or a fraction of training (< 1)."}
    )
    target_choice_samples: int = field(
        default=128, metadata={"help": "Evaluation rows for measuring bypass costs (choice and adaptation)."}
    )
    target_choice_candidates: int = field(
        default=8, metadata={"help": "Layers measured per greedy round after the first; at least 1."}
    )
    msw_adaptive: bool = field(
        default=True, metadata={"help": "With targets, adapt lambda to the measured bypass cost (recorded)."}
    )
    msw_adapt_steps: int = field(default=20, metadata={"help": "Optimizer steps between adaptations of lambda."})
    msw_adapt_tolerance: float = field(
        default=0.02, metadata={"help": "Relative evaluation-loss increase that the adaptation treats as too much."}
    )
    fade_steps: float = field(
        default=0,
        metadata={"help": "Fade the targets to zero over this many steps (or fraction) after the choice; 0: no fade."},
    )
    target_repair: str = field(
        default="none",
        metadata={
            "help": "Repair the cut at the target choice and fine-tune without the targets (needs fade_steps 1): "
            "none, scale, linear or transport.",
            "choices": list(REPAIRS),
        },
    )
    target_repair_samples: int = field(
        default=256, metadata={"help": "Training rows the repair at the target choice is fitted on; at least 1."}
    )
    distill_weight: float = field(
        default=0.0, metadata={"help": "Weight of logit distillation from the frozen teacher; 0: none."}
    )
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the distillation term; > 0."})
    heal_steps: int = field(
        default=0, metadata={"help": "Fine-tuning steps after the layers are removed (on top of max_steps); 0: none."}
    )
    distill_hidden_weight: float = field(
        default=0.0,
        metadata={"help": "Healing: weight of the MSE between kept layers' hidden states and the teacher's; 0: none."},
    )
    heal_scope: str | None = field(
        default=None,
        metadata={"help": "What healing trains: full, lora or adjacent (layers next to the cut + head).", "choices": list(HEAL_SCOPES)},
    )

    @property
    def has_target(self) -> bool:
        """Whether training prepares specific layers for removal (a target depth that is not post hoc)."""
        wants = self.collapse_layers is not None or self.collapse_num_layers is not None
        return wants and self.target_choice != "post_hoc"

    def __post_init__(self):
        def finite(name: str, low: float = 0.0, strict: bool = False) -> None:
            value = getattr(self, name)
            ok = value is not None and math.isfinite(value) and (value > low if strict else value >= low)
            if not ok:
                raise ValueError(
                    f"{name} must be a number {'>' if strict else '>='} {low:g} (and finite), got {shown(value)}"
                )

        self._check_training_numbers()
        for name in ("msw_weight", "msw_adapt_tolerance", "distill_weight", "distill_hidden_weight", "fade_steps",
                     "target_choice_steps"):
            finite(name)
        finite("distill_temperature", strict=True)
        if not self.msw_weight <= MSW_WEIGHT_MAX:
            raise ValueError(
                f"msw_weight must be at most {MSW_WEIGHT_MAX:g}, got {shown(self.msw_weight)}: a larger λ swamps the "
                "task loss (the paper used 0.1–9)"
            )
        if self.msw_search not in SEARCH_MODES:
            raise ValueError(f"msw_search must be one of {', '.join(SEARCH_MODES)}; got {self.msw_search!r}")
        projections = self.msw_num_projections
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise ValueError(
                f"msw_num_projections must be at least 1, a whole number (the random directions drawn per layer and "
                f"step; the paper's msw_search: random drew 50), got {shown(projections)}"
            )
        if self.msw_search_tokens < 0 or self.msw_search_tokens == 1:
            raise ValueError(
                f"msw_search_tokens must be at least 2 (or 0 to search on all tokens), got {self.msw_search_tokens}"
            )
        for name in ("msw_refine_steps", "msw_warmup_steps", "heal_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("msw_adapt_steps", "target_choice_samples", "target_choice_candidates", "target_repair_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.msw_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"msw_normalization must be one of {', '.join(NORMALIZATIONS)}; got {self.msw_normalization!r}"
            )
        if self.target_score not in SCORING_METHODS:
            raise ValueError(f"target_score must be one of {', '.join(SCORING_METHODS)}; got {self.target_score!r}")
        if self.heal_scope is not None and self.heal_scope not in HEAL_SCOPES:
            raise ValueError(f"heal_scope must be one of {', '.join(HEAL_SCOPES)} (or unset); got {self.heal_scope!r}")
        if self.target_choice not in TARGET_CHOICES:
            raise ValueError(f"target_choice must be one of {', '.join(TARGET_CHOICES)}; got {self.target_choice!r}")
        for name in ("msw_layers", "collapse_layers"):
            check_layer_list(name, getattr(self, name))
        check_num_layers(self.collapse_num_layers)
        check_protect(self.collapse_protect_first, self.collapse_protect_last)
        if self.collapse_layers is not None and self.collapse_num_layers is not None:
            if len(self.collapse_layers) != self.collapse_num_layers:
                raise ValueError(
                    f"collapse_layers names {len(self.collapse_layers)} layers but collapse_num_layers is "
                    f"{self.collapse_num_layers}: set one of them"
                )
        if self.has_target and self.msw_layers is not None:
            raise ValueError(
                "msw_layers selects the layers of the uniform penalty; with a target depth the targets are penalised: "
                "unset msw_layers, or set target_choice: post_hoc"
            )
        if not self.has_target:
            if self.fade_steps:
                raise ValueError(
                    "fade_steps fades targeted layers: set collapse_num_layers or collapse_layers (with target_choice "
                    "measured or score), or leave fade_steps at 0"
                )
        self._check_target_repair()
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.has_target and getattr(self, "max_steps", 0) > 0:
            self.check_schedule(self.max_steps)

    def _check_target_repair(self) -> None:
        """`target_repair` acts only as the immediate cut of prune, repair, fine-tune."""
        if self.target_repair not in REPAIRS:
            raise ValueError(f"target_repair must be one of {', '.join(REPAIRS)}; got {shown(self.target_repair)}")
        if self.target_repair == "none":
            return
        if not self.has_target:
            raise ValueError(
                f"target_repair: {self.target_repair} repairs the cut of targeted layers: set collapse_num_layers or "
                "collapse_layers (with target_choice measured or score), or leave target_repair at none"
            )
        if (0 in self.collapse_layers) if self.collapse_layers is not None else self.collapse_protect_first < 1:
            raise ValueError(
                f"target_repair: {self.target_repair} folds each map into the last kept layer before its span, and layer 0 "
                "could be targeted, with no layer before it: set collapse_protect_first: 1 or more (or leave layer 0 out "
                "of collapse_layers)"
            )
        if self.fade_steps != 1:
            raise ValueError(
                f"target_repair: {self.target_repair} replaces the targets by a fitted map at the choice, so they are cut "
                f"at once, and fade_steps is {shown(self.fade_steps)}: set fade_steps: 1 (a gradual fade would keep part "
                "of the layers on top of the map; with fade_steps: 0 and collapse_repair the cut is repaired after training)"
            )

    def _check_training_numbers(self) -> None:
        """The `TrainingArguments` numbers the library relies on (when the class mixes them in), refused before any
        model loads: transformers accepts several of them and fails later, or silently trains nothing."""
        def number(name: str, low: float, strict: bool, what: str) -> None:
            value = getattr(self, name, None)
            if value is None:
                return
            ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
            if not ok:
                raise ValueError(f"{name} must be {what}, got {shown(value)}")

        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            number(name, 1, False, "at least 1")
        # 0 is allowed: a run that trains nothing on purpose (a baseline that keeps the weights) is legitimate
        number("learning_rate", 0, False, "a finite number >= 0")
        for name in ("num_train_epochs", "weight_decay", "warmup_steps"):
            number(name, 0, False, "a finite number >= 0")
        max_steps = getattr(self, "max_steps", None)
        if max_steps is None:
            return
        if max_steps == 0:
            raise ValueError("max_steps must be at least 1 (or -1 to train for num_train_epochs), got 0")
        if max_steps < 0 and not getattr(self, "num_train_epochs", 0) > 0:
            raise ValueError(
                f"max_steps is {max_steps} (train by epochs) but num_train_epochs is "
                f"{shown(getattr(self, 'num_train_epochs', None))}: set max_steps >= 1 or num_train_epochs above 0"
            )

    def target_choice_of(self) -> LayerChoice:
        """The [`LayerChoice`] of the target depth: the given `collapse_layers`, or `collapse_num_layers` chosen by
        measurement among `target_choice_candidates` per round, with the protected layers."""
        return LayerChoice(
            layers=self.collapse_layers, num_layers=None if self.collapse_layers else self.collapse_num_layers,
            protect_first=self.collapse_protect_first, protect_last=self.collapse_protect_last,
            candidates=self.target_choice_candidates,
        )

    def check_schedule(self, total_steps: int) -> None:
        """Refuse a target schedule that does not fit in `total_steps` optimizer steps."""
        start = steps_of(self.target_choice_steps, total_steps)
        if start >= total_steps:
            raise ValueError(
                f"targeting starts at step {start} but training has only {total_steps} steps: lower "
                "target_choice_steps (a fraction such as 0.3 scales with the budget) or train longer"
            )
        end = start + steps_of(self.fade_steps, total_steps) if self.fade_steps else start
        if end > total_steps:
            raise ValueError(
                f"the fade would end at step {end}, after the last of {total_steps} training steps: lower fade_steps "
                "or target_choice_steps"
            )


@dataclass
class CollapseConfig(MSWArguments, TrainingArguments):
    r"""
    Configuration of [`CollapseTrainer`]: every [`~transformers.TrainingArguments`] field plus the fields of
    [`MSWArguments`] (the MSW penalty, target depth, fading, distillation and healing).
    """
