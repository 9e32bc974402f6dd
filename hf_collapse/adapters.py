"""PEFT adapters and collapsed models: carry a full-depth adapter over to the collapsed model, or refuse it.

An adapter names the modules it changes by their path, and the path holds the layer's position
(`model.layers.5.self_attn.q_proj`). After a collapse the positions move, so a full-depth adapter loaded as it is
lands on the wrong layers (or on layers that no longer exist) without an error. [`remap_adapter`] writes a copy
for the collapsed model: the removed layers' weights are dropped, the kept ones renumbered, and the config fields
that name layers (`layers_to_transform`, layer-indexed `rank_pattern` / `alpha_pattern` / `target_modules` /
`modules_to_save` / `exclude_modules` entries) follow. Like the surgery, it verifies by construction before writing
anything: PEFT, given the new config, must build on the collapsed model exactly the adapter tensors (names and
shapes) written, with the same rank and alpha for every module. [`check_adapter_fits`] refuses an adapter whose
layers are not this model's.

The copy records which collapse it was written for in its safetensors metadata (`_MARK_*`), so that
[`check_adapter_fits`] can tell it from a full-depth adapter.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from accelerate import init_empty_weights
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from peft import PeftConfig, PeftType
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .layers import LayerStack, find_layer_stacks, unwrap_model
from .paths import check_tree_inside

__all__ = ["check_adapter_fits", "remap_adapter"]

_CONFIG = "adapter_config.json"
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."  # what PeftModel puts before the base model's module paths in a saved adapter
# Safetensors metadata written by remap_adapter: the collapse the adapter was written for (JSON values).
_MARK_COLLAPSED = "hf_collapse.collapsed_layers"
_MARK_ORIGINAL = "hf_collapse.original_num_hidden_layers"

# PEFT methods whose weights sit in the adapted modules themselves, one set per module, so that renumbering the
# modules is the whole remap; with the config fields that give a module's rank and scale (None: no rank).
_PER_MODULE_TYPES: dict[str, tuple[str, str] | None] = {
    PeftType.LORA.value: ("r", "lora_alpha"),
    PeftType.LOHA.value: ("r", "alpha"),
    PeftType.LOKR.value: ("r", "alpha"),
    PeftType.IA3.value: None,
}
# Config fields whose entries (module names or patterns) may name a layer by its position.
_NAME_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")
_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class _Numbering:
    """How one stack's layers are numbered by the adapter and by the model, both as original layer indices."""

    stack: LayerStack
    adapter_layers: tuple[int, ...]  # original index of the adapter's layer 0, 1, ...
    model_layers: tuple[int, ...]  # original index of the model's layer 0, 1, ...

    def new_index(self, old: int) -> int | None:
        """The model's index of the adapter's layer `old`, or None when the collapse removed it."""
        original = self.adapter_layers[old]
        return self.model_layers.index(original) if original in self.model_layers else None

    def where(self) -> str:
        return f"the {self.stack.name} stack" if self.stack.name else "the model"


# ---- reading an adapter folder ----------------------------------------------------------------------------------


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / _CONFIG
    if not path.is_file():
        raise ValueError(f"{adapter_dir} is not a PEFT adapter folder: it has no {_CONFIG}")
    return json.loads(path.read_text())


def _weights_path(adapter_dir: Path) -> Path:
    for name in _WEIGHTS:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise ValueError(f"{adapter_dir} has no adapter weights ({' or '.join(_WEIGHTS)})")


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    return torch.load(path, map_location="cpu", weights_only=True), {}


def _read_keys(path: Path) -> tuple[list[str], dict[str, str]]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    return list(torch.load(path, map_location="meta", weights_only=True)), {}


