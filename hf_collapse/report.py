"""What a collapse did, as data: the report a model card is rendered from (see `card.py`).

A [`CollapseReport`] is made of four sections, each a small dataclass that checks itself: [`Removal`] (what was
removed and why), [`Training`] (how the model was trained), [`Measurements`] (what the removal cost) and
[`Provenance`] (where the model comes from and how it loads). The report is built, stored in
`collapse_report.json` and updated with flat field names (`CollapseReport(removed_layers=..., metric_after=...)`);
each name belongs to exactly one section.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .layers import check_layer_indices

__all__ = [
    "AUTO_CLASS_BY_PIPELINE_TAG", "BenchmarkResult", "CollapseReport", "Measurements", "Provenance", "Removal",
    "StackSummary", "Training", "per_stack", "redact_tokens",
]

# How a model of each pipeline tag loads (the card's loading snippet); anything else uses AutoModel.
AUTO_CLASS_BY_PIPELINE_TAG = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "text2text-generation": "AutoModelForSeq2SeqLM",
    "translation": "AutoModelForSeq2SeqLM",
    "summarization": "AutoModelForSeq2SeqLM",
    "image-classification": "AutoModelForImageClassification",
    "image-text-to-text": "AutoModelForImageTextToText",
}
# Recipe keys that hold credentials (TrainingArguments' and common script arguments).
_SECRET_KEYS = frozenset({"hub_token", "push_to_hub_token", "token", "hf_token", "use_auth_token"})
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9_]{20,}")


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark figure of the base model and of the collapsed one (e.g. an lm-evaluation-harness task).

    Args:
        task (`str`): the benchmark task, e.g. `"hellaswag"`.
        metric (`str`): the metric, e.g. `"acc_norm"`, `"word_perplexity"`.
        before (`float`, *optional*), after (`float`, *optional*): the figure of the base model and of this model.
        split (`str`, *optional*): the split it was measured on.
        dataset (`str`, *optional*): the Hub dataset id the task reads; only then does the figure enter `model-index`.
        dataset_config (`str`, *optional*): the dataset's configuration name.
        num_fewshot (`int`, *optional*): few-shot examples per prompt.
        harness (`str`, defaults to `"lm-evaluation-harness"`): what measured it (with its version, ideally).
    """

    task: str
    metric: str
    before: float | None
    after: float | None
    split: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    num_fewshot: int | None = None
    harness: str = "lm-evaluation-harness"


@dataclass(frozen=True)
class StackSummary:
    """One layer stack of a [`CollapseReport`]: `name` is `""` for a model with one stack."""

    name: str
    layers_before: int
    removed: list[int]
    scores: list[float]
    earlier: list[int] = field(default_factory=list)

    @property
    def layers_after(self) -> int:
        return self.layers_before - len(self.removed)

    @property
    def original_numbers(self) -> list[int]:
        """The original model's number of each layer ``0..layers_before-1`` (they differ once layers were removed
        earlier, from a checkpoint that was itself collapsed)."""
        lost = set(self.earlier)
        return [i for i in range(self.layers_before + len(lost)) if i not in lost]

    @property
    def removed_original(self) -> list[int]:
        """The layers this collapse removed, numbered as in the original model (as `config.collapsed_layers` is)."""
        return [self.original_numbers[i] for i in self.removed]


