"""Plan, make and undo a removal of layers: the module list, `layer_idx`, the configs and the record of it.

Everything is planned and checked first (on copies of the configs, with the configs' own validators); the model is
changed only when the whole request can be done exactly, and every change returns what puts it back. Weights keys
are never rewritten by hand: `save_pretrained` numbers them from the module list.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (
    LayerStack,
    find_layer_stacks,
    get_path,
    layer_count,
    real_attr,
    resolve_layer_selection,
    unwrap_model,
)
from ..peft_state import has_tuner_layers, is_peft_model
from . import rules
from .rules import DELETE, Apply, Edit, Removal, Rule, Undo, refuse
from .verify import (
    build_probe,
    reference_outputs,
    structure_differences,
    verify_collapse,
)

__all__ = ["CollapseRecord", "collapse_layers", "collapsed_config"]

_SUGGESTIONS = 4  # removals named in a refusal


def _rule_applies(rule: Rule, value) -> bool:
    if value is None or value is False or (isinstance(value, (list, tuple)) and not value):
        return False
    return rule.when is None or value == rule.when


def _read_only_property(config, name: str) -> bool:
    attribute = getattr(type(config), name, None)
    return isinstance(attribute, property) and attribute.fset is None


def _layer_kinds(config, count: int) -> dict[str, list]:
    """Every per-layer list a config gives without storing it: read-only properties and `rules.LAYER_KINDS` formulas."""
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
    for fields, kind in rules.LAYER_KINDS:
        if all(isinstance(getattr(config, f, None), int) for f in fields):
            kinds[" / ".join(fields)] = [kind(config, i) for i in range(count)]
    return kinds


def _kinds_mismatch(removal: Removal, updates: dict[str, object]) -> list[str]:
    """The derived per-layer lists that would not follow the kept layers once `updates` are made."""
    config = removal.stack.config
    before = _layer_kinds(config, len(removal.stack))
    if not before:
        return []
    trial = copy.deepcopy(config)
    _set_config(trial, updates)
    after = _layer_kinds(trial, len(removal.kept))
    return [name for name, kinds in before.items() if after.get(name) != [kinds[i] for i in removal.kept]]


def _removable_instead(removal: Removal) -> list[list[int]]:
    """Up to `_SUGGESTIONS` sets of as many layers whose removal the rules can express exactly."""
    count, size = len(removal.stack), len(removal.removed)
    windows = [tuple(range(start, start + size)) for start in range(count - size + 1)]
    spread = itertools.islice(itertools.combinations(range(count), size), 2000)
    found = []
    for candidate in dict.fromkeys([*windows, *spread]):
        kept = tuple(i for i in range(count) if i not in candidate)
        trial = Removal(removal.stack, candidate, kept)
        try:
            if kept and not _kinds_mismatch(trial, _rule_updates(trial, suggest=False)[0].config):
                found.append(list(candidate))
        except ValueError:
            continue
        if len(found) == _SUGGESTIONS:
            break
    return found


def _rule_updates(removal: Removal, suggest: bool = True) -> tuple[Edit, set[str]]:
    """Run every rule that applies to the stack's config; return the edit and the fields the rules covered.

    A rule's field is read through the config's `attribute_map` (Zamba's `layer_types` is `layers_block_type`);
    a field that is a read-only property derived from other fields is left to them (Jamba's `layer_types`).
    """
    config = removal.stack.config
    edit = Edit(config={removal.stack.count_attr: len(removal.kept)})
    handled = set(rules.RECORD_FIELDS)
    for rule in rules.RULES:
        name = real_attr(config, rule.field)
        value = getattr(config, name, None)
        if not _rule_applies(rule, value):
            continue
        handled.update((rule.field, name, *rule.owns))
        if _read_only_property(config, name):
            continue
        found = rule.handler(removal, config, name, value)
        edit.config.update(found.config)
        edit.modules.extend(found.modules)
        if found.modules:
            edit.weight_changes.append(rule.field)
    mismatch = _kinds_mismatch(removal, edit.config)
    if mismatch:
        instead = _removable_instead(removal) if suggest else []
        raise refuse(
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


def _per_layer_edit(removal: Removal) -> Edit:
    """The config and module changes every rule asks for; refuse unknown per-layer list fields."""
    config = removal.stack.config
    edit, handled = _rule_updates(removal)
    unknown = [
        name
        for name, value in vars(config).items()
        if "layer" in name.lower() and isinstance(value, (list, tuple)) and value and name not in handled
    ]
    if unknown:
        raise refuse(
            removal,
            f"the config has per-layer field(s) {', '.join(unknown)} that hf-collapse does not know how to update "
            f"({type(config).__name__}); this family is not supported yet",
        )
    return edit


def _renumber_edit(removal: Removal) -> Edit:
    """Set `layer_idx` of every module inside the kept layers to the layer's new position."""
    moves: list[tuple[nn.Module, int]] = []
    for new, old in enumerate(removal.kept):
        for path, module in removal.stack.layers[old].named_modules():
            index = getattr(module, "layer_idx", None)
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            if index != old:
                raise refuse(
                    removal,
                    f"layer {old}'s {path or 'block'} holds layer_idx={index}, not its own position; layers that "
                    "point at other layers' state cannot be renumbered safely",
                )
            if new != old:
                moves.append((module, new))

    def apply() -> Undo:
        previous = [(module, module.layer_idx) for module, _ in moves]
        for module, new in moves:
            module.layer_idx = new

        def undo() -> None:
            for module, index in previous:
                module.layer_idx = index

        return undo

    return Edit(modules=[apply])


def _parent_edit(model: nn.Module, removal: Removal) -> Edit:
    """Counts cached by the stack's parent module: an int attribute, or a private config copy (T5 stacks)."""
    stack = removal.stack
    parent = get_path(model, stack.path.rpartition(".")[0]) if "." in stack.path else model
    count, new_count = len(stack), len(removal.kept)
    attrs = [a for a in rules.PARENT_COUNT_ATTRS if type(vars(parent).get(a)) is int and vars(parent)[a] == count]
    parent_config = getattr(parent, "config", None)
    counted = layer_count(parent_config) if parent_config is not None else None
    copy_attr = None
    if parent_config is not stack.config and parent_config is not model.config and counted and counted[1] == count:
        copy_attr = counted[0]

    def apply() -> Undo:
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

    return Edit(modules=[apply])


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


def _set_config(config, updates: dict[str, object]) -> Undo:
    """Apply `updates` to `config`; return what restores every attribute it touched (or removes a new one)."""
    previous = {name: vars(config).get(name, DELETE) for name in updates}
    for name, value in updates.items():
        if value is DELETE:
            delattr(config, name)
        else:
            setattr(config, name, value)

    def undo() -> None:
        for name, value in previous.items():
            if value is not DELETE:
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
                "This family needs a rule in hf_collapse.surgery.rules.RULES"
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
    counted = layer_count(config.get_text_config(decoder=True))
    if counted is not None and counted[1] < kept:
        raise ValueError(
            f"after this collapse the decoder would keep {kept} layers but {type(config).__name__} would size the "
            f"generation KV cache for {counted[1]} ({counted[0]}), so `generate` would fail with an IndexError "
            "inside transformers: keep at least as many encoder layers as decoder layers (remove fewer encoder "
            "layers or more decoder layers)"
        )


def _refuse_adapters(model: nn.Module) -> None:
    if is_peft_model(model) or has_tuner_layers(model):
        raise ValueError(
            "the model carries PEFT adapters: call `model = model.merge_and_unload()` first, then collapse. "
            "Otherwise the saved weights keep base_layer/lora_* keys and the adapter's layers_to_transform "
            "points at the wrong layers"
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


def _device_map_edit(model: nn.Module, stacks: list[LayerStack], selection: dict[str, list[int]]) -> Apply:
    """Renumber `hf_device_map` (set by `device_map=` loading) to the kept layers; its hooks stay on the modules."""

    def apply() -> Undo:
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
        `ValueError`: the request cannot be done exactly; the model is left untouched: an index out of range, negative,
            not an integer or given twice; every layer of a stack; PEFT adapters still attached; no recognisable layer
            stack; a per-layer config field or architecture quirk with no exact update (layer 0 of ModernBERT, say); a
            failed verification (the message names what differs and the config fields that may be the cause).
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
    plan = _plan(inner, stacks, selection)
    probe = build_probe(inner) if probe_inputs is None else probe_inputs
    reference = None if probe is None else reference_outputs(inner, selection, probe, given=probe_inputs is not None)
    baseline = structure_differences(inner, inner.config)  # what already differs from a fresh build, before any change
    renames = _renames(stacks, selection)
    undo = _apply(stacks, selection, plan.edits, plan.config_updates)
    try:
        verify_collapse(inner, stacks, probe, reference, baseline, renames)
    except BaseException:
        undo()
        raise
    return CollapseRecord(
        removed=plan.removed,
        layers_before=counts,
        layers_after={stack.name: len(stack) for stack in stacks},
        parameters_before=parameters,
        parameters_after=inner.num_parameters(),
        outputs_verified=reference is not None,
    )


@dataclass(frozen=True)
class _Plan:
    edits: list[Edit]
    config_updates: list[tuple[object, dict[str, object]]]
    removed: dict[str, tuple[int, ...]]  # per stack, in the original numbering
    config: object  # a copy of the top-level config with every update made (checked by its validators)
    weight_changes: list[str]  # the rules whose module changes alter weights


def _plan(inner: nn.Module, stacks: list[LayerStack], selection: dict[str, list[int]]) -> _Plan:
    """Every module change and config update the removal needs, checked on copies of the configs, and the removal
    per stack in the original numbering. Changes nothing."""
    edits: list[Edit] = []
    config_updates: list[tuple[object, dict[str, object]]] = []
    weight_changes: list[str] = []
    for stack in stacks:
        chosen = selection.get(stack.name, [])
        if not chosen:
            continue
        removal = Removal(stack, tuple(chosen), tuple(i for i in range(len(stack)) if i not in set(chosen)))
        if not removal.kept:
            raise refuse(removal, f"that is every layer; keep at least one of the {len(stack)}")
        per_layer = _per_layer_edit(removal)
        config_updates.append((stack.config, per_layer.config))
        weight_changes += per_layer.weight_changes
        edits += [per_layer, _renumber_edit(removal), _parent_edit(inner, removal)]
        edits.append(rules.unused_layer_type_edit(inner, removal))
    edits.append(Edit(modules=[_device_map_edit(inner, stacks, selection)]))
    record_values, removed = _record_values(inner.config, stacks, selection)
    config_updates.append((inner.config, record_values))
    trial = _check_configs(config_updates)
    _check_decoder_cache(trial[id(inner.config)], stacks, selection)
    return _Plan(edits, config_updates, removed, trial[id(inner.config)], weight_changes)


def collapsed_config(
    model: nn.Module, layers: Sequence[int] | dict[str, Sequence[int]]
) -> tuple[object, dict[str, tuple[int, ...]], list[str]]:
    """The config that [`collapse_layers`] would leave on `model`, computed without changing the model.

    The same plan as [`collapse_layers`] (one rule table, the same refusals), so a checkpoint rewritten without
    loading its weights (see `hf_collapse.streaming`) gets exactly the config an in-memory collapse saves. `model`
    may live on the meta device.

    Returns:
        `(config, removed, weight_changes)`: a new top-level config with the per-layer fields updated and the
        removal recorded; the removed layers per stack in the original numbering; and the rules (by config field)
        whose exact collapse also changes weights (GPT-2's query rescaling, T5's moved relative attention bias),
        empty when renaming the kept layers' tensors is all the weights need.

    Raises:
        `ValueError`: what [`collapse_layers`] refuses before changing anything.
    """
    _refuse_adapters(model)
    inner = unwrap_model(model)
    stacks = find_layer_stacks(inner)
    selection = resolve_layer_selection(stacks, layers)
    if not any(selection.values()):
        raise ValueError("no layer to remove: name at least one layer")
    plan = _plan(inner, stacks, selection)
    return plan.config, plan.removed, plan.weight_changes


def _renames(stacks: list[LayerStack], selection: dict[str, list[int]]) -> dict[str, str]:
    """Each kept layer's path after the removal -> its path before (`model.layers.1` -> `model.layers.2`)."""
    return {
        f"{stack.path}.{new}": f"{stack.path}.{old}"
        for stack in stacks
        for new, old in enumerate(i for i in range(len(stack)) if i not in set(selection.get(stack.name, [])))
    }


def _apply(stacks, selection, edits, config_updates) -> Undo:
    """Make every change; return what undoes all of them, in reverse order."""
    undos: list[Undo] = []

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


def _delete_layers(stack: LayerStack, indices: Sequence[int]) -> Undo:
    every = list(stack.layers)
    for index in reversed(indices):
        del stack.layers[index]

    def undo() -> None:
        for index in reversed(range(len(stack.layers))):
            del stack.layers[index]
        stack.layers.extend(every)

    return undo