def _layer_of(key: str, stacks: list[LayerStack]) -> tuple[LayerStack, int, str] | None:
    """(stack, layer index, rest of the key) for a key inside a layer stack, else None."""
    inner = key.removeprefix(_PREFIX)
    for stack in stacks:
        head = f"{stack.path}."
        if inner.startswith(head):
            index, _, rest = inner[len(head) :].partition(".")
            if index.isdigit():
                return stack, int(index), rest
    return None


# ---- the collapse a model and an adapter are numbered by ----------------------------------------------------------


def _per_stack(value, stack: LayerStack, two_stacks: bool):
    return value.get(stack.name) if two_stacks and isinstance(value, dict) else value


def _model_numbering(inner: nn.Module, stacks: list[LayerStack]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per stack: (the original index of each current layer, the original layer count), from the config record."""
    config = inner.config
    collapsed = getattr(config, "collapsed_layers", None)
    originals = getattr(config, "original_num_hidden_layers", None)
    numbering = {}
    for stack in stacks:
        removed = _per_stack(collapsed, stack, len(stacks) > 1)
        total = _per_stack(originals, stack, len(stacks) > 1)
        if collapsed is None and originals is None:
            removed, total = [], len(stack)
        kept = tuple(i for i in range(total) if i not in set(removed)) if isinstance(total, int) else ()
        if not isinstance(removed, list) or len(kept) != len(stack):
            raise ValueError(
                f"config.collapsed_layers={collapsed!r} and config.original_num_hidden_layers={originals!r} do not "
                f"match {'the ' + stack.name + ' stack' if stack.name else 'the model'}, which has {len(stack)} layers"
            )
        numbering[stack.name] = (kept, total)
    return numbering


def _is_collapsed(numbering: dict[str, tuple[tuple[int, ...], int]]) -> bool:
    return any(len(kept) != total for kept, total in numbering.values())


def _adapter_mark(metadata: dict[str, str]) -> tuple[object, object] | None:
    if _MARK_COLLAPSED not in metadata:
        return None
    return json.loads(metadata[_MARK_COLLAPSED]), json.loads(metadata[_MARK_ORIGINAL])


def _record_of(numbering: dict[str, tuple[tuple[int, ...], int]]) -> tuple[object, object]:
    """(collapsed_layers, original_num_hidden_layers) as the config records them, from a numbering."""
    removed = {name: [i for i in range(total) if i not in kept] for name, (kept, total) in numbering.items()}
    totals = {name: total for name, (_, total) in numbering.items()}
    if list(removed) == [""]:
        return removed[""], totals[""]
    return removed, totals


# ---- remapping names ---------------------------------------------------------------------------------------------


def _rename_key(key: str, stacks: list[LayerStack], numberings: dict[str, _Numbering]) -> str | None:
    """The key on the collapsed model, or None when its layer was removed."""
    found = _layer_of(key, stacks)
    if found is None:
        return key
    stack, index, rest = found
    numbering = numberings[stack.name]
    if index >= len(numbering.adapter_layers):
        raise ValueError(
            f"the adapter has weights for layer {index} of {numbering.where()} ({key}), but the model had "
            f"{len(numbering.adapter_layers)} layers before the collapse: it was saved for another model"
        )
    new = numbering.new_index(index)
    if new is None:
        return None
    prefix = _PREFIX if key.startswith(_PREFIX) else ""
    return f"{prefix}{stack.path}.{new}" + (f".{rest}" if rest else "")


def _layer_reference(stacks: list[LayerStack]) -> re.Pattern:
    """Matches `<list name>.<index>` inside a module name or a regex (`layers.5.`, `layers\\.5\\.`, `block.2`)."""
    leaves = sorted({stack.path.rpartition(".")[2] for stack in stacks}, key=len, reverse=True)
    return re.compile(rf"(?<![\w])({'|'.join(map(re.escape, leaves))})(\\?\.)(\d+)(?=\\?\.|$)")


def _rename_entry(entry: str, field: str, stacks, numberings: dict[str, _Numbering]) -> str | None:
    """A config entry (module name or pattern) with its layer positions renumbered; None when it names a removed
    layer. Refuses an entry whose position means different layers in different stacks."""
    reference = _layer_reference(stacks)
    removed = False

    def replace(match: re.Match) -> str:
        nonlocal removed
        leaf, dot, index = match.group(1), match.group(2), int(match.group(3))
        before = entry[: match.start()].replace("\\.", ".")
        candidates = [s for s in stacks if s.path.rpartition(".")[2] == leaf]
        named = [s for s in candidates if before.endswith(s.path.rpartition(".")[0] + ".") and "." in s.path]
        candidates = named or candidates
        results = set()
        for stack in candidates:
            numbering = numberings[stack.name]
            if index >= len(numbering.adapter_layers):
                raise ValueError(
                    f"adapter_config.json's {field} entry {entry!r} names layer {index} of {numbering.where()}, which "
                    f"had {len(numbering.adapter_layers)} layers before the collapse: it was saved for another model"
                )
            results.add(numbering.new_index(index))
        if len(results) > 1:
            raise ValueError(
                f"adapter_config.json's {field} entry {entry!r} names layer {index} of several stacks, which the "
                "collapse renumbers differently; name the stack in the entry (e.g. encoder.block.2) and retry"
            )
        (new,) = results
        if new is None:
            removed = True
            return match.group(0)
        return f"{leaf}{dot}{new}"

    renamed = reference.sub(replace, entry)
    return None if removed else renamed


def _remap_config(config: dict, stacks: list[LayerStack], numberings: dict[str, _Numbering]) -> dict:
    config = copy.deepcopy(config)
    if config.get("layer_replication"):
        raise ValueError(
            f"the adapter uses layer_replication={config['layer_replication']!r}, which builds the model's depth from "
            "layer ranges of the full model; such an adapter cannot be remapped: merge it into the full-depth model "
            "(merge_and_unload) before collapsing"
        )
    for field in _NAME_FIELDS:
        value = config.get(field)
        if isinstance(value, str):
            renamed = _rename_entry(value, field, stacks, numberings)
            if renamed is None:
                raise ValueError(
                    f"adapter_config.json's {field} is the pattern {value!r}, which names a layer the collapse removed; "
                    "a pattern cannot be remapped, so write the module names out as a list and retry"
                )
            config[field] = renamed
        elif isinstance(value, list):
            config[field] = [r for r in (_rename_entry(v, field, stacks, numberings) for v in value) if r is not None]
    for field in _PATTERN_FIELDS:
        if field not in config:
            continue  # a method without per-module ranks (IA3)
        value = config[field] or {}
        remapped = {}
        for key, setting in value.items():
            renamed = _rename_entry(key, field, stacks, numberings)
            if renamed is not None:
                remapped[renamed] = setting
        config[field] = remapped
    layers = config.get("layers_to_transform")
    if layers is not None:
        config["layers_to_transform"] = _remap_layers_to_transform(layers, numberings)
    return config


def _remap_layers_to_transform(layers: int | list[int], numberings: dict[str, _Numbering]) -> list[int]:
    indices = [layers] if isinstance(layers, int) else list(layers)
    results = []
    for numbering in numberings.values():
        for index in indices:
            if not 0 <= index < len(numbering.adapter_layers):
                raise ValueError(
                    f"adapter_config.json's layers_to_transform names layer {index}, but {numbering.where()} had "
                    f"{len(numbering.adapter_layers)} layers before the collapse: it was saved for another model"
                )
        results.append([n for n in (numbering.new_index(i) for i in indices) if n is not None])
    if any(result != results[0] for result in results):
        raise ValueError(
            f"layers_to_transform={layers!r} applies to every layer stack, and the collapse removed different layers "
            "from each, so one list cannot describe the kept layers: merge the adapter before collapsing"
        )
    if not results[0]:
        raise ValueError(
            f"layers_to_transform={layers!r}: the collapse removed every layer the adapter changes, so nothing of it "
            "is left for the collapsed model"
        )
    return results[0]


# ---- verification by construction --------------------------------------------------------------------------------


def _rank_and_scale(config: dict, module: str) -> tuple[object, object] | None:
    """The rank and alpha PEFT gives `module` under `config` (its pattern-key rule), or None for rank-free types."""
    fields = _PER_MODULE_TYPES[config["peft_type"]]
    if fields is None:
        return None
    rank_field, alpha_field = fields
    values = []
    for field, pattern in ((rank_field, "rank_pattern"), (alpha_field, "alpha_pattern")):
        table = config.get(pattern) or {}
        key = peft.utils.other.get_pattern_key(list(table), module)
        values.append(table.get(key, config.get(field)))
    return tuple(values)


def _module_of(key: str) -> str | None:
    """The adapted module's path in the base model, from a saved adapter key (`...q_proj.lora_A.weight`)."""
    parts = key.removeprefix(_PREFIX).split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut].startswith(("lora_", "hada_", "lokr_", "ia3_")):
            return ".".join(parts[:cut])
    return None


