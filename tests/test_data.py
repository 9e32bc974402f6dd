"""Recipe data: how the offline datasets become model inputs, and what the sample caps count."""

import pytest
from transformers import AutoTokenizer

from hf_collapse.assets import minilm_path, smollm2_path
from hf_collapse.data import load_task_data
from hf_collapse.recipe import RecipeArguments


def _recipe(**kwargs):
    return RecipeArguments(model_name_or_path="unused", collapse=False, **kwargs)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def test_causal_lm_caps_count_blocks_not_documents(smollm2_tokenizer):
    full = load_task_data(_recipe(task="causal-lm", dataset_name="offline:shakespeare", max_length=64), smollm2_tokenizer)
    capped = load_task_data(
        _recipe(task="causal-lm", dataset_name="offline:shakespeare", max_length=64, max_train_samples=10,
                max_eval_samples=7),
        smollm2_tokenizer,
    )
    # the capped splits are the first blocks of the full ones, each exactly max_length tokens long
    assert len(full.train) > 1000 and len(full.eval) > 100
    assert len(capped.train) == 10 and len(capped.eval) == 7
    assert list(capped.train["input_ids"]) == list(full.train["input_ids"][:10])
    assert list(capped.eval["input_ids"]) == list(full.eval["input_ids"][:7])
    assert all(len(ids) == 64 for ids in list(capped.train["input_ids"]) + list(capped.eval["input_ids"]))
    assert list(capped.train["labels"]) == list(capped.train["input_ids"])
    # held-out works: no evaluation block occurs in training
    train_blocks = {tuple(ids) for ids in full.train["input_ids"]}
    assert not any(tuple(ids) in train_blocks for ids in full.eval["input_ids"])


def test_classification_caps_count_rows():
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_task_data(
        _recipe(task="text-classification", dataset_name="offline:rotten_tomatoes", max_length=16,
                max_train_samples=12, max_eval_samples=5),
        tokenizer,
    )
    assert len(data.train) == 12 and len(data.eval) == 5
    assert all(len(ids) <= 16 for ids in data.train["input_ids"])
    assert set(data.train["labels"]) <= {0, 1} and len(data.label_names) == 2
