"""Delete transformer layers for real, leaving a plain, smaller model of the same family.

Removing a layer touches more than the module list: each kept layer's `layer_idx` (which indexes the KV
cache), the layer count on the right config, and every config field that describes layers by position.
How each of those fields follows the kept layers is data: `_RULES`, one row per field or position-dependent
quirk. A list field whose name mentions layers and that no rule covers is refused rather than guessed.

Everything is planned and checked first (on copies of the configs, with the configs' own validators); the
model is changed only when the whole request can be done exactly. Weights keys are never rewritten by hand:
`save_pretrained` numbers them from the module list.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layers import (
    LayerStack,
    _get_path,
    _layer_count,
    _real_attr,
    bypass_layers,
    eval_mode,
    find_layer_stacks,
    resolve_layer_selection,
    unwrap_model,
)

__all__ = ["CollapseRecord", "collapse_layers"]

_DELETE = object()  # config update value meaning "remove this attribute"
# Where collapse_layers records what it removed (on the top-level config), in the original numbering.
_RECORD_FIELDS = ("collapsed_layers", "original_num_hidden_layers")
# Int attributes of a stack's parent module that cache the layer count (DistilBERT's Transformer.n_layers).
_PARENT_COUNT_ATTRS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")


@dataclass(frozen=True)
class _Removal:
    """What happens to one stack: the 0-based layers removed and kept, in the current numbering."""

    stack: LayerStack
    removed: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def where(self) -> str:
        return f"the {self.stack.name} stack" if self.stack.name else "the model"


_Undo = Callable[[], None]
_Apply = Callable[[], _Undo]  # a module change: makes it, and returns what puts it back exactly


@dataclass
class _Edit:
    """Changes a rule asks for: config attribute updates (or `_DELETE`) and module changes to run later."""

    config: dict[str, object] = field(default_factory=dict)
    modules: list[_Apply] = field(default_factory=list)


def _refuse(removal: _Removal, why: str) -> ValueError:
    return ValueError(f"cannot remove layers {list(removal.removed)} from {removal.where()}: {why}")


# ---- rule handlers: (removal, config, field name, value) -> _Edit, raising ValueError when not exact ----


def _slice_per_layer(removal: _Removal, config, name: str, value) -> _Edit:
    count = len(removal.stack)
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise _refuse(
            removal,
            f"config.{name} should hold one entry per layer ({count}) but is {value!r}; fix the config first",
        )
    return _Edit(config={name: [value[i] for i in removal.kept]})


def _remap_indices(removal: _Removal, config, name: str, value) -> _Edit:
    count = len(removal.stack)
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < count for i in value):
        raise _refuse(removal, f"config.{name} should list layer indices in 0-{count - 1} but is {value!r}")
    new_index = removal.new_index
    return _Edit(config={name: [new_index[i] for i in value if i in new_index]})


def _count_kept_below(removal: _Removal, config, name: str, value) -> _Edit:
    # The layers below the threshold are a prefix of the stack, so the kept ones are still a prefix.
    return _Edit(config={name: sum(1 for i in removal.kept if i < value)})


def _explicit_sparse_layers(removal: _Removal, config, name: str, value) -> _Edit:
    # A period no longer describes the kept layers: list every dense layer instead, with a period of 1.
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    is_sparse = {i: i not in dense and (i + 1) % value == 0 for i in removal.kept}
    return _Edit(
        config={name: 1, "mlp_only_layers": [new for new, old in enumerate(removal.kept) if not is_sparse[old]]}
    )


def _drop_periodic_pattern(removal: _Removal, config, name: str, value) -> _Edit:
    if not isinstance(getattr(config, "layer_types", None), (list, tuple)):
        raise _refuse(
            removal,
            f"config.{name}={value!r} gives the layer pattern as a period, which cannot describe the kept "
            "layers, and this config has no `layer_types` list to give it layer by layer",
        )
    # Configs that also carry `layer_types` read the period only to build it; once `layer_types` is sliced,
    # a leftover period would misdescribe the model, so drop it where it is a legacy extra (not a declared field).
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    extras = [attr for attr in (name, f"_{name}") if attr in vars(config) and attr not in declared]
    return _Edit(config={attr: _DELETE for attr in extras})


def _rescale_inverse_index_attention(removal: _Removal, config, name: str, value) -> _Edit:
    # GPT-2 divides attention scores by (layer_idx + 1). A layer moving from position i to j would be
    # rebuilt with 1/(j + 1): scaling its queries by (j + 1)/(i + 1) keeps every score, hence the output.
    edit = _Edit()
    for new, old in enumerate(removal.kept):
        if new == old:
            continue
        for attention in removal.stack.layers[old].modules():
            if not getattr(attention, "scale_attn_by_inverse_layer_idx", False):
                continue
            query = _query_projection(attention)
            if query is None:
                raise _refuse(
                    removal,
                    f"{type(attention).__name__} scales attention by 1/(layer_idx + 1) and its query projection "
                    "is not the GPT-2 layout (c_attn = [q | k | v], or q_attn for cross-attention), so the "
                    "renumbered layers cannot be rescaled exactly",
                )
            edit.modules.append(_scale_queries(attention, *query, factor=(new + 1) / (old + 1)))
    return edit


def _query_projection(attention: nn.Module) -> tuple[nn.Module, int] | None:
    """The Conv1D that computes the queries and how many of its leading output columns they are, or None."""
    width = getattr(attention, "split_size", None)
    if getattr(attention, "is_cross_attention", False):
        module, outputs = getattr(attention, "q_attn", None), width
    else:
        module, outputs = getattr(attention, "c_attn", None), None if width is None else 3 * width
    weight = getattr(module, "weight", None)
    if width is None or weight is None or weight.shape[-1] != outputs or not hasattr(attention, "scaling"):
        return None
    return module, width


def _scale_queries(attention: nn.Module, module: nn.Module, columns: int, factor: float) -> _Apply:
    def apply() -> _Undo:
        saved = (module.weight[..., :columns].clone(), None if module.bias is None else module.bias[:columns].clone())
        scaling = attention.scaling
        with torch.no_grad():
            module.weight[..., :columns] *= factor
            if module.bias is not None:
                module.bias[:columns] *= factor
        attention.scaling /= factor  # what the module would compute at its new layer_idx

        def undo() -> None:
            with torch.no_grad():
                module.weight[..., :columns].copy_(saved[0])
                if saved[1] is not None:
                    module.bias[:columns].copy_(saved[1])
            attention.scaling = scaling

        return undo

    return apply


def _move_relative_attention_bias(removal: _Removal, config, name: str, value) -> _Edit:
    # T5 builds the relative position bias only in block 0 and hands the result to the later blocks.
    edit = _Edit()
    if 0 not in removal.removed:
        return edit
    first, new_first = removal.stack.layers[0], removal.stack.layers[removal.kept[0]]
    for path, owner in first.named_modules():
        if not getattr(owner, "has_relative_attention_bias", False):
            continue
        target = new_first.get_submodule(path)
        if getattr(target, "has_relative_attention_bias", False):
            continue  # UMT5-style: every block owns its bias
        if not hasattr(target, "has_relative_attention_bias") or not hasattr(owner, "relative_attention_bias"):
            raise _refuse(
                removal,
                f"layer 0's {path} owns the relative position bias but layer {removal.kept[0]} has no matching "
                "module to move it to",
            )
        edit.modules.append(_move_bias(owner, target))
    return edit


def _move_bias(owner: nn.Module, target: nn.Module) -> _Apply:
    def apply() -> _Undo:
        had = target.has_relative_attention_bias
        target.relative_attention_bias = owner.relative_attention_bias
        target.has_relative_attention_bias = True

        def undo() -> None:
            del target.relative_attention_bias
            target.has_relative_attention_bias = had

        return undo

    return apply


def _keep_first_layer(removal: _Removal, config, name: str, value) -> _Edit:
    if 0 in removal.removed:
        raise _refuse(
            removal,
            f"{type(config).__name__} builds layer 0 differently from the others (no attention norm), so a "
            "model without it cannot be described by a config; keep layer 0 and remove other layers",
        )
    return _Edit()


def _remap_stages(removal: _Removal, config, name: str, value) -> _Edit:
    # Backbones (DINOv2, ViT-style): stage_names = ["stem", "stage1", ..., "stageN"], stage k is layer k - 1's
    # output; out_indices / out_features pick the stages the backbone returns.
    count = len(removal.stack)
    if list(value) != ["stem"] + [f"stage{i}" for i in range(1, count + 1)]:
        raise _refuse(
            removal,
            f"config.stage_names={value!r} is not one stage per layer (stem, stage1..stage{count}), so the stages "
            "cannot follow the kept layers",
        )
    new_index = removal.new_index
    outputs = [i % (count + 1) for i in (config.out_indices or [])]
    lost = [i for i in outputs if i and i - 1 not in new_index]
    if lost:
        raise _refuse(
            removal,
            f"the backbone returns stage(s) {', '.join(value[i] for i in lost)} (out_features), the output of layer(s) "
            f"{', '.join(str(i - 1) for i in lost)}; keep those layers, or change out_features first",
        )
    stages = ["stem"] + [f"stage{i}" for i in range(1, len(removal.kept) + 1)]
    indices = [0 if i == 0 else new_index[i - 1] + 1 for i in outputs]
    return _Edit(config={"stage_names": stages, "_out_indices": indices, "_out_features": [stages[i] for i in indices]})


def _keep_pattern(removal: _Removal, config, name: str, value) -> _Edit:
    # The layer kinds are given by integers (start / interval / end, or period / offset) that stay as they are:
    # the removal is exact only if the pattern, counted afresh over the kept layers, gives each its own kind.
    # `_check_layer_kinds` compares the kinds; nothing to update here beyond the count.
    return _Edit()


@dataclass(frozen=True)
class _Rule:
    """How a config field (present and not None, False or empty) follows the removal of layers.

    Attributes:
        field (`str`): the config attribute that triggers the rule.
        handler: computes the `_Edit`, or raises `ValueError` when the removal cannot be done exactly.
        owns (`tuple[str, ...]`): per-layer list fields the handler also rewrites.
        when: the rule applies only if the field has this value (`None`: any value).
    """

    field: str
    handler: Callable[[_Removal, object, str, object], _Edit]
    owns: tuple[str, ...] = ()
    when: object = None


# One row per config field or quirk that depends on layer positions. Families that have none (Llama,
# Mistral, Phi3, GPT-NeoX, OPT, Falcon, BERT, RoBERTa, DistilBERT, ViT, Mixtral) need only the count.
_RULES: tuple[_Rule, ...] = (
    _Rule("layer_types", _slice_per_layer),  # Gemma2/3, Qwen2/3, ModernBERT, ...: attention kind per layer
    _Rule("mlp_layer_types", _slice_per_layer),  # dense / sparse per layer
    _Rule("no_rope_layers", _slice_per_layer),  # SmolLM3, Llama4: a 0/1 RoPE flag per layer
    _Rule("moe_layers", _remap_indices),  # Llama4: indices of the MoE layers
    _Rule("first_k_dense_replace", _count_kept_below),  # DeepSeek-V2/V3: layers below k are dense
    _Rule("num_dense_layers", _count_kept_below),  # LFM2-MoE: the same "first k layers are dense"
    _Rule("attn_layer_indices", _remap_indices),  # Bamba: indices of the attention layers (others are Mamba)
    _Rule("full_attn_idxs", _remap_indices),  # LFM2: indices of the attention layers (others are convolutions)
    _Rule("hybrid_layer_ids", _remap_indices),  # Zamba2: indices of the layers with the shared attention block
    _Rule("stage_names", _remap_stages, owns=("_out_indices", "_out_features")),  # backbones
    # Patterns given by integers; the kinds they give are compared in _check_layer_kinds (see _LAYER_KINDS).
    _Rule("attn_layer_period", _keep_pattern, owns=("attn_layer_offset",)),  # Jamba
    _Rule("expert_layer_period", _keep_pattern, owns=("expert_layer_offset",)),  # Jamba
    _Rule("moe_layer_interval", _keep_pattern, owns=("moe_layer_start_index", "moe_layer_end_index")),  # ERNIE-4.5
    _Rule("max_window_layers", _count_kept_below),  # Qwen2/3: layers from this index on may slide
    # Qwen2/3-MoE: layer i is sparse iff (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    _Rule("decoder_sparse_step", _explicit_sparse_layers, owns=("mlp_only_layers",)),
    _Rule("sliding_window_pattern", _drop_periodic_pattern),  # Gemma3, Cohere2: legacy period of layer_types
    _Rule("scale_attn_by_inverse_layer_idx", _rescale_inverse_index_attention),  # GPT-2 family
    _Rule("relative_attention_num_buckets", _move_relative_attention_bias),  # T5 family
    _Rule("model_type", _keep_first_layer, when="modernbert"),  # layer 0 has no attn_norm
)


# Per-layer kinds that a config gives by a formula in the modeling code rather than by a config field or property:
# (the fields that must be present, the kind of layer i). Read-only properties of the config that give one entry
# per layer (Jamba's `layers_block_type`, Bamba's, FalconH1's) are found without a row here.
_LAYER_KINDS: tuple[tuple[tuple[str, ...], Callable[[object, int], object]], ...] = (
    (  # ERNIE-4.5-MoE: MoE where (i + 1) % interval == 0 and start <= i <= end
        ("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index"),
        lambda c, i: (i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= c.moe_layer_end_index,
    ),
)
_SUGGESTIONS = 4  # removals named in a refusal


def _rule_applies(rule: _Rule, value) -> bool:
    if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
        return False
    return rule.when is None or value == rule.when


def _read_only_property(config, name: str) -> bool:
    attribute = getattr(type(config), name, None)
    return isinstance(attribute, property) and attribute.fset is None


def _layer_kinds(config, count: int) -> dict[str, list]:
    """Every per-layer list a config gives without storing it: read-only properties and `_LAYER_KINDS` formulas."""
    kinds = {}
    for name in dir(type(config)):
        if name.startswith("_") or not _read_only_property(config, name):
            continue
        try:
            value = getattr(config, name)
        except Exception:  # a property that does not apply to this config
            continue
        if isinstance(value, (list, tuple)) and len(value) == count:
            kinds[name] = list(value)
    for fields, kind in _LAYER_KINDS:
        if all(isinstance(getattr(config, f, None), int) for f in fields):
            kinds[" / ".join(fields)] = [kind(config, i) for i in range(count)]
    return kinds


def _kinds_mismatch(removal: _Removal, updates: dict[str, object]) -> list[str]:
    """The derived per-layer lists that would not follow the kept layers once `updates` are made."""
    config = removal.stack.config
    before = _layer_kinds(config, len(removal.stack))
    if not before:
        return []
    trial = copy.deepcopy(config)
    _set_config(trial, updates)
    after = _layer_kinds(trial, len(removal.kept))
    return [name for name, kinds in before.items() if after.get(name) != [kinds[i] for i in removal.kept]]


def _removable_instead(removal: _Removal) -> list[list[int]]:
    """Up to `_SUGGESTIONS` sets of as many layers whose removal the rules can express exactly."""
    count, size = len(removal.stack), len(removal.removed)
    windows = [tuple(range(start, start + size)) for start in range(count - size + 1)]
    spread = itertools.islice(itertools.combinations(range(count), size), 2000)
    found = []
    for candidate in dict.fromkeys([*windows, *spread]):
        kept = tuple(i for i in range(count) if i not in candidate)
        trial = _Removal(removal.stack, candidate, kept)
        try:
            if kept and not _kinds_mismatch(trial, _rule_updates(trial, suggest=False)[0].config):
                found.append(list(candidate))
        except ValueError:
            continue
        if len(found) == _SUGGESTIONS:
            break
    return found


def _rule_updates(removal: _Removal, suggest: bool = True) -> tuple[_Edit, set[str]]:
    """Run every rule that applies to the stack's config; return the edit and the fields the rules covered.

    A rule's field is read through the config's `attribute_map` (Zamba's `layer_types` is `layers_block_type`);
    a field that is a read-only property derived from other fields is left to them (Jamba's `layer_types`).
    """
    config = removal.stack.config
    edit = _Edit(config={removal.stack.count_attr: len(removal.kept)})
    handled = set(_RECORD_FIELDS)
    for rule in _RULES:
        name = _real_attr(config, rule.field)
        value = getattr(config, name, None)
        if not _rule_applies(rule, value):
            continue
        handled.update((rule.field, name, *rule.owns))
        if _read_only_property(config, name):
            continue
        found = rule.handler(removal, config, name, value)
        edit.config.update(found.config)
        edit.modules.extend(found.modules)
    mismatch = _kinds_mismatch(removal, edit.config)
    if mismatch:
        instead = _removable_instead(removal) if suggest else []
        raise _refuse(
            removal,
            f"{type(config).__name__} gives the layer pattern {', '.join(mismatch)} by integers or from other fields, "
            "and counted over the kept layers it would give them other kinds than they have"
            + (
                f"; removals of {len(removal.removed)} layer(s) it can express: {'; '.join(map(str, instead))}"
                if instead
                else f"; no removal of {len(removal.removed)} layer(s) keeps it"
            ),
        )
    return edit, handled


def _per_layer_edit(removal: _Removal) -> _Edit:
    """The config and module changes every rule asks for; refuse unknown per-layer list fields."""
    config = removal.stack.config
    edit, handled = _rule_updates(removal)
    unknown = [
        name
        for name, value in vars(config).items()
        if "layer" in name.lower() and isinstance(value, (list, tuple)) and value and name not in handled
    ]
    if unknown:
        raise _refuse(
            removal,
            f"the config has per-layer field(s) {', '.join(unknown)} that hf-collapse does not know how to update "
            f"({type(config).__name__}); this family is not supported yet",
        )
    return edit


def _renumber_edit(removal: _Removal) -> _Edit:
    """Set `layer_idx` of every module inside the kept layers to the layer's new position."""
    moves: list[tuple[nn.Module, int]] = []
    for new, old in enumerate(removal.kept):
        for path, module in removal.stack.layers[old].named_modules():
            index = getattr(module, "layer_idx", None)
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            if index != old:
                raise _refuse(
                    removal,
                    f"layer {old}'s {path or 'block'} holds layer_idx={index}, not its own position; layers that "
                    "point at other layers' state cannot be renumbered safely",
                )
            if new != old:
                moves.append((module, new))

    def apply() -> _Undo:
        previous = [(module, module.layer_idx) for module, _ in moves]
        for module, new in moves:
            module.layer_idx = new

        def undo() -> None:
            for module, index in previous:
                module.layer_idx = index

        return undo

    return _Edit(modules=[apply])


def _parent_edit(model: nn.Module, removal: _Removal) -> _Edit:
    """Counts cached by the stack's parent module: an int attribute, or a private config copy (T5 stacks)."""
    stack = removal.stack
    parent = _get_path(model, stack.path.rpartition(".")[0]) if "." in stack.path else model
    count, new_count = len(stack), len(removal.kept)
    attrs = [a for a in _PARENT_COUNT_ATTRS if type(vars(parent).get(a)) is int and vars(parent)[a] == count]
    parent_config = getattr(parent, "config", None)
    counted = _layer_count(parent_config) if parent_config is not None else None
    copy_attr = None
    if parent_config is not stack.config and parent_config is not model.config and counted and counted[1] == count:
        copy_attr = counted[0]

    def apply() -> _Undo:
        for attr in attrs:
            setattr(parent, attr, new_count)
        if copy_attr is not None:
            setattr(parent_config, copy_attr, new_count)

        def undo() -> None:
            for attr in attrs:
                setattr(parent, attr, count)
            if copy_attr is not None:
                setattr(parent_config, copy_attr, count)

        return undo

    return _Edit(modules=[apply])


def _previous_record(config, stack: LayerStack, two_stacks: bool) -> tuple[list[int], int]:
    """(layers removed so far, original count) of one stack, from the record of earlier collapses."""
    previous = getattr(config, "collapsed_layers", None)
    originals = getattr(config, "original_num_hidden_layers", None)
    if previous is None and originals is None:
        return [], len(stack)
    before, total = previous, originals
    if two_stacks:
        both_dicts = isinstance(previous, dict) and isinstance(originals, dict)
        before, total = (previous.get(stack.name), originals.get(stack.name)) if both_dicts else (None, None)
    if (
        not isinstance(before, list)
        or not isinstance(total, int)
        or len([i for i in range(total) if i not in set(before)]) != len(stack)
    ):
        where = f"the {stack.name} stack" if stack.name else "the model"
        raise ValueError(
            f"config.collapsed_layers={previous!r} and config.original_num_hidden_layers={originals!r} do not "
            f"match {where}, which has {len(stack)} layers: restore or delete those two config fields"
        )
    return before, total


def _record_values(
    config, stacks: list[LayerStack], selection: dict[str, list[int]]
) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    """`collapsed_layers` / `original_num_hidden_layers` after this removal, and this removal per stack, both in
    the original numbering."""
    collapsed: dict[str, list[int]] = {}
    original_counts: dict[str, int] = {}
    now: dict[str, tuple[int, ...]] = {}
    for stack in stacks:
        before, total = _previous_record(config, stack, two_stacks=len(stacks) > 1)
        surviving = [i for i in range(total) if i not in set(before)]
        now[stack.name] = tuple(surviving[i] for i in selection.get(stack.name, []))
        collapsed[stack.name] = sorted(before + list(now[stack.name]))
        original_counts[stack.name] = total
    if len(stacks) > 1:
        return {"collapsed_layers": collapsed, "original_num_hidden_layers": original_counts}, now
    (name,) = collapsed
    return {"collapsed_layers": collapsed[name], "original_num_hidden_layers": original_counts[name]}, now


def _set_config(config, updates: dict[str, object]) -> _Undo:
    """Apply `updates` to `config`; return what restores every attribute it touched (or removes a new one)."""
    previous = {name: vars(config).get(name, _DELETE) for name in updates}
    for name, value in updates.items():
        if value is _DELETE:
            delattr(config, name)
        else:
            setattr(config, name, value)

    def undo() -> None:
        for name, value in previous.items():
            if value is not _DELETE:
                setattr(config, name, value)
            elif name in vars(config):
                delattr(config, name)

    return undo


def _check_configs(config_updates: list[tuple[object, dict[str, object]]]) -> dict[int, object]:
    """Apply the updates to copies of the configs and run the configs' own validators on them.

    Returns the copies by `id()` of the original config.
    """
    memo: dict[int, object] = {}
    copies = {id(config): copy.deepcopy(config, memo) for config, _ in config_updates}
    for config, updates in config_updates:
        _set_config(copies[id(config)], updates)
    for trial in copies.values():
        validate = getattr(trial, "validate", None)
        if not callable(validate):
            continue
        try:
            validate()
        except Exception as error:  # strict-dataclass errors are not ValueErrors
            raise ValueError(
                f"removing these layers would leave an invalid {type(trial).__name__}: {error}. "
                "This family needs a rule in hf_collapse.surgery._RULES"
            ) from error
    return copies


def _check_decoder_cache(config, stacks: list[LayerStack], selection: dict[str, list[int]]) -> None:
    """Refuse a collapse after which `generate` would build too small a KV cache for the decoder.

    `generate` sizes the cache from `config.get_text_config(decoder=True)`, which for T5-style flat configs
    reports the *encoder* count (`num_layers`); with fewer encoder than decoder layers, cached generation
    fails with an IndexError in transformers itself.
    """
    decoder = next((stack for stack in stacks if stack.name == "decoder"), None)
    if decoder is None:
        return
    kept = len(decoder) - len(selection.get("decoder", []))
    counted = _layer_count(config.get_text_config(decoder=True))
    if counted is not None and counted[1] < kept:
        raise ValueError(
            f"after this collapse the decoder would keep {kept} layers but {type(config).__name__} would size the "
            f"generation KV cache for {counted[1]} ({counted[0]}), so `generate` would fail with an IndexError "
            "inside transformers: keep at least as many encoder layers as decoder layers (remove fewer encoder "
            "layers or more decoder layers)"
        )


def _refuse_adapters(model: nn.Module) -> None:
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "the model carries PEFT adapters: call `model = model.merge_and_unload()` first, then collapse. "
            "Otherwise the saved weights keep base_layer/lora_* keys and the adapter's layers_to_transform "
            "points at the wrong layers"
        )


# ---- verification by construction: run after the changes are made, before they are kept ----------------------

# Module attributes that say how a module is being run, not what it is: a fresh model may differ in them.
_RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})
_SCALARS = (bool, int, float, str, type(None))
_SHOWN = 3  # differences named in an error