def _built_adapter(inner: nn.Module, config: dict) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (names and shapes, as saved) PEFT builds from `config` on a model like `inner`.

    The model is rebuilt from its config with its parameters on the meta device, so nothing is allocated.
    """
    with init_empty_weights():
        fresh = type(inner)(copy.deepcopy(inner.config))
        wrapped = peft.get_peft_model(fresh, PeftConfig.from_peft_type(**dict(config, inference_mode=True)))
    state = peft.get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def _verify(inner: nn.Module, old_config: dict, new_config: dict, weights: dict, renames: dict[str, str]) -> None:
    built = _built_adapter(inner, new_config)
    base = {f"{_PREFIX}{name}": tuple(t.shape) for name, t in inner.state_dict().items()}
    differences = []
    for key in sorted(set(built) | set(weights)):
        have = tuple(weights[key].shape) if key in weights else None
        want = built.get(key, base.get(key.replace(".base_layer.", ".")))  # embeddings PEFT saves whole
        if have is None:
            differences.append(f"{key} (shape {want}) would be created, not loaded")
        elif want is None:
            differences.append(f"{key} would not be loaded: PEFT builds no such tensor on the collapsed model")
        elif have != want:
            differences.append(f"{key} has shape {have} but the collapsed model needs {want}")
    modules = {}
    for new_key, old_key in renames.items():
        if new_key in built and _module_of(new_key) is not None:
            modules[_module_of(new_key)] = _module_of(old_key)
    for new, old in sorted(modules.items()):
        expected, got = _rank_and_scale(old_config, old), _rank_and_scale(new_config, new)
        if expected != got:
            differences.append(f"{new} would get (rank, alpha) {got}, but as {old} it had {expected}")
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ValueError(
            f"the remapped adapter would not load as the same adapter on the collapsed model, so nothing was written: "
            f"{shown}. Modules outside the layer stack that change with the depth, and target patterns that do not "
            "name layers literally, cannot be remapped: merge the adapter into the full-depth model "
            "(merge_and_unload) before collapsing, or give target_modules as a list of names"
        )


# ---- public API ---------------------------------------------------------------------------------------------------


def _refuse_type(config: dict) -> None:
    kind = config.get("peft_type")
    if kind in _PER_MODULE_TYPES:
        return
    supported = ", ".join(_PER_MODULE_TYPES)
    why = (
        "its prompt or prefix is sized by, or fed to, the full model's layers"
        if kind in {t.value for t in (PeftType.PREFIX_TUNING, PeftType.P_TUNING, PeftType.PROMPT_TUNING)}
        else "hf-collapse does not know where this method keeps per-layer state"
    )
    raise ValueError(
        f"cannot remap a {kind} adapter ({why}); remap_adapter supports {supported}. Merge the adapter into the "
        "full-depth model before collapsing, or train it again on the collapsed model"
    )


def remap_adapter(adapter_dir: str | Path, model: nn.Module, out_dir: str | Path) -> Path:
    """Write a copy of a PEFT adapter saved for the full-depth model that fits the collapsed `model`.

    The weights of the removed layers are dropped and the kept layers' weights renamed to their new positions
    (`model.layers.5.self_attn.q_proj` becomes `model.layers.3.self_attn.q_proj` once two layers below it are
    gone); `layers_to_transform`, and the entries of `rank_pattern`, `alpha_pattern`, `target_modules`,
    `modules_to_save` and `exclude_modules` that name a layer by its position, follow the kept layers. Loaded
    with `PeftModel.from_pretrained(model, out_dir)`, the copy gives the outputs the full model with the adapter
    gives when the same layers are bypassed.

    The copy is verified before anything is written: PEFT, given the new config, must build on the collapsed
    model exactly the adapter tensors written (names and shapes), with the same rank and alpha for each module.
    Its safetensors metadata records the collapse it was written for, which [`check_adapter_fits`] reads.

    Args:
        adapter_dir (`str` or `Path`): the folder `save_pretrained` wrote for the adapter (`adapter_config.json`
            and `adapter_model.safetensors` or `.bin`). Its layer numbering is the model's before any collapse, or,
            for a copy this function wrote, the collapse recorded in it.
        model (`nn.Module`): the collapsed model (its config carries `collapsed_layers` and
            `original_num_hidden_layers`, as [`collapse_layers`] records them), possibly wrapped.
        out_dir (`str` or `Path`): where to write the copy; the adapter's other files (its README) are copied too.

    Returns:
        `Path`: `out_dir`.

    Raises:
        `ValueError`: nothing is written when the adapter cannot be remapped exactly: a PEFT method other than LoRA,
            LoHa, LoKr or IA3 (prefix tuning, for one, is sized by the layer count); `layer_replication`; a target
            pattern that names a removed layer; an adapter whose layers do not exist in the full model, or that
            changes only removed layers; a model that was not collapsed; a failed verification (named tensors or
            modules), such as a module outside the layer stack that changes with the depth.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"out_dir is the adapter folder itself ({adapter_dir}): write the copy to another folder")
    check_tree_inside(adapter_dir)  # its files are copied into out_dir: none may come from outside it
    config = _read_config(adapter_dir)
    _refuse_type(config)
    weights_path = _weights_path(adapter_dir)
    weights, metadata = _read_weights(weights_path)

    inner = unwrap_model(model)
    stacks = find_layer_stacks(inner)
    model_numbering = _model_numbering(inner, stacks)
    if not _is_collapsed(model_numbering):
        raise ValueError(
            "the model has not been collapsed (its config has no collapsed_layers): the adapter fits it as it is"
        )
    adapter_numbering = _adapter_numbering(metadata, stacks, model_numbering)
    numberings = {
        stack.name: _Numbering(stack, adapter_numbering[stack.name], model_numbering[stack.name][0]) for stack in stacks
    }

    new_config = _remap_config(config, stacks, numberings)
    renamed: dict[str, torch.Tensor] = {}
    renames: dict[str, str] = {}
    for key, tensor in weights.items():
        new_key = _rename_key(key, stacks, numberings)
        if new_key is not None:
            renamed[new_key], renames[new_key] = tensor, key
    if not renamed:
        raise ValueError("the collapse removed every layer the adapter changes, so nothing of it is left to remap")
    _verify(inner, config, new_config, renamed, renames)

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in adapter_dir.iterdir():
        if path.is_file() and path.name not in (_CONFIG, *_WEIGHTS):
            shutil.copy2(path, out_dir / path.name)
    collapsed, originals = _record_of(model_numbering)
    marks = {_MARK_COLLAPSED: json.dumps(collapsed), _MARK_ORIGINAL: json.dumps(originals)}
    tensors = {key: tensor.contiguous() for key, tensor in renamed.items()}
    save_file(tensors, str(out_dir / _WEIGHTS[0]), metadata={**metadata, "format": "pt", **marks})
    (out_dir / _CONFIG).write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _adapter_numbering(metadata, stacks, model_numbering) -> dict[str, tuple[int, ...]]:
    """Per stack, the original index of each of the adapter's layers: all layers, or those of its recorded collapse."""
    mark = _adapter_mark(metadata)
    if mark is None:
        return {name: tuple(range(total)) for name, (_, total) in model_numbering.items()}
    collapsed, originals = mark
    numbering = {}
    for stack in stacks:
        removed = _per_stack(collapsed, stack, len(stacks) > 1) or []
        total = _per_stack(originals, stack, len(stacks) > 1)
        kept, model_total = model_numbering[stack.name]
        if total != model_total or any(i in kept for i in removed):
            raise ValueError(
                f"the adapter was remapped for a collapse that removed layers {collapsed!r} of {originals!r}, and this "
                f"model keeps some of them (or has another depth): remap the full-depth adapter for this model instead"
            )
        numbering[stack.name] = tuple(i for i in range(total) if i not in set(removed))
    return numbering


