"""Score each layer on calibration data, then choose the layers to remove.

Scoring is one forward pass over calibration batches with the hooks of [`LayerCapture`], which hand
over each layer's input and output as clouds of real (non-padding) tokens. Low score = more
removable. Three scores are offered:

* ``"msw"`` (LaCoOT): the max-sliced Wasserstein-2 distance between the layer's input and output
  clouds of a batch, averaged over batches weighted by their number of tokens.
* ``"block_influence"`` (ShortGPT): the mean over tokens of ``1 - cos(input, output)``.
* ``"angular"`` (Gromov et al.): the mean over tokens of ``arccos(cos(input, output)) / pi``.

Choosing is a budget (the ``k`` lowest scores), an explicit list, or the paper's tolerance loop,
which evaluates a user metric with the candidate layers bypassed ([`bypass_layers`]) and stops once
the metric drops more than the tolerance. All policies can protect the first and last layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers.utils.logging import tqdm

from .choice import SELECTION_STRATEGIES, greedy_bypass, removable_layers
from .data import right_pad
from .layers import (
    LayerCapture,
    LayerStack,
    bypass_layers,
    check_layer_indices,
    eval_mode,
    find_layer_stacks,
)
from .msw import NORMALIZATIONS, DirectionSearch, max_sliced_wasserstein

__all__ = [
    "SCORING_METHODS",
    "SELECTION_STRATEGIES",
    "LayerScores",
    "ScoreSums",
    "ToleranceSelection",
    "bypassed_metric",
    "finite_metric",
    "score_layers",
    "select_by_tolerance",
    "select_explicit",
    "select_lowest",
]

SCORING_METHODS = ("msw", "block_influence", "angular")
# Token-level columns a padding collator knows how to pad; other columns (text, labels) are dropped.
_TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
# A dict whose main input has this many dimensions is a batch, not a row (token ids, images).
_BATCH_DIMS = {"input_ids": 2, "pixel_values": 4}


@dataclass(frozen=True)
class LayerScores:
    """One score per layer of one layer stack; low = more removable.

    Attributes:
        method (`str`): how the scores were computed (one of `SCORING_METHODS` for [`score_layers`]).
        values (`tuple[float, ...]`): `values[i]` is the score of layer `i`, 0-based, in the model's
            original numbering.
        stack (`str`, defaults to `""`): the name of the scored [`LayerStack`] (`""` for the only stack
            of a model, `"encoder"` / `"decoder"` for encoder-decoder models).
        num_tokens (`int`, defaults to 0): the real (non-padding) tokens each layer was scored on.
    """

    method: str
    values: tuple[float, ...]
    stack: str = ""
    num_tokens: int = 0

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if not self.values:
            raise ValueError("LayerScores needs one value per layer; got none")

    def __len__(self) -> int:
        return len(self.values)

    def ranking(self) -> list[int]:
        """Layer indices from the most removable (lowest score) to the least; ties keep index order."""
        return sorted(range(len(self.values)), key=lambda i: (self.values[i], i))


@dataclass(frozen=True)
class ToleranceSelection:
    """What [`select_by_tolerance`] chose, and the metric along the way.

    Attributes:
        layers (`tuple[int, ...]`): the chosen 0-based layers, sorted.
        curve (`tuple[tuple[tuple[int, ...], float], ...]`): `(layers bypassed, in removal order; metric)`
            per step. The first entry is the full-depth model `((), baseline)`; when the loop stopped on
            the tolerance, the last entry is the step that broke it (its layer is not chosen).
        stack (`str`): the name of the layer stack the layers belong to.
        trials (`tuple[tuple[int, tuple[int, ...], float], ...]`): every evaluation the loop made, in order, as
            `(step, layers bypassed, metric)`: step 0 is the full model, step `s` tried one more layer on top of
            the `s - 1` already chosen. With `"measured"`, the step-1 trials are each candidate's own
            single-layer removal cost (compare them with the baseline).
        seconds (`float`): wall time of the loop, evaluations included.
        higher_is_better (`bool`): the metric's direction, as given to the loop.
    """

    layers: tuple[int, ...]
    curve: tuple[tuple[tuple[int, ...], float], ...]
    stack: str = ""
    trials: tuple[tuple[int, tuple[int, ...], float], ...] = ()
    seconds: float = field(default=0.0, compare=False)  # wall time: two equal choices may differ in it
    higher_is_better: bool = True

    @property
    def evaluations(self) -> int:
        """How many times `evaluate_fn` was called (the cost of choosing, in evaluations)."""
        return len(self.trials)

    def removal_costs(self) -> dict[int, float]:
        """Each layer's single-layer removal cost measured in step 1: how much the metric got worse than the full
        model's with only that layer bypassed (positive = worse, whichever way the metric points)."""
        sign = 1.0 if self.higher_is_better else -1.0
        return {layers[0]: sign * (self.baseline - metric) for step, layers, metric in self.trials if step == 1}

    @property
    def baseline(self) -> float:
        """The metric of the full-depth model."""
        return self.curve[0][1]


