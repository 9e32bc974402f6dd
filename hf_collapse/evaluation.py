"""Before/after numbers for a collapsed model: task metric, perplexity and latency.

* [`load_metric`] loads the `evaluate` metric modules shipped in `hf_collapse/metrics/` (accuracy, F1), which
  work offline: `evaluate.load("accuracy")` would fetch its script from the Hugging Face Hub.
* [`evaluate_classification`] runs a sequence- or image-classification model over a dataset and scores its
  arg-max predictions with those metrics.
* [`perplexity`] is exp of the token-weighted mean negative log-likelihood of a causal LM, computed directly.
* [`measure_latency`] / [`compare_latency`] time a forward pass, a generation prefill or greedy decoding; the
  comparison interleaves the two models so that a noisy machine slows both alike.

Every function puts the model in eval mode for the run and gives each module its previous mode back after.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import evaluate
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, default_data_collator
from transformers.generation.streamers import BaseStreamer
from transformers.utils.logging import (
    tqdm,  # the bar transformers.utils.logging.disable_progress_bar() hides
)

from .data import right_pad
from .layers import eval_mode, unwrap_model

__all__ = [
    "Latency",
    "LatencyComparison",
    "compare_latency",
    "evaluate_classification",
    "load_metric",
    "measure_latency",
    "metric_names",
    "perplexity",
]

METRICS_DIR = Path(__file__).parent / "metrics"
LATENCY_MODES = ("forward", "prefill", "decode")
_IGNORE_INDEX = -100  # the label value transformers' losses skip
_METRIC_CACHE: dict[tuple, evaluate.EvaluationModule] = {}


def metric_names() -> list[str]:
    """Names of the metric modules shipped with hf-collapse, for [`load_metric`]."""
    return sorted(path.parent.name for path in METRICS_DIR.glob("*/*.py") if path.stem == path.parent.name)


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load a metric module shipped with hf-collapse, without the Hugging Face Hub.

    Args:
        name (`str`): the metric, one of [`metric_names`] (`"accuracy"`, `"f1"`).
        kwargs: passed to `evaluate.load` (for instance `keep_in_memory=True`).

    The module is loaded once per name and keyword arguments and then reused (loading parses the metric
    script; `compute` keeps no state between calls), so repeated evaluations do not pay for it again.

    Returns:
        `evaluate.EvaluationModule`: call `.compute(predictions=..., references=...)` on it.

    Raises:
        `ValueError`: hf-collapse ships no metric of that name (the message lists those it ships).
    """
    names = metric_names()
    if name not in names:
        raise ValueError(
            f"hf-collapse ships no metric named {name!r}: choose one of {', '.join(map(repr, names))}, or load another "
            "with `evaluate.load` (a Hub name needs network access, a local path to a metric script does not)"
        )
    key = (name, tuple(sorted(kwargs.items())))
    try:
        hash(key)
    except TypeError:  # unhashable keyword values: load afresh
        return evaluate.load(str(METRICS_DIR / name), **kwargs)
    if key not in _METRIC_CACHE:
        _METRIC_CACHE[key] = evaluate.load(str(METRICS_DIR / name), **kwargs)
    return _METRIC_CACHE[key]


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _forward_arguments(model: nn.Module) -> set[str]:
    return set(inspect.signature(unwrap_model(model).forward).parameters)


def _column_names(dataset) -> list[str]:
    """The columns as rows present them: a `set_transform` (e.g. image preprocessing) renames them."""
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: pass at least one example")
    return list(dataset[0])


def _length_order(dataset, column: str | None) -> list[int] | None:
    """Row indices from the longest row to the shortest (ties keep their order), or `None` when the rows
    have no length to sort by (images, a transform that hides the column)."""
    if column is None:
        return None
    if hasattr(dataset, "column_names"):  # a datasets.Dataset: read the raw column, never the transform
        if column not in dataset.column_names:
            return None
        values = dataset[column]
    else:
        try:
            values = [row[column] for row in dataset]
        except (KeyError, TypeError):
            return None
    lengths = [len(value) for value in values]
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _resolve_metrics(
    metric: str | evaluate.EvaluationModule | Sequence[str | evaluate.EvaluationModule],
) -> list[evaluate.EvaluationModule]:
    items = [metric] if isinstance(metric, (str, evaluate.EvaluationModule)) else list(metric)
    if not items:
        raise ValueError("no metric given: pass a metric name such as 'accuracy', or several")
    return [load_metric(item, keep_in_memory=True) if isinstance(item, str) else item for item in items]