@dataclass(frozen=True)
class Removal:
    """What was removed, and why those layers.

    Layer indices are always 0-based and in the numbering of the model *before* removal. For a model with one layer
    stack, give `removed_layers`, `layers_before` and `scores` directly; for an encoder-decoder model give each as a
    mapping from stack name (`"encoder"`, `"decoder"`) to value.

    Args:
        removed_layers (`Sequence[int]` or `Mapping[str, Sequence[int]]`):
            The layers that were deleted.
        layers_before (`int` or `Mapping[str, int]`):
            The layer count before removal.
        num_parameters_before (`int`), num_parameters_after (`int`):
            Parameter counts of the model before and after removal (shared weights counted once).
        scores (`Sequence[float]` or `Mapping[str, Sequence[float]]`):
            One score per layer before removal, in layer order (lower = more removable for distances).
        score_method (`str`):
            How the scores were computed, e.g. `"msw"`, `"block_influence"`, `"angular_distance"`.
        selection (`str`, *optional*):
            How the layers were chosen from the scores, in one sentence (e.g. "the 2 lowest-scoring layers").
        selection_curve (`list[tuple[list[int], float]]`, *optional*):
            The validation metric after each step of a tolerance or measured selection: (layers bypassed so
            far, metric), starting with the full model; for a `block` selection, every candidate run bypassed (with
            its repair applied, when there is one) and its metric, with no full-model row.
        earlier_removed (`Sequence[int]` or `Mapping[str, Sequence[int]]`, *optional*):
            When the source checkpoint was itself collapsed: the layers it had already lost, in the numbering
            of the original model (its `config.collapsed_layers`). `removed_layers` stays in the numbering of
            the source checkpoint.
        repair (`Mapping`, *optional*):
            The repair at the cut ([`fit_repair`]), when one was folded in: `method` (`scale`, `linear`,
            `transport`), the calibration `rows` and `tokens` it was fitted on, the `data` they came from, how the
            ridge was set (`ridge_choice`, and `ridge` when fixed), whether a `shift` was folded, the `spans` (removed
            layers, the module folded into, its `ridge`, the relative error after the cut without and with the map)
            and whether the fold was `verified`. When the rows that chose the layers judged it
            (`collapse_model(choose_on=...)`, every recipe): `validation` (the `metric`, `unrepaired` and `repaired`
            values with the layers bypassed) and `folded`, false when the maps made that metric worse and were undone
            (the cut is then unrepaired). Reports written before it load without it.
        collapse_path (`Mapping`, *optional*):
            How the checkpoint was rewritten, when `hf-collapse collapse --stream` was asked for: `path` is
            `"streaming"` (tensor by tensor from the source files, see `hf_collapse.streaming`) or `"in-memory"`
            (loaded whole, with the `reason` streaming could not do it); for a streamed collapse, `structure_check`
            (always `True`) and `probe_check`, what the output check on a probe input compared (or why it did not run).
            Unset means the in-memory path.
    """

    removed_layers: Sequence[int] | Mapping[str, Sequence[int]]
    layers_before: int | Mapping[str, int]
    num_parameters_before: int
    num_parameters_after: int
    scores: Sequence[float] | Mapping[str, Sequence[float]] | None
    score_method: str | None
    selection: str | None = None
    selection_curve: list[tuple[list[int], float]] | None = None
    earlier_removed: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    repair: Mapping[str, Any] | None = None
    collapse_path: Mapping[str, Any] | None = None

    def __post_init__(self):
        self.stacks()  # validate the per-stack fields now, not when the card is rendered
        if self.repair is not None:
            missing = [k for k in ("method", "rows", "tokens") if not isinstance(self.repair, Mapping) or k not in self.repair]
            if missing:
                raise ValueError(f"repair must be a mapping with method, rows and tokens (missing {', '.join(missing)})")

    def stacks(self) -> list[StackSummary]:
        """The per-stack view: one entry for a one-stack model, encoder and decoder otherwise."""
        removed = per_stack(self.removed_layers, "removed_layers")
        before = per_stack(self.layers_before, "layers_before")
        scores = {name: None for name in before} if self.scores is None else per_stack(self.scores, "scores")
        if not (removed.keys() == before.keys() == scores.keys()):
            raise ValueError(
                f"removed_layers, layers_before and scores must name the same stacks, got {sorted(removed)}, "
                f"{sorted(before)} and {sorted(scores)}"
            )
        earlier = {} if self.earlier_removed is None else per_stack(self.earlier_removed, "earlier_removed")
        summaries = []
        for name, count in before.items():
            where = f"the {name} stack" if name else "the model"
            try:
                indices = check_layer_indices(removed[name], count, where)  # numbered before removal
            except ValueError as error:
                raise ValueError(f"removed_layers: {error}") from None
            values = [] if scores[name] is None else [float(s) for s in scores[name]]
            if scores[name] is not None and len(values) != count:
                raise ValueError(
                    f"scores has {len(values)} values for {where} but it had {count} layers: give one score per "
                    "layer, in the numbering before removal"
                )
            summaries.append(StackSummary(name, count, indices, values, sorted(earlier.get(name, []))))
        return summaries