# ---------------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------------


def _as_batches(
    data: object, tokenizer: object | None, batch_size: int, max_length: int
) -> Iterable[Mapping[str, object]]:
    """Turn the accepted forms of calibration data into an iterable of model-input dicts."""
    if isinstance(data, (str, Mapping)):
        raise TypeError(
            f"calibration data must be a collection of texts, rows or batches, not a single {type(data).__name__}: "
            "wrap it in a list"
        )
    if not (isinstance(data, Sized) and hasattr(data, "__getitem__")):
        return data  # a DataLoader or any iterable of batches
    if len(data) == 0:
        raise ValueError("the calibration data is empty: give at least one text, row or batch")
    first = data[0]
    if isinstance(first, str):
        if tokenizer is None:
            raise ValueError("the calibration data is a list of texts: pass the model's tokenizer to tokenize them")
        encoded = tokenizer(list(data), truncation=True, max_length=max_length)
        data = [{key: encoded[key][i] for key in _TOKEN_COLUMNS if key in encoded} for i in range(len(data))]
        first = data[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            f"cannot read calibration examples of type {type(first).__name__}: give texts (with a tokenizer), "
            "tokenized rows (dicts with input_ids) or batches (dicts of 2-D tensors)"
        )
    if any(isinstance(first.get(key), torch.Tensor) and first[key].dim() == dims for key, dims in _BATCH_DIMS.items()):
        return data  # already a list of batches
    ids = first.get("input_ids")
    if ids is None:
        raise ValueError(
            "calibration rows need an input_ids column: tokenize them first (e.g. dataset.map(tokenize)), "
            "or pass texts with a tokenizer, or a DataLoader of ready batches"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # Padded positions are masked out of every score, so any valid id works when there is no tokenizer.
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    pad_token_id = 0 if pad_token_id is None else pad_token_id
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=partial(right_pad, pad_token_id=pad_token_id))


def calibration_batches(
    data: object, tokenizer: object | None = None, batch_size: int = 8, max_length: int = 512
) -> Iterable[Mapping[str, object]]:
    """The accepted forms of calibration data (see [`score_layers`]) as an iterable of model-input dicts."""
    return _as_batches(data, tokenizer, batch_size, max_length)


# ---------------------------------------------------------------------------------------------------
# Per-batch sums (the score of a layer is its total over the data divided by its number of tokens)
# ---------------------------------------------------------------------------------------------------


