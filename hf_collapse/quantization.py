"""bitsandbytes 4-/8-bit weights (QLoRA): loading a recipe's model quantised, describing it, and leaving it.

A recipe with `load_in_4bit` or `load_in_8bit` trains LoRA adapters on quantised linear layers. Everything
downstream (the collapse, the export, the card) works on a plain full-precision model: [`merge_dequantized`] merges
the adapters into a full-precision copy of the dequantised weights, and an export of weights still quantised is
refused. [`describe_quantization`] puts into words, for the card, what the weights were during training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn

from .layers import unwrap_model
from .peft_state import has_bnb_weights, is_peft_model

if TYPE_CHECKING:
    from peft import PeftModel

    from .recipe import RecipeArguments

__all__ = [
    "describe_quantization",
    "disable_cpu_repacking",
    "is_quantized",
    "merge_dequantized",
    "prepare_quantized",
    "quantization_config",
    "quantized_loading",
    "refuse_quantized_export",
]


def quantization_config(recipe: RecipeArguments, device) -> transformers.BitsAndBytesConfig | None:
    """The `BitsAndBytesConfig` of a recipe with `load_in_4bit` or `load_in_8bit` (else `None`) for ``device``:
    `bnb_4bit_compute_dtype: auto` computes in float32 on the CPU (exactly the dequantised weights, which the merge
    after training reproduces) and in bfloat16 on GPUs that have it (else float16)."""
    if recipe.load_in_8bit:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if not recipe.load_in_4bit:
        return None
    dtype = recipe.bnb_4bit_compute_dtype
    if dtype == "auto":
        dtype = "float32" if torch.device(device).type == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
        bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
    )


def quantized_loading(recipe: RecipeArguments, device=None) -> dict[str, object]:
    """The `from_pretrained` keyword arguments that quantise a recipe's model on ``device`` (the training device: a
    quantised model is not moved afterwards; default: the current CUDA device, else the CPU)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": quantization_config(recipe, device), "device_map": {"": device}}


def prepare_quantized(model: nn.Module) -> nn.Module:
    """Prepare a freshly loaded quantised model for LoRA training, as QLoRA trains; returns the model."""
    # For its cast of the parameters left unquantised (norms, embeddings, head) from half precision to float32,
    # as QLoRA trains, and its freezing; not for its activation checkpointing, which it turns on by default:
    # that stays the recipe's choice (activation_checkpointing), as without quantisation.
    import peft  # peft (and bitsandbytes) load only when a quantised model is trained

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    disable_cpu_repacking(model)  # else the first evaluation on some CPUs would stop the gradients
    return model