@dataclass(frozen=True)
class Training:
    """How the model was trained (all optional; the card's "How it was trained" section lists those that are set).

    Args:
        recipe (`dict`, *optional*):
            The resolved training recipe (flat config fields). `None` when the layers were removed without
            training. Values of keys ending in `_token` are never written out.
        healed (`bool`, defaults to `False`):
            Whether the model was fine-tuned again after the layers were removed.
        training_steps (`int`, *optional*):
            Optimizer steps of the training before the removal.
        target_layers (`Sequence[int]` or `Mapping[str, Sequence[int]]`, *optional*):
            Layers the training concentrated on removing (penalised, faded), in the numbering before removal.
        target_choice (`str`, *optional*):
            How the target layers were chosen, in one sentence (e.g. "least harmful bypass on validation at step 60").
        penalty_schedule (`list[tuple[int, float]]` or `str`, *optional*):
            The penalty weight λ actually applied: `(step, λ)` pairs (each value holds from its step on), or a
            summary.
        fade_window (`tuple[int, int]`, *optional*):
            First and last optimizer step over which the target layers were faded out of the residual stream.
        distillation_weight (`float`, *optional*), distillation_temperature (`float`, *optional*):
            Weight and temperature of the distillation loss from the full-depth model.
        healing_steps (`int`, *optional*), healing_lora (`bool`, *optional*):
            Fine-tuning steps after the layers were removed, and whether they trained LoRA adapters (merged since).
        healing_scope (`str`, *optional*):
            What healing trained: `"full"`, `"lora"` or `"adjacent"` (the layers next to each removed span and the head).
        distillation_hidden_weight (`float`, *optional*):
            Weight of the hidden-state term of distillation during healing (kept layers against the teacher's).
        teacher_forward_passes (`int`, *optional*), teacher_forward_rows (`int`, *optional*):
            The distillation teacher's forward passes during healing and the rows they ran: work outside the
            student's training budget, reported apart.
        quantized_training (`str`, *optional*), dequantized_dtype (`str`, *optional*):
            QLoRA: how the base weights were quantised while LoRA adapters trained on them (e.g. `"4-bit nf4
            weights (bitsandbytes, computing in float32)"`, see [`describe_quantization`]), and the dtype of the
            dequantised copy that the adapters were merged into ([`merge_dequantized`]), which the collapse and the
            export are made of. Both or neither.
    """

    recipe: dict[str, Any] | None = None
    healed: bool = False
    training_steps: int | None = None
    target_layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    target_choice: str | None = None
    penalty_schedule: list[tuple[int, float]] | str | None = None
    fade_window: tuple[int, int] | None = None
    distillation_weight: float | None = None
    distillation_temperature: float | None = None
    healing_steps: int | None = None
    healing_lora: bool | None = None
    healing_scope: str | None = None
    distillation_hidden_weight: float | None = None
    teacher_forward_passes: int | None = None
    teacher_forward_rows: int | None = None
    quantized_training: str | None = None
    dequantized_dtype: str | None = None

    def __post_init__(self):
        if (self.quantized_training is None) != (self.dequantized_dtype is None):
            raise ValueError(
                "quantized_training and dequantized_dtype go together: give both (how the weights were quantised "
                "during training, and the dtype of the dequantised merge the collapse ran on) or neither"
            )
        if self.healing_lora is not None and not self.healing_steps:
            raise ValueError("healing_lora is set but healing_steps is not: give the number of healing steps")

    @property
    def msw_penalty_used(self) -> bool:
        """Whether the model was trained with the MSW penalty (LaCoOT): a non-zero λ in the applied schedule, or, for
        the uniform penalty (no schedule), a non-zero `msw_weight` in the recipe."""
        schedule = self.penalty_schedule
        if isinstance(schedule, str):
            return True
        if schedule is not None:
            return any(float(w) > 0 for _, w in schedule)
        return bool(self.recipe) and float(self.recipe.get("msw_weight") or 0) > 0

    @property
    def trained(self) -> bool:
        """Whether the weights were trained at all, before or after the removal."""
        return self.recipe is not None or self.healed or bool(self.training_steps) or bool(self.healing_steps)


