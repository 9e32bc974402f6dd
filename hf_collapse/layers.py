"""Find a model's transformer layer stack(s) and capture each layer's true input and output.

Where the stack lives is data (``_KNOWN_STACK_PATHS``), with a generic fallback: the module list
of identical blocks whose length is the (text) config's layer count. Encoder-decoder models have two
stacks. Wrappers (PEFT, DDP, ``torch.compile``) are looked through.

Capture uses one forward hook per layer module, which sees the layer's positional input and its
output together. In transformers 5.x, gradient checkpointing wraps ``forward``, not ``__call__``, so
hooks fire once per step; the capture is also only *armed* around the step's own forward, so a
recomputation during backward is never counted twice whatever the checkpointing implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .choice import layer_index

__all__ = [
    "LayerStack",
    "LayerCapture",
    "bypass_layers",
    "eval_mode",
    "find_layer_stacks",
    "resolve_layer_selection",
    "scale_residual_updates",
    "token_cloud",
    "unwrap_model",
]

# Dotted paths (from the unwrapped top-level model) tried in order, before the generic search.
_KNOWN_STACK_PATHS = (
    "model.language_model.layers",  # Gemma3 / Llava-style multimodal: the text stack
    "language_model.model.layers",
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, Mixtral, Qwen3-MoE, DeepSeek-V3 (*ForCausalLM)
    "layers",  # the same families as bare *Model
    "model.decoder.layers",  # OPT
    "decoder.layers",
    "transformer.h",  # GPT-2, Falcon, BLOOM, GPT-J
    "h",
    "gpt_neox.layers",
    "transformer.layer",  # DistilBERT
    "distilbert.transformer.layer",
    "encoder.layer",  # BERT, RoBERTa, ViT as bare models
)
# Encoder-decoder models: (encoder path, decoder path, encoder count attr, decoder count attr).
_ENCODER_DECODER_STACKS = (
    ("encoder.block", "decoder.block", "num_layers", "num_decoder_layers"),  # T5, mT5, UMT5
    ("model.encoder.layers", "model.decoder.layers", "encoder_layers", "decoder_layers"),  # BART, Marian
    ("encoder.layers", "decoder.layers", "encoder_layers", "decoder_layers"),
)


@dataclass(frozen=True)
class LayerStack:
    """One stack of identical transformer blocks.

    Attributes:
        name (`str`): `""` for the only stack of a model, `"encoder"` / `"decoder"` for encoder-decoder models.
        path (`str`): dotted path of the `nn.ModuleList` inside the unwrapped model.
        layers (`nn.ModuleList`): the blocks.
        config: the config object that owns the layer count (the text config of a multimodal model).
        count_attr (`str`): the real attribute of `config` that holds the count (aliases resolved).
        mask_key (`str`): the model input that carries this stack's padding mask.
    """

    name: str
    path: str
    layers: nn.ModuleList
    config: object
    count_attr: str
    mask_key: str

    def key(self, index: int) -> str:
        """Logging name of layer ``index`` (0-based): `layer_3`, or `encoder_layer_3` in a two-stack model."""
        return f"{self.name}_layer_{index}" if self.name else f"layer_{index}"

    def __len__(self) -> int:
        return len(self.layers)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside DDP / FSDP / DeepSpeed / torch.compile / PEFT wrappers.

    Distributed containers and `torch.compile` are removed by `accelerate.utils.extract_model_from_parallel`
    (which knows every wrapper accelerate can create); a PEFT model gives its base model; a sentence-transformers
    pipeline gives the transformers model of its first (Transformer) module.
    """
    while True:
        model = extract_model_from_parallel(model, keep_torch_compile=False)
        model = _sentence_transformer_model(model) or model
        base = getattr(model, "get_base_model", None)
        if not callable(base) or base() is model:
            return model
        model = base()


