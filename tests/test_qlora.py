"""QLoRA on this CPU: LoRA trained with the MSW penalty on 4-/8-bit bitsandbytes weights, merged into the
dequantised weights (merge_dequantized), then collapsed, saved and reloaded as a plain model."""

from __future__ import annotations

import json

import bitsandbytes  # noqa: F401 (in the dev extra: these tests run in CI, never skip)
import peft
import pytest
import torch
import yaml
from test_trainer import config, lm_dataset
from tiny_models import write_lm_source
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from hf_collapse import CollapseTrainer, collapse_layers
from hf_collapse.quantization import merge_dequantized
from hf_collapse.layers import bypass_layers

QUANTISED = {
    # bitsandbytes' 4-bit blocks are 64 wide: layers narrower than that fail in its CPU forward
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama64")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )).save_pretrained(folder)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    "bits, inference_first", [("4bit", False), ("4bit", True), ("8bit", False)], ids=["4bit", "4bit-eval-first", "8bit"]
)
def test_qlora_trains_with_the_penalty_then_collapses_on_the_dequantised_merge(tmp_path, checkpoint, bits, inference_first):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTISED[bits], device_map="cpu")
    assert {type(model.model.layers[0].self_attn.q_proj).__name__} <= {"Linear4bit", "Linear8bitLt"}
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    quantised_before = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    trainer = CollapseTrainer(
        model=model, train_dataset=lm_dataset(8),
        args=config(tmp_path / "run", max_steps=2, learning_rate=5e-2, msw_weight=1.0),
    )
    trainer.train()
    logged = [log for log in trainer.state.log_history if "msw/penalty" in log]
    assert len(logged) == 2 and all(log["msw/penalty"] > 0 and "msw/layer_3" in log for log in logged)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # trained (LoRA's B starts at zero)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(q_proj.weight.detach(), quantised_before)  # the quantised weights stayed frozen

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    trained = logits(model, ids)  # in training mode (no dropout): bitsandbytes computes with the dequantised weights
    model.eval()
    if inference_first:
        # on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 kernel at the first inference
        # forward, rounding their scales; merge_dequantized unpacks them, and the rounding stays
        torch.testing.assert_close(logits(model, ids), trained, rtol=0, atol=5e-2 * trained.abs().max().item())
    merged = merge_dequantized(model)
    assert not any(p.dtype in (torch.uint8, torch.int8) for p in merged.parameters())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear and "quantization_config" not in merged.config
    # 4-bit computes with the dequantised weights, so the merge is exact; after a repack only the scales' bf16
    # rounding stays (a block given another block's scale would be off by several %); LLM.int8 also rounds activations
    tolerance = 5e-2 if bits == "8bit" else 1e-2 if inference_first else 1e-4
    torch.testing.assert_close(logits(merged, ids), trained, rtol=0, atol=tolerance * trained.abs().max().item())

    with bypass_layers(merged, [1]):
        expected = logits(merged, ids)
    record = collapse_layers(merged, [1])
    assert record.outputs_verified and record.layers_after == {"": 3}
    merged.save_pretrained(tmp_path / "slim")
    saved = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["num_hidden_layers"] == 3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim")
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_merge_dequantized_refuses_a_plain_model(checkpoint):
    plain = peft.get_peft_model(LlamaForCausalLM.from_pretrained(checkpoint), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no bitsandbytes 4-/8-bit weights: call model.merge_and_unload"):
        merge_dequantized(plain)
    with pytest.raises(ValueError, match="takes a PeftModel"):
        merge_dequantized(plain.get_base_model())


# ----------------------------------------------------------------------------------------------------
# recipes: load_in_4bit / load_in_8bit through run_recipe, and what is refused before anything loads


@pytest.fixture(scope="module")
def lm_source(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer (widths of 64: bitsandbytes' 4-bit blocks) and a text file to train on."""
    return write_lm_source(tmp_path_factory.mktemp("qlora-src"), model="model", hidden_size=64, intermediate_size=128)


def qlora_recipe(tmp_path, source, **fields):
    from hf_collapse.recipe import load_recipe

    values = dict(
        model_name_or_path=str(source / "model"), task="causal-lm", dataset_files=[str(source / "train.txt")],
        max_length=32, output_dir=str(tmp_path / "run"), export_dir=str(tmp_path / "out"), max_steps=3,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, max_eval_samples=8, calibration_samples=8,
        learning_rate=5e-2, report_to="none", save_strategy="steps", save_steps=3, use_cpu=True, use_peft=True,
        lora_r=4, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj", "down_proj"], collapse_layers=[1],
        latency_repeats=1, logging_steps=1,
    ) | fields
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return load_recipe(path)


@pytest.mark.parametrize(
    "bits, fields, described",
    [
        ("4bit", dict(load_in_4bit=True), "4-bit nf4 weights (bitsandbytes, computing in float32)"),
        ("4bit-fp4-double", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
         "4-bit fp4 weights (bitsandbytes, double quantisation, computing in float32)"),
        ("8bit", dict(load_in_8bit=True), "8-bit LLM.int8() weights (bitsandbytes)"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else "",
)
def test_a_qlora_recipe_exports_the_collapsed_dequantised_merge(tmp_path, lm_source, bits, fields, described):
    from transformers import AutoTokenizer

    from hf_collapse.card import render_card
    from hf_collapse.report import CollapseReport
    from hf_collapse.quantization import quantization_config
    from hf_collapse.pipeline import run_recipe

    recipe, config_, resolved = qlora_recipe(tmp_path, lm_source, **fields)
    summary = run_recipe(recipe, config_, resolved, log=lambda text: None)
    assert summary.removed == [1] and summary.layers_after == 3
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["num_hidden_layers"] == 3

    exported = AutoModelForCausalLM.from_pretrained(out)  # plain loading: no bitsandbytes, no PEFT
    linears = [m for m in exported.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}

    # the reference, built apart from run_recipe: the source quantised the same way, the adapter the Trainer saved at
    # the last step, merged into the dequantised weights, layer 1 bypassed
    ids = AutoTokenizer.from_pretrained(out)("To be, or not to be, that is the question", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(
        lm_source / "model", quantization_config=quantization_config(recipe, "cpu"), device_map="cpu"
    )
    adapter = tmp_path / "run" / "checkpoint-3"
    trained = peft.PeftModel.from_pretrained(peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), adapter)
    lora_b = trained.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().max() > 0  # the adapter trained (LoRA's B starts at zero)
    merged = merge_dequantized(trained)
    with bypass_layers(merged, [1]):
        expected = logits(merged, ids)
    got = logits(exported, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ... and it is not the adapter merged into the original full-precision weights: the quantisation is in it
    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_source / "model"), adapter).merge_and_unload()
    with bypass_layers(plain, [1]):
        unquantised = logits(plain, ids)
    assert (got - unquantised).abs().max() > 1e-3 * unquantised.abs().max()

    stored = json.loads((out / "collapse_report.json").read_text())["report"]
    assert stored["quantized_training"] == described and stored["dequantized_dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert f"QLoRA on {described}" in card and "dequantised merge in float32" in card
    assert "as quantised for training and dequantised to float32" in card  # a limitation
    assert render_card(CollapseReport.from_dict(stored)).count(f"QLoRA on {described}") == 1  # rendered again from the JSON


def test_a_report_without_the_qlora_fields_still_loads_and_they_go_together():
    from hf_collapse.card import render_card
    from hf_collapse.report import CollapseReport

    values = dict(base_model="m", removed_layers=[1], layers_before=4, num_parameters_before=10, num_parameters_after=8,
                  scores=None, score_method=None)
    old = CollapseReport.from_dict(values)  # a collapse_report.json written before these fields existed
    assert old.quantized_training is None and "QLoRA" not in render_card(old)
    with pytest.raises(ValueError, match="go together"):
        CollapseReport(**values, quantized_training="4-bit nf4 weights (bitsandbytes)")
    with pytest.raises(ValueError, match="go together"):
        CollapseReport(**values, dequantized_dtype="float32")


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(load_in_4bit=True, load_in_8bit=True), "both set: choose one"),
        (dict(load_in_4bit=True, use_peft=False), "load_in_4bit needs use_peft: true"),
        (dict(load_in_8bit=True, use_peft=False), "load_in_8bit needs use_peft: true"),
        (dict(load_in_4bit=True, task="text-classification"), "causal-lm only"),
        (dict(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type only apply with load_in_4bit"),
        (dict(load_in_8bit=True, bnb_4bit_use_double_quant=True), "bnb_4bit_use_double_quant only apply with load_in_4bit"),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype="int8"), "bnb_4bit_compute_dtype"),
    ],
)
def test_quantised_loading_that_cannot_work_is_refused_by_the_recipe(tmp_path, lm_source, fields, message):
    from hf_collapse.recipe import RecipeError

    with pytest.raises(RecipeError, match=message):
        qlora_recipe(tmp_path, lm_source, **fields)


def test_quantised_loading_without_bitsandbytes_says_what_to_install(tmp_path, lm_source, capsys, monkeypatch):
    import importlib.util

    from hf_collapse.cli import EXIT_REFUSED, main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    qlora_recipe(tmp_path, lm_source)  # without quantisation, bitsandbytes is not needed
    code = main(["validate", str(tmp_path / "recipe.yaml"), "--load_in_4bit", "true"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_REFUSED and len(lines) == 1
    assert "load_in_4bit needs bitsandbytes" in lines[0] and "pip install 'hf-collapse[qlora]'" in lines[0]


def test_the_compute_dtype_follows_the_device(tmp_path, lm_source):
    from hf_collapse.quantization import quantization_config

    recipe, _, _ = qlora_recipe(tmp_path, lm_source, load_in_4bit=True)
    assert quantization_config(recipe, "cpu").bnb_4bit_compute_dtype == torch.float32
    recipe, _, _ = qlora_recipe(tmp_path, lm_source, load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16")
    assert quantization_config(recipe, "cpu").bnb_4bit_compute_dtype == torch.bfloat16
    recipe, _, _ = qlora_recipe(tmp_path, lm_source, load_in_8bit=True)
    assert quantization_config(recipe, "cpu").load_in_8bit
    recipe, _, _ = qlora_recipe(tmp_path, lm_source)
    assert quantization_config(recipe, "cpu") is None


def test_an_evaluation_leaves_the_4bit_layers_trainable(tmp_path, lm_source):
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit layers at the first inference forward into a kernel with
    no backward; load_model switches that off, so the LoRA gradients after an evaluation are those before it."""
    from transformers import AutoTokenizer

    from hf_collapse.quantization import disable_cpu_repacking
    from hf_collapse.models import load_model, resolve_model

    recipe, _, _ = qlora_recipe(tmp_path, lm_source, load_in_4bit=True)
    tokenizer = AutoTokenizer.from_pretrained(lm_source / "model")
    ids = tokenizer("Something is rotten in the state of Denmark", return_tensors="pt").input_ids

    def lora_gradients(model, evaluate_first):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return [m.lora_A["default"].weight.grad for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]

    reference = lora_gradients(load_model(recipe, resolve_model(recipe.model_name_or_path), tokenizer), False)
    after = lora_gradients(load_model(recipe, resolve_model(recipe.model_name_or_path), tokenizer), True)
    assert len(after) == 4 and all(g is not None for g in after)
    for got, expected in zip(after, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert disable_cpu_repacking(load_model(recipe, resolve_model(recipe.model_name_or_path), tokenizer)) == 0
    if bitsandbytes.functional.has_avx512bf16():  # what it guards against: without it, no gradient reaches them
        base = AutoModelForCausalLM.from_pretrained(lm_source / "model", quantization_config=QUANTISED["4bit"], device_map="cpu")
        assert all(g is None for g in lora_gradients(base, True))


def test_an_export_of_quantised_weights_is_refused(tmp_path, checkpoint):
    from hf_collapse import CollapseReport, export_collapsed

    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTISED["4bit"], device_map="cpu")
    collapse_layers(model, [1])  # the surgery itself works on quantised layers
    report = CollapseReport(base_model=str(checkpoint), removed_layers=[1], layers_before=4, num_parameters_before=10**6,
                            num_parameters_after=model.num_parameters(), scores=None, score_method=None)
    with pytest.raises(ValueError, match=r"bitsandbytes 4-/8-bit weights.*model.dequantize\(\)"):
        export_collapsed(model, tmp_path / "out", report=report)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"merge_dequantized\(peft_model\)"):
        export_collapsed(adapted, tmp_path / "out", report=report)
    assert not (tmp_path / "out").exists()


def test_every_hf_collapse_trainer_switches_the_cpu_repacking_off(tmp_path, checkpoint):
    """A 4-bit model loaded by hand (not through load_model) is protected by the trainer itself."""
    from hf_collapse import CollapseConfig, CollapseTrainer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=QUANTISED["4bit"], device_map="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    flags = lambda: [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]  # noqa: E731
    assert flags() and all(flag == bitsandbytes.functional.has_avx512bf16() for flag in flags())
    CollapseTrainer(model=model, args=CollapseConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1))
    assert flags() and not any(flags())
