"""PEFT adapters across a collapse: remap_adapter gives the merged full model's outputs; check_adapter_fits refuses
adapters numbered for another depth."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny_models import TINY_MODELS

from hf_collapse.adapters import check_adapter_fits, remap_adapter
from hf_collapse.layers import bypass_layers
from hf_collapse.surgery import collapse_layers

TINY = TINY_MODELS["llama"]  # 4 layers
REMOVED = [1, 2]

ADAPTERS = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    # only some layers, with per-layer ranks and alphas named by position (full name, suffix, escaped regex)
    "lora-layer-indexed": peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=[0, 2, 3],
        rank_pattern={"model.layers.3.self_attn.q_proj": 6, "layers.2.self_attn.v_proj": 3},
        alpha_pattern={r"layers\.3\.self_attn\.v_proj": 16},
        init_lora_weights=False,
    ),
    "lora-dora-lm-head": peft.LoraConfig(
        r=2, target_modules=["o_proj", "lm_head"], use_dora=True, init_lora_weights=False
    ),
    "loha": peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"], init_weights=False),
    "ia3": peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def save_adapter(config, folder, seed: int = 5) -> PeftModel:
    """A full-depth model with a randomly initialised (non-zero) adapter, saved to `folder`."""
    model = peft.get_peft_model(TINY.build(), config)
    torch.manual_seed(seed)
    with torch.no_grad():  # large enough that a misplaced adapter shows in the logits
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return model


def collapsed(*removals) -> torch.nn.Module:
    model = TINY.build()
    for layers in removals or (REMOVED,):
        collapse_layers(model, layers)
    return model


def reference(adapted: PeftModel, inputs) -> torch.Tensor:
    """The full model with the adapter merged, the removed layers bypassed."""
    merged = adapted.merge_and_unload()
    with bypass_layers(merged, REMOVED):
        return logits(merged, inputs)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_remapped_adapter_gives_the_merged_full_models_outputs(tmp_path, name):
    inputs = TINY.inputs()
    adapted = save_adapter(ADAPTERS[name], tmp_path / "full")
    expected = reference(adapted, inputs)
    model = collapsed()
    out = remap_adapter(tmp_path / "full", model, tmp_path / "collapsed")
    loaded = PeftModel.from_pretrained(model, out).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    # the adapter changes the output (so the comparison above can fail) and merging it changes nothing
    with loaded.disable_adapter():
        assert (logits(loaded, inputs) - expected).abs().max() > 1e-2
    torch.testing.assert_close(logits(loaded.merge_and_unload(), inputs), expected, rtol=1e-5, atol=1e-5)


def test_layer_indexed_config_fields_follow_the_kept_layers(tmp_path):
    save_adapter(ADAPTERS["lora-layer-indexed"], tmp_path / "full")
    out = remap_adapter(tmp_path / "full", collapsed(), tmp_path / "collapsed")
    config = json.loads((out / "adapter_config.json").read_text())
    # layers 0, 2, 3 of 4 with 1 and 2 removed: old 0 -> 0, old 3 -> 1
    assert config["layers_to_transform"] == [0, 1]
    assert config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 6}  # layer 2's entry went with it
    assert config["alpha_pattern"] == {r"layers\.1\.self_attn\.v_proj": 16}
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        marks = handle.metadata()
    layers = {int(k.split(".")[4]) for k in keys}
    assert layers == {0, 1}
    assert {k for k in keys if "layers.1.self_attn.q_proj.lora_A" in k} == {
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    }
    assert json.loads(marks["hf_collapse.collapsed_layers"]) == REMOVED
    assert json.loads(marks["hf_collapse.original_num_hidden_layers"]) == 4


def test_remap_after_two_collapses_and_onto_the_reloaded_model(tmp_path):
    # collapsing layer 1, then layer 1 of the 3 left (original 2) is the same removal as [1, 2] at once
    inputs = TINY.inputs()
    adapted = save_adapter(ADAPTERS["lora-layer-indexed"], tmp_path / "full")
    expected = reference(adapted, inputs)
    model = collapsed([1], [1])
    assert model.config.collapsed_layers == REMOVED
    model.save_pretrained(tmp_path / "model")
    reloaded = TINY.auto_class.from_pretrained(tmp_path / "model", attn_implementation="eager").eval()
    out = remap_adapter(tmp_path / "full", reloaded, tmp_path / "collapsed")
    check_adapter_fits(reloaded, out)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(reloaded, out), inputs), expected, rtol=1e-5, atol=1e-5)


def test_a_remapped_copy_is_remapped_again_after_a_further_collapse(tmp_path):
    inputs = TINY.inputs()
    adapted = save_adapter(ADAPTERS["lora"], tmp_path / "full")
    expected = reference(adapted, inputs)
    once = collapsed([1])
    remap_adapter(tmp_path / "full", once, tmp_path / "once")
    collapse_layers(once, [1])  # original layer 2
    with pytest.raises(ValueError, match=r"remapped for the collapse collapsed_layers=\[1\] of 4 layers"):
        check_adapter_fits(once, tmp_path / "once")
    out = remap_adapter(tmp_path / "once", once, tmp_path / "twice")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(once, out), inputs), expected, rtol=1e-5, atol=1e-5)


# ---- check_adapter_fits ------------------------------------------------------------------------------------------


def test_a_full_depth_adapter_on_a_collapsed_model_is_refused(tmp_path):
    save_adapter(ADAPTERS["lora"], tmp_path / "full")  # layers 0-3
    model = collapsed()
    with pytest.raises(ValueError, match=r"changes layer\(s\) \[2, 3\] of the model, which has 2 layers .*remap_adapter"):
        check_adapter_fits(model, tmp_path / "full")
    check_adapter_fits(TINY.build(), tmp_path / "full")  # fits the full model


def test_a_full_depth_adapter_on_kept_positions_is_refused_by_its_origin(tmp_path):
    # only layer 0 and 1 are adapted, positions the collapsed model also has: the layer indices alone cannot tell
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 1], init_lora_weights=False)
    save_adapter(config, tmp_path / "anonymous")  # built from a config: no base model to read
    model = collapsed()
    with pytest.raises(ValueError, match=r"cannot tell which depth .*collapsed_layers=\[1, 2\] of 4"):
        check_adapter_fits(model, tmp_path / "anonymous")

    TINY.build().save_pretrained(tmp_path / "base")
    base = TINY.auto_class.from_pretrained(tmp_path / "base")
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "known")
    with pytest.raises(ValueError, match=r"saved on .*base \(the model: 4 layers\).*full-depth adapter; write a copy"):
        check_adapter_fits(model, tmp_path / "known")


def test_an_adapter_trained_on_the_reloaded_collapsed_model_fits(tmp_path):
    collapsed().save_pretrained(tmp_path / "model")
    model = TINY.auto_class.from_pretrained(tmp_path / "model")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    fresh = TINY.auto_class.from_pretrained(tmp_path / "model")
    check_adapter_fits(fresh, tmp_path / "adapter")
    other = collapsed([0, 3])  # same depth, other layers removed
    with pytest.raises(ValueError, match=r"collapsed_layers=\[1, 2\]\), not on a model like this one .*\[0, 3\]"):
        check_adapter_fits(other, tmp_path / "adapter")


# ---- what cannot be remapped: refused, nothing written -----------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), r"PREFIX_TUNING adapter \(its prompt"),
        (peft.VeraConfig(r=2, target_modules=["q_proj"]), r"cannot remap a VERA adapter .*supports LORA, LOHA"),
        (
            peft.LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 4]]),
            r"layer_replication=\[\[0, 2\], \[1, 4\]\]",
        ),
        (
            peft.LoraConfig(r=2, target_modules=r".*layers\.2\.self_attn\.q_proj"),
            r"target_modules is the pattern .* names a layer the collapse removed",
        ),
        # a pattern that names layers by a character class: renumbering would move it onto other layers
        (
            peft.LoraConfig(r=2, target_modules=r".*layers\.[03]\.self_attn\.q_proj", init_lora_weights=False),
            r"would not load as the same adapter .*layers\.1\.self_attn\.q_proj\.lora_A\.weight.* would not be loaded",
        ),
        (
            peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1, 2]),
            r"removed every layer the adapter changes",
        ),
    ],
    ids=["prefix-tuning", "vera", "layer-replication", "regex-removed", "regex-class", "only-removed"],
)
def test_what_cannot_be_remapped_is_refused_and_nothing_written(tmp_path, config, message):
    folder = tmp_path / "full"
    peft.get_peft_model(TINY.build(), config).save_pretrained(folder)
    with pytest.raises(ValueError, match=message):
        remap_adapter(folder, collapsed(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remap_refuses_an_uncollapsed_model_and_its_own_folder(tmp_path):
    save_adapter(ADAPTERS["lora"], tmp_path / "full")
    with pytest.raises(ValueError, match="has not been collapsed"):
        remap_adapter(tmp_path / "full", TINY.build(), tmp_path / "out")
    with pytest.raises(ValueError, match="out_dir is the adapter folder itself"):
        remap_adapter(tmp_path / "full", collapsed(), tmp_path / "full")
    with pytest.raises(ValueError, match="is not a PEFT adapter folder"):
        remap_adapter(tmp_path, collapsed(), tmp_path / "out")


def test_remap_refuses_an_adapter_folder_with_a_link_out_of_it(tmp_path):
    save_adapter(ADAPTERS["lora"], tmp_path / "full")
    (tmp_path / "secret.txt").write_text("HF_TOKEN=hf_do_not_leak")
    (tmp_path / "full" / "NOTES.md").symlink_to(tmp_path / "secret.txt")  # would be copied with the adapter's files
    with pytest.raises(ValueError, match=r"NOTES\.md is a symlink to .*secret\.txt, outside the checkpoint folder"):
        remap_adapter(tmp_path / "full", collapsed(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