def _sentence_transformer_model(model: nn.Module) -> nn.Module | None:
    """The transformers model of a sentence-transformers pipeline (an `nn.Sequential` whose first module holds it
    as `auto_model`), or None for any other module. Duck-typed: sentence-transformers need not be installed."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return None
    inner = getattr(model[0], "auto_model", None)
    return inner if isinstance(inner, nn.Module) and getattr(inner, "config", None) is not None else None


def get_path(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _is_homogeneous(modules: nn.Module | None) -> bool:
    return (
        isinstance(modules, nn.ModuleList)
        and len(modules) > 0
        and len({type(m) for m in modules}) == 1
    )


def real_attr(config: object, name: str) -> str:
    return getattr(config, "attribute_map", {}).get(name, name)


def _text_config(config: object) -> object:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def layer_count(config: object) -> tuple[str, int] | None:
    for name in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        attr = real_attr(config, name)
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return attr, value
    return None


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"cannot find the transformer layer stack of {type(model).__name__}: {why}. "
        "hf-collapse supports models whose blocks sit in one nn.ModuleList of identical modules "
        "(decoder LMs, BERT-style encoders, ViT, T5/BART encoder-decoders, the text stack of multimodal models)."
    )


def find_layer_stacks(model: nn.Module) -> list[LayerStack]:
    """Find the transformer layer stack(s) of a (possibly wrapped) transformers model.

    Returns one [`LayerStack`] for decoder-only, encoder-only and vision models, and two
    (`"encoder"`, `"decoder"`) for encoder-decoder models.

    Raises:
        `ValueError`: the model has no recognisable stack; the message says what was looked for.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise _unsupported(inner, "it has no `config` (not a transformers PreTrainedModel)")

    if getattr(config, "is_encoder_decoder", False):
        for enc_path, dec_path, enc_attr, dec_attr in _ENCODER_DECODER_STACKS:
            enc, dec = get_path(inner, enc_path), get_path(inner, dec_path)
            if _is_homogeneous(enc) and _is_homogeneous(dec) and hasattr(config, enc_attr):
                # T5 keeps num_decoder_layers; an unset one means "same as the encoder".
                dec_attr = dec_attr if getattr(config, dec_attr, None) is not None else enc_attr
                return [
                    LayerStack("encoder", enc_path, enc, config, enc_attr, "attention_mask"),
                    LayerStack("decoder", dec_path, dec, config, dec_attr, "decoder_attention_mask"),
                ]
        raise _unsupported(inner, "it is an encoder-decoder model of an unknown layout")

    text_config = _text_config(config)
    counted = layer_count(text_config)
    if counted is None:
        raise _unsupported(inner, "its config has no layer count (num_hidden_layers)")
    count_attr, count = counted

    for path in _KNOWN_STACK_PATHS:
        modules = get_path(inner, path)
        # at a known path, blocks of several kinds are one stack too (hybrid attention / state-space models)
        if isinstance(modules, nn.ModuleList) and len(modules) == count > 0:
            return [LayerStack("", path, modules, text_config, count_attr, "attention_mask")]

    candidates = [
        (name, module)
        for name, module in inner.named_modules()
        if _is_homogeneous(module) and len(module) == count
    ]
    if text_config is not config:  # multimodal: prefer the language side
        text_side = [c for c in candidates if "language" in c[0] or "text" in c[0]]
        candidates = text_side or candidates
    if not candidates:
        raise _unsupported(inner, f"no nn.ModuleList of {count} identical modules ({count_attr}={count})")
    path, modules = min(candidates, key=lambda c: (c[0].count("."), c[0]))
    return [LayerStack("", path, modules, text_config, count_attr, "attention_mask")]


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


# Called as callback(stack, index, tokens_in, tokens_out) with (n, d) tensors of the real tokens.
PairCallback = Callable[[LayerStack, int, torch.Tensor, torch.Tensor], None]