def _settings(module: nn.Module) -> dict[str, object]:
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name not in _RUNTIME_ATTRS and isinstance(value, _SCALARS)
    }


def _same_setting(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return type(a) is type(b) and a == b


def _structure(model: nn.Module, config) -> dict[tuple[str, ...], str]:
    """How `model` differs from a model built from `config`: module types and settings, tensor names and shapes.

    Keyed by (module or tensor path, what) so that differences already present before a collapse (settings a
    forward pass changes, modules a user swapped) can be told apart. The fresh model is built with its
    parameters on the meta device (no memory); tied weights are listed under every name, so a difference in
    tying is not mistaken for a missing weight. A module rebuilt as another type is reported once, not once per
    tensor inside it.
    """
    with init_empty_weights():
        fresh = type(model)(copy.deepcopy(config))
    differences: dict[tuple[str, ...], str] = {}
    retyped = []
    fresh_modules = dict(fresh.named_modules())
    for path, module in model.named_modules():
        other = fresh_modules.get(path)
        if other is None:
            continue  # its tensors are reported below
        where = path or type(model).__name__
        if type(other) is not type(module):
            differences[(path, "type")] = (
                f"{where} is a {type(module).__name__} but would be rebuilt as a {type(other).__name__}"
            )
            retyped.append(f"{path}.")
            continue
        ours, theirs = _settings(module), _settings(other)
        for name in sorted(set(ours) | set(theirs)):
            if not _same_setting(ours.get(name), theirs.get(name)):
                differences[(path, "setting", name)] = (
                    f"{where}.{name} is {ours.get(name)!r} but would be rebuilt as {theirs.get(name)!r}"
                )
    for kind in ("parameters", "buffers"):
        ours = {n: tuple(t.shape) for n, t in getattr(model, f"named_{kind}")(remove_duplicate=False)}
        theirs = {n: tuple(t.shape) for n, t in getattr(fresh, f"named_{kind}")(remove_duplicate=False)}
        for name in sorted(set(ours) | set(theirs)):
            if name.startswith(tuple(retyped)) or ours.get(name) == theirs.get(name):
                continue
            if name not in theirs:
                message = f"{name} (shape {ours[name]}) would not be rebuilt"
            elif name not in ours:
                message = f"{name} (shape {theirs[name]}) would be created, randomly initialised"
            else:
                message = f"{name} has shape {ours[name]} but would be rebuilt as {theirs[name]}"
            differences[(name, kind)] = message
    return differences


def _old_path(path: str, renames: dict[str, str]) -> str:
    """The path a module or tensor of the collapsed model had before (`model.layers.1.x` -> `model.layers.2.x`)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        old = renames.get(".".join(parts[:cut]))
        if old is not None:
            return ".".join([old, *parts[cut:]])
    return path


@contextlib.contextmanager
def _settings_kept(model: nn.Module) -> Iterator[None]:
    """Give every module back its scalar settings after a probe: some forwards adjust them to the input (Swin's
    window size), and a probe must leave no trace."""
    saved = [(module, _settings(module)) for module in model.modules()]
    try:
        yield
    finally:
        for module, settings in saved:
            for name, value in settings.items():
                if vars(module).get(name, _DELETE) is not value:
                    setattr(module, name, value)


def _special_token_ids(*configs) -> set[int]:
    ids: set[int] = set()
    for config in configs:
        for name, value in vars(config).items():
            if name.endswith(("_token_id", "_token_index", "_token_ids")):
                ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    return ids


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    real = [p.device for p in model.parameters() if p.device.type != "meta"]
    return real[0] if real else torch.device("cpu")


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A small deterministic input built from the config, or None when the forward takes neither tokens nor pixels.

    Tokens avoid every special id of the config (an image token would make a multimodal model expect pixels);
    encoder-decoders also get decoder tokens; vision models get one image of the configured size.
    """
    config = model.config
    accepted = set(inspect.signature(model.forward).parameters)
    text = config.get_text_config(decoder=True)
    vocab = getattr(text, "vocab_size", None)
    generator = torch.Generator().manual_seed(0)
    device = _input_device(model)
    if "input_ids" in accepted and isinstance(vocab, int) and vocab > 0:
        special = _special_token_ids(config, text)
        allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special] or [0])
        pick = lambda n: allowed[torch.randint(len(allowed), (1, n), generator=generator)].to(device)  # noqa: E731
        probe = {"input_ids": pick(8)}
        if "decoder_input_ids" in accepted and getattr(config, "is_encoder_decoder", False):
            probe["decoder_input_ids"] = pick(4)
        return probe
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if "pixel_values" in accepted and size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, height, width, generator=generator).to(device, dtype)}
    return None


