"""The model card of a collapsed model: what was removed, why, and what it cost.

The card is rendered from the Jinja template `model_cards/lacoot.md.j2` (shipped in the wheel as
`hf_collapse.model_cards`). Rendering uses `StrictUndefined`, so a template that names a variable the
renderer does not provide fails instead of printing an empty string; nothing here touches the network.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = ["CollapseReport", "plot_layer_scores", "render_card", "write_card"]

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
            Hub ids of the datasets used for training and calibration.
        eval_dataset (`str`, *optional*), eval_split (`str`, *optional*):
            Hub id and split of the dataset the metrics were measured on (feeds the card's `model-index`).
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

    def __post_init__(self):
        self.stacks()  # validate the per-stack fields now, not when the card is rendered
        if (self.metric_before is not None or self.metric_after is not None) and not self.task_metric:
            raise ValueError(
                "metric_before/metric_after are set but task_metric is not: name the metric, e.g. 'accuracy'"
            )
        if (self.latency_ms_before is not None or self.latency_ms_after is not None) and not self.latency_setup:
            raise ValueError(
                "latency values are set but latency_setup is not: say how they were measured "
                "(device, batch shape, dtype, threads, statistic), a bare number in a card is not comparable"
            )

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
            indices = sorted(int(i) for i in removed[name])
            bad = [i for i in indices if not 0 <= i < count]
            if bad:
                raise ValueError(
                    f"removed layer {bad[0]} does not exist: {where} had {count} layers, numbered 0-{count - 1}"
                )
            if len(set(indices)) != len(indices):
                raise ValueError(f"removed_layers lists a layer twice ({indices}): name each layer once")
            values = [] if scores[name] is None else [float(s) for s in scores[name]]
            if scores[name] is not None and len(values) != count:
                raise ValueError(
                    f"scores has {len(values)} values for {where} but it had {count} layers: give one score per "
                    "layer, in the numbering before removal"
                )
            summaries.append(StackSummary(name, count, indices, values))
        return summaries


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


def _card_data(report: CollapseReport, model_name: str) -> ModelCardData:
    eval_results = []
    if report.eval_dataset and report.pipeline_tag:
        stacks = report.stacks()
        before = " + ".join(str(s.layers_before) for s in stacks)
        after = " + ".join(str(s.layers_after) for s in stacks)
        measured = [
            (report.task_metric, report.metric_before, report.metric_after),
            ("perplexity", report.perplexity_before, report.perplexity_after),
        ]
        for metric, value_before, value_after in measured:
            for value, when in ((value_before, f"before collapse, {before}"), (value_after, f"after collapse, {after}")):
                if value is None:
                    continue
                eval_results.append(
                    EvalResult(
                        task_type=report.pipeline_tag,
                        dataset_type=report.eval_dataset,
                        dataset_name=report.eval_dataset,
                        dataset_split=report.eval_split,
                        metric_type=metric,
                        metric_name=f"{metric} ({when} layers)",
                        metric_value=float(value),
                    )
                )
    return ModelCardData(
        base_model=_hub_id(report.base_model),
        library_name="transformers",
        pipeline_tag=report.pipeline_tag,
        license=report.license,
        datasets=list(report.datasets) or None,
        tags=list(TAGS),
        model_name=model_name if eval_results else None,  # only the model-index uses it
        eval_results=eval_results or None,
    )


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
        "has_scores": report.scores is not None,
        "selection": report.selection,
        "task_metric": report.task_metric,
        "selection_curve": [(list(layers), float(value)) for layers, value in report.selection_curve or []],
        "plot_file": PLOT_FILE,
        "metrics": metrics,
        "latency": latency,
        "eval_dataset": report.eval_dataset,
        "eval_split": report.eval_split,
        "datasets": list(report.datasets),
        "auto_class": _AUTO_CLASS_BY_PIPELINE_TAG.get(report.pipeline_tag or "", "AutoModel"),
        "preprocessor_class": _auto_preprocessor(processing_class),
        "recipe_yaml": recipe_yaml(report.recipe).rstrip() if report.recipe is not None else None,
        "healed": report.healed,
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
