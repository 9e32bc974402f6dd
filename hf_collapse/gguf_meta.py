"""Per-layer metadata that llama.cpp's converter leaves out of a GGUF made from a collapsed export.

llama.cpp gives several families a per-layer attention kind by a period (Gemma-3: every 6th layer is global;
Gemma-2 and gpt-oss: every 2nd; Cohere2 and Llama-4: every 4th; ModernBERT: every 3rd, the first included) unless
the file holds the bool array `{arch}.attention.sliding_window_pattern`, one entry per layer. `convert_hf_to_gguf.py`
writes that array for some families and not for these, so a collapsed model whose kept layers no longer follow the
period converts without error and runs with the wrong window (and, for Gemma-3, the wrong RoPE base) on the wrong
layers. `write_layer_metadata` copies the GGUF with the array built from the export's `layer_types`.

Some per-layer kinds llama.cpp derives from a period it cannot be told otherwise (Llama-4 and SmolLM3: the layers
without RoPE; Llama-4: the MoE layers). When the kept layers break such a rule, no metadata can fix the file and it
is refused.

Gemma-2/3 ignore `query_pre_attn_scalar` and take the query scale from the layer count (1/sqrt(hidden / heads) at the
27B models' counts, 1/sqrt(head_dim) otherwise), so a collapsed 27B gets the wrong one. No key sets it, but the
queries are linear in one tensor per layer ahead of that scale: Gemma-3's query norm (RMS norm, then its weight),
Gemma-2's query projection. `write_layer_metadata` multiplies that tensor by sqrt(llama.cpp's / the model's scalar),
so that llama.cpp's scale times it is the model's (RoPE is linear, so the order does not matter), and records the
factor under `hf_collapse.query_scale_folded` so that a second run does not apply it twice. The `gguf` package is
imported only when a file is read or written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["FAMILIES", "GgufFamily", "LayerMetadataResult", "LlamaCppFit", "llama_cpp_fit", "write_layer_metadata"]

SWA_KEY = "{arch}.attention.sliding_window_pattern"
# the factor folded into the query tensors (a float); llama.cpp ignores keys it does not know
QUERY_SCALE_KEY = "hf_collapse.query_scale_folded"


def _rope_every_4(values: dict, n_layer: int) -> list[bool]:
    # llama.cpp (SmolLM3; Llama-4 with chunked attention): use_rope = (il + 1) % 4 != 0.
    return [(i + 1) % 4 != 0 for i in range(n_layer)]


def _llama4_rope(values: dict, n_layer: int) -> list[bool]:
    # Llama-4 without chunked attention (sliding_window 0) makes the step the layer count instead of 4.
    step = n_layer if values.get("sliding_window") == 0 else 4
    return [(i + 1) % step != 0 for i in range(n_layer)]


def _moe_every(values: dict, n_layer: int) -> list[bool]:
    # llama.cpp (Llama-4): layer i is MoE iff step > 0 and (i + 1) % step == 0.
    step = values.get("interleave_moe_layer_step", 0)
    return [step > 0 and (i + 1) % step == 0 for i in range(n_layer)]


def _uses_rope(config: dict) -> list[bool] | None:
    flags = config.get("no_rope_layers")  # transformers: 1 = the layer applies RoPE
    return None if flags is None else [bool(f) for f in flags]


def _is_moe(config: dict) -> list[bool] | None:
    if config.get("moe_layers") is None:
        return None
    moe = set(config["moe_layers"])
    return [i in moe for i in range(config["num_hidden_layers"])]


@dataclass(frozen=True)
class FixedPeriod:
    """A per-layer kind that llama.cpp derives from a period, with no key to give it layer by layer.

    Attributes:
        what (`str`): the kind, as a message names it.
        from_config: the kind of each layer of the export (from its config dict), or None when the config does not say.
        in_llama_cpp: the kind llama.cpp gives each layer, from the GGUF's `{arch}.*` values (suffix → value).
    """

    what: str
    from_config: Callable[[dict], list[bool] | None]
    in_llama_cpp: Callable[[dict, int], list[bool]]


@dataclass(frozen=True)
class GgufFamily:
    """What llama.cpp reads per layer for one GGUF architecture.

    Attributes:
        architectures (`tuple[str, ...]`): the transformers classes (config `architectures`) the converter turns
            into this GGUF architecture.
        sliding (`tuple[str, ...]`): the `layer_types` values llama.cpp runs with its window (SWA or chunked); when
            not empty, the file gets `{arch}.attention.sliding_window_pattern`, True for those layers.
        period (`tuple[int, bool]`): the window period llama.cpp assumes without the array, and whether the
            period's global layer comes first (`load_swa_pattern(ml, period, dense_first)`).
        fixed (`tuple[FixedPeriod, ...]`): per-layer kinds llama.cpp derives from a period it cannot be told.
        wide_query_scale (`tuple[int, ...] | None`): for families that ignore the config's `query_pre_attn_scalar`,
            the layer counts at which llama.cpp scales queries by 1/sqrt(hidden_size / heads) instead of
            1/sqrt(head_dim) (its 27B sizes); None for families without that scalar.
        query_tensor (`str | None`): for those families, the GGUF tensor of layer `{}` that the queries are linear
            in just before llama.cpp's scale, where `gguf-metadata` folds the scale the model needs.
    """

    architectures: tuple[str, ...]
    sliding: tuple[str, ...] = ()
    period: tuple[int, bool] = (0, False)
    fixed: tuple[FixedPeriod, ...] = ()
    wide_query_scale: tuple[int, ...] | None = None
    query_tensor: str | None = None


_SLIDING = ("sliding_attention",)
# Gemma-3's query norm (the converter stores 1 + weight) and Gemma-2's query projection (it has no query norm)
_Q_NORM, _Q_PROJ = "blk.{}.attn_q_norm.weight", "blk.{}.attn_q.weight"
_NO_ROPE = "layers without RoPE (no_rope_layers)"

# Keyed by the GGUF architecture name (`general.architecture`). Checked against llama.cpp as vendored in
# llama-cpp-python 0.3.36 (src/models/*.cpp: load_swa_pattern, n_no_rope_layer_step, n_moe_layer_step).
FAMILIES: dict[str, GgufFamily] = {
    "gemma3": GgufFamily(
        ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), _SLIDING, (6, False), wide_query_scale=(62,),
        query_tensor=_Q_NORM,
    ),
    "gemma-embedding": GgufFamily(("Gemma3TextModel",), _SLIDING, (6, False), wide_query_scale=(), query_tensor=_Q_NORM),
    "gemma2": GgufFamily(("Gemma2ForCausalLM",), _SLIDING, (2, False), wide_query_scale=(46,), query_tensor=_Q_PROJ),
    "cohere2": GgufFamily(("Cohere2ForCausalLM",), _SLIDING, (4, False)),
    "gpt-oss": GgufFamily(("GptOssForCausalLM",), _SLIDING, (2, False)),
    "modern-bert": GgufFamily(
        ("ModernBertModel", "ModernBertForMaskedLM", "ModernBertForSequenceClassification"), _SLIDING, (3, True)
    ),
    "llama4": GgufFamily(
        ("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
        ("chunked_attention",),
        (4, False),
        (FixedPeriod(_NO_ROPE, _uses_rope, _llama4_rope), FixedPeriod("MoE layers (moe_layers)", _is_moe, _moe_every)),
    ),
    "smollm3": GgufFamily(("SmolLM3ForCausalLM",), fixed=(FixedPeriod(_NO_ROPE, _uses_rope, _rope_every_4),)),
    # Families whose layers are all alike in llama.cpp: nothing per layer to write.
    "llama": GgufFamily(("LlamaForCausalLM", "MistralForCausalLM")),
    "qwen2": GgufFamily(("Qwen2ForCausalLM",)),
    "qwen3": GgufFamily(("Qwen3ForCausalLM", "Qwen3Model")),
    "phi3": GgufFamily(("Phi3ForCausalLM",)),
    "gemma": GgufFamily(("GemmaForCausalLM",)),
}


@dataclass(frozen=True)
class LayerMetadataResult:
    """What `write_layer_metadata` did.

    Attributes:
        path (`Path | None`): the file written, or None when the GGUF already held the right metadata.
        architecture (`str`): the GGUF architecture.
        written (`dict[str, list[bool] | float]`): the keys written, with their values.
        rescaled (`dict[str, float]`): the tensors multiplied by a factor (the query scale, see the module), by name.
    """

    path: Path | None
    architecture: str
    written: dict[str, list[bool] | float]
    rescaled: dict[str, float] = dataclasses.field(default_factory=dict)


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


@dataclass(frozen=True)
class LlamaCppFit:
    """How an export converts to llama.cpp (see `llama_cpp_fit`).

    Attributes:
        architecture (`str`): the GGUF architecture the converter makes of it.
        needs_metadata (`bool`): run `hf-collapse gguf-metadata` on the converted file: the kept layers leave
            llama.cpp's default window period and the converter writes no per-layer array for this family, or
            llama.cpp's query scale is not the model's (`query_scale`).
        unsupported (`tuple[str, ...]`): per-layer kinds llama.cpp derives from a period, that the kept layers break
            and that no key can override (llama.cpp would run the model wrong).
        query_scale (`tuple[float, float] | None`): (the model's query_pre_attn_scalar, the one llama.cpp would use)
            when they differ; `gguf-metadata` folds the difference into `query_tensor`.
        query_tensor (`str | None`): that tensor, as llama.cpp names it (layer `{}`).
        window_pattern (`bool`): the window pattern is among what `gguf-metadata` writes.
    """

    architecture: str
    needs_metadata: bool
    unsupported: tuple[str, ...]
    query_scale: tuple[float, float] | None = None
    query_tensor: str | None = None
    window_pattern: bool = False


def _broken_periods(family: GgufFamily, text: dict, values: dict) -> tuple[str, ...]:
    n_layer = text["num_hidden_layers"]
    return tuple(
        fixed.what for fixed in family.fixed
        if (wanted := fixed.from_config(text)) is not None and list(wanted) != fixed.in_llama_cpp(values, n_layer)
    )


def _query_scale(family: GgufFamily, text: dict) -> tuple[float, float] | None:
    """(the config's query_pre_attn_scalar, the one llama.cpp uses) when they differ, else None."""
    wanted = text.get("query_pre_attn_scalar")
    if family.wide_query_scale is None or wanted is None:
        return None
    if text["num_hidden_layers"] in family.wide_query_scale:
        if not (text.get("hidden_size") and text.get("num_attention_heads")):
            return None  # a nested config written without its defaults: nothing to compare
        used = text["hidden_size"] // text["num_attention_heads"]
    else:
        used = text.get("head_dim", 256)  # the converter's default for key_length
    return None if float(used) == float(wanted) else (float(wanted), float(used))


def llama_cpp_fit(config: dict) -> LlamaCppFit | None:
    """What converting this export (its `config.json` as a dict) to llama.cpp needs, or None for a family hf-collapse
    has no llama.cpp table for. A model whose layers follow llama.cpp's periods (a full one, say) needs nothing."""
    architecture = (config.get("architectures") or [None])[0]
    arch = next((name for name, family in FAMILIES.items() if architecture in family.architectures), None)
    if arch is None:
        return None
    family, text = FAMILIES[arch], _text_config(config)
    layer_types = text.get("layer_types") or []
    # what the converter writes that the periods depend on (Llama-4: sliding_window 0 when no layer is chunked)
    values = {
        "sliding_window": 0 if layer_types and all(t == "full_attention" for t in layer_types) else None,
        "interleave_moe_layer_step": text.get("interleave_moe_layer_step", 0),
    }
    needs = bool(family.sliding and layer_types) and (
        _period_flags(family, len(layer_types)) != _sliding_flags(family, layer_types)
    )
    scale = _query_scale(family, text)
    return LlamaCppFit(
        arch, needs or scale is not None, _broken_periods(family, text, values), scale,
        family.query_tensor if scale is not None else None, needs,
    )


def _period_flags(family: GgufFamily, n_layer: int) -> list[bool]:
    """The window flags llama.cpp gives `n_layer` layers from the family's period (llama-hparams.cpp)."""
    period, dense_first = family.period
    if dense_first:
        return [i % period != 0 for i in range(n_layer)]
    return [i % period < period - 1 for i in range(n_layer)]


def _sliding_flags(family: GgufFamily, layer_types: list[str]) -> list[bool]:
    return [kind in family.sliding for kind in layer_types]


def _read_export(out: Path) -> dict:
    path = out / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} has no config.json: give --from the export folder the GGUF was converted from")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): give --from an intact export folder") from None