def _output_tensors(output) -> dict[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return {"output": output}
    items = output.items() if isinstance(output, dict) else enumerate(output)
    found = {}
    for name, value in items:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[str(name)] = value
        elif isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            found.update({f"{name}[{i}]": v for i, v in enumerate(value) if v.is_floating_point()})
    return found


def _run_probe(model: nn.Module, probe: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad(), eval_mode(model), _settings_kept(model):
        return {k: v.detach().float().cpu() for k, v in _output_tensors(model(**probe)).items()}


def _output_differences(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], dtype) -> list[str]:
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    differences = [f"output {name!r} is missing" for name in reference if name not in got]
    for name, expected in reference.items():
        value = got.get(name)
        if value is None:
            continue
        if value.shape != expected.shape:
            differences.append(f"output {name!r} has shape {tuple(value.shape)}, not {tuple(expected.shape)}")
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        error = float((value - expected).abs().max()) if expected.numel() else 0.0
        if error > tolerance * max(scale, 1e-6) or not torch.isfinite(value).all() == torch.isfinite(expected).all():
            differences.append(f"output {name!r} differs by up to {error:.3g} (its largest value is {scale:.3g})")
    return differences


def _suspect_fields(configs) -> list[str]:
    """Config fields that look layer-related and that no rule updated: the likely cause of a difference."""
    handled = {rule.field for rule in _RULES} | {o for rule in _RULES for o in rule.owns}
    handled |= set(_RECORD_FIELDS) | set(_PARENT_COUNT_ATTRS) | {"num_decoder_layers", "encoder_layers", "decoder_layers"}
    names = set()
    for config in configs:
        for name, value in vars(config).items():
            lowered = name.lower()
            if name in handled or name.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, list, tuple)) and ("layer" in lowered or "dense" in lowered):
                names.add(name)
    return sorted(names)