def evaluate_classification(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 32,
    metric: str | evaluate.EvaluationModule | Sequence[str | evaluate.EvaluationModule] = "accuracy",
    metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    tokenizer=None,
    collator: Callable[[list[dict]], Mapping[str, Any]] | None = None,
    sort_by_length: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Score the arg-max predictions of a sequence- or image-classification model on a labelled dataset.

    The model runs batched, without gradients and in eval mode (each module's previous mode is restored).
    Only the dataset columns that the model's `forward` accepts are given to it, so extra columns (raw text,
    ids) may stay in the dataset.

    Args:
        model (`nn.Module`): a `*ForSequenceClassification` or `*ForImageClassification` model with 2 or more labels.
        dataset: a `datasets.Dataset` (or a sequence of dict rows) holding a label column and either model inputs
            (`input_ids`/`attention_mask` or `pixel_values`) or, with `text_column`, raw text.
        batch_size (`int`, defaults to 32): examples per forward pass.
        metric (`str`, `evaluate.EvaluationModule` or a sequence of them, defaults to `"accuracy"`): names of
            metrics shipped with hf-collapse (see [`metric_names`]) or already loaded `evaluate` modules.
        metric_kwargs (`Mapping[str, Mapping]`, *optional*): extra `compute` arguments per metric name, e.g.
            `{"f1": {"average": "macro"}}`.
        label_column (`str`, *optional*): the column of class ids; default `"labels"`, else `"label"`.
        text_column (`str`, *optional*): a column of raw text to tokenize batch by batch with `tokenizer`
            (padding to the longest text of the batch, truncation to the tokenizer's maximum length).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): needed with `text_column`; without it, pads the
            pre-tokenized inputs of each batch (unless `collator` is given).
        collator (`Callable`, *optional*): turns a list of rows (model-input columns only) into a batch of
            tensors; default `DataCollatorWithPadding(tokenizer)` with a tokenizer, `default_data_collator` otherwise.
        sort_by_length (`bool`, defaults to `True`): batch rows of similar length together (longest first, by
            `input_ids`, or by characters of `text_column`), so that batches carry less padding; the metric
            sees the predictions in the dataset's order. Rows without a length (images) keep their order.
        progress (`bool`, defaults to `False`): show a progress bar.

    Returns:
        `dict[str, float]`: every metric's results merged, e.g. `{"accuracy": 0.81, "f1": 0.84}`.

    Raises:
        `ValueError`: the model has no classification head of 2+ labels, the dataset lacks a label column or
            model inputs, `text_column` is given without a tokenizer, or two metrics return the same key.
    """
    inner = unwrap_model(model)
    num_labels = getattr(inner.config, "num_labels", 0)
    if num_labels < 2:
        raise ValueError(
            f"evaluate_classification needs a classification head with 2 or more labels, but "
            f"{type(inner).__name__} has num_labels={num_labels}; load the model with `num_labels=...`"
        )
    metrics = _resolve_metrics(metric)
    metric_kwargs = dict(metric_kwargs or {})
    unknown = set(metric_kwargs) - {m.name for m in metrics}
    if unknown:
        raise ValueError(
            f"metric_kwargs names {sorted(unknown)} but the metrics are {[m.name for m in metrics]}: key it by metric name"
        )

    columns = _column_names(dataset)
    label_column = _label_column(columns, label_column)
    accepted = _forward_arguments(model) - {"labels"}
    to_inputs = _input_builder(columns, accepted, text_column, tokenizer, collator)

    def collate(rows: list[dict]) -> tuple[dict[str, Any], torch.Tensor]:
        batch = {key: value for key, value in to_inputs(rows).items() if key in accepted}
        return batch, torch.tensor([int(row[label_column]) for row in rows])

    order = _length_order(dataset, text_column or "input_ids") if sort_by_length else None
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, sampler=order)
    device = _device(model)
    predictions, references = [], []
    with eval_mode(model), torch.inference_mode():
        for batch, labels in tqdm(loader, desc="evaluating", disable=not progress):
            logits = model(**_to_device(batch, device)).logits
            if logits.dim() != 2:
                raise ValueError(
                    f"the model returned logits of shape {tuple(logits.shape)}, not (batch, num_labels): "
                    "evaluate_classification scores one label per example"
                )
            predictions += logits.argmax(dim=-1).tolist()
            references += labels.tolist()
    if order is not None:  # back to the dataset's order
        unsorted_predictions, unsorted_references = [0] * len(order), [0] * len(order)
        for position, index in enumerate(order):
            unsorted_predictions[index] = predictions[position]
            unsorted_references[index] = references[position]
        predictions, references = unsorted_predictions, unsorted_references

    return _compute_metrics(metrics, metric_kwargs, predictions, references)


def _input_builder(
    columns: list[str], accepted: set[str], text_column: str | None, tokenizer, collator
) -> Callable[[list[dict]], Mapping[str, Any]]:
    """How a list of rows becomes model inputs: raw text tokenized batch by batch, or the input columns collated."""
    if text_column is not None:
        if tokenizer is None:
            raise ValueError(f"text_column={text_column!r} needs the model's tokenizer: pass tokenizer=...")
        if text_column not in columns:
            raise ValueError(f"text_column={text_column!r} is not a dataset column; the columns are {columns}")

        def to_inputs(rows: list[dict]) -> Mapping[str, Any]:
            texts = [row[text_column] for row in rows]
            return tokenizer(texts, padding=True, truncation=True, return_tensors="pt")

        return to_inputs

    inputs = [column for column in columns if column in accepted]
    if not inputs:
        raise ValueError(
            f"the dataset has no column the model takes as input (columns: {columns}): tokenize it first, "
            "or pass text_column=... and tokenizer=..."
        )
    base = collator or (DataCollatorWithPadding(tokenizer) if tokenizer is not None else default_data_collator)

    def collate_inputs(rows: list[dict]) -> Mapping[str, Any]:
        return base([{key: row[key] for key in inputs} for row in rows])

    return collate_inputs


def _compute_metrics(metrics: list, metric_kwargs: Mapping[str, Mapping[str, Any]], predictions: list[int],
                     references: list[int]) -> dict[str, float]:
    """Every metric's results, merged into one dict; two metrics returning the same key are refused."""
    results: dict[str, float] = {}
    for module in metrics:
        scores = module.compute(predictions=predictions, references=references, **metric_kwargs.get(module.name, {}))
        clash = set(scores) & set(results)
        if clash:
            raise ValueError(f"two metrics both return {sorted(clash)}: evaluate them in separate calls")
        results.update(scores)
    return results


def _label_column(columns: list[str], label_column: str | None) -> str:
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"label_column={label_column!r} is not a dataset column; the columns are {columns}")
        return label_column
    for name in ("labels", "label"):
        if name in columns:
            return name
    raise ValueError(f"the dataset has no 'labels' or 'label' column (columns: {columns}): pass label_column=...")


def perplexity(
    model: nn.Module, dataset, *, batch_size: int = 8, sort_by_length: bool = True, progress: bool = False
) -> float:
    """Perplexity of a causal LM: exp of the mean negative log-likelihood over every predicted token.

    Token `t + 1` of a row is predicted from tokens `0..t`. A prediction counts when its target label is not
    `-100` and both token `t` and token `t + 1` are real (attention mask 1); labels default to `input_ids`.
    The mean weighs every counted token equally, across rows and batches, so neither the batch size nor
    padding changes the result. Rows of different lengths are right-padded within each batch.

    Args:
        model (`nn.Module`): a decoder-only language model (`*ForCausalLM`).
        dataset: a `datasets.Dataset` (or a sequence of dict rows) with `input_ids` and optionally
            `attention_mask` and `labels` (`-100` marks tokens not to score), e.g. from `assets.shakespeare_lm`.
        batch_size (`int`, defaults to 8): rows per forward pass.
        sort_by_length (`bool`, defaults to `True`): batch rows of similar length together (longest first), so
            that ragged rows carry less padding; the result does not depend on the order.
        progress (`bool`, defaults to `False`): show a progress bar.

    Returns:
        `float`: the perplexity.

    Raises:
        `ValueError`: an encoder-decoder model, ragged rows, or no token left to predict.
    """
    inner = unwrap_model(model)
    if getattr(inner.config, "is_encoder_decoder", False):
        raise ValueError(
            f"perplexity scores decoder-only language models; {type(inner).__name__} is an encoder-decoder model"
        )
    extra = {"use_cache": False} if "use_cache" in _forward_arguments(model) else {}
    order = _length_order(dataset, "input_ids") if sort_by_length else None
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=partial(right_pad, lm_labels=True), sampler=order)
    device = _device(model)
    total_nll, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc="perplexity", disable=not progress):
            batch = _to_device(batch, device)
            mask = batch["attention_mask"].bool()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
            targets = batch["labels"][:, 1:]
            scored = (targets != _IGNORE_INDEX) & mask[:, 1:] & mask[:, :-1]
            nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
            total_nll += nll.item()
            count += int(scored.sum())
    if count == 0:
        raise ValueError(
            "no token to predict: every row is shorter than 2 real tokens or has all its labels set to -100"
        )
    return math.exp(total_nll / count)