def describe_quantization(model) -> str | None:
    """What bitsandbytes quantised a model's weights to, in words for its card (e.g. `"4-bit nf4 weights
    (bitsandbytes, computing in float32)"`, `"8-bit LLM.int8() weights (bitsandbytes)"`); `None` for a model that
    is not quantised. Read it before [`merge_dequantized`], which removes the quantisation config."""
    inner = unwrap_model(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(inner.config, "quantization_config", None)
    method = getattr(config, "quant_method", None)
    if getattr(method, "value", method) != "bitsandbytes":
        return None
    if config.load_in_8bit:
        return "8-bit LLM.int8() weights (bitsandbytes)"
    how = ["bitsandbytes"] + (["double quantisation"] if config.bnb_4bit_use_double_quant else [])
    how.append(f"computing in {str(config.bnb_4bit_compute_dtype).removeprefix('torch.')}")
    return f"4-bit {config.bnb_4bit_quant_type} weights ({', '.join(how)})"


def is_quantized(model: nn.Module) -> bool:
    """Whether any of the model's parameters is a bitsandbytes 4-/8-bit weight."""
    return has_bnb_weights(model.parameters())


def refuse_quantized_export(model: nn.Module) -> None:
    """Refuse to export bitsandbytes 4-/8-bit weights: an export is a plain full-precision model."""
    if is_quantized(model):
        raise ValueError(
            "the model's weights are bitsandbytes 4-/8-bit weights, and an export is a plain full-precision model "
            "(its card says how to load it without bitsandbytes): dequantise it first (model.dequantize()), or after "
            "QLoRA merge the adapters with merge_dequantized(peft_model)"
        )


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep a model's bitsandbytes 4-bit layers in the layout they train in; returns how many layers it changed.

    On CPUs with AVX512-BF16, bitsandbytes (0.50.2) repacks a 4-bit layer's weights for a faster bf16 kernel at
    the first forward pass in eval mode without gradients (an evaluation, a measured choice of layers), for good.
    That kernel has no backward: training afterwards sends no gradient through the repacked layers, so the LoRA
    adapters below them stop learning without an error, and the bf16 scales round the weights by about 0.3 %.
    Here the repacking is switched off (the standard 4-bit kernels run instead, in training and evaluation alike).
    Call it after loading and before any forward pass; on other devices it changes nothing that runs.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear


def _dequantized(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its CPU kernel at the first inference forward (on CPUs with
        # AVX512-BF16): the codes are reordered and the scales stored as bf16, transposed to (blocks per row, rows)
        # and un-nested. Its inverse (used by its own state_dict()) restores the codes, but without double
        # quantisation it leaves the scales transposed (0.50.2), so each block would get another block's scale;
        # with it, it quantises the bf16 scales again. Here the codes come back through the inverse and the scales
        # are the bf16 ones the repacked kernel computes with, in block order.
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        scales = state.absmax.T.reshape(-1).float()
        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax, state.nested, state.offset, state.state2 = scales, False, None, None
        weight.quant_state = module.quant_state = state
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(weight, state=getattr(module, "state", None)).to(dtype)


def merge_dequantized(model: PeftModel) -> nn.Module:
    """Merge the adapters of a PEFT model on 4-/8-bit bitsandbytes weights (QLoRA) into full-precision weights.

    `merge_and_unload()` on such a model merges each adapter into the quantised weight and quantises the sum again,
    which changes the model. Here each quantised linear layer is dequantised to the dtype of the model's
    embeddings, the adapter's update is added in that dtype, and the layer becomes a plain `nn.Linear`; quantised
    layers without an adapter are dequantised the same way, the quantisation config is removed, and adapters on
    modules that were never quantised are merged as usual. The result is a plain transformers model that
    [`collapse_layers`] and `save_pretrained` take like any other; its weights are the dequantised ones the adapter
    was trained against, not the original full-precision weights.

    Args:
        model (`PeftModel`): the trained model; it is changed in place and must not be used afterwards.

    Returns:
        `nn.Module`: the plain (unwrapped) transformers model.

    Raises:
        `ValueError`: the model is not a PEFT model, or its base model is not quantised with bitsandbytes.
    """
    if not is_peft_model(model):
        raise ValueError(f"merge_dequantized takes a PeftModel, not a {type(model).__name__}: plain models need no merge")
    inner = model.get_base_model()
    if not is_quantized(inner):
        raise ValueError("the base model has no bitsandbytes 4-/8-bit weights: call model.merge_and_unload() instead")
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.integrations import get_bnb_param_type

    dtype = inner.get_input_embeddings().weight.dtype
    replacements: dict[str, nn.Module] = {}
    for name, module in inner.named_modules():
        if any(name.startswith(f"{done}.") for done in replacements):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not get_bnb_param_type(getattr(base, "weight", None)):
            continue
        weight = _dequantized(base, dtype)
        if base is not module:
            if not hasattr(module, "lora_A") or any(module.use_dora.get(a) for a in module.active_adapters):
                raise ValueError(
                    f"{name} carries a {type(module).__name__} adapter: merge_dequantized merges plain LoRA into "
                    "quantised layers (not DoRA or other methods)"
                )
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(dtype)
        replacements[name] = _linear(weight, base.bias)
    for name, linear in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(inner.get_submodule(parent) if parent else inner, child, linear)
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(inner)
    return model.merge_and_unload()