def _verification_error(what: str, differences: list[str], configs) -> ValueError:
    shown = "; ".join(differences[:_SHOWN]) + (f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else "")
    suspects = _suspect_fields(configs)
    hint = (
        f" Config field(s) that may describe layers and that no rule updated: {', '.join(suspects)}."
        if suspects
        else ""
    )
    return ValueError(
        f"the collapse could not be verified, so nothing was changed: {what}: {shown}.{hint} "
        "This family needs a rule in hf_collapse.surgery._RULES; until then remove other layers or keep these"
    )


@dataclass(frozen=True)
class CollapseRecord:
    """What one call to [`collapse_layers`] removed.

    Attributes:
        removed (`dict[str, tuple[int, ...]]`): per stack name (`""` for a one-stack model, `"encoder"` /
            `"decoder"` for encoder-decoders), the 0-based layers removed by this call, in the *original*
            numbering (before any collapse; the same numbering as `config.collapsed_layers`).
        layers_before (`dict[str, int]`): each stack's layer count before this call.
        layers_after (`dict[str, int]`): each stack's layer count after it.
        parameters_before (`int`): `model.num_parameters()` before this call.
        parameters_after (`int`): `model.num_parameters()` after it.
        outputs_verified (`bool`): whether the collapsed model's output was checked against the original's with
            the layers bypassed, on a probe input built from the config (or given). `False` when the model's
            forward takes neither `input_ids` nor `pixel_values` (only the structure was checked), or when
            nothing was removed.
    """

    removed: dict[str, tuple[int, ...]]
    layers_before: dict[str, int]
    layers_after: dict[str, int]
    parameters_before: int
    parameters_after: int
    outputs_verified: bool

    @property
    def num_removed(self) -> int:
        """How many layers this call removed, over all stacks."""
        return sum(len(indices) for indices in self.removed.values())