@dataclass(frozen=True)
class Latency:
    """Timings of one model in one mode.

    Attributes:
        mode (`str`): `"forward"`, `"prefill"` or `"decode"` (see [`measure_latency`]).
        times_ms (`tuple[float, ...]`): one time per repeat, in milliseconds (per generated token for `"decode"`).
        threads (`int`): `torch.get_num_threads()` during the run.
        new_tokens (`int` or `None`): tokens generated per repeat in `"decode"` mode.
    """

    mode: str
    times_ms: tuple[float, ...]
    threads: int
    new_tokens: int | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "times_ms": list(self.times_ms), "median_ms": self.median_ms}


@dataclass(frozen=True)
class LatencyComparison:
    """Interleaved timings of two models on the same batch; `speedup` is how many times faster `b` is than `a`.

    Attributes:
        a (`Latency`): the first model (typically the full model).
        b (`Latency`): the second model (typically the collapsed one).
    """

    a: Latency
    b: Latency

    @property
    def speedup(self) -> float:
        return self.a.median_ms / self.b.median_ms

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "speedup": self.speedup}


class _TokenClock(BaseStreamer):
    """A streamer that only notes when `generate` hands it tokens: first the prompt, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _timer(model: nn.Module, batch: Mapping[str, Any], mode: str, new_tokens: int) -> Callable[[], float]:
    """Check the mode against the model; return a function that runs it once and returns milliseconds."""
    if mode not in LATENCY_MODES:
        raise ValueError(f"unknown latency mode {mode!r}: choose one of {', '.join(map(repr, LATENCY_MODES))}")
    device = _device(model)
    batch = _to_device(batch, device)
    inner = unwrap_model(model)
    if mode != "forward" and not (hasattr(inner, "can_generate") and inner.can_generate()):
        raise ValueError(
            f"mode={mode!r} needs a model that generates text; {type(inner).__name__} does not: use mode='forward'"
        )

    if mode == "decode":
        if new_tokens < 2:
            raise ValueError(f"decode latency needs new_tokens of 2 or more (the first comes from the prefill), got {new_tokens}")
        # Greedy and exactly new_tokens long, whatever the model's generation config says about sampling or stopping.
        options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)

        def run() -> float:
            clock = _TokenClock()
            model.generate(**batch, streamer=clock, **options)
            # stamps: prompt, token 1 (after the prefill), ..., token N; decoding is what follows token 1.
            if len(clock.stamps) != new_tokens + 1:
                raise RuntimeError(
                    f"generate stopped after {len(clock.stamps) - 1} of {new_tokens} new tokens although "
                    "min_new_tokens was set; check the model's generation config (stop strings, custom criteria)"
                )
            return (clock.stamps[-1] - clock.stamps[1]) * 1000 / (new_tokens - 1)

        return run

    extra: dict[str, Any] = {}
    if mode == "prefill":
        # What generate's first step does: fill a fresh KV cache and compute only the last position's logits.
        extra["use_cache"] = True
        if "logits_to_keep" in _forward_arguments(model):
            extra["logits_to_keep"] = 1

    def run() -> float:
        _synchronize(device)
        start = time.perf_counter()
        model(**batch, **extra)
        _synchronize(device)
        return (time.perf_counter() - start) * 1000

    return run


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be 1 or more, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")


def measure_latency(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    mode: str = "forward",
    repeats: int = 20,
    warmup: int = 3,
    new_tokens: int = 16,
) -> Latency:
    """Time one model on one batch, without gradients and in eval mode.

    Modes:

    - `"forward"`: one `model(**batch)` call (e.g. batch classification, or a full-logits LM forward).
    - `"prefill"`: the first step of generation: `model(**batch, use_cache=True, logits_to_keep=1)`, which fills
      a fresh KV cache from the prompt and computes the next-token logits only.
    - `"decode"`: greedy `model.generate` of exactly `new_tokens` tokens with the KV cache; the time is per
      generated token, measured from the first new token (produced by the prefill) to the last, so it leaves
      out the prefill and generate's set-up and includes its per-step work (input preparation, token choice).

    Threads are left to the caller (`torch.set_num_threads`); the count in use is recorded.

    Args:
        model (`nn.Module`): the model; `"prefill"` and `"decode"` need a generative model.
        batch (`Mapping[str, Any]`): the model's keyword inputs (moved to the model's device once).
        mode (`str`, defaults to `"forward"`): `"forward"`, `"prefill"` or `"decode"`.
        repeats (`int`, defaults to 20): timed runs; the median is `Latency.median_ms`.
        warmup (`int`, defaults to 3): untimed runs first.
        new_tokens (`int`, defaults to 16): tokens generated per run in `"decode"` mode (2 or more).

    Returns:
        [`Latency`]: the times of every repeat, in milliseconds.
    """
    _check_counts(repeats, warmup)
    run = _timer(model, batch, mode, new_tokens)
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            run()
        times = tuple(run() for _ in range(repeats))
    return Latency(mode, times, torch.get_num_threads(), new_tokens if mode == "decode" else None)


def compare_latency(
    model_a: nn.Module,
    model_b: nn.Module,
    batch: Mapping[str, Any],
    *,
    mode: str = "forward",
    repeats: int = 20,
    warmup: int = 3,
    new_tokens: int = 16,
) -> LatencyComparison:
    """Time two models on the same batch, interleaved (a, b, b, a, a, b, ...), so that drift and noise from other
    processes hit both alike. Arguments and modes are those of [`measure_latency`]; warm-up runs alternate too.

    Returns:
        [`LatencyComparison`]: both models' timings; `.speedup` is median(a) / median(b).
    """
    _check_counts(repeats, warmup)
    runs = (_timer(model_a, batch, mode, new_tokens), _timer(model_b, batch, mode, new_tokens))
    times: tuple[list[float], list[float]] = ([], [])
    with eval_mode(model_a, model_b), torch.inference_mode():
        for _ in range(warmup):
            runs[0]()
            runs[1]()
        for repeat in range(repeats):
            for which in (0, 1) if repeat % 2 == 0 else (1, 0):
                times[which].append(runs[which]())
    threads = torch.get_num_threads()
    tokens = new_tokens if mode == "decode" else None
    return LatencyComparison(
        Latency(mode, tuple(times[0]), threads, tokens), Latency(mode, tuple(times[1]), threads, tokens)
    )
