"""collapse_layers verifies every collapse by construction, and reports what it removed.

A rule that is missing or wrong must turn into a refusal that leaves the model exactly as it was, never into a
checkpoint that reloads as a different model. The tests break one rule at a time (through `RULES`) on a family
where that rule matters and check which of the two checks catches it: the structure of a model rebuilt from the
new config, or the output on the probe input.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from test_surgery import assert_same, logits, snapshot
from tiny_models import TINY_MODELS

from hf_collapse import CollapseRecord
from hf_collapse.layers import bypass_layers
from hf_collapse.surgery import collapse_layers, rules, verify
from hf_collapse.surgery.rules import Edit, Rule


def without_rule(monkeypatch, field: str, replacement: Rule | None = None) -> None:
    others = tuple(r for r in rules.RULES if r.field != field)
    assert len(others) == len(rules.RULES) - 1, f"no rule for {field}"
    monkeypatch.setattr(rules, "RULES", others + ((replacement,) if replacement else ()))


def layer_ids(model) -> list[int]:
    return [id(m) for m in model.modules()]


def refuse_and_restore(family: str, layers, match: str) -> str:
    model = TINY_MODELS[family].build()
    inputs = TINY_MODELS[family].inputs()
    before, modules, output = snapshot(model), layer_ids(model), logits(model, inputs)
    with pytest.raises(ValueError, match=match) as caught:
        collapse_layers(model, layers)
    assert_same(before, model)
    assert layer_ids(model) == modules  # the very same modules, in the same order
    torch.testing.assert_close(logits(model, inputs), output, rtol=0, atol=0)
    return str(caught.value)


def test_missing_first_k_rule_is_caught_by_the_rebuilt_structure(monkeypatch):
    # DeepSeek-V3 layers 0-1 are dense: removing layer 1 without recounting would rebuild layer 1 as dense.
    without_rule(monkeypatch, "first_k_dense_replace")
    message = refuse_and_restore("deepseek-v3", [1], r"a model built from the new config would not be this model")
    assert "model.layers.1.mlp is a DeepseekV3MoE but would be rebuilt as a DeepseekV3MLP" in message
    assert "first_k_dense_replace" in message  # named as the likely cause


def test_naive_slicing_of_layer_types_is_caught_by_module_settings(monkeypatch):
    # Gemma2 alternates sliding/full; keeping the first n entries instead of the kept layers' entries gives the
    # same tensors but the wrong attention kind for every layer.
    naive = Rule("layer_types", lambda removal, config, name, value: Edit(config={name: value[: len(removal.kept)]}))
    without_rule(monkeypatch, "layer_types", naive)
    message = refuse_and_restore("gemma2", [0], r"would not be this model")
    assert "model.layers.0.self_attn.sliding_window is None but would be rebuilt as 4" in message
    assert "num_hidden_layers" not in message  # the count is updated by surgery itself, never a suspect


def test_missing_inverse_scaling_rule_is_caught_by_the_probe(monkeypatch):
    # GPT-2 with scale_attn_by_inverse_layer_idx: same structure, but the moved layers compute other scores.
    without_rule(monkeypatch, "scale_attn_by_inverse_layer_idx")
    message = refuse_and_restore("gpt2-inverse-scaling", [1], r"would not be this model")
    # the module setting `scaling` is what betrays it first; without it, the probe output would
    assert "transformer.h.1.attn.scaling" in message


def test_probe_catches_what_the_structure_cannot(monkeypatch):
    # Same settings as a fresh build (the scaling check is satisfied by hand), but the queries are not rescaled:
    # only the output on the probe can tell.
    def settle_scaling(removal, config, name, value):
        edit = Edit()
        for new, old in enumerate(removal.kept):
            attention = removal.stack.layers[old].attn

            def apply(attention=attention, factor=(new + 1) / (old + 1)):
                previous = attention.scaling
                attention.scaling = previous / factor

                def undo():
                    attention.scaling = previous

                return undo

            edit.modules.append(apply)
        return edit

    without_rule(monkeypatch, "scale_attn_by_inverse_layer_idx", Rule("scale_attn_by_inverse_layer_idx", settle_scaling))
    message = refuse_and_restore("gpt2-inverse-scaling", [1], r"its output differs from the original's")
    assert "output 'logits' differs by up to" in message


def test_a_layer_that_fails_after_renumbering_is_refused(monkeypatch):
    # A model that treats its first layer specially by position: a wrapper that breaks the forward of whatever
    # layer ends up at index 0 once it is not the original layer 0.
    model = TINY_MODELS["llama"].build()
    first = model.model.layers[0]
    before = snapshot(model)

    def only_the_original_first_layer(module, args, kwargs, output):
        if module is not first and module is model.model.layers[0]:
            return (output[0] * 2, *output[1:]) if isinstance(output, tuple) else output * 2
        return None

    for layer in model.model.layers:
        layer.register_forward_hook(only_the_original_first_layer, with_kwargs=True)
    with pytest.raises(ValueError, match=r"output 'logits' differs"):
        collapse_layers(model, [0])
    assert_same(before, model)


def test_model_without_token_or_pixel_input_is_checked_by_structure_alone():
    config = transformers.WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config).eval()
    record = collapse_layers(model, {"encoder": [1], "decoder": [0]})
    assert record.outputs_verified is False
    assert (len(model.model.encoder.layers), len(model.model.decoder.layers)) == (2, 2)


def test_given_probe_inputs_are_used():
    tiny = TINY_MODELS["llama"]
    model = tiny.build()
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    probe = {"input_ids": torch.tensor([[5, 6, 7]])}
    record = collapse_layers(model, [1], probe_inputs=probe)
    assert record.outputs_verified is True
    assert seen == [3, 3]  # the reference (bypassed) pass and the collapsed pass, both on the given probe


def test_probe_tokens_avoid_special_ids():
    model = TINY_MODELS["gemma3-multimodal"].build()
    probe = verify.build_probe(model)
    special = {model.config.image_token_id, model.config.boi_token_id, model.config.eoi_token_id, 0, 1, 2}
    assert set(probe["input_ids"].flatten().tolist()).isdisjoint(special)
    assert probe["input_ids"].shape == (1, 8)
    vit = TINY_MODELS["vit"].build()
    assert verify.build_probe(vit)["pixel_values"].shape == (1, 3, 16, 16)


def test_verification_runs_in_eval_mode_and_restores_training_mode():
    model = TINY_MODELS["bert"].build().train()  # dropout on: an output check in train mode would be random
    record = collapse_layers(model, [1])
    assert record.outputs_verified and model.training and model.bert.encoder.layer[0].training


# ---- the record -----------------------------------------------------------------------------------------------


def test_record_of_repeated_collapses_uses_the_original_numbering():
    model = TINY_MODELS["llama"].build()
    first = collapse_layers(model, [1])
    second = collapse_layers(model, [1])  # the current layer 1 is the original layer 2
    assert isinstance(first, CollapseRecord)
    assert (first.removed, second.removed) == ({"": (1,)}, {"": (2,)})
    assert (first.layers_before, first.layers_after, second.layers_after) == ({"": 4}, {"": 3}, {"": 2})
    per_layer = sum(p.numel() for p in TINY_MODELS["llama"].build().model.layers[0].parameters())
    assert first.parameters_before - first.parameters_after == per_layer
    assert second.parameters_before == first.parameters_after
    assert second.parameters_after == model.num_parameters()
    assert first.num_removed == 1 and first.outputs_verified


def test_record_of_an_encoder_decoder():
    model = TINY_MODELS["t5"].build()
    record = collapse_layers(model, {"encoder": [0, 2], "decoder": [2, 3]})
    assert record.removed == {"encoder": (0, 2), "decoder": (2, 3)}
    assert record.layers_before == {"encoder": 4, "decoder": 4}
    assert record.layers_after == {"encoder": 2, "decoder": 2}
    assert record.num_removed == 4
    with pytest.raises(AttributeError):
        record.removed = {}  # frozen


def test_collapse_after_verification_equals_bypass():
    """Control: a verified collapse keeps the bypassed model's output (the verification itself changes nothing)."""
    tiny = TINY_MODELS["qwen3-moe"]
    original, model = tiny.build(), tiny.build()
    with bypass_layers(original, [0]):
        reference = logits(original, tiny.inputs())
    collapse_layers(model, [0])
    torch.testing.assert_close(logits(model, tiny.inputs()), reference)
