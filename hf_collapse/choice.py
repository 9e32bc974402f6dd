"""Which layers go: the choice as one value object, its checks, and the one greedy bypass routine.

Every way of asking for a removal builds a [`LayerChoice`]: a recipe (`collapse_layers`, `collapse_num_layers`,
`collapse_tolerance` and the other `collapse_*` fields), `hf-collapse collapse` (`--layers`, `--num-layers`,
`--tolerance`), [`collapse_model`] and the trainer's target choice. Each setting is checked by one function of this
module, and the checks against a model's depth (layers that exist, the protected layers, the budget) by
[`LayerChoice.removable`] and [`LayerChoice.check_depth`], whoever asks. Messages name the recipe fields
(`collapse_num_layers`); the Python keyword is the same name without the `collapse_` prefix.

[`greedy_bypass`] is the measured choice: bypass one more layer at a time and keep the one whose bypass hurts a
measurement least. The trainer's target choice (on the evaluation loss) and the post-training choice (on a
validation metric, with or without a tolerance) both run it. The `block` strategy instead measures every run of
`num_layers` consecutive removable layers ([`contiguous_blocks`]) at once, with the repair applied when there is one
(ReplaceMe's setting: one span, one map), and removes the best.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "SELECTION_STRATEGIES",
    "GreedyResult",
    "LayerChoice",
    "check_layer_list",
    "contiguous_blocks",
    "greedy_bypass",
    "layer_index",
    "removable_layers",
    "selection_sentence",
]

SELECTION_STRATEGIES = ("ranked", "measured", "block")


def layer_index(value: object) -> int:
    """A 0-based layer index as an `int`; a bool, a float or a string is refused, not coerced."""
    # operator.index accepts ints (numpy and 0-d integer tensors too) but not 1.5 or "3", which int() would coerce.
    if isinstance(value, bool):
        raise ValueError(f"layer index {value!r} is a bool: give 0-based integer layer indices")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"layer index {value!r} is not an integer: give 0-based integer layer indices") from None


def check_layer_list(name: str, value: Sequence[int] | None) -> None:
    """A list of layers named by a setting (`collapse_layers`, `msw_layers`): not empty, not negative, no repeats."""
    if value is None:
        return
    if len(value) == 0:
        raise ValueError(f"{name} is empty: leave it unset, or name at least one layer")
    indices = [layer_index(i) for i in value]
    if any(i < 0 for i in indices):
        raise ValueError(f"{name} are 0-based layer indices and cannot be negative: {list(value)}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name} names a layer twice: {list(value)}")


def check_num_layers(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"collapse_num_layers must be at least 1 (or left unset), got {value}")


def check_tolerance(value: float | None) -> None:
    if value is not None and not value >= 0:  # also catches nan
        raise ValueError(f"collapse_tolerance must be a number >= 0 (in the metric's units), got {value}")


def check_protect(first: int, last: int) -> None:
    for name, value in (("collapse_protect_first", first), ("collapse_protect_last", last)):
        if value < 0:
            raise ValueError(f"{name} must be 0 or more, got {value}")


def check_candidates(value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"collapse_candidates must be at least 1 (or left unset), got {value}")


def check_strategy(value: str) -> None:
    if value not in SELECTION_STRATEGIES:
        raise ValueError(f"collapse_strategy must be one of {', '.join(SELECTION_STRATEGIES)}; got {value!r}")


def removable_layers(depth: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """The layers of a `depth`-layer stack that are not protected, in index order: the one computation of the
    protected-layer budget.

    Raises:
        `ValueError`: a negative protection, or one that covers every layer.
    """
    check_protect(protect_first, protect_last)
    removable = list(range(protect_first, depth - protect_last))
    if not removable:
        raise ValueError(
            f"collapse_protect_first={protect_first} and collapse_protect_last={protect_last} protect all {depth} "
            "layers: nothing is left to remove"
        )
    return removable


def contiguous_blocks(removable: Sequence[int], size: int) -> list[list[int]]:
    """Every run of `size` consecutive layers that are all in `removable`, in index order."""
    allowed = set(removable)
    return [list(range(first, first + size)) for first in sorted(allowed)
            if all(layer in allowed for layer in range(first, first + size))]


@dataclass(frozen=True)
class LayerChoice:
    """Which layers to remove, in one validated object.

    Exactly one of `layers`, `num_layers` and `tolerance` says what goes; the other fields say how a number or a
    tolerance is chosen. A recipe sets the same fields with a `collapse_` prefix (`collapse_num_layers`, ...).

    Args:
        layers (`Sequence[int]`, *optional*): remove exactly these 0-based layers.
        num_layers (`int`, *optional*): remove this many layers.
        tolerance (`float`, *optional*): remove layers while the validation metric stays within this of the full
            model's (in the metric's units).
        protect_first, protect_last (`int`, defaults to 0): never remove the first / last this many layers.
        candidates (`int`, *optional*): with `strategy="measured"`, each step measures only this many of the
            lowest-scoring remaining layers (default: all of them).
        strategy (`str`, defaults to `"measured"`): `"ranked"` removes layers in score order; `"measured"` removes,
            one at a time, the candidate whose bypass hurts the validation metric least; `"block"` (with
            `num_layers`) measures every run of `num_layers` consecutive removable layers bypassed, with the repair
            fitted and applied when [`collapse_model`] has one, and removes the best run.

    Raises:
        `ValueError`: not exactly one of `layers`, `num_layers` and `tolerance`, or a value out of range.
    """

    layers: tuple[int, ...] | None = None
    num_layers: int | None = None
    tolerance: float | None = None
    protect_first: int = 0
    protect_last: int = 0
    candidates: int | None = None
    strategy: str = "measured"

    def __post_init__(self):
        given = [name for name in ("layers", "num_layers", "tolerance") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of layers, num_layers and tolerance (in a recipe: set exactly one of collapse_layers, "
                f"collapse_num_layers, collapse_tolerance, or collapse: false to only train); got {', '.join(given) or 'none'}"
            )
        check_layer_list("collapse_layers", self.layers)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(layer_index(i) for i in self.layers))
        check_num_layers(self.num_layers)
        check_tolerance(self.tolerance)
        check_protect(self.protect_first, self.protect_last)
        check_candidates(self.candidates)
        check_strategy(self.strategy)
        if self.candidates is not None and self.strategy != "measured":
            raise ValueError("collapse_candidates only applies to strategy='measured': drop it or switch strategy")
        if self.strategy == "block" and self.num_layers is None and self.layers is None:
            raise ValueError("collapse_strategy 'block' removes one run of collapse_num_layers consecutive layers: set "
                             "collapse_num_layers instead of collapse_tolerance, or use strategy 'measured'")

    @property
    def given(self) -> bool:
        """Whether the layers are named (no data or measurement needed to choose them)."""
        return self.layers is not None

    @property
    def needs_metric(self) -> bool:
        """Whether choosing evaluates the model with layers bypassed (a measured choice or a tolerance)."""
        return not self.given and (self.strategy in ("measured", "block") or self.tolerance is not None)

    def removable(self, depth: int) -> list[int]:
        """The layers of a `depth`-layer stack that the protection leaves removable (see [`removable_layers`])."""
        return removable_layers(depth, self.protect_first, self.protect_last)

    def check_depth(self, depth: int) -> list[int]:
        """Check the choice against a stack of `depth` layers; returns the removable layers.

        Raises:
            `ValueError`: a named layer that does not exist, is protected or leaves no layer; a number of layers
                that leaves none or exceeds the unprotected ones; protection of every layer.
        """
        removable = self.removable(depth)
        if self.layers is not None:
            missing = sorted(i for i in self.layers if i >= depth)
            if missing:
                raise ValueError(
                    f"collapse_layers {missing} do not exist: the model has {depth} layers, numbered 0-{depth - 1}"
                )
            if len(self.layers) >= depth:
                raise ValueError(f"removing all {depth} layers would leave none: name at most {depth - 1}")
            protected = sorted(set(self.layers) - set(removable))
            if protected:
                raise ValueError(
                    f"collapse_layers {protected} are protected (collapse_protect_first={self.protect_first}, "
                    f"collapse_protect_last={self.protect_last}): only layers {removable[0]}-{removable[-1]} may be removed"
                )
        if self.num_layers is not None:
            if self.num_layers >= depth:
                raise ValueError(
                    f"collapse_num_layers {self.num_layers} would remove all of the model's {depth} layers or more, which "
                    f"would leave none: ask for at most {depth - 1}"
                )
            if self.num_layers > len(removable):
                raise ValueError(
                    f"collapse_num_layers {self.num_layers}, but only {len(removable)} of the model's {depth} layers are "
                    f"not protected (collapse_protect_first={self.protect_first}, collapse_protect_last="
                    f"{self.protect_last}): lower it or protect fewer layers"
                )
        return removable


@dataclass(frozen=True)
class GreedyResult:
    """What [`greedy_bypass`] chose.

    Attributes:
        layers (`tuple[int, ...]`): the chosen layers, in the order they were chosen.
        curve (`tuple[tuple[tuple[int, ...], float], ...]`): `(layers bypassed, measurement)` per step; with a
            baseline, the first entry is `((), baseline)`; when a tolerance ended the loop, the last entry is the
            step that broke it (its layer is not chosen).
        trials (`tuple[tuple[int, tuple[int, ...], float], ...]`): every measurement as `(step, layers, value)`,
            step 0 being the baseline.
    """

    layers: tuple[int, ...]
    curve: tuple[tuple[tuple[int, ...], float], ...]
    trials: tuple[tuple[int, tuple[int, ...], float], ...]

    @property
    def evaluations(self) -> int:
        return len(self.trials)


def greedy_bypass(
    measure: Callable[[list[int]], float],
    order: Sequence[int],
    steps: int,
    *,
    pool: int | None = None,
    rerank: bool = False,
    higher_is_better: bool = True,
    tolerance: float = math.inf,
    baseline: bool = True,
) -> GreedyResult:
    """Choose up to `steps` layers one at a time: each step measures the candidates with the layers chosen so far
    bypassed too, and keeps the one whose value is best.

    Args:
        measure (`Callable[[list[int]], float]`): the measurement with these layers bypassed (a validation metric or
            an evaluation loss).
        order (`Sequence[int]`): the candidate layers, most promising first (ties go to the earlier one).
        steps (`int`): the most layers to choose.
        pool (`int`, *optional*): how many of the first remaining candidates each step measures; default all.
        rerank (`bool`, defaults to `False`): the first step measures every candidate alone, and later steps take the
            `pool` candidates whose single-layer value was best (the trainer's target choice).
        higher_is_better (`bool`, defaults to `True`): the direction of the measurement.
        tolerance (`float`, defaults to `inf`): stop before a step whose best value is worse than the baseline by
            more than this (needs `baseline`).
        baseline (`bool`, defaults to `True`): measure the model with nothing bypassed first.
    """
    sign = 1.0 if higher_is_better else -1.0
    trials: list[tuple[int, tuple[int, ...], float]] = []

    def run(step: int, layers: list[int]) -> float:
        value = float(measure(layers))
        if not math.isfinite(value):
            raise ValueError(f"the measurement returned {value} with layers {layers} bypassed: it must be a finite number")
        trials.append((step, tuple(layers), value))
        return value

    curve: list[tuple[tuple[int, ...], float]] = []
    reference = run(0, []) if baseline else None
    if reference is not None:
        curve.append(((), reference))
    order, chosen = list(order), []
    while len(chosen) < min(steps, len(order)):
        remaining = [i for i in order if i not in chosen]
        width = len(remaining) if rerank and not chosen else pool
        step_trials = [(run(len(chosen) + 1, [*chosen, i]), i) for i in remaining[:width]]
        value, layer = max(step_trials, key=lambda trial: sign * trial[0])  # max keeps the first of equals
        if rerank and not chosen:
            single = {i: v for v, i in step_trials}
            order = sorted(order, key=lambda i: -sign * single[i])  # stable: ties keep the given order
        curve.append(((*chosen, layer), value))
        if reference is not None and sign * (reference - value) > tolerance:
            break
        chosen.append(layer)
    return GreedyResult(layers=tuple(chosen), curve=tuple(curve), trials=tuple(trials))


def selection_sentence(choice: LayerChoice | None = None, *, metric_name: str = "metric", targeted: str | None = None,
                       repair: str = "none") -> str:
    """How the layers were chosen, as a clause for the card (`repair`: the repair a `block` choice measured with)."""
    if targeted is not None:
        return f"training targeted the layers it removed ({targeted})"
    if choice.given:
        return "the layers to remove were given"
    if choice.strategy == "block":
        applied = f", its {repair} repair fitted and applied," if repair != "none" else ""
        return (f"every run of {choice.num_layers} consecutive removable layers was bypassed{applied} and measured on "
                f"validation {metric_name}, and the best run was chosen")
    pool = f"among the {choice.candidates} lowest-scoring ones" if choice.candidates else "among all"
    measured = f"each time the remaining layer ({pool}) whose bypass hurt validation {metric_name} least"
    if choice.num_layers is not None:
        if choice.strategy == "ranked":
            return f"the {choice.num_layers} lowest-scoring layers were chosen"
        return f"{choice.num_layers} layers were chosen one at a time, {measured}"
    within = f"while validation {metric_name} stayed within {choice.tolerance} of the full model"
    if choice.strategy == "ranked":
        return f"layers were chosen in score order {within}"
    return f"layers were chosen one at a time, {measured}, {within}"