class LayerCapture:
    """Forward hooks that hand each selected layer's (input, output) token clouds to a callback.

    The hooks stay registered while the object is open (`with LayerCapture(...) as cap:`), but they
    only act inside `cap.armed(inputs)`, which also supplies the padding masks of the step: padding
    tokens are removed before the callback sees the clouds, so a padded batch gives the same clouds
    as an unpadded one. Nothing is stored by the capture itself.

    Args:
        model (`nn.Module`): the (possibly wrapped) transformers model.
        callback: called as `callback(stack, index, tokens_in, tokens_out)` with `(n, d)` tensors.
        layers (`Sequence[int]` or `dict[str, Sequence[int]]`, *optional*): the 0-based layers to capture
            (per stack name for encoder-decoder models); default all layers of all stacks.
    """

    def __init__(
        self,
        model: nn.Module,
        callback: PairCallback,
        layers: Sequence[int] | dict[str, Sequence[int]] | None = None,
    ):
        self.stacks = find_layer_stacks(model)
        self.callback = callback
        if layers is None:
            layers = {stack.name: range(len(stack)) for stack in self.stacks}
        self.selected = resolve_layer_selection(self.stacks, layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._masks: dict[str, torch.Tensor | None] | None = None

    def __enter__(self) -> LayerCapture:
        for stack in self.stacks:
            for index in self.selected.get(stack.name, []):
                hook = self._make_hook(stack, index)
                self._handles.append(stack.layers[index].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks = None

    @contextlib.contextmanager
    def armed(self, inputs: dict | None = None, *, masks_from: nn.Module | None = None) -> Iterator[None]:
        """Let the hooks act during one forward pass of ``inputs`` (the model's keyword inputs).

        With `masks_from`, a module that runs once per pass of the layers (e.g. a sentence-transformers Transformer
        module, which a loss calls once per text column), the padding masks are read from each of its calls
        instead: from its keyword arguments, or from the mapping it gets as first argument; ``inputs`` is ignored.
        """
        def read_masks(given) -> None:
            self._masks = {stack.name: _padding_mask(given.get(stack.mask_key)) for stack in self.stacks}

        def on_call(module, args, kwargs) -> None:
            read_masks(kwargs if kwargs else (args[0] if args and isinstance(args[0], Mapping) else {}))

        read_masks((inputs or {}) if masks_from is None else {})  # with masks_from: none until the module's first call
        handle = None if masks_from is None else masks_from.register_forward_pre_hook(on_call, with_kwargs=True)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()
            self._masks = None

    def _make_hook(self, stack: LayerStack, index: int):
        def hook(module, args, kwargs, output):
            if self._masks is None:
                return None
            hidden_in = args[0] if args else kwargs.get("hidden_states")
            hidden_out = _first_tensor(output)
            if not isinstance(hidden_in, torch.Tensor) or hidden_out is None:
                raise RuntimeError(
                    f"cannot read the hidden states of {stack.key(index)} ({type(module).__name__}): "
                    "the layer was not called with a hidden-state tensor"
                )
            mask = self._masks.get(stack.name)
            self.callback(stack, index, _tokens(hidden_in, mask), _tokens(hidden_out, mask))
            return None

        return hook


def _padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The boolean padding mask of a step, or None when every token is real (then no copy is needed)."""
    if mask is None or mask.dim() != 2:
        return mask  # a non-2-D mask is reported by _tokens, with the shapes involved
    mask = mask.to(dtype=torch.bool)
    return None if bool(mask.all()) else mask


def token_cloud(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `(n, d)` cloud of real tokens of `(batch, seq, d)` hidden states, given the batch's padding mask (or None),
    exactly as [`LayerCapture`] hands them over."""
    return _tokens(hidden, _padding_mask(mask))


def _tokens(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten (batch, seq, d) hidden states to the (n, d) cloud of real (non-padding) tokens."""
    if hidden.dim() == 2:
        hidden = hidden.unsqueeze(0)
    if mask is None:
        return hidden.reshape(-1, hidden.shape[-1])
    if mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"the attention mask has shape {tuple(mask.shape)} but the layer's hidden states have "
            f"(batch, seq) = {tuple(hidden.shape[:2])}: pass a 2-D padding mask that matches the tokens"
        )
    return hidden[mask.to(device=hidden.device, dtype=torch.bool)]


def resolve_layer_selection(
    stacks: list[LayerStack], layers: Sequence[int] | dict[str, Sequence[int]]
) -> dict[str, list[int]]:
    """Check a choice of 0-based layers against a model's stacks and return it as {stack name: sorted indices}.

    Args:
        stacks (`list[LayerStack]`): the model's stacks, from [`find_layer_stacks`].
        layers (`Sequence[int]` or `dict[str, Sequence[int]]`): the layers, as a list for a one-stack model or
            per stack name (`"encoder"`, `"decoder"`) for an encoder-decoder model. Stacks left out are not selected.

    Raises:
        `ValueError`: an index that is not an integer, out of range (negative included) or named twice, an
            unknown stack name, or a plain list for a two-stack model.
    """
    if not isinstance(layers, dict):
        if len(stacks) != 1:
            names = ", ".join(repr(s.name) for s in stacks)
            raise ValueError(f"this model has several layer stacks ({names}): give the layers as {{stack name: [indices]}}")
        layers = {stacks[0].name: layers}
    by_name = {stack.name: stack for stack in stacks}
    resolved: dict[str, list[int]] = {}
    for name, indices in layers.items():
        if name not in by_name:
            raise ValueError(f"unknown layer stack {name!r}: this model has {', '.join(repr(n) for n in by_name)}")
        stack = by_name[name]
        resolved[name] = check_layer_indices(indices, len(stack), f"the {stack.name or 'model'} stack")
    return resolved


def check_layer_indices(indices: Sequence[int], count: int, where: str = "the model") -> list[int]:
    """The one check of a list of 0-based layer indices against a stack of `count` layers; returns them sorted.

    Raises:
        `ValueError`: an index that is not an integer, out of range (negative included) or named twice.
    """
    indices = [layer_index(i) for i in indices]
    for index in indices:
        if not 0 <= index < count:
            raise ValueError(f"layer {index} does not exist: {where} has {count} layers, numbered 0-{count - 1}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate layer indices in {sorted(indices)}: name each layer once")
    return sorted(indices)



@contextlib.contextmanager
def bypass_layers(model: nn.Module, layers: Sequence[int] | dict[str, Sequence[int]]) -> Iterator[None]:
    """Make the given 0-based layers act as identity inside the block, without changing the model.

    The layer still runs (its output is replaced by its input), so this is for evaluating a choice of
    layers before cutting them, not for speed. Layers that return a tuple keep their other outputs.
    """
    stacks = find_layer_stacks(model)
    selection = resolve_layer_selection(stacks, layers)
    modules = [stack.layers[index] for stack in stacks for index in selection.get(stack.name, [])]
    with scale_residual_updates(modules, 0.0):
        yield


@contextlib.contextmanager
def scale_residual_updates(layers: Sequence[nn.Module], alpha: float) -> Iterator[None]:
    """Inside the block, each of ``layers`` returns `input + alpha · (output − input)`: it keeps the fraction
    ``alpha`` of its residual update.

    At `alpha == 0` a layer returns its input itself (exactly the model without it, see [`bypass_layers`]); a
    layer that returns a tuple keeps its other outputs.
    """

    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        if alpha == 0.0:
            scaled = hidden_in
        else:
            hidden_out = output if isinstance(output, torch.Tensor) else output[0]
            scaled = hidden_in + alpha * (hidden_out - hidden_in)
        return scaled if isinstance(output, torch.Tensor) else (scaled, *output[1:])

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for a block, then give every module back its own previous mode.

    Restoring each module's flag (rather than calling `model.train()`) keeps deliberately frozen parts in eval.
    """
    modes = {module: module.training for model in models for module in model.modules()}
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
