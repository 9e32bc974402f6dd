"""Offline evaluation: shipped metric modules, classification scores, perplexity, latency and analytic FLOPs.

Tiny models built from configs (`tiny_models.TINY_MODELS` and a 3-label BERT / ViT classifier). Every value is
checked against a hand computation; latency tests check structure and behaviour, never wall-clock amounts.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import subprocess
import sys
import textwrap
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from tiny_models import TINY_MODELS, VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_collapse.evaluation import (
    METRICS_DIR,
    compare_latency,
    evaluate_classification,
    load_metric,
    measure_latency,
    metric_names,
    perplexity,
)
from hf_collapse.surgery import collapse_layers

from benchmarks.inference_speed import flops_per_token

NUM_LABELS = 3
WORDS = [f"w{i}" for i in range(40)]


# ---- fixtures ----


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", model_max_length=64)


def bert_classifier(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.5,  # so that a forward in training mode would give different logits
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config).eval()


def force_class(classifier: torch.nn.Linear, label: int) -> None:
    """Make a classification head answer `label` whatever its input."""
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[label] = 1.0


@pytest.fixture(scope="session")
def texts() -> Dataset:
    """12 texts of 1-6 words; labels 0, 1, 2 with frequencies 5/12, 3/12, 4/12."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        length = 1 + i % 6
        ids = torch.randint(len(WORDS), (length,), generator=generator)
        rows.append(" ".join(WORDS[j] for j in ids))
    labels = [0, 1, 2, 0, 0, 1, 2, 2, 0, 1, 2, 0]
    return Dataset.from_dict({"text": rows, "label": labels})


@pytest.fixture(scope="session")
def tokenized(texts: Dataset, tokenizer) -> Dataset:
    """The texts tokenized without padding (ragged rows), labels in `labels`, the raw text kept as a column."""
    return texts.map(lambda row: tokenizer(row["text"])).rename_column("label", "labels")


@pytest.fixture(scope="session")
def llama() -> transformers.PreTrainedModel:
    return TINY_MODELS["llama"].build()


# ---- shipped metric modules ----


def test_shipped_metric_names() -> None:
    assert metric_names() == ["accuracy", "f1"]
    for name in metric_names():
        assert (METRICS_DIR / name / f"{name}.py").is_file()


def test_every_shipped_metric_is_in_the_wheel() -> None:
    """Each metric script is either a listed package's module or matched by hf_collapse's package-data."""
    setuptools = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools.get("package-data", {}).get("hf_collapse", [])
    for name in metric_names():
        relative = f"metrics/{name}/{name}.py"
        packaged = f"hf_collapse.metrics.{name}" in setuptools["packages"] or any(fnmatch(relative, p) for p in patterns)
        assert packaged, f"{relative} would be left out of the wheel: list hf_collapse.metrics.{name} in packages"


def test_metric_modules_load_offline_by_path(tmp_path) -> None:
    """A fresh process with the Hub unreachable and an empty module cache loads both modules by path."""
    script = textwrap.dedent(
        f"""
        import evaluate
        accuracy = evaluate.load({str(METRICS_DIR / "accuracy")!r})
        f1 = evaluate.load({str(METRICS_DIR / "f1" / "f1.py")!r})
        print(type(accuracy).__name__, accuracy.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])["accuracy"])
        print(type(f1).__name__, f1.compute(predictions=[0, 1, 1, 1], references=[0, 1, 0, 1])["f1"])
        """
    )
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",  # a closed port: any network attempt fails at once
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["Accuracy 0.75", "F1 0.8"]


def test_load_metric_returns_our_modules() -> None:
    accuracy = load_metric("accuracy", keep_in_memory=True)
    f1 = load_metric("f1", keep_in_memory=True)
    # evaluate takes the first EvaluationModule subclass of the script: it must be ours, not evaluate.Metric.
    assert (type(accuracy).__name__, type(f1).__name__) == ("Accuracy", "F1")
    assert accuracy.compute(predictions=[2, 1, 0, 2, 2], references=[2, 0, 0, 1, 2]) == {"accuracy": 0.6}


