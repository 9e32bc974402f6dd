"""Score layers with only one layer's weights resident: a checkpoint read from its safetensors shards, layer by layer.

[`score_layers`] runs the whole model. Block Influence, angular distance and MSW need only one layer's input and
output at a time, so [`score_layers_layerwise`] builds the model's skeleton on the meta device, loads what runs
before the first layer (the embeddings), and runs the model's own forward once per calibration batch with every
layer replaced by a stand-in that records the arguments transformers passes it (attention masks, position
embeddings, position ids) and hands its input on unchanged. The embedded calibration rows are kept (float32), then
each layer in turn is loaded from the shards (only its own tensors), run on the kept hidden states with the recorded
arguments, scored through the same [`ScoreSums`] as the whole-model pass, and freed; its outputs are the next
layer's inputs. The scores equal [`score_layers`]'s on the same checkpoint and data.

What cannot be done exactly this way is refused: a checkpoint that needs its own code, a quantized one, an
encoder-decoder, tensors stored under other names or shapes than the model's (transformers renames or fuses them on
load), layers that share weights with each other or with the rest of the model, and a forward that changes the
hidden states between layers (DeBERTa's convolution after layer 0, Gemma-3n's per-layer inputs).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers.utils.logging import tqdm

from .layers import LayerStack, find_layer_stacks, token_cloud
from .msw import DirectionSearch
from .scoring import LayerScores, ScoreSums, calibration_batches
from .sourcecheck import check_weight_files

__all__ = ["score_layers_layerwise"]


class _Stop(Exception):
    """Raised by the last stand-in: the forward has handed every layer its arguments; the rest need not run."""


class _Recorder(nn.Module):
    """Stands in for one layer during the capture pass: records its call and returns its hidden states unchanged.

    Attribute reads it does not have (`attention_type`, `layer_type`, ... that a model's loop may look at) go to
    the real layer, which stays on the meta device.
    """

    def __init__(self, layer: nn.Module, index: int, calls: list, last: bool):
        super().__init__()
        self.layer = layer
        self.index = index
        self.calls = calls
        self.last = last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((self.index, hidden, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


class _Checkpoint:
    """The tensors of a local safetensors checkpoint: which file holds each, and its shape, read from the headers."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise ValueError(
                f"{folder} has no model.safetensors (nor an index of shards): layer-by-layer scoring reads safetensors "
                "checkpoints only; save the model with save_pretrained (safetensors), or score it in memory"
            )
        self.folder = folder
        self.files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise ValueError(f"the shard index of {folder} names files that are not there: {', '.join(missing[:3])}")
        self.shapes = {}
        self.dtypes = {}
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = piece.get_dtype()
        absent = sorted(set(self.files) - set(self.shapes))
        if absent:
            raise ValueError(f"the shard index of {folder} names tensors its files do not hold: {', '.join(absent[:3])}")

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, some in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in some:
                    tensors[name] = handle.get_tensor(name)
        return tensors


def _refuse(folder: Path, why: str) -> ValueError:
    return ValueError(f"cannot score {folder} layer by layer: {why}; score it in memory instead")


def _skeleton(folder: Path, checkpoint: _Checkpoint) -> tuple[nn.Module, torch.dtype]:
    """The model as saved (its `architectures[0]`), built on the meta device in the dtype `from_pretrained` would use."""
    if json.loads((folder / "config.json").read_text()).get("auto_map"):  # read before any code could run
        raise _refuse(folder, "it needs its own Python code (auto_map), and only transformers' own classes run here")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if getattr(config, "quantization_config", None):
        raise _refuse(folder, "it is quantized, and its layers would have to be loaded the way its quantizer does")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(folder, "it is an encoder-decoder model")
    architecture = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, architecture, None) if architecture else None
    cls = cls if isinstance(cls, type) else transformers.AutoModel
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):  # as from_pretrained's "auto": the first floating tensor's dtype
        stored = next((d for d in checkpoint.dtypes.values() if d in ("F32", "F16", "BF16")), "F32")
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[stored]
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies, position ids) are real
        model = (cls.from_config if cls.__name__.startswith("Auto") else cls._from_config)(config, dtype=dtype)
    return model.eval(), dtype