def _removed_layers(out: Path) -> list[int] | None:
    path = out / "collapse_report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("collapsed_layers")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path} is not a valid collapse report: give --from an intact export folder") from None


def _open_gguf(path: Path):
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading a GGUF needs the gguf package: pip install gguf") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: give the GGUF that llama.cpp's converter wrote")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as error:
        raise ValueError(f"{path} is not a readable GGUF file ({error})") from None


def _field_value(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _arch_values(reader, arch: str) -> dict:
    prefix = f"{arch}."
    return {name[len(prefix):]: _field_value(reader, name) for name in reader.fields if name.startswith(prefix)}


def _check_match(reader, gguf_path: Path, out: Path, config: dict) -> tuple[str, GgufFamily, dict]:
    arch = _field_value(reader, "general.architecture")
    if arch not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(
            f"{gguf_path} is a llama.cpp {arch!r} model, whose per-layer metadata hf-collapse does not know "
            f"(it knows {known}): check llama.cpp's loader for that architecture instead"
        )
    family = FAMILIES[arch]
    architecture = (config.get("architectures") or ["(none)"])[0]
    if architecture not in family.architectures:
        raise ValueError(
            f"{gguf_path} is a llama.cpp {arch!r} model but {out} holds a {architecture}, which the converter does not "
            f"turn into {arch!r}: give --from the export this GGUF was converted from"
        )
    text = _text_config(config)
    n_layer = text.get("num_hidden_layers")
    if not isinstance(n_layer, int):
        raise ValueError(f"{out}/config.json gives no num_hidden_layers: give --from an intact export folder")
    blocks = _field_value(reader, f"{arch}.block_count")
    if blocks != n_layer:
        raise ValueError(
            f"{gguf_path} has {blocks} layers ({arch}.block_count) but {out} has {n_layer}: it was converted from "
            "another model; convert this export again, or give --from the folder it was converted from"
        )
    return arch, family, text


def _plan(reader, gguf_path: Path, out: Path, config: dict) -> tuple[str, dict, dict[str, float]]:
    """The keys to write (name → bool list, or the folded query factor) and the tensors to rescale (name → factor),
    after refusing a mismatch or a period llama.cpp cannot be told."""
    arch, family, text = _check_match(reader, gguf_path, out, config)
    broken = _broken_periods(family, text, _arch_values(reader, arch))
    if broken:
        removed = _removed_layers(out)
        cut = f" after removing layers {removed}" if removed else ""
        raise ValueError(
            f"llama.cpp's {arch!r} model gives the {' and the '.join(broken)} by a fixed period that the kept layers "
            f"of {out} no longer follow{cut}, and GGUF has no key to give them layer by layer: llama.cpp would run "
            "this model wrong; remove other layers (keeping the period), or run the export in transformers"
        )
    keys, rescale = _query_plan(reader, gguf_path, family, text)
    return arch, {**_window_keys(reader, arch, family, text, out), **keys}, rescale


def _query_plan(reader, gguf_path: Path, family: GgufFamily, text: dict) -> tuple[dict, dict[str, float]]:
    """The query tensors to multiply so that llama.cpp's query scale becomes the model's (see the module), and the
    key recording it; nothing when the scales agree or the file holds the factor already."""
    import gguf

    scale = _query_scale(family, text)
    if scale is None:
        return {}, {}
    factor = math.sqrt(scale[1] / scale[0])  # llama.cpp multiplies by 1/sqrt(used); the model needs 1/sqrt(wanted)
    done = _field_value(reader, QUERY_SCALE_KEY)
    if done is not None:
        if math.isclose(float(done), factor, rel_tol=1e-6):
            return {}, {}
        raise ValueError(
            f"{gguf_path} already has its queries multiplied by {float(done):g} ({QUERY_SCALE_KEY}) where this export "
            f"needs {factor:g}: it was fixed for another export; convert this export again and run gguf-metadata on that"
        )
    names = [family.query_tensor.format(i) for i in range(text["num_hidden_layers"])]
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if missing := [name for name in names if name not in tensors]:
        raise ValueError(
            f"{gguf_path} has no tensor {missing[0]}, where llama.cpp's converter puts the query weights the query scale "
            "is folded into: convert the export again with llama.cpp's convert_hf_to_gguf.py"
        )
    unquantized = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    if quantized := [name for name in names if tensors[name].tensor_type not in unquantized]:
        kind = gguf.GGMLQuantizationType(tensors[quantized[0]].tensor_type).name
        raise ValueError(
            f"{gguf_path}'s {quantized[0]} is {kind}, and the query scale is folded into it only unquantized: convert "
            "with --outtype bf16 (or f16, f32), run gguf-metadata on that file, then quantize the result with "
            "llama-quantize"
        )
    return {QUERY_SCALE_KEY: factor}, {name: factor for name in names}


def _window_keys(reader, arch: str, family: GgufFamily, text: dict, out: Path) -> dict:
    """The window-pattern key to write (name → bool list), or nothing when the family has none or the file has it."""
    n_layer = text["num_hidden_layers"]
    if not family.sliding:
        return {}
    layer_types = text.get("layer_types")
    if not layer_types or len(layer_types) != n_layer:
        raise ValueError(
            f"{out}/config.json gives no layer_types with one entry per layer ({n_layer}): the window pattern cannot "
            "be written; collapse the model with hf-collapse, which keeps layer_types"
        )
    key = SWA_KEY.format(arch=arch)
    flags = _sliding_flags(family, layer_types)
    current = _field_value(reader, key)
    if isinstance(current, list) and [bool(v) for v in current] == flags:
        return {}
    return {key: flags}


def _target(gguf_path: Path, output: str | os.PathLike | None, in_place: bool) -> Path:
    if in_place:
        if output is not None:
            raise ValueError("give --output or --in-place, not both")
        return gguf_path
    target = Path(output) if output is not None else gguf_path.with_name(f"{gguf_path.stem}-layers.gguf")
    if target.absolute() == gguf_path.absolute() or (target.exists() and target.samefile(gguf_path)):
        raise ValueError(f"--output {target} is the input file: pass --in-place to rewrite it")
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists: remove it or choose another --output (nothing was written)")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the folder of --output {target} does not exist: create it first")
    return target