def _refuse_offloaded(model: nn.Module) -> None:
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} weights of the model (e.g. {offloaded[0]}) are offloaded (device_map with 'disk' or "
            "CPU offload): their offload index is keyed by the old layer names, so the collapsed model would save "
            "wrong weights. Load the model without offloading (for instance on CPU, device_map=None) to collapse it, "
            "then dispatch the collapsed model again"
        )


def _device_map_edit(model: nn.Module, stacks: list[LayerStack], selection: dict[str, list[int]]) -> _Apply:
    """Renumber `hf_device_map` (set by `device_map=` loading) to the kept layers; its hooks stay on the modules."""

    def apply() -> _Undo:
        device_map = getattr(model, "hf_device_map", None)
        if not isinstance(device_map, dict):
            return lambda: None
        renamed = {}
        for name, device in device_map.items():
            new_name = name
            for stack in stacks:
                prefix = f"{stack.path}."
                if not name.startswith(prefix):
                    continue
                index, _, rest = name[len(prefix) :].partition(".")
                removed = selection.get(stack.name, [])
                if not index.isdigit() or int(index) in removed:
                    new_name = None if index.isdigit() else name
                    break
                moved = int(index) - sum(1 for i in removed if i < int(index))
                new_name = f"{prefix}{moved}" + (f".{rest}" if rest else "")
            if new_name is not None:
                renamed[new_name] = device
        model.hf_device_map = renamed

        def undo() -> None:
            model.hf_device_map = device_map

        return undo

    return apply