def _unit_difference(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xn = F.normalize(x.float(), dim=-1)
    yn = F.normalize(y.float(), dim=-1)
    return xn - yn, xn + yn


def _block_influence_sum(x: torch.Tensor, y: torch.Tensor, index: int, search: DirectionSearch) -> torch.Tensor:
    difference, _ = _unit_difference(x, y)
    # 1 - cos = |x/|x| - y/|y||² / 2: exactly 0 for an unchanged token, where 1 - cosine_similarity rounds.
    return difference.pow(2).sum() / 2


def _angular_sum(x: torch.Tensor, y: torch.Tensor, index: int, search: DirectionSearch) -> torch.Tensor:
    difference, total = _unit_difference(x, y)
    # The half-angle form keeps full precision near 0, where arccos(cos) loses half the digits.
    angle = 2 * torch.atan2(difference.norm(dim=-1), total.norm(dim=-1))
    return angle.sum() / math.pi


def _msw_sum(x: torch.Tensor, y: torch.Tensor, index: int, search: DirectionSearch) -> torch.Tensor:
    return max_sliced_wasserstein(x, y, search=search, key=index) * x.shape[0]


def _relative_msw_sum(x: torch.Tensor, y: torch.Tensor, index: int, search: DirectionSearch) -> torch.Tensor:
    # as the trainer's penalty with msw_normalization="input_rms": each batch's distance over its input's RMS
    rms = x.detach().float().pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float32).eps)
    return _msw_sum(x, y, index, search) / rms


_BATCH_SUMS = {"msw": _msw_sum, "block_influence": _block_influence_sum, "angular": _angular_sum}


def _pick_stack(stacks: list[LayerStack], name: str | None) -> LayerStack:
    by_name = {stack.name: stack for stack in stacks}
    if name is None:
        if len(stacks) == 1:
            return stacks[0]
        names = " or ".join(f"stack={s.name!r}" for s in stacks)
        raise ValueError(f"this model has {len(stacks)} layer stacks: choose the one to score with {names}")
    if name not in by_name:
        raise ValueError(f"unknown layer stack {name!r}: this model has {', '.join(repr(n) for n in by_name)}")
    return by_name[name]