def test_load_metric_unknown_name_lists_shipped_names() -> None:
    with pytest.raises(ValueError, match=r"no metric named 'bleu'.*'accuracy', 'f1'"):
        load_metric("bleu")


@pytest.fixture(scope="module")
def f1():
    return load_metric("f1", keep_in_memory=True)


PREDICTIONS = [0, 1, 2, 2, 1, 0, 2]
REFERENCES = [0, 1, 1, 2, 1, 2, 2]


@pytest.mark.parametrize(
    "average, expected",
    [
        # per class (2TP / (2TP + FP + FN)): 0 -> 2/3, 1 -> 4/5, 2 -> 4/6; supports 1, 3, 3
        ("macro", (2 / 3 + 4 / 5 + 4 / 6) / 3),
        ("weighted", (1 * 2 / 3 + 3 * 4 / 5 + 3 * 4 / 6) / 7),
        ("micro", 5 / 7),  # equals accuracy
    ],
)
def test_f1_multiclass_averages(f1, average: str, expected: float) -> None:
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average=average)["f1"] == pytest.approx(expected)


def test_f1_binary(f1) -> None:
    # positive class 1: TP 2, FP 1, FN 1 -> 4/6; with pos_label 0: TP 1, FP 1, FN 1 -> 2/4
    predictions, references = [1, 1, 0, 1, 0], [1, 0, 1, 1, 0]
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx(4 / 6)
    assert f1.compute(predictions=predictions, references=references, pos_label=0)["f1"] == pytest.approx(2 / 4)
    assert f1.compute(predictions=[0, 0], references=[0, 0])["f1"] == 0.0  # no positive anywhere


def test_f1_refuses_binary_average_for_three_classes(f1) -> None:
    with pytest.raises(ValueError, match="average='binary' needs at most two classes"):
        f1.compute(predictions=PREDICTIONS, references=REFERENCES)


# ---- evaluate_classification ----


def test_forced_class_accuracy_equals_class_frequency(tokenized: Dataset, tokenizer) -> None:
    model = bert_classifier()
    force_class(model.classifier, 2)
    # ragged rows padded by the tokenizer; the raw `text` column is not a model input and must be ignored
    scores = evaluate_classification(
        model,
        tokenized,
        batch_size=5,
        metric=["accuracy", "f1"],
        metric_kwargs={"f1": {"average": "macro"}},
        tokenizer=tokenizer,
    )
    # always class 2: accuracy = 4/12; F1 of class 2 = 2*4 / (2*4 + 8 + 0), the other classes 0
    assert scores == pytest.approx({"accuracy": 4 / 12, "f1": (8 / 16) / 3})


def test_predictions_do_not_depend_on_batching_or_padding(tokenized: Dataset, texts: Dataset, tokenizer) -> None:
    model = bert_classifier(seed=3)
    expected = []
    with torch.no_grad():
        for row in tokenized:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
            expected.append(int(logits.argmax()))
    accuracy = sum(p == y for p, y in zip(expected, tokenized["labels"])) / len(expected)
    assert 0 < accuracy < 1  # a random model: the batched runs must reproduce each of its answers

    one_by_one = evaluate_classification(model, tokenized, batch_size=1, tokenizer=tokenizer)
    padded = evaluate_classification(model, tokenized, batch_size=12, tokenizer=tokenizer)
    from_text = evaluate_classification(model, texts, batch_size=4, text_column="text", tokenizer=tokenizer)
    assert one_by_one == padded == from_text == {"accuracy": pytest.approx(accuracy)}