def _base_config(config: dict) -> dict | None:
    """The config.json of the model the adapter was saved on, when it can be read here (a folder or the HF cache)."""
    name = config.get("base_model_name_or_path")
    if not name:
        return None
    path = Path(name) / "config.json"
    if not path.is_file():
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=config.get("revision"))
        except HFValidationError:  # neither a folder nor a repository id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    return json.loads(path.read_text())


def _layer_indices(keys: Iterable[str], stacks: list[LayerStack]) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {stack.name: set() for stack in stacks}
    for key in keys:
        hit = _layer_of(key, stacks)
        if hit is not None:
            found[hit[0].name].add(hit[1])
    return found


def check_adapter_fits(model: nn.Module, adapter_dir: str | Path) -> None:
    """Refuse a PEFT adapter whose layer numbering is not `model`'s, before it is loaded onto the wrong layers.

    Call it before `PeftModel.from_pretrained(model, adapter_dir)` (or `model.load_adapter`). It reads only the
    adapter's config, weight names and metadata. The adapter fits when every layer it names exists in the model
    and it was saved for a model of this depth and collapse, which is known from, in this order: the collapse
    recorded by [`remap_adapter`]; the config of the model it was saved on (`base_model_name_or_path`, when that
    folder or its Hub cache is readable here). On a collapsed model, an adapter whose origin is unknown is
    refused, since a full-depth adapter would silently change other layers than it was trained on.

    Args:
        model (`nn.Module`): the model the adapter is about to be loaded on, possibly wrapped.
        adapter_dir (`str` or `Path`): the adapter folder.

    Raises:
        `ValueError`: the adapter was saved for another depth or collapse; the message says how to get a fitting
            adapter ([`remap_adapter`] for a full-depth adapter on a collapsed model).
    """
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    inner = unwrap_model(model)
    stacks = find_layer_stacks(inner)
    numbering = _model_numbering(inner, stacks)
    collapsed, originals = _record_of(numbering)
    depth = {stack.name: len(stack) for stack in stacks}
    depth_text = ", ".join(f"{name or 'the model'}: {n} layers" for name, n in depth.items())
    remap_hint = f"write a copy for this model with hf_collapse.remap_adapter({str(adapter_dir)!r}, model, out_dir)"

    if config.get("peft_type") in {PeftType.PREFIX_TUNING.value, PeftType.P_TUNING.value}:
        _check_prompt_depth(config, stacks, adapter_dir)
        return

    keys, metadata = _read_keys(_weights_path(adapter_dir))
    mark = _adapter_mark(metadata)
    if mark is not None:
        if mark != (collapsed, originals):
            raise ValueError(
                f"the adapter in {adapter_dir} was remapped for the collapse collapsed_layers={mark[0]!r} of "
                f"{mark[1]!r} layers, but this model has collapsed_layers={collapsed!r} of {originals!r}: "
                "remap the full-depth adapter for this model"
            )
        return

    _check_layers_exist(config, keys, stacks, adapter_dir, f"; {remap_hint}" if _is_collapsed(numbering) else "")
    base = _base_config(config)
    base_depths = None if base is None else _config_depths(base, stacks)
    if base_depths is not None:
        base_collapsed = base.get("collapsed_layers")
        if base_depths == depth and (base_collapsed is None or base_collapsed == collapsed):
            return  # saved on a model of this depth (and collapse): its numbering is this model's
        full_depth = _is_collapsed(numbering) and base_depths == {n: t for n, (_, t) in numbering.items()}
        base_text = ", ".join(f"{name or 'the model'}: {n} layers" for name, n in base_depths.items())
        raise ValueError(
            f"the adapter in {adapter_dir} was saved on {config['base_model_name_or_path']} ({base_text}"
            + (f", collapsed_layers={base_collapsed!r}" if base_collapsed is not None else "")
            + f"), not on a model like this one ({depth_text}"
            + (f", collapsed_layers={collapsed!r}" if _is_collapsed(numbering) else "")
            + ")"
            + (
                f": it is the full-depth adapter; {remap_hint} (if it was trained on this collapsed model held in "
                f"memory, set base_model_name_or_path in its {_CONFIG} to this model's folder)"
                if full_depth
                else ""
            )
        )
    if _is_collapsed(numbering):
        raise ValueError(
            f"cannot tell which depth the adapter in {adapter_dir} was saved for: its base model "
            f"{config.get('base_model_name_or_path')!r} cannot be read here, and this model is collapsed "
            f"(collapsed_layers={collapsed!r} of {originals!r}). If the adapter was saved for the full-depth model, "
            f"{remap_hint}; if it was trained on this collapsed model, set base_model_name_or_path in its "
            f"{_CONFIG} to this model's folder"
        )