@dataclass(frozen=True)
class Measurements:
    """What the removal cost: the task metric, perplexity, latency and benchmarks before and after, and where.

    Args:
        task_metric (`str`, *optional*):
            Name of the task metric, e.g. `"accuracy"`; required when `metric_before`/`metric_after` are set.
        metric_before (`float`, *optional*), metric_after (`float`, *optional*):
            The task metric of the full-depth model and of the collapsed one.
        perplexity_before (`float`, *optional*), perplexity_after (`float`, *optional*):
            Perplexity before and after removal (language models).
        latency_ms_before (`float`, *optional*), latency_ms_after (`float`, *optional*):
            Measured forward latency in milliseconds; `latency_setup` says how it was measured.
        latency_setup (`str`, *optional*):
            Hardware, batch shape, dtype, threads and statistic of the latency measurement.
        benchmarks (`list[BenchmarkResult]`):
            Benchmark figures of both models (e.g. lm-evaluation-harness tasks), see [`BenchmarkResult`].
        eval_dataset (`str`, *optional*), eval_split (`str`, *optional*):
            Dataset and split the metrics were measured on. The `model-index` is only filled when `eval_dataset` is a
            Hub id, and then only with this model's (after-removal) figures; the base model's are a comparison in the
            body.
        selection_split (`str`, *optional*):
            The split the layers were chosen on (the validation metric of a measured or tolerance selection). A report
            whose after-removal figures were measured on that same split is refused: they would be optimistic.
    """

    task_metric: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_setup: str | None = None
    benchmarks: list[BenchmarkResult] = field(default_factory=list)
    eval_dataset: str | None = None
    eval_split: str | None = None
    selection_split: str | None = None

    def __post_init__(self):
        after = [self.metric_after, self.perplexity_after]
        if self.selection_split and self.selection_split == self.eval_split and any(v is not None for v in after):
            raise ValueError(
                f"the after-removal figures were measured on the split {self.eval_split!r}, which is also the split "
                "the layers were chosen on, so they are optimistic: measure them on a split the selection never saw "
                "(the test split where the data has one) and set eval_split to it"
            )
        if (self.metric_before is not None or self.metric_after is not None) and not self.task_metric:
            raise ValueError(
                "metric_before/metric_after are set but task_metric is not: name the metric, e.g. 'accuracy'"
            )
        if (self.latency_ms_before is not None or self.latency_ms_after is not None) and not self.latency_setup:
            raise ValueError(
                "latency values are set but latency_setup is not: say how they were measured "
                "(device, batch shape, dtype, threads, statistic), a bare number in a card is not comparable"
            )


@dataclass(frozen=True)
class Provenance:
    """Where the model comes from, what it was made with, and how it loads.

    Args:
        base_model (`str`):
            Hub id (or local path) of the checkpoint the collapse started from. Only a Hub id goes into the
            card's `base_model` metadata; a local path is named in the text only.
        license (`str`, *optional*):
            License of the weights, usually the base model's (e.g. `"apache-2.0"`).
        datasets (`list[str]`):
            The datasets used for training and calibration. Hub ids go into the card's `datasets` metadata; offline
            aliases (`offline:rotten_tomatoes`) and local files are named in the text only (with package and licence).
        data_sources (`list[str]`):
            Data that is not a Hub dataset, described in one line each (what it is, where it comes from, licence).
        pipeline_tag (`str`, *optional*):
            Hub pipeline tag, e.g. `"text-generation"`; also picks the Auto class of the loading snippet.
        limitations (`list[str]`):
            Extra limitations to state, e.g. that the source weights are a dequantised GGUF copy.
        trust_remote_code (`bool`, defaults to `False`):
            Whether loading the model runs Python code that ships with it (its architecture is the checkpoint's own
            code, loaded with `trust_remote_code=True`). [`export_collapsed`] sets it, and `remote_code_files`, from
            the saved folder; the card then says so and its loading snippet passes the flag.
        remote_code_files (`list[str]`):
            The code files that ship with the model (paths in its folder); only with `trust_remote_code`.
        sentence_transformers_modules (`list[str]`, *optional*):
            For a sentence-transformers export: the class name of each module of its pipeline, in order (e.g.
            `["Transformer", "Pooling", "Normalize"]`). The card then uses `library_name: sentence-transformers`.
            [`export_collapsed`] fills this (and `max_seq_length`) from the source checkpoint's files.
        max_seq_length (`int`, *optional*):
            The sentence-transformers token limit of the export.
    """

    base_model: str
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    data_sources: list[str] = field(default_factory=list)
    pipeline_tag: str | None = None
    limitations: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    remote_code_files: list[str] = field(default_factory=list)
    sentence_transformers_modules: list[str] | None = None
    max_seq_length: int | None = None

    def __post_init__(self):
        if self.remote_code_files and not self.trust_remote_code:
            raise ValueError(
                "remote_code_files is set but trust_remote_code is not: a model that ships code needs "
                "trust_remote_code=True to load, set it so the card says so"
            )


# The sections in the order they are checked, and the section of each flat field name.
_SECTIONS = {"removal": Removal, "measurements": Measurements, "provenance": Provenance, "training": Training}
_SECTION_OF = {f.name: name for name, section in _SECTIONS.items() for f in fields(section)}
# written only when set: older reports (and their JSON) stay as they were
_LATER_FIELDS = frozenset({
    "repair", "collapse_path", "healing_scope", "distillation_hidden_weight", "teacher_forward_passes", "teacher_forward_rows",
})


