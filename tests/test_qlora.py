"""QLoRA on this CPU: LoRA trained with the MSW penalty on 4-/8-bit bitsandbytes weights, merged into the
dequantised weights (merge_dequantized), then collapsed, saved and reloaded as a plain model."""

from __future__ import annotations

import json

import bitsandbytes  # noqa: F401 (in the dev extra: these tests run in CI, never skip)
import peft
import pytest
import torch
from test_trainer import config, lm_dataset
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from hf_collapse import CollapseTrainer, collapse_layers
from hf_collapse.adapters import merge_dequantized
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
