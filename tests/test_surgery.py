"""collapse_layers: exact removal of layers across model families, save/reload, generation and refusals.

Every family in `tiny_models.TINY_MODELS` is collapsed, compared with the uncollapsed model whose dropped
layers are bypassed (`bypass_layers`), saved with `save_pretrained`, reloaded with its plain Auto class, and
(for generative families) made to generate greedily without cache, with the dynamic cache and with the
static cache. The reference is always the original model with the layers bypassed and no cache.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, replace

import peft
import pytest
import torch
from tiny_models import TINY_MODELS, TinyModel
from torch import nn
from transformers import AutoModelForCausalLM

from hf_collapse.layers import bypass_layers, find_layer_stacks
from hf_collapse.surgery import collapse_layers

FAMILIES = list(TINY_MODELS)
GENERATIVE = [name for name, tiny in TINY_MODELS.items() if tiny.generates]
NEW_TOKENS = 6
# What a bad reload looks like: transformers' LOAD REPORT, or any message about weights not matching.
WEIGHT_TROUBLE = re.compile(r"LOAD REPORT|missing|unexpected|mismatch|newly initialized|not initialized", re.I)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_with_messages(tiny: TinyModel, folder) -> tuple[nn.Module, dict, list[str]]:
    """Reload with the plain Auto class; return the model, its loading info and every log/warning message."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = tiny.auto_class.from_pretrained(folder, output_loading_info=True, attn_implementation="eager")
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.messages + [str(w.message) for w in caught]


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model: nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    with torch.no_grad():
        return model.generate(
            **prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,  # no early end-of-sequence: every step is compared
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )


@dataclass
class Case:
    tiny: TinyModel
    inputs: dict
    reference: torch.Tensor  # logits of the original model with the dropped layers bypassed
    original: nn.Module  # the original model (not collapsed)
    collapsed: nn.Module
    reloaded: nn.Module
    loading_info: dict
    load_messages: list[str]
    folder: object


@pytest.fixture(scope="session")
def case(tmp_path_factory):
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            tiny = TINY_MODELS[name]
            inputs = tiny.inputs()
            original = tiny.build()
            with bypass_layers(original, tiny.drop):
                reference = logits(original, inputs)
            collapsed = tiny.build()
            collapse_layers(collapsed, tiny.drop)
            folder = tmp_path_factory.mktemp(name)
            collapsed.save_pretrained(folder)
            reloaded, info, messages = load_with_messages(tiny, folder)
            built[name] = Case(tiny, inputs, reference, original, collapsed, reloaded, info, messages, folder)
        return built[name]

    return get


def kept_indices(stack_len: int, removed: list[int]) -> list[int]:
    return [i for i in range(stack_len) if i not in removed]


# ---- 1. in memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_collapsed_model_equals_bypassed_layers(case, family):
    c = case(family)
    torch.testing.assert_close(logits(c.collapsed, c.inputs), c.reference)
    before = {s.name: len(s) for s in find_layer_stacks(c.original)}
    drop = c.tiny.drop if isinstance(c.tiny.drop, dict) else {"": c.tiny.drop}
    for stack in find_layer_stacks(c.collapsed):
        assert len(stack) == before[stack.name] - len(drop.get(stack.name, []))
        assert getattr(stack.config, stack.count_attr) == len(stack)
        for position, layer in enumerate(stack.layers):
            indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
            assert indices <= {position}, f"{stack.key(position)} still holds layer_idx {indices}"