def _check_layout(folder: Path, model: nn.Module, stack: LayerStack, checkpoint: _Checkpoint) -> list[str]:
    """The parameter names to load before the first layer; refuses names or shapes the checkpoint does not hold as the
    model does, and layers that share weights."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(p) for p in output.parameters()} if output is not None else set()
    layer_of = {}
    for index, layer in enumerate(stack.layers):
        for parameter in layer.parameters():
            if id(parameter) in layer_of:
                raise _refuse(folder, f"layers {layer_of[id(parameter)]} and {index} share weights")
            layer_of[id(parameter)] = index
    outside = []
    for name, parameter in model.named_parameters():
        if name.startswith(stack.path + ".") and id(parameter) in layer_of:
            pass
        elif id(parameter) in layer_of:
            raise _refuse(folder, f"layer {layer_of[id(parameter)]} shares its weights with {name}, outside the layers")
        elif id(parameter) in head and name not in checkpoint.shapes:
            continue  # an output head tied to the embeddings, or one that runs only after the layers
        else:
            outside.append(name)
        if name not in checkpoint.shapes or checkpoint.shapes[name] != tuple(parameter.shape):
            found = "absent" if name not in checkpoint.shapes else f"of shape {checkpoint.shapes[name]}"
            raise _refuse(
                folder,
                f"the model's tensor {name} (shape {tuple(parameter.shape)}) is {found} in the checkpoint (transformers "
                "renames, fuses or ties tensors of this checkpoint on load)",
            )
    return [name for name in outside if id(model.get_parameter(name)) not in head]


def _load(model: nn.Module, checkpoint: _Checkpoint, names: Sequence[str], device) -> None:
    """Materialise the named parameters from the shards, each in the dtype the skeleton gave it."""
    for name, tensor in checkpoint.read(names).items():
        set_module_tensor_to_device(model, name, device, value=tensor, clear_cache=False)


def _free(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        set_module_tensor_to_device(model, name, "meta", clear_cache=False)


def _capture(folder: Path, model: nn.Module, stack: LayerStack, batches, device, progress: bool) -> list[dict]:
    """Run the model's forward per batch with recording stand-ins for the layers: per batch, the first layer's hidden
    states (float32), the padding mask and each layer's other arguments."""
    calls: list = []
    layers = list(stack.layers)
    for index, layer in enumerate(layers):
        stack.layers[index] = _Recorder(layer, index, calls, last=index == len(layers) - 1)
    parameters = inspect.signature(model.forward).parameters.values()
    accepts_cache = any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    kept = []
    try:
        for batch in tqdm(batches, desc="embedding the calibration rows", unit="batch", disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            calls.clear()
            try:
                model(**batch, **({"use_cache": False} if accepts_cache else {}))
            except _Stop:
                pass
            except (TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
                raise _refuse(
                    folder,
                    "its forward expects more of a layer than hidden states in and out (with stand-ins for the "
                    f"layers it failed: {type(error).__name__}: {error})",
                ) from error
            kept.append(_one_batch(folder, calls, len(layers), batch.get(stack.mask_key)))
    finally:
        for index, layer in enumerate(layers):
            stack.layers[index] = layer
    return kept


def _one_batch(folder: Path, calls: list, count: int, mask) -> dict:
    if [index for index, *_ in calls] != list(range(count)):
        raise _refuse(folder, f"its forward called the layers in the order {[i for i, *_ in calls]}, not once each in turn")
    for (index, hidden, _, _), (_, previous, _, _) in zip(calls[1:], calls[:-1]):
        if hidden is not previous:
            raise _refuse(
                folder,
                f"its forward changes the hidden states between layers {index - 1} and {index} (layer {index} does not "
                f"get layer {index - 1}'s output as it is)",
            )
    return {
        "hidden": calls[0][1].float(),
        "mask": mask,
        "arguments": [(args, kwargs) for _, _, args, kwargs in calls],
    }


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def score_layers_layerwise(
    path: str | os.PathLike,
    data: object,
    *,
    method: str = "msw",
    tokenizer: object | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    direction_search: DirectionSearch | None = None,
    normalization: str = "none",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LayerScores:
    """Score every layer of a saved checkpoint with only one layer's weights in memory at a time.

    The same scores as [`score_layers`] on the model `from_pretrained(path)` gives (same dtype, same attention
    implementation), with peak memory of about one layer's weights, the embeddings, and the calibration hidden states
    (float32, kept on `device`). See the module docstring for how, and for what is refused.

    Args:
        path (`str` or `os.PathLike`): a local folder with `config.json` and safetensors weights (one file or shards).
        data: the calibration data, in any form [`score_layers`] takes; it is read once.
        method, tokenizer, batch_size, max_length, direction_search, normalization, progress: as for [`score_layers`].
        device (`str` or `torch.device`, defaults to `"cpu"`): where each layer runs and the hidden states are kept.

    Returns:
        [`LayerScores`]: the per-layer scores in the original 0-based numbering.

    Raises:
        `ValueError`: what [`score_layers`] refuses, and what cannot be scored exactly layer by layer (the message
            says why and to score in memory instead).
    """
    folder = Path(path)
    check_weight_files(folder)
    checkpoint = _Checkpoint(folder)
    model, dtype = _skeleton(folder, checkpoint)
    stacks = find_layer_stacks(model)
    if len(stacks) != 1:
        raise _refuse(folder, f"it has {len(stacks)} layer stacks")
    stack = stacks[0]
    sums = ScoreSums(method, len(stack), stack=stack.name, direction_search=direction_search, normalization=normalization)
    front = _check_layout(folder, model, stack, checkpoint)
    saved = checkpoint.read([name for name, _ in model.named_buffers() if name in checkpoint.shapes])
    for name, buffer in list(model.named_buffers()):  # built by the skeleton, or saved (persistent ones)
        set_module_tensor_to_device(model, name, device, value=saved.get(name, buffer), clear_cache=False)
    _load(model, checkpoint, front, device)
    with torch.no_grad():
        batches = _capture(folder, model, stack, calibration_batches(data, tokenizer, batch_size, max_length), device, progress)
    _free(model, front)
    with torch.no_grad():
        for index, layer in enumerate(tqdm(stack.layers, desc=f"scoring layer by layer ({method})", disable=not progress)):
            names = [f"{stack.path}.{index}.{name}" for name, _ in layer.named_parameters()]
            _load(model, checkpoint, names, device)
            for batch in batches:
                hidden = batch["hidden"].to(dtype)
                args, kwargs = batch["arguments"][index]
                output = _first_tensor(layer(hidden, *args, **kwargs))
                sums.add(index, token_cloud(hidden, batch["mask"]), token_cloud(output, batch["mask"]))
                batch["hidden"] = output.float()
            _free(model, names)
    return sums.scores(torch.device(device))