def collapse_layers(
    model: nn.Module,
    layers: Sequence[int] | dict[str, Sequence[int]],
    *,
    probe_inputs: dict[str, torch.Tensor] | None = None,
) -> CollapseRecord:
    """Remove layers from a transformers model in place, leaving a plain, smaller model of the same family.

    The removed blocks leave the `nn.ModuleList`; every `layer_idx` inside the kept blocks is renumbered to
    the block's new position (the KV cache is indexed by it); the layer count is lowered on the config that
    owns it (the text config of a multimodal model); per-layer config fields follow the kept layers
    (`layer_types`, `mlp_layer_types`, `no_rope_layers` sliced; `moe_layers` remapped; `first_k_dense_replace`
    and `max_window_layers` recounted; Qwen-MoE's `decoder_sparse_step` made explicit through
    `mlp_only_layers`); T5's relative position bias moves to the new first block; GPT-2 layers scaled by
    `1/(layer_idx + 1)` get their queries rescaled so their outputs do not change. The result saves with
    `save_pretrained` and reloads with the plain `AutoModel*` class, without missing or unexpected weights.

    Every collapse is verified before it is kept, whatever the architecture: (1) a model built from the new
    config (parameters on the meta device) must have exactly the collapsed model's parameter and buffer names
    and shapes, module types and module settings (such as each attention's sliding window); (2) on a small
    probe input, the collapsed model's outputs must equal the original's with the same layers bypassed
    ([`bypass_layers`]). The probe is built from the config (tokens that avoid the special ids, decoder tokens
    for encoder-decoders, one image of `image_size` for vision models) unless `probe_inputs` is given; a model
    whose forward takes neither `input_ids` nor `pixel_values` is checked by (1) alone, and the record says so.
    If a check fails, the model and its config are restored exactly and the call raises.

    The removal is recorded on the top-level `model.config`, in the *original* numbering, cumulatively over
    repeated calls:

    - `collapsed_layers`: the removed 0-based layer indices (`list[int]`), or `{"encoder": [...],
      "decoder": [...]}` for encoder-decoder models;
    - `original_num_hidden_layers`: the layer count before any collapse (`int`, or a dict per stack).

    Args:
        model (`nn.Module`): a transformers model, possibly wrapped by `torch.compile`, DDP or FSDP, without PEFT
            adapters.
        layers (`Sequence[int]` or `dict[str, Sequence[int]]`): the 0-based layers to remove, in the model's
            current numbering: a list for one-stack models, `{"encoder": [...], "decoder": [...]}` for
            encoder-decoder models (a stack left out keeps all its layers). An empty selection changes nothing.
        probe_inputs (`dict[str, torch.Tensor]`, *optional*): keyword inputs of the model for the output check,
            instead of the probe built from the config.

    Returns:
        [`CollapseRecord`]: what was removed (original numbering), layer and parameter counts before and after.

    Raises:
        `ValueError`: the request cannot be done exactly; the model is left untouched. That is: an index out of
            range, negative, not an integer or given twice; every layer of a stack; PEFT adapters still attached;
            no recognisable layer stack; a per-layer config field or architecture quirk with no exact update
            (for instance layer 0 of ModernBERT); a failed verification (the message names the tensors, modules
            or outputs that differ, and the config fields that may be the cause).
    """
    _refuse_adapters(model)
    inner = unwrap_model(model)
    _refuse_offloaded(inner)
    stacks = find_layer_stacks(inner)
    selection = resolve_layer_selection(stacks, layers)
    counts = {stack.name: len(stack) for stack in stacks}
    parameters = inner.num_parameters()
    if not any(selection.values()):
        return CollapseRecord({name: () for name in counts}, counts, counts, parameters, parameters, False)

    edits: list[_Edit] = []
    config_updates: list[tuple[object, dict[str, object]]] = []
    for stack in stacks:
        chosen = selection.get(stack.name, [])
        if not chosen:
            continue
        removal = _Removal(stack, tuple(chosen), tuple(i for i in range(len(stack)) if i not in set(chosen)))
        if not removal.kept:
            raise _refuse(removal, f"that is every layer; keep at least one of the {len(stack)}")
        per_layer = _per_layer_edit(removal)
        config_updates.append((stack.config, per_layer.config))
        edits += [per_layer, _renumber_edit(removal), _parent_edit(inner, removal)]
    edits.append(_Edit(modules=[_device_map_edit(inner, stacks, selection)]))
    record_values, removed = _record_values(inner.config, stacks, selection)
    config_updates.append((inner.config, record_values))
    trial = _check_configs(config_updates)
    _check_decoder_cache(trial[id(inner.config)], stacks, selection)

    probe = _probe_inputs(inner) if probe_inputs is None else probe_inputs
    reference = None if probe is None else _reference_outputs(inner, selection, probe, given=probe_inputs is not None)

    baseline = _structure(inner, inner.config)  # what already differs from a fresh build, before any change
    renames = {
        f"{stack.path}.{new}": f"{stack.path}.{old}"
        for stack in stacks
        for new, old in enumerate(i for i in range(len(stack)) if i not in set(selection.get(stack.name, [])))
    }
    undo = _apply(stacks, selection, edits, config_updates)
    try:
        _verify(inner, stacks, probe, reference, baseline, renames)
    except BaseException:
        undo()
        raise
    return CollapseRecord(
        removed=removed,
        layers_before=counts,
        layers_after={stack.name: len(stack) for stack in stacks},
        parameters_before=parameters,
        parameters_after=inner.num_parameters(),
        outputs_verified=reference is not None,
    )