# ---- 2. save and reload -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_is_clean_and_exact(case, family):
    c = case(family)
    assert {k: v for k, v in c.loading_info.items() if v} == {}
    assert [m for m in c.load_messages if WEIGHT_TROUBLE.search(m)] == []
    saved, loaded = c.collapsed.state_dict(), c.reloaded.state_dict()
    assert sorted(saved) == sorted(loaded)
    for key, value in saved.items():
        assert torch.equal(value, loaded[key]), key
    torch.testing.assert_close(logits(c.reloaded, c.inputs), c.reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_layers_have_the_structure_of_the_kept_layers(case, family):
    """A layer rebuilt at its new position (dense vs MoE, owner of T5's bias...) matches the layer that moved there."""
    c = case(family)
    drop = c.tiny.drop if isinstance(c.tiny.drop, dict) else {"": c.tiny.drop}
    originals = {s.name: s for s in find_layer_stacks(c.original)}
    for stack in find_layer_stacks(c.reloaded):
        kept = kept_indices(len(originals[stack.name]), drop.get(stack.name, []))
        for position, old in enumerate(kept):
            # T5: the new first block also takes over the relative position bias of a removed block 0
            model_layer = originals[stack.name].layers[0 if family == "t5" and position == 0 else old]
            expected = sorted((path, type(m).__name__) for path, m in model_layer.named_modules())
            got = sorted((path, type(m).__name__) for path, m in stack.layers[position].named_modules())
            assert got == expected, f"{stack.key(position)} (was layer {old})"


def test_load_check_catches_a_naive_deletion(tmp_path):
    """Control: deleting a module without fixing the config is reported, so the clean-reload test can fail."""
    tiny = TINY_MODELS["llama"]
    model = tiny.build()
    del model.model.layers[1]
    model.save_pretrained(tmp_path)
    _, info, messages = load_with_messages(tiny, tmp_path)
    assert info["missing_keys"]
    assert any(WEIGHT_TROUBLE.search(m) for m in messages)


# ---- 3. generation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference_generation(case):
    done: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in done:
            c = case(name)
            with bypass_layers(c.original, c.tiny.drop):
                done[name] = generate(c.original, c.inputs, use_cache=False)
        return done[name]

    return get


@pytest.mark.parametrize("cache", ["no-cache", "dynamic", "static"])
@pytest.mark.parametrize("family", GENERATIVE)
def test_greedy_generation_matches_with_every_cache(case, reference_generation, family, cache):
    c = case(family)
    expected = reference_generation(family)
    new_tokens = expected[:, -NEW_TOKENS:]
    assert len(new_tokens.unique()) >= 3, "degenerate reference: the comparison would prove little"
    kwargs = {"no-cache": {"use_cache": False}, "dynamic": {}, "static": {"cache_implementation": "static"}}[cache]
    for label, model in (("in memory", c.collapsed), ("reloaded", c.reloaded)):
        assert torch.equal(generate(model, c.inputs, **kwargs), expected), label


# ---- 4. config ----------------------------------------------------------------------------------------------

F, S = "full_attention", "sliding_attention"
# Concrete values after reload for the families with position-dependent config fields.
QUIRKY_CONFIG = {
    "qwen2": {"num_hidden_layers": 3, "max_window_layers": 1, "layer_types": [F, S, S]},
    "qwen3": {"num_hidden_layers": 2, "max_window_layers": 1, "layer_types": [F, S]},
    "gemma2": {"num_hidden_layers": 3, "layer_types": [F, S, F]},
    "gemma3": {"num_hidden_layers": 3, "layer_types": [S, S, F]},
    "modernbert": {"num_hidden_layers": 3, "layer_types": [F, S, F]},
    "qwen3-moe": {"num_hidden_layers": 3, "decoder_sparse_step": 1, "mlp_only_layers": [1, 2]},
    "deepseek-v3": {"num_hidden_layers": 2, "first_k_dense_replace": 1},
    "t5": {"num_layers": 2, "num_decoder_layers": 2},
    "gpt2-inverse-scaling": {"n_layer": 3},
    "smollm3": {"num_hidden_layers": 3, "no_rope_layers": [0, 1, 0]},
    "llama4-text": {
        "num_hidden_layers": 3,
        "moe_layers": [0, 2],
        "no_rope_layers": [0, 1, 0],
        "layer_types": [F, "chunked_attention", F],
    },
    "glm4-moe-lite": {"num_hidden_layers": 3, "mlp_layer_types": ["sparse", "sparse", "sparse"]},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_records_the_collapse(case, family):
    c = case(family)
    config = c.reloaded.config
    assert config.collapsed_layers == c.tiny.drop
    stacks = find_layer_stacks(c.original)
    if len(stacks) == 1:
        assert config.original_num_hidden_layers == len(stacks[0])
    else:
        assert config.original_num_hidden_layers == {s.name: len(s) for s in stacks}
    for stack in find_layer_stacks(c.reloaded):
        types = getattr(stack.config, "layer_types", None)
        assert types is None or len(types) == len(stack)


@pytest.mark.parametrize("family", sorted(QUIRKY_CONFIG))
def test_quirky_config_fields_follow_the_kept_layers(case, family):
    c = case(family)
    (stack,) = {id(s.config): s for s in find_layer_stacks(c.reloaded)}.values()
    for name, expected in QUIRKY_CONFIG[family].items():
        assert getattr(stack.config, name) == expected, name


def test_gemma3_periodic_pattern_is_replaced_by_layer_types(case):
    for family in ("gemma3", "gemma3-multimodal"):
        saved = (case(family).folder / "config.json").read_text()
        assert "sliding_window_pattern" not in saved
        text_config = case(family).reloaded.config.get_text_config(decoder=True)
        assert text_config.layer_types == [S, S, F]


def test_gemma3_saved_by_transformers_5_loses_its_stale_period_too(tmp_path):
    """transformers 5 writes the period as `_sliding_window_pattern`; a checkpoint it saved has no other key, and
    collapsing it must not carry the old period (6) beside the sliced `layer_types` (converters read it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8,
    )
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "src")
    assert '"_sliding_window_pattern": 6' in (tmp_path / "src" / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    expected = model.config.layer_types[:2] + model.config.layer_types[3:]
    collapse_layers(model, [2])
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not [key for key in saved if "sliding_window_pattern" in key]
    assert saved["layer_types"] == expected and expected[4] == "full_attention"  # old layer 5, the sixth


def test_qwen3_moe_layers_are_sparse_where_they_were(case):
    c = case("qwen3-moe")
    kinds = [type(layer.mlp).__name__ for layer in c.reloaded.model.layers]
    assert kinds == ["Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeMLP"]


def test_t5_relative_bias_moves_to_the_new_first_block(case):
    c = case("t5")
    for stack_name in ("encoder", "decoder"):
        blocks = getattr(c.reloaded, stack_name).block
        owners = [i for i, b in enumerate(blocks) if b.layer[0].SelfAttention.has_relative_attention_bias]
        assert owners == [0]
        moved = blocks[0].layer[0].SelfAttention.relative_attention_bias.weight
        original = getattr(c.original, stack_name).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(moved, original)


def test_gpt2_inverse_scaling_is_folded_into_the_queries(case):
    c = case("gpt2-inverse-scaling")
    base = (32 // 4) ** -0.5
    for model in (c.collapsed, c.reloaded):
        assert [block.attn.scaling for block in model.transformer.h] == pytest.approx([base, base / 2, base / 3])
    # layer 2 moved to position 1: its queries are scaled by 2/3, its keys and values untouched
    old, new = c.original.transformer.h[2].attn.c_attn, c.reloaded.transformer.h[1].attn.c_attn
    torch.testing.assert_close(new.weight[:, :32], old.weight[:, :32] * 2 / 3)
    torch.testing.assert_close(new.weight[:, 32:], old.weight[:, 32:])


def test_distilbert_parent_count_is_updated(case):
    assert case("distilbert").collapsed.distilbert.transformer.n_layers == 2


def test_t5_stack_config_copies_get_the_new_counts(case):
    c = case("t5")
    assert c.collapsed.encoder.config.num_layers == 2
    assert c.collapsed.decoder.config.num_layers == 2


# ---- repeated collapses, partial selections -----------------------------------------------------------------


def test_repeated_collapse_records_original_indices(tmp_path):
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    original = tiny.build()
    with bypass_layers(original, [1, 2]):
        reference = logits(original, inputs)
    model = tiny.build()
    collapse_layers(model, [1])
    collapse_layers(model, [1])  # the second call's layer 1 was layer 2
    assert model.config.collapsed_layers == [1, 2]
    assert model.config.original_num_hidden_layers == 4
    torch.testing.assert_close(logits(model, inputs), reference)
    model.save_pretrained(tmp_path)
    reloaded, info, _ = load_with_messages(tiny, tmp_path)
    assert reloaded.config.collapsed_layers == [1, 2]
    collapse_layers(reloaded, [0])
    assert reloaded.config.collapsed_layers == [0, 1, 2]
    assert reloaded.config.num_hidden_layers == 1


def test_t5_decoder_only_selection_keeps_the_encoder():
    tiny = TINY_MODELS["t5"]
    model = tiny.build()
    collapse_layers(model, {"decoder": [1]})
    assert len(model.encoder.block) == 4 and len(model.decoder.block) == 3
    assert model.config.collapsed_layers == {"encoder": [], "decoder": [1]}
    assert model.config.original_num_hidden_layers == {"encoder": 4, "decoder": 4}


def test_empty_selection_changes_nothing():
    model = TINY_MODELS["llama"].build()
    before = model.config.to_dict()
    record = collapse_layers(model, [])
    assert record.removed == {"": ()} and record.layers_after == record.layers_before == {"": 4}
    assert record.parameters_after == record.parameters_before == model.num_parameters()
    assert model.config.to_dict() == before
    assert len(model.model.layers) == 4


def test_merged_peft_model_collapses_like_the_base_model():
    tiny = TINY_MODELS["llama"]
    inputs = tiny.inputs()
    wrapped = peft.get_peft_model(
        tiny.build(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    merged = wrapped.merge_and_unload().eval()
    with bypass_layers(merged, [0, 3]):
        reference = logits(merged, inputs)
    collapse_layers(merged, [0, 3])
    assert not any("lora" in key or "base_layer" in key for key in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), reference)


# ---- 5. refusals leave the model untouched ------------------------------------------------------------------


def snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config.to_dict(),
        [(p, m.layer_idx) for p, m in model.named_modules() if isinstance(getattr(m, "layer_idx", None), int)],
    )


def assert_same(before: tuple, model: nn.Module) -> None:
    after = snapshot(model)
    assert sorted(before[0]) == sorted(after[0])
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1]
    assert before[2] == after[2]


REFUSALS = {
    "out of range": ("llama", [4], r"layer 4 does not exist: the model stack has 4 layers, numbered 0-3"),
    "negative": ("llama", [-1], r"layer -1 does not exist"),
    "duplicate": ("llama", [1, 1], r"duplicate layer indices"),
    "not an integer": ("llama", [1.5], r"not an integer"),
    "every layer": ("llama", [0, 1, 2, 3], r"that is every layer; keep at least one of the 4"),
    "every encoder layer": ("t5", {"encoder": [0, 1, 2, 3]}, r"from the encoder stack: that is every layer"),
    "list for two stacks": ("t5", [0], r"several layer stacks"),
    "unknown stack": ("t5", {"middle": [0]}, r"unknown layer stack 'middle'"),
    "modernbert layer 0": ("modernbert", [0, 2], r"layer 0.*no attention norm.*keep layer 0"),
    # transformers sizes T5's generation cache by num_layers (the encoder count)
    "t5 fewer encoder than decoder layers": ("t5", {"encoder": [0, 1]}, r"keep at least as many encoder layers"),
}


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_refused_requests_leave_the_model_untouched(what):
    family, layers, message = REFUSALS[what]
    model = TINY_MODELS[family].build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        collapse_layers(model, layers)
    assert_same(before, model)


def test_peft_model_is_refused_until_merged():
    tiny = TINY_MODELS["llama"]
    wrapped = peft.get_peft_model(tiny.build(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
        collapse_layers(wrapped, [1])
    assert_same(before, wrapped)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):  # the base model still carries the LoRA layers
        collapse_layers(wrapped.get_base_model(), [1])


def test_unknown_per_layer_config_field_is_refused():
    tiny = replace(
        TINY_MODELS["llama"],
        config_kwargs=dict(TINY_MODELS["llama"].config_kwargs, attention_layer_scales=[1, 2, 3, 4]),
    )
    model = tiny.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"per-layer field\(s\) attention_layer_scales"):
        collapse_layers(model, [1])
    assert_same(before, model)


def test_inconsistent_collapse_record_is_refused():
    model = TINY_MODELS["llama"].build()
    model.config.collapsed_layers = [1]
    model.config.original_num_hidden_layers = 8
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"restore or delete those two config fields"):
        collapse_layers(model, [0])
    assert_same(before, model)


def test_model_without_a_layer_stack_is_refused():
    with pytest.raises(ValueError, match=r"cannot find the transformer layer stack of Linear"):
        collapse_layers(nn.Linear(4, 4), [0])


def test_layer_idx_pointing_at_another_layer_is_refused():
    model = TINY_MODELS["llama"].build()
    model.model.layers[2].self_attn.layer_idx = 0  # e.g. a layer sharing another layer's cache
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 2's self_attn holds layer_idx=0"):
        collapse_layers(model, [1])
    assert_same(before, model)