def _check_prompt_depth(config: dict, stacks: list[LayerStack], adapter_dir: Path) -> None:
    """Prefix and prompt tuning are sized by the layer count: refuse one made for another depth."""
    layers = config.get("num_layers")
    if isinstance(layers, int) and len(stacks) == 1 and layers != len(stacks[0]):
        raise ValueError(
            f"the {config['peft_type']} adapter in {adapter_dir} was made for {layers} layers, but the model has "
            f"{len(stacks[0])}: train it again on this model"
        )


def _check_layers_exist(config: dict, keys: list[str], stacks: list[LayerStack], adapter_dir: Path, hint: str) -> None:
    """Refuse an adapter whose weights or `layers_to_transform` name a layer the model does not have."""
    named = _layer_indices(keys, stacks)
    layers = config.get("layers_to_transform")
    if layers is not None:
        for name in named:
            named[name] |= {layers} if isinstance(layers, int) else set(layers)
    for stack in stacks:
        beyond = sorted(i for i in named[stack.name] if i >= len(stack))
        if beyond:
            raise ValueError(
                f"the adapter in {adapter_dir} changes layer(s) {beyond} of "
                f"{'the ' + stack.name + ' stack' if stack.name else 'the model'}, which has {len(stack)} layers "
                f"(numbered 0-{len(stack) - 1}): it was saved for a deeper model{hint}"
            )


def _config_depths(config: dict, stacks: list[LayerStack]) -> dict[str, int] | None:
    """Each stack's layer count according to a config.json dict, or None when it does not say."""
    depths = {}
    for stack in stacks:
        source = config if stack.count_attr in config else config.get("text_config") or {}
        value = source.get(stack.count_attr)
        if not isinstance(value, int):
            return None
        depths[stack.name] = value
    return depths
