"""Refuse a source checkpoint that disagrees with itself, before anything is written.

Three kinds of self-contradiction that transformers loads without an error: weights files that are not complete
safetensors files (read here from their header, without loading a tensor), a config whose layer count differs from
the layers the weights hold (surplus layers are dropped, missing ones randomly initialised; only the load report
says so) and weights that are not finite (a NaN spreads to every output, and a comparison with it proves nothing).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch

from .errors import RecipeError
from .layers import find_layer_stacks

__all__ = ["check_loaded_weights", "check_weight_files"]

_HEADER_LIMIT = 100_000_000  # safetensors itself refuses larger headers


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a complete safetensors file, or None."""
    size = file.stat().st_size
    if size < 8:
        return f"is {size} bytes long, too short for a safetensors file (empty or truncated)"
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(_HEADER_LIMIT, size - 8):
            return "does not start with a safetensors header (truncated, or not a safetensors file)"
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "has an unreadable safetensors header (corrupt, or not a safetensors file)"
    if not isinstance(header, dict):
        return "has a safetensors header that is not a JSON object"
    ends = [
        entry["data_offsets"][1] for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)
    ]
    if len(ends) != len(header) - ("__metadata__" in header):
        return "has a safetensors header with malformed tensor entries"
    if 8 + length + max(ends, default=0) > size:
        return f"is truncated: its header describes {8 + length + max(ends):,} bytes but the file has {size:,}"
    return None


def check_weight_files(path: str | os.PathLike) -> None:
    """Refuse a local checkpoint folder whose ``*.safetensors`` files are empty, truncated or not safetensors at all.

    Raises:
        [`RecipeError`]: naming the first bad file.
    """
    folder = Path(path)
    if not folder.is_dir():
        return  # a Hub id: its files are checked by the loader
    for file in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(file) if file.is_file() else None
        if problem:
            raise RecipeError(f"{file} {problem}: restore the checkpoint's weights (nothing was written)")


def _layer_pattern(stack_path: str) -> re.Pattern:
    # checkpoint keys may carry another prefix than the loaded class (bert.encoder.layer.N vs encoder.layer.N)
    tail = re.escape(".".join(stack_path.split(".")[-2:]))
    return re.compile(rf"(?:^|\.){tail}\.(\d+)\.")


def _check_layer_count(model, info: dict, name: str) -> None:
    try:
        stacks = find_layer_stacks(model)
    except ValueError:
        return  # no layer stack hf-collapse knows: the collapse itself will say so
    for stack in stacks:
        declared = f"{type(stack.config).__name__}.{stack.count_attr}={len(stack)}"
        pattern = _layer_pattern(stack.path)
        surplus = sorted({int(m.group(1)) for key in info.get("unexpected_keys", []) if (m := pattern.search(key))})
        surplus = [i for i in surplus if i >= len(stack)]
        if surplus:
            raise RecipeError(
                f"{name} holds weights of layer {surplus[-1]} of {stack.path} but its config declares {declared} "
                f"layers: the extra layers would be silently dropped; fix {stack.count_attr} in config.json to "
                f"{surplus[-1] + 1} (or remove those weights)"
            )
        missing = sorted({
            int(key[len(stack.path) + 1:].split(".")[0]) for key in info.get("missing_keys", [])
            if key.startswith(stack.path + ".") and key[len(stack.path) + 1:].split(".")[0].isdigit()
        })
        if missing:
            raise RecipeError(
                f"{name} has no weights for layer {missing[0]} of {stack.path} but its config declares {declared} "
                f"layers: those layers would be randomly initialised; fix {stack.count_attr} in config.json to the "
                "number of layers the weights hold"
            )


def check_loaded_weights(model, info: dict, name: str) -> None:
    """Refuse a model whose config and weights disagree on the layer count, or whose loaded weights are not finite.

    Args:
        model: the model as `from_pretrained(..., output_loading_info=True)` returned it.
        info (`dict`): the loading info returned with it (`missing_keys`, `unexpected_keys`).
        name (`str`): the checkpoint, for the message.

    Raises:
        [`RecipeError`]: naming the layer, or the first tensor holding NaN or infinity.
    """
    _check_layer_count(model, info, name)
    new = set(info.get("missing_keys", []))
    for key, tensor in model.state_dict().items():
        if key in new or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise RecipeError(
                f"{name} has non-finite weights (NaN or infinity) in {key}: the checkpoint is broken (a diverged "
                "training run, or a bad conversion); collapse a checkpoint with finite weights"
            )