def _reference_outputs(inner: nn.Module, selection, probe: dict, given: bool) -> dict[str, torch.Tensor] | None:
    """The original's outputs on the probe with the layers bypassed; None when the built probe does not fit the model.

    A bypass that breaks a model which runs on the probe means the layers change the hidden states' shape (Swin's
    stages, for example): they cannot be removed. A probe built from the config that the model itself does not
    accept (it needs other inputs) leaves the structure check alone; a probe given by the caller must work.
    """
    try:
        with bypass_layers(inner, selection):
            return _run_probe(inner, probe)
    except Exception as bypassed_error:
        try:
            _run_probe(inner, probe)
        except Exception as error:
            if given:
                raise ValueError(f"the model fails on the given probe_inputs: {type(error).__name__}: {error}") from error
            return None
        chosen = {name: indices for name, indices in selection.items() if indices}
        layers = ", ".join(f"{name} {indices}" if name else str(indices) for name, indices in chosen.items())
        raise ValueError(
            f"cannot remove layers {layers}: the model fails once they are bypassed "
            f"({type(bypassed_error).__name__}: {bypassed_error}), so their input and output are not interchangeable "
            "(for example blocks that change the hidden size or the sequence length); only layers whose output has "
            "the shape of their input can be removed"
        ) from bypassed_error


