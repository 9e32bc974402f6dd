"""How each per-layer config field and position-dependent quirk follows the removal of layers: one row per field.

Removing a layer touches more than the module list: the layer count, and every config field that describes layers
by position. How each such field follows the kept layers is data, `RULES`; a handler computes the config updates
(and the module changes, such as GPT-2's query rescaling) for one removal, or raises `ValueError` when it cannot
be done exactly. Planning and applying the removal is [`~surgery.apply`]'s job, checking it [`~surgery.verify`]'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import LayerStack

DELETE = object()  # config update value meaning "remove this attribute"
# Where collapse_layers records what it removed (on the top-level config), in the original numbering.
RECORD_FIELDS = ("collapsed_layers", "original_num_hidden_layers")
# Int attributes of a stack's parent module that cache the layer count (DistilBERT's Transformer.n_layers).
PARENT_COUNT_ATTRS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer")


@dataclass(frozen=True)
class Removal:
    """What happens to one stack: the 0-based layers removed and kept, in the current numbering."""

    stack: LayerStack
    removed: tuple[int, ...]
    kept: tuple[int, ...]

    @property
    def new_index(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}

    def where(self) -> str:
        return f"the {self.stack.name} stack" if self.stack.name else "the model"


Undo = Callable[[], None]
Apply = Callable[[], Undo]  # a module change: makes it, and returns what puts it back exactly


@dataclass
class Edit:
    """Changes a rule asks for: config attribute updates (or `DELETE`) and module changes to run later."""

    config: dict[str, object] = field(default_factory=dict)
    modules: list[Apply] = field(default_factory=list)
    # the rules (their config field) whose module changes alter weights: a rewrite of the weights files alone cannot
    # make them (see hf_collapse.streaming)
    weight_changes: list[str] = field(default_factory=list)


def refuse(removal: Removal, why: str) -> ValueError:
    return ValueError(f"cannot remove layers {list(removal.removed)} from {removal.where()}: {why}")

# ---- rule handlers: (removal, config, field name, value) -> Edit, raising ValueError when not exact ----


def _slice_per_layer(removal: Removal, config, name: str, value) -> Edit:
    count = len(removal.stack)
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise refuse(
            removal,
            f"config.{name} should hold one entry per layer ({count}) but is {value!r}; fix the config first",
        )
    return Edit(config={name: [value[i] for i in removal.kept]})


def _remap_indices(removal: Removal, config, name: str, value) -> Edit:
    count = len(removal.stack)
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < count for i in value):
        raise refuse(removal, f"config.{name} should list layer indices in 0-{count - 1} but is {value!r}")
    new_index = removal.new_index
    return Edit(config={name: [new_index[i] for i in value if i in new_index]})


def _count_kept_below(removal: Removal, config, name: str, value) -> Edit:
    # The layers below the threshold are a prefix of the stack, so the kept ones are still a prefix.
    return Edit(config={name: sum(1 for i in removal.kept if i < value)})


def _explicit_sparse_layers(removal: Removal, config, name: str, value) -> Edit:
    # A period no longer describes the kept layers: list every dense layer instead, with a period of 1.
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    is_sparse = {i: i not in dense and (i + 1) % value == 0 for i in removal.kept}
    return Edit(
        config={name: 1, "mlp_only_layers": [new for new, old in enumerate(removal.kept) if not is_sparse[old]]}
    )


def _drop_periodic_pattern(removal: Removal, config, name: str, value) -> Edit:
    if not isinstance(getattr(config, "layer_types", None), (list, tuple)):
        raise refuse(
            removal,
            f"config.{name}={value!r} gives the layer pattern as a period, which cannot describe the kept "
            "layers, and this config has no `layer_types` list to give it layer by layer",
        )
    # Configs that also carry `layer_types` read the period only to build it; once `layer_types` is sliced,
    # a leftover period would misdescribe the model, so drop it where it is a legacy extra (not a declared field).
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    extras = [attr for attr in (name, f"_{name}") if attr in vars(config) and attr not in declared]
    return Edit(config={attr: DELETE for attr in extras})


def _rescale_inverse_index_attention(removal: Removal, config, name: str, value) -> Edit:
    # GPT-2 divides attention scores by (layer_idx + 1). A layer moving from position i to j would be
    # rebuilt with 1/(j + 1): scaling its queries by (j + 1)/(i + 1) keeps every score, hence the output.
    edit = Edit()
    for new, old in enumerate(removal.kept):
        if new == old:
            continue
        for attention in removal.stack.layers[old].modules():
            if not getattr(attention, "scale_attn_by_inverse_layer_idx", False):
                continue
            query = _query_projection(attention)
            if query is None:
                raise refuse(
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


def _scale_queries(attention: nn.Module, module: nn.Module, columns: int, factor: float) -> Apply:
    def apply() -> Undo:
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


def _move_relative_attention_bias(removal: Removal, config, name: str, value) -> Edit:
    # T5 builds the relative position bias only in block 0 and hands the result to the later blocks.
    edit = Edit()
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
            raise refuse(
                removal,
                f"layer 0's {path} owns the relative position bias but layer {removal.kept[0]} has no matching "
                "module to move it to",
            )
        edit.modules.append(_move_bias(owner, target))
    return edit


def _move_bias(owner: nn.Module, target: nn.Module) -> Apply:
    def apply() -> Undo:
        had = target.has_relative_attention_bias
        target.relative_attention_bias = owner.relative_attention_bias
        target.has_relative_attention_bias = True

        def undo() -> None:
            del target.relative_attention_bias
            target.has_relative_attention_bias = had

        return undo

    return apply


def _keep_first_layer(removal: Removal, config, name: str, value) -> Edit:
    if 0 in removal.removed:
        raise refuse(
            removal,
            f"{type(config).__name__} builds layer 0 differently from the others (no attention norm), so a "
            "model without it cannot be described by a config; keep layer 0 and remove other layers",
        )
    return Edit()


def _remap_stages(removal: Removal, config, name: str, value) -> Edit:
    # Backbones (DINOv2, ViT-style): stage_names = ["stem", "stage1", ..., "stageN"], stage k is layer k - 1's
    # output; out_indices / out_features pick the stages the backbone returns.
    count = len(removal.stack)
    if list(value) != ["stem"] + [f"stage{i}" for i in range(1, count + 1)]:
        raise refuse(
            removal,
            f"config.stage_names={value!r} is not one stage per layer (stem, stage1..stage{count}), so the stages "
            "cannot follow the kept layers",
        )
    new_index = removal.new_index
    outputs = [i % (count + 1) for i in (config.out_indices or [])]
    lost = [i for i in outputs if i and i - 1 not in new_index]
    if lost:
        raise refuse(
            removal,
            f"the backbone returns stage(s) {', '.join(value[i] for i in lost)} (out_features), the output of layer(s) "
            f"{', '.join(str(i - 1) for i in lost)}; keep those layers, or change out_features first",
        )
    stages = ["stem"] + [f"stage{i}" for i in range(1, len(removal.kept) + 1)]
    indices = [0 if i == 0 else new_index[i - 1] + 1 for i in outputs]
    return Edit(config={"stage_names": stages, "_out_indices": indices, "_out_features": [stages[i] for i in indices]})


def _refit_interval_pattern(removal: Removal, config, name: str, value) -> Edit:
    # ERNIE-4.5-MoE: layer i is MoE iff (i + 1) % interval == 0 and start <= i <= end. Find integers that give the
    # kept layers, renumbered, the kinds they have; none found leaves them as they are, and the planning's comparison
    # of kinds (see `LAYER_KINDS`) refuses the removal.
    start, end = config.moe_layer_start_index, config.moe_layer_end_index
    moe = [new for new, old in enumerate(removal.kept) if (old + 1) % value == 0 and start <= old <= end]
    count = len(removal.kept)
    if not moe:  # a dense model: a start past the last layer
        return Edit(config={"moe_layer_start_index": count, "moe_layer_end_index": count - 1})
    for interval in dict.fromkeys([value, *range(1, count + 1)]):  # the current interval first, if it still fits
        found = [i for i in range(moe[0], moe[-1] + 1) if (i + 1) % interval == 0]
        if found == moe:
            return Edit(config={name: interval, "moe_layer_start_index": moe[0], "moe_layer_end_index": moe[-1]})
    return Edit()


def _unrelated_to_stack(removal: Removal, config, name: str, value) -> Edit:
    # NemotronH: `mtp_layers_block_type` lists the kinds of the multi-token-prediction layers, a stack of their own
    # (`mtp.*` weights, which transformers does not build and drops on load); the main stack's removal leaves it.
    return Edit()


def _keep_pattern(removal: Removal, config, name: str, value) -> Edit:
    # The layer kinds are given by integers (start / interval / end, or period / offset) that stay as they are:
    # the removal is exact only if the pattern, counted afresh over the kept layers, gives each its own kind.
    # The planning compares the kinds (see `LAYER_KINDS`); nothing to update here beyond the count.
    return Edit()


def unused_layer_type_edit(model: nn.Module, removal: Removal) -> Edit:
    """Drop the state a model keeps per layer type for the types no kept layer has any more.

    Gemma-3 and OLMo-3 build one rotary embedding per type of `layer_types` (buffers `{type}_inv_freq` and
    `{type}_original_inv_freq`, a `{type}_attention_scaling` float) in a module outside the layers. Once the last
    full-attention layer is removed, a model built from the new config has no such state for that type, and no
    output depended on it: the collapsed model drops it too, so that it is exactly the model its config describes.
    """
    types = getattr(removal.stack.config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(types) != len(removal.stack):
        return Edit()
    gone = sorted(set(types) - {types[i] for i in removal.kept})
    return Edit(
        modules=[
            _drop_type_state(module, kind)
            for module in model.modules()
            for kind in gone
            if isinstance(getattr(module, f"{kind}_inv_freq", None), torch.Tensor)
        ]
    )


def _drop_type_state(module: nn.Module, kind: str) -> Apply:
    prefix = f"{kind}_"

    def apply() -> Undo:
        names = [name for name in vars(module) if name.startswith(prefix)]
        buffers = [name for name, _ in module.named_buffers(recurse=False) if name.startswith(prefix)]
        persistent = {name: name not in module._non_persistent_buffers_set for name in buffers}
        saved = {name: getattr(module, name) for name in [*names, *buffers]}
        lists = {name: vars(module)[name] for name in ("layer_types", "rope_type") if name in vars(module)}
        for name in saved:
            delattr(module, name)
        if isinstance(lists.get("layer_types"), list):
            module.layer_types = [t for t in lists["layer_types"] if t != kind]
        if isinstance(lists.get("rope_type"), dict):
            module.rope_type = {t: v for t, v in lists["rope_type"].items() if t != kind}

        def undo() -> None:
            for name, value in saved.items():
                if name in persistent:
                    module.register_buffer(name, value, persistent=persistent[name])
                else:
                    setattr(module, name, value)
            for name, value in lists.items():
                setattr(module, name, value)

        return undo

    return apply


@dataclass(frozen=True)
class Rule:
    """How a config field (present and not None, False or empty) follows the removal of layers.

    Attributes:
        field (`str`): the config attribute that triggers the rule.
        handler: computes the `Edit`, or raises `ValueError` when the removal cannot be done exactly.
        owns (`tuple[str, ...]`): per-layer list fields the handler also rewrites.
        when: the rule applies only if the field has this value (`None`: any value).
    """

    field: str
    handler: Callable[[Removal, object, str, object], Edit]
    owns: tuple[str, ...] = ()
    when: object = None


# One row per config field or quirk that depends on layer positions. Families that have none (Llama,
# Mistral, Phi3, GPT-NeoX, OPT, Falcon, BERT, RoBERTa, DistilBERT, ViT, Mixtral) need only the count.
RULES: tuple[Rule, ...] = (
    Rule("layer_types", _slice_per_layer),  # Gemma2/3, Qwen2/3, ModernBERT, ...: attention kind per layer
    Rule("mlp_layer_types", _slice_per_layer),  # dense / sparse per layer
    Rule("no_rope_layers", _slice_per_layer),  # SmolLM3, Llama4: a 0/1 RoPE flag per layer
    Rule("moe_layers", _remap_indices),  # Llama4: indices of the MoE layers
    Rule("first_k_dense_replace", _count_kept_below),  # DeepSeek-V2/V3: layers below k are dense
    Rule("num_dense_layers", _count_kept_below),  # LFM2-MoE: the same "first k layers are dense"
    Rule("attn_layer_indices", _remap_indices),  # Bamba: indices of the attention layers (others are Mamba)
    Rule("full_attn_idxs", _remap_indices),  # LFM2: indices of the attention layers (others are convolutions)
    Rule("hybrid_layer_ids", _remap_indices),  # Zamba2: indices of the layers with the shared attention block
    Rule("stage_names", _remap_stages, owns=("_out_indices", "_out_features")),  # backbones
    # Patterns given by integers; the kinds they give are compared when the removal is planned (see LAYER_KINDS).
    Rule("attn_layer_period", _keep_pattern, owns=("attn_layer_offset",)),  # Jamba
    Rule("expert_layer_period", _keep_pattern, owns=("expert_layer_offset",)),  # Jamba
    Rule("moe_layer_interval", _refit_interval_pattern, owns=("moe_layer_start_index", "moe_layer_end_index")),  # ERNIE-4.5
    Rule("max_window_layers", _count_kept_below),  # Qwen2/3: layers from this index on may slide
    # Qwen2/3-MoE: layer i is sparse iff (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    Rule("decoder_sparse_step", _explicit_sparse_layers, owns=("mlp_only_layers",)),
    Rule("sliding_window_pattern", _drop_periodic_pattern),  # Gemma3, Cohere2: legacy period of layer_types
    # transformers 5 keeps that period as `_sliding_window_pattern` (and writes it so): a checkpoint it saved has no other
    Rule("_sliding_window_pattern", _drop_periodic_pattern),
    Rule("global_attn_every_n_layers", _drop_periodic_pattern),  # ModernBERT (saved by transformers 4): the same
    Rule("scale_attn_by_inverse_layer_idx", _rescale_inverse_index_attention),  # GPT-2 family
    Rule("relative_attention_num_buckets", _move_relative_attention_bias),  # T5 family
    Rule("model_type", _keep_first_layer, when="modernbert"),  # layer 0 has no attn_norm
    Rule("mtp_layers_block_type", _unrelated_to_stack),  # NemotronH: the multi-token-prediction layers' kinds
)


# Per-layer kinds that a config gives by a formula in the modeling code rather than by a config field or property:
# (the fields that must be present, the kind of layer i). Read-only properties of the config that give one entry
# per layer (Jamba's `layers_block_type`, Bamba's, FalconH1's) are found without a row here.
LAYER_KINDS: tuple[tuple[tuple[str, ...], Callable[[object, int], object]], ...] = (
    (  # ERNIE-4.5-MoE: MoE where (i + 1) % interval == 0 and start <= i <= end
        ("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index"),
        lambda c, i: (i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= c.moe_layer_end_index,
    ),
)