def test_evaluation_runs_in_eval_mode_and_restores_each_modules_mode(tokenized: Dataset, tokenizer) -> None:
    model = bert_classifier(seed=3)
    reference = evaluate_classification(model, tokenized, batch_size=4, tokenizer=tokenizer)
    model.train()
    model.bert.embeddings.eval()  # a deliberately frozen part stays as it was
    in_training_mode = evaluate_classification(model, tokenized, batch_size=4, tokenizer=tokenizer)
    assert in_training_mode == reference  # dropout 0.5 was off during the run
    assert model.training and model.bert.encoder.layer[0].training
    assert not model.bert.embeddings.training


def test_image_classification_with_pixel_values() -> None:
    tiny = TINY_MODELS["vit"]
    model = tiny.build()
    force_class(model.classifier, 1)
    generator = torch.Generator().manual_seed(0)
    labels = [1, 0, 1, 2, 1, 1, 0]
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(len(labels), 3, 16, 16, generator=generator).tolist(), "label": labels}
    )
    assert evaluate_classification(model, data, batch_size=3) == {"accuracy": pytest.approx(4 / 7)}


def test_classification_refusals(tokenized: Dataset, texts: Dataset, tokenizer) -> None:
    model = bert_classifier()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        evaluate_classification(model, texts, text_column="text")
    with pytest.raises(ValueError, match="no 'labels' or 'label' column"):
        evaluate_classification(model, tokenized.remove_columns("labels"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no column the model takes as input"):
        evaluate_classification(model, texts, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="key it by metric name"):
        evaluate_classification(model, tokenized, tokenizer=tokenizer, metric_kwargs={"f1": {"average": "macro"}})
    regression = transformers.BertForSequenceClassification(
        transformers.BertConfig(**dict(model.config.to_dict(), num_labels=1))
    )
    with pytest.raises(ValueError, match="2 or more labels"):
        evaluate_classification(regression, tokenized, tokenizer=tokenizer)


# ---- perplexity ----


def hand_perplexity(model, rows: list[dict]) -> float:
    """Each row alone (no padding): sum of -log p(token t+1 | tokens <= t) over scored targets, / their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            labels = row.get("labels", row["input_ids"])
            for t in range(len(labels) - 1):
                if labels[t + 1] != -100:
                    total -= log_probs[t, labels[t + 1]].item()
                    count += 1
    return math.exp(total / count)


def lm_rows(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 6, 2, 8]
    return [{"input_ids": torch.randint(3, VOCAB, (n,), generator=generator).tolist()} for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and absolute positions
def test_perplexity_equals_hand_computation_with_and_without_padding(family: str) -> None:
    model = TINY_MODELS[family].build()
    rows = lm_rows()
    expected = hand_perplexity(model, rows)
    assert 1 < expected < 10 * VOCAB
    assert perplexity(model, rows, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, Dataset.from_list(rows), batch_size=5) == pytest.approx(expected, rel=1e-5)  # padded


def test_perplexity_skips_ignored_labels_and_masked_tokens(llama) -> None:
    rows = lm_rows(seed=1)
    with_labels = [dict(row, labels=[-100, -100, *row["input_ids"][2:]]) for row in rows]
    expected = hand_perplexity(llama, with_labels)
    assert perplexity(llama, with_labels, batch_size=5) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(hand_perplexity(llama, rows), rel=1e-3)
    # pre-padded rows: right padding marked by the attention mask is not scored
    padded = [
        {"input_ids": row["input_ids"] + [0] * 3, "attention_mask": [1] * len(row["input_ids"]) + [0] * 3}
        for row in rows
    ]
    assert perplexity(llama, padded, batch_size=2) == pytest.approx(hand_perplexity(llama, rows), rel=1e-5)


def test_perplexity_refusals(llama) -> None:
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(llama, [{"input_ids": [5]}, {"input_ids": [6]}])
    with pytest.raises(ValueError, match="one per token"):
        perplexity(llama, [{"input_ids": [5, 6, 7], "labels": [5, 6]}])
    with pytest.raises(ValueError, match="encoder-decoder"):
        perplexity(TINY_MODELS["t5"].build(), lm_rows())


# ---- analytic FLOPs ----

# Tiny Llama block: q (32x32) + k, v (32x16 each, 2 KV heads of 8) + o (32x32) + gate, up, down (32x64 each)
# + two RMSNorm weights (32 each). Output head: 128 x 32.
LLAMA_BLOCK = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
LLAMA_HEAD = VOCAB * 32


def test_flops_per_token_matches_the_formula(llama) -> None:
    assert flops_per_token(llama) == 2 * (4 * LLAMA_BLOCK + LLAMA_HEAD)
    assert flops_per_token(llama, output_head=False) == 2 * 4 * LLAMA_BLOCK
    # attention: 4 * layers * context * (4 heads * head dim 8)
    assert flops_per_token(llama, context_length=10.5) == 2 * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * 4 * 10.5 * 32


def test_flops_ratio_after_collapse(llama) -> None:
    collapsed = copy.deepcopy(llama)
    collapse_layers(collapsed, [1, 2])
    ratio = flops_per_token(llama, context_length=7) / flops_per_token(collapsed, context_length=7)
    expected = (2 * (4 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * 4 * 7 * 32) / (
        2 * (2 * LLAMA_BLOCK + LLAMA_HEAD) + 4 * 2 * 7 * 32
    )
    assert ratio == pytest.approx(expected)
    # a classifier has no per-token head: without attention, removing k of L blocks gives exactly L / (L - k)
    encoder = bert_classifier()
    collapsed_encoder = copy.deepcopy(encoder)
    collapse_layers(collapsed_encoder, [0])
    assert flops_per_token(encoder) / flops_per_token(collapsed_encoder) == pytest.approx(4 / 3)


def test_flops_refuses_mixture_of_experts_and_negative_context(llama) -> None:
    with pytest.raises(ValueError, match="mixture-of-experts"):
        flops_per_token(TINY_MODELS["mixtral"].build())
    with pytest.raises(ValueError, match="context_length must be 0 or more"):
        flops_per_token(llama, context_length=-1)


# ---- latency ----


@pytest.mark.parametrize("mode", ["forward", "prefill", "decode"])
def test_measure_latency_structure(llama, mode: str) -> None:
    batch = TINY_MODELS["llama"].inputs()
    llama.train()
    result = measure_latency(llama, batch, mode=mode, repeats=3, warmup=1, new_tokens=3)
    assert llama.training  # mode restored
    llama.eval()
    assert result.mode == mode and len(result.times_ms) == 3
    assert all(t > 0 for t in result.times_ms)
    assert result.median_ms == statistics.median(result.times_ms)
    assert result.threads == torch.get_num_threads()
    assert result.new_tokens == (3 if mode == "decode" else None)
    assert result.to_dict()["median_ms"] == result.median_ms


def test_prefill_fills_a_cache_and_keeps_only_last_logits(llama) -> None:
    seen = []
    handle = llama.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    try:
        measure_latency(llama, TINY_MODELS["llama"].inputs(), mode="prefill", repeats=1, warmup=0)
    finally:
        handle.remove()
    ((kwargs, output),) = seen
    assert kwargs["use_cache"] is True and kwargs["logits_to_keep"] == 1
    assert output.logits.shape[1] == 1 and output.past_key_values.get_seq_length() == 7


def test_decode_generates_exactly_new_tokens_greedily(llama) -> None:
    lengths = []
    original = llama.generate

    def spy(**kwargs):
        out = original(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        assert kwargs["do_sample"] is False
        return out

    batch = TINY_MODELS["llama"].inputs()
    first = original(**batch, max_new_tokens=1, do_sample=False)[:, -1].tolist()
    llama.generate = spy
    llama.generation_config.eos_token_id = first  # without min_new_tokens, both rows would stop at once
    try:
        measure_latency(llama, batch, mode="decode", repeats=2, warmup=1, new_tokens=5)
    finally:
        del llama.generate
        llama.generation_config.eos_token_id = TINY_MODELS["llama"].config().eos_token_id
    assert lengths == [5, 5, 5]


def test_compare_latency_interleaves_the_models(llama) -> None:
    collapsed = copy.deepcopy(llama)
    collapse_layers(collapsed, [1, 2])
    calls = []
    handles = [
        model.register_forward_pre_hook(lambda m, args, name=name: calls.append(name))
        for model, name in ((llama, "a"), (collapsed, "b"))
    ]
    try:
        result = compare_latency(llama, collapsed, TINY_MODELS["llama"].inputs(), repeats=4, warmup=1)
    finally:
        for handle in handles:
            handle.remove()
    assert "".join(calls) == "ab" + "abbaabba"
    assert len(result.a.times_ms) == len(result.b.times_ms) == 4
    assert result.speedup == result.a.median_ms / result.b.median_ms
    assert result.a.threads == result.b.threads == torch.get_num_threads()
    assert set(result.to_dict()) == {"a", "b", "speedup"}


def test_latency_refusals(llama) -> None:
    batch = TINY_MODELS["llama"].inputs()
    with pytest.raises(ValueError, match="unknown latency mode 'train'"):
        measure_latency(llama, batch, mode="train")
    with pytest.raises(ValueError, match="new_tokens of 2 or more"):
        measure_latency(llama, batch, mode="decode", new_tokens=1)
    with pytest.raises(ValueError, match="repeats must be 1 or more"):
        compare_latency(llama, llama, batch, repeats=0)
    with pytest.raises(ValueError, match="use mode='forward'"):
        measure_latency(bert_classifier(), {"input_ids": torch.tensor([[3, 4]])}, mode="prefill")


# ---- length-sorted batches and cached metric modules ----


def test_load_metric_is_loaded_once_and_reused() -> None:
    assert load_metric("accuracy", keep_in_memory=True) is load_metric("accuracy", keep_in_memory=True)
    assert load_metric("f1", keep_in_memory=True) is not load_metric("accuracy", keep_in_memory=True)


def test_length_sorted_batches_pad_less_and_keep_the_dataset_order(tokenized: Dataset, tokenizer, monkeypatch) -> None:
    model = bert_classifier(seed=3)
    with torch.no_grad():
        expected = [int(model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax()) for row in tokenized]
    module = load_metric("accuracy", keep_in_memory=True)
    seen: list[tuple[list, list]] = []
    compute = module.compute
    monkeypatch.setattr(
        module, "compute", lambda predictions, references, **kw: seen.append((predictions, references)) or compute(predictions=predictions, references=references)
    )
    widths: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        by_length = evaluate_classification(model, tokenized, batch_size=4, tokenizer=tokenizer, metric=module)
        padded_sorted = sum(rows * width for rows, width in widths)
        widths.clear()
        unsorted = evaluate_classification(model, tokenized, batch_size=4, tokenizer=tokenizer, metric=module, sort_by_length=False)
        padded_unsorted = sum(rows * width for rows, width in widths)
    finally:
        hook.remove()
    assert by_length == unsorted
    # the metric sees every row's own prediction, in the dataset's order, both ways
    assert seen[0] == seen[1] == (expected, list(tokenized["labels"]))
    real = sum(len(ids) for ids in tokenized["input_ids"])
    assert real <= padded_sorted < padded_unsorted


def test_perplexity_does_not_depend_on_sorting() -> None:
    model = TINY_MODELS["llama"].build()
    rows = lm_rows(seed=1)
    assert perplexity(model, rows, batch_size=2) == pytest.approx(
        perplexity(model, rows, batch_size=2, sort_by_length=False), rel=1e-5
    )
    assert perplexity(model, rows, batch_size=2) == pytest.approx(hand_perplexity(model, rows), rel=1e-5)