class ScoreSums:
    """The running per-layer totals of one score over calibration batches; [`score_layers`] and the layer-by-layer
    path ([`~layerwise.score_layers_layerwise`]) both add each batch's clouds here, so they compute the same thing.

    Args:
        method (`str`): one of `SCORING_METHODS`.
        num_layers (`int`): the layers of the stack.
        stack (`str`, defaults to `""`): the stack's name, for the result.
        direction_search ([`DirectionSearch`], *optional*): for `"msw"`; see [`score_layers`].
        normalization (`str`, defaults to `"none"`): for `"msw"`; see [`score_layers`].
    """

    def __init__(
        self,
        method: str,
        num_layers: int,
        *,
        stack: str = "",
        direction_search: DirectionSearch | None = None,
        normalization: str = "none",
    ):
        if method not in SCORING_METHODS:
            raise ValueError(f"unknown scoring method {method!r}: choose one of {', '.join(SCORING_METHODS)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        self.method, self.stack = method, stack
        # one generator per layer: a layer's directions do not depend on the order the layers are scored in
        self.search = direction_search if direction_search is not None else DirectionSearch(seed=0, generator_per_key=True)
        self._batch_sum = _relative_msw_sum if (method, normalization) == ("msw", "input_rms") else _BATCH_SUMS[method]
        self.totals: list[torch.Tensor | None] = [None] * num_layers
        self.counts = [0] * num_layers

    def add(self, index: int, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> None:
        """Add one batch of layer `index`: its `(n, d)` input and output clouds of real tokens."""
        if tokens_in.shape[0] == 0:  # a batch of padding only
            return
        value = self._batch_sum(tokens_in, tokens_out, index, self.search)
        self.totals[index] = value if self.totals[index] is None else self.totals[index] + value
        self.counts[index] += tokens_in.shape[0]

    def scores(self, device: torch.device) -> LayerScores:
        """The per-layer means; refuses data without a real token, a layer that never ran, a non-finite score."""
        counts, totals = self.counts, self.totals
        if all(count == 0 for count in counts):
            raise ValueError(
                "the calibration data is empty: no batch held a real (non-padding) token; "
                "check the data and its attention_mask"
            )
        missing = [i for i, count in enumerate(counts) if count == 0]
        if missing:
            raise RuntimeError(
                f"layers {missing} of the {self.stack or 'model'} stack never ran during the calibration pass: "
                "the model skips them, so they cannot be scored"
            )
        # One read-back for all layers; .to() gathers the sums of a model split over several devices.
        values = (torch.stack([t.to(device) for t in totals]) / torch.tensor(counts, device=device)).tolist()
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"layers {bad} scored {[values[i] for i in bad]}: the hidden states hold non-finite values "
                "(an fp16 overflow?); score the model in float32 or bfloat16"
            )
        return LayerScores(method=self.method, values=tuple(values), stack=self.stack, num_tokens=counts[0])


def score_layers(
    model: nn.Module,
    data: Iterable[Mapping[str, object]] | Sequence[str] | Sequence[Mapping[str, object]],
    *,
    method: str = "msw",
    tokenizer: object | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    stack: str | None = None,
    direction_search: DirectionSearch | None = None,
    normalization: str = "none",
    progress: bool = True,
) -> LayerScores:
    """Score every layer of a stack in one forward pass over calibration data; low = more removable.

    The model runs under `torch.no_grad()` in eval mode (each module's previous mode is restored
    afterwards). Padding tokens are left out of every score, so extra padding changes nothing. Sums are
    accumulated on the model's device and read back once at the end.

    Args:
        model (`nn.Module`):
            A (possibly PEFT/DDP/compiled-wrapped) transformers model.
        data:
            The calibration data, in one of these forms:

            - a `DataLoader`, or any iterable of batches: dicts of model inputs, used as they are (the
              padding mask is the stack's `mask_key`, usually `attention_mask`);
            - a list of such batches (dicts whose `input_ids` is a 2-D tensor, or `pixel_values` a 4-D one);
            - tokenized rows: a `datasets.Dataset` or a list of dicts with `input_ids` (and optionally
              `attention_mask`, `token_type_ids`; other columns are dropped), grouped by `batch_size`
              in order and right-padded;
            - a list of texts, tokenized with `tokenizer` (truncated to `max_length`), then as rows.
        method (`str`, defaults to `"msw"`):
            `"msw"`, `"block_influence"` or `"angular"` (see the module docstring).
        tokenizer (*optional*):
            Needed for texts; for rows, its `pad_token_id` is the padding id.
        batch_size (`int`, defaults to 8):
            Rows per batch (texts and rows only).
        max_length (`int`, defaults to 512):
            Truncation length for texts.
        stack (`str`, *optional*):
            The stack to score; required for models with several (`"encoder"` / `"decoder"`).
        direction_search ([`DirectionSearch`], *optional*):
            The slicing-direction search for `"msw"`; defaults to a fresh
            `DirectionSearch(seed=0, generator_per_key=True)`, so results are deterministic and each layer's do not
            depend on the other layers. Each layer's best direction is carried from batch to batch. A
            passed instance keeps its state, so reusing it does not repeat the same numbers.
        normalization (`str`, defaults to `"none"`):
            For `"msw"`: `"none"` (raw distances) or `"input_rms"` (each batch's distance divided by the RMS of
            the layer's input tokens, as the penalty with `msw_normalization="input_rms"`, so that layers with
            large activations do not rank last by scale alone). The other methods are scale-free already.
        progress (`bool`, defaults to `True`):
            Show a progress bar over batches (transformers' `disable_progress_bar()` also hides it).

    Returns:
        [`LayerScores`]: the per-layer scores in the original 0-based numbering.

    Raises:
        `ValueError`: unknown method or stack, empty data (no real token), texts without a tokenizer,
            or a non-finite score.
    """
    target = _pick_stack(find_layer_stacks(model), stack)
    sums = ScoreSums(
        method, len(target), stack=target.name, direction_search=direction_search, normalization=normalization
    )
    batches = _as_batches(data, tokenizer, batch_size, max_length)
    device = next(model.parameters()).device

    def on_pair(_stack: LayerStack, index: int, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> None:
        sums.add(index, tokens_in, tokens_out)

    with eval_mode(model), torch.no_grad(), LayerCapture(model, on_pair, {target.name: range(len(target))}) as capture:
        for batch in tqdm(batches, desc=f"scoring layers ({method})", unit="batch", disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with capture.armed(batch):
                model(**batch)
    return sums.scores(device)


# ---------------------------------------------------------------------------------------------------
# Selection policies
# ---------------------------------------------------------------------------------------------------


def select_explicit(
    layers: Sequence[int], num_layers: int, *, protect_first: int = 0, protect_last: int = 0
) -> list[int]:
    """Validate an explicit choice of layers to remove.

    Args:
        layers (`Sequence[int]`): 0-based indices, in the model's original numbering.
        num_layers (`int`): the number of layers of the stack (e.g. `len(scores)`).
        protect_first (`int`, defaults to 0): the first this many layers may not be removed.
        protect_last (`int`, defaults to 0): the last this many layers may not be removed.

    Returns:
        `list[int]`: the layers, sorted.

    Raises:
        `ValueError`: an index out of range, duplicated or protected, an empty choice, or every layer.
    """
    removable = removable_layers(num_layers, protect_first, protect_last)
    chosen = check_layer_indices(layers, num_layers)
    if not chosen:
        raise ValueError("no layer was chosen: name at least one layer to remove")
    if len(chosen) == num_layers:
        raise ValueError(f"removing all {num_layers} layers is refused: keep at least one")
    protected = sorted(set(chosen) - set(removable))
    if protected:
        raise ValueError(
            f"layers {protected} are protected (protect_first={protect_first}, protect_last={protect_last}): "
            f"only layers {removable[0]}-{removable[-1]} may be removed"
        )
    return sorted(chosen)


def select_lowest(scores: LayerScores, k: int, *, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Choose the `k` lowest-scoring layers (ties go to the lower index), never a protected one.

    Args:
        scores ([`LayerScores`]): the per-layer scores.
        k (`int`): how many layers to remove; at least 1, fewer than all layers.
        protect_first (`int`, defaults to 0): the first this many layers may not be removed.
        protect_last (`int`, defaults to 0): the last this many layers may not be removed.

    Returns:
        `list[int]`: the chosen 0-based layers, sorted.
    """
    removable = set(removable_layers(len(scores), protect_first, protect_last))
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k >= len(scores):
        raise ValueError(f"removing {k} of {len(scores)} layers is refused: keep at least one (k <= {len(scores) - 1})")
    if k > len(removable):
        raise ValueError(
            f"k={k} but only {len(removable)} layers may be removed with protect_first={protect_first} "
            f"and protect_last={protect_last}: lower k or protect fewer layers"
        )
    return sorted([i for i in scores.ranking() if i in removable][:k])


def bypassed_metric(model: nn.Module, evaluate_fn: Callable[[nn.Module], float], stack: str, layers: Sequence[int]) -> float:
    """`evaluate_fn(model)` with `layers` of the named stack bypassed; refuses a non-finite value."""
    with bypass_layers(model, {stack: list(layers)}):
        return finite_metric(evaluate_fn, model, f"layers {list(layers)} bypassed")


def finite_metric(evaluate_fn: Callable[[nn.Module], float], model: nn.Module, state: str) -> float:
    """`evaluate_fn(model)` as a float; a non-finite value is refused, naming the model's `state` (what was done to
    it for this measure)."""
    value = float(evaluate_fn(model))
    if not math.isfinite(value):
        raise ValueError(f"evaluate_fn returned {value} with {state}: it must return a finite number")
    return value


def select_by_tolerance(
    model: nn.Module,
    scores: LayerScores,
    evaluate_fn: Callable[[nn.Module], float],
    tolerance: float,
    *,
    max_layers: int | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
    higher_is_better: bool = True,
    strategy: str = "ranked",
    num_candidates: int | None = None,
    progress: bool = True,
) -> ToleranceSelection:
    """Remove layers one by one while a validation metric stays within `tolerance` of the full model.

    Each step bypasses a layer (with [`bypass_layers`]: the layer's output is replaced by its input; no
    surgery) on top of those already chosen, and calls `evaluate_fn(model)`. The step is kept while the
    drop from the full-depth metric is at most `tolerance`; the first step that drops more ends the loop.
    The model is in eval mode during the calls and is left as it was (modes, no hooks) on return.

    Args:
        model (`nn.Module`): the model the scores were computed on.
        scores ([`LayerScores`]): per-layer scores; they order the candidates.
        evaluate_fn (`Callable[[nn.Module], float]`): computes the metric on validation data.
        tolerance (`float`): the largest accepted drop from the full-depth metric, in the metric's units;
            `math.inf` with `max_layers=k` chooses `k` layers (with `"measured"`: a budget chosen by measurement).
        max_layers (`int`, *optional*): remove at most this many layers; defaults to all layers but one.
        protect_first (`int`, defaults to 0): the first this many layers may not be removed.
        protect_last (`int`, defaults to 0): the last this many layers may not be removed.
        higher_is_better (`bool`, defaults to `True`): `False` for metrics like loss or perplexity, where
            the drop is `metric - baseline`.
        strategy (`str`, defaults to `"ranked"`):
            - `"ranked"`: the paper's loop; each step tries only the lowest-scoring remaining layer.
            - `"measured"`: greedy by measurement; each step tries every one of the `num_candidates`
              lowest-scoring remaining layers and keeps the one whose removal hurts the metric least
              (ties go to the lower score). It costs up to `num_candidates` evaluations per step.
        num_candidates (`int`, *optional*): with `"measured"`, how many of the lowest-scoring remaining
            layers each step tries; defaults to all of them.
        progress (`bool`, defaults to `True`):
            Show a progress bar over the evaluations, with the best metric of the current step (its total is
            the most the loop can make; the bar stops early when the tolerance ends the loop).

    Cheap measurement for deep models: rank first and measure only the best few (`num_candidates`), and/or
    give an `evaluate_fn` that scores a small validation subset. `ToleranceSelection.evaluations` and
    `.seconds` say what the choice cost; `.trials` keeps every measured candidate.

    Returns:
        [`ToleranceSelection`]: the chosen layers, the metric curve and every trial.
    """
    stack = _pick_stack(find_layer_stacks(model), scores.stack)
    if len(stack) != len(scores):
        raise ValueError(
            f"the scores cover {len(scores)} layers but the {stack.name or 'model'} stack has {len(stack)}: "
            "score this model before selecting on it"
        )
    removable = set(removable_layers(len(scores), protect_first, protect_last))
    if not tolerance >= 0:  # also catches nan
        raise ValueError(f"tolerance must be a number >= 0 (in the metric's units), got {tolerance}")
    if max_layers is None:
        max_layers = len(scores) - 1
    elif max_layers < 1:
        raise ValueError(f"max_layers must be at least 1, got {max_layers}")
    elif max_layers >= len(scores):
        raise ValueError(
            f"max_layers={max_layers} would allow removing all {len(scores)} layers, which is refused: "
            f"use at most {len(scores) - 1}"
        )
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}: choose one of {', '.join(SELECTION_STRATEGIES)}")
    if strategy == "block":
        raise ValueError("a tolerance removes layers one at a time ('ranked' or 'measured'); strategy 'block' removes "
                         "one run of a given number of layers: use collapse_model(num_layers=..., strategy='block')")
    if num_candidates is not None:
        if strategy != "measured":
            raise ValueError("num_candidates only applies to strategy='measured': drop it or switch strategy")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
    pool_size = 1 if strategy == "ranked" else num_candidates

    order = [i for i in scores.ranking() if i in removable]
    steps = min(max_layers, len(order))
    most = 1 + sum(min(pool_size or len(order), len(order) - step) for step in range(steps))
    bar = tqdm(total=most, desc=f"choosing layers ({strategy})", unit="eval", disable=not progress)

    def measure(layers: list[int]) -> float:
        value = bypassed_metric(model, evaluate_fn, stack.name, layers)
        bar.update(1)
        bar.set_postfix_str(f"without {sorted(layers)}: {value:.4g}" if layers else f"full model {value:.4g}")
        return value

    start = time.perf_counter()
    with eval_mode(model), bar:
        result = greedy_bypass(
            measure, order, steps, pool=pool_size, higher_is_better=higher_is_better, tolerance=tolerance
        )
    return ToleranceSelection(
        layers=tuple(sorted(result.layers)),
        curve=result.curve,
        stack=stack.name,
        trials=result.trials,
        seconds=time.perf_counter() - start,
        higher_is_better=higher_is_better,
    )