def _scaled(tensor, factor: float):
    """``tensor``'s data (F32, F16 or BF16, as `_query_plan` checked) multiplied by ``factor``, in its own type."""
    import gguf
    import numpy as np

    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:  # the reader gives BF16 as raw bytes
        raw = np.ascontiguousarray(tensor.data).view(np.uint16)
        values = (raw.astype(np.uint32) << 16).view(np.float32) * np.float32(factor)
        bits = values.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even, as torch does
        return rounded.astype(np.uint16).view(np.uint8).reshape(tensor.data.shape)
    return (tensor.data.astype(np.float64) * factor).astype(tensor.data.dtype)


def _add_key(writer, name: str, value) -> None:
    import gguf

    if isinstance(value, float):
        writer.add_key_value(name, value, gguf.GGUFValueType.FLOAT32)
    else:  # a window pattern (a period written as an integer before becomes the array)
        writer.add_key_value(name, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL)


def _copy_with(reader, arch: str, new: dict, target: Path, rescale: dict[str, float]) -> None:
    """Write ``reader``'s keys and tensors to ``target`` atomically, with ``new`` (key → bool list or float) set and
    the tensors of ``rescale`` multiplied by their factor."""
    import gguf
    from .paths import sibling_prefix

    handle, staging = tempfile.mkstemp(prefix=f"{sibling_prefix(target)}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, arch, endianess=reader.endianess)
        writer.data_alignment = reader.alignment
        pending = dict(new)
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            if field.name in pending:  # replaced where it was
                _add_key(writer, field.name, pending.pop(field.name))
                continue
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
        for key, value in pending.items():
            _add_key(writer, key, value)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = _scaled(tensor, rescale[tensor.name]) if tensor.name in rescale else tensor.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        with open(staging, "rb") as done:
            os.fsync(done.fileno())
        os.replace(staging, target)
    except (OSError, ValueError) as error:
        error.work_began = True  # the command reports a failure while writing with exit 1, not as a refusal
        raise
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def write_layer_metadata(
    gguf_path: str | os.PathLike, export: str | os.PathLike, output: str | os.PathLike | None = None,
    *, in_place: bool = False,
) -> LayerMetadataResult:
    """Write the per-layer metadata llama.cpp needs into a GGUF converted from the export ``export``: the window
    pattern, and for Gemma-2/3 the query scale folded into the query tensors when llama.cpp's is not the model's.

    Args:
        gguf_path: the GGUF file `convert_hf_to_gguf.py` wrote from ``export``; read, never changed unless
            ``in_place``.
        export: the export folder (its `config.json`; `collapse_report.json` when present, for the messages).
        output: where to write the new file (default: beside ``gguf_path``, named `NAME-layers.gguf`); must not exist.
        in_place: replace ``gguf_path`` itself (atomically) instead.

    Returns:
        A [`LayerMetadataResult`]; its `path` is None when the file already held what llama.cpp needs.

    Raises:
        `ValueError`: the GGUF's architecture or layer count does not match the export, llama.cpp derives a
            per-layer kind the kept layers break from a period no key can override, or the query tensors a scale
            must be folded into are quantized (convert unquantized, fix, then quantize).
        `FileNotFoundError` / `FileExistsError`: a missing input, or an output that exists already.
    """
    gguf_path, export = Path(gguf_path), Path(export)
    target = _target(gguf_path, output, in_place)
    config = _read_export(export)
    reader = _open_gguf(gguf_path)
    arch, new, rescale = _plan(reader, gguf_path, export, config)
    if not new:
        return LayerMetadataResult(None, arch, {})
    _copy_with(reader, arch, new, target, rescale)
    return LayerMetadataResult(target, arch, new, rescale)