@dataclass(frozen=True, init=False)
class CollapseReport:
    """What a collapse did, as the model card reports it: four sections, built from flat field names.

    ```python
    report = CollapseReport(base_model="HuggingFaceTB/SmolLM2-135M", removed_layers=[3, 5], layers_before=30,
                            num_parameters_before=134_515_008, num_parameters_after=128_613_504,
                            scores=scores, score_method="msw", task_metric="accuracy", metric_after=0.79)
    report.removal.removed_layers  # [3, 5]; report.removed_layers reads the same field
    report = report.updated(metric_before=0.81)  # a new report, checked again
    ```

    Each flat keyword is a field of one section, documented there: [`Removal`] (`removed_layers`, `layers_before`,
    `num_parameters_before`, `num_parameters_after`, `scores` and `score_method` are required), [`Training`],
    [`Measurements`] and [`Provenance`] (`base_model` is required). A section may also be given whole (`removal=`,
    `training=`, `measurements=`, `provenance=`); flat keywords then replace single fields of it. A flat field name
    also reads as an attribute of the report. Reports are frozen: change one with [`updated`] (or
    `dataclasses.replace`, which takes the same flat keywords).

    Raises:
        `TypeError`: a keyword that is no field of any section, or a required field missing.
        `ValueError`: fields that contradict each other (see each section).
    """

    removal: Removal
    measurements: Measurements
    provenance: Provenance
    training: Training

    def __init__(
        self,
        *,
        removal: Removal | None = None,
        measurements: Measurements | None = None,
        provenance: Provenance | None = None,
        training: Training | None = None,
        **values: Any,
    ):
        unknown = sorted(set(values) - _SECTION_OF.keys())
        if unknown:
            raise TypeError(f"CollapseReport has no field {', '.join(map(repr, unknown))}: see the fields of "
                            f"{', '.join(section.__name__ for section in _SECTIONS.values())}")
        given = {"removal": removal, "measurements": measurements, "provenance": provenance, "training": training}
        grouped = {name: {} if part is None else _section_values(part) for name, part in given.items()}
        for key, value in values.items():
            grouped[_SECTION_OF[key]][key] = value
        for name, section in _SECTIONS.items():
            object.__setattr__(self, name, section(**grouped[name]))

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not attributes: a flat field name reads from its section
        section = _SECTION_OF.get(name)
        if section is None or section not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[section], name)

    def flat_fields(self) -> dict[str, Any]:
        """Every field by its flat name, as [`CollapseReport`] takes them; a field added after the flat format was
        fixed (`repair`, the healing scope and the teacher's passes) only when it is set, so a report without it is written as before."""
        values = {name: getattr(getattr(self, section), name) for name, section in _SECTION_OF.items()}
        return {name: value for name, value in values.items() if not (name in _LATER_FIELDS and value is None)}

    def updated(self, **changes: Any) -> CollapseReport:
        """A copy with the given flat fields replaced, checked again like a new report."""
        return replace(self, **changes)

    def stacks(self) -> list[StackSummary]:
        """The per-stack view of the removal: one entry for a one-stack model, encoder and decoder otherwise."""
        return self.removal.stacks()

    def to_dict(self) -> dict[str, Any]:
        """The report as flat, JSON-ready values (the recipe's credentials redacted); see [`from_dict`]."""
        values = self.flat_fields()
        values["benchmarks"] = [asdict(b) for b in self.measurements.benchmarks]
        if self.training.recipe is not None:
            values["recipe"] = redact_tokens(self.training.recipe)
        return json.loads(json.dumps(values, default=list))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CollapseReport:
        """A report from [`to_dict`]'s output; fields added since it was written keep their defaults."""
        values = dict(values)
        values["benchmarks"] = [BenchmarkResult(**b) for b in values.get("benchmarks", [])]
        return cls(**values)


def _section_values(section: Removal | Measurements | Provenance | Training) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def per_stack(value: Any, what: str) -> dict[str, Any]:
    """A per-stack field as a mapping from stack name to value; a one-stack model's value is keyed `""`."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{what} is an empty mapping: give one entry per layer stack")
        return dict(value)
    if isinstance(value, str):
        raise TypeError(
            f"{what} must be a value for a one-stack model or a mapping from stack name to value, got a string"
        )
    return {"": value}


def redact_tokens(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``recipe`` with credentials replaced by a placeholder: the value of a known token field, and any
    string that looks like a Hugging Face token wherever it appears."""
    redacted: dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, Mapping):
            value = redact_tokens(value)
        elif key in _SECRET_KEYS and value not in (None, "", False):
            value = f"<{str(key).upper()}>"
        elif isinstance(value, str) and _HF_TOKEN.search(value):
            value = _HF_TOKEN.sub("<HF_TOKEN>", value)
        redacted[key] = value
    return redacted