def _apply(stacks, selection, edits, config_updates) -> _Undo:
    """Make every change; return what undoes all of them, in reverse order."""
    undos: list[_Undo] = []

    def undo() -> None:
        for step in reversed(undos):
            step()

    try:
        for edit in edits:
            for apply in edit.modules:
                undos.append(apply())
        for stack in stacks:
            undos.append(_delete_layers(stack, selection.get(stack.name, [])))
        for config, updates in config_updates:
            undos.append(_set_config(config, updates))
    except BaseException:
        undo()
        raise
    return undo


def _delete_layers(stack: LayerStack, indices: Sequence[int]) -> _Undo:
    every = list(stack.layers)
    for index in reversed(indices):
        del stack.layers[index]

    def undo() -> None:
        for index in reversed(range(len(stack.layers))):
            del stack.layers[index]
        stack.layers.extend(every)

    return undo


def _verify(inner: nn.Module, stacks: list[LayerStack], probe, reference, baseline, renames) -> None:
    configs = [inner.config, *{id(s.config): s.config for s in stacks}.values()]
    differences = [
        message
        for key, message in _structure(inner, inner.config).items()
        if (_old_path(key[0], renames), *key[1:]) not in baseline
    ]
    if differences:
        raise _verification_error("a model built from the new config would not be this model", differences, configs)
    if reference is None:
        return
    try:
        got = _run_probe(inner, probe)
    except Exception as error:
        raise _verification_error(
            "the collapsed model fails on the probe input", [f"{type(error).__name__}: {error}"], configs
        ) from error
    dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)
    differences = _output_differences(reference, got, dtype)
    if differences:
        raise _verification_error(
            "its output differs from the original's with the same layers bypassed", differences, configs
        )
