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


def test_shakespeare_holds_out_whole_test_works_distinct_from_validation(smollm2_tokenizer):
    from hf_collapse.assets import shakespeare_works
    from hf_collapse.data import shakespeare_split

    names = list(shakespeare_works())
    splits = {name: shakespeare_split(i) for i, name in enumerate(names)}
    test_works = [n for n, s in splits.items() if s == "test"]
    validation_works = [n for n, s in splits.items() if s == "validation"]
    assert len(test_works) == 4 and len(validation_works) == 4 and not set(test_works) & set(validation_works)

    data = load_task_data(
        _recipe(task="causal-lm", dataset_name="offline:shakespeare", max_length=256, max_eval_samples=50),
        smollm2_tokenizer,
    )
    assert data.test is not None and len(data.test) > 100 and len(data.eval) == 50
    train = {tuple(ids) for ids in data.train["input_ids"]}
    validation = {tuple(ids) for ids in data.eval["input_ids"]}
    test = [tuple(ids) for ids in data.test["input_ids"]]
    assert not any(block in train or block in validation for block in test)
    # the test blocks are exactly the blocks of the test works
    eos = [smollm2_tokenizer.eos_token_id]
    ids = [t for work in test_works for t in smollm2_tokenizer(shakespeare_works()[work], verbose=False)["input_ids"] + eos]
    expected = [tuple(ids[i : i + 256]) for i in range(0, len(ids) - 255, 256)]
    assert test == expected


def test_rotten_tomatoes_test_split_is_the_offline_test_rows():
    from hf_collapse.assets import rotten_tomatoes

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_task_data(
        _recipe(task="text-classification", dataset_name="offline:rotten_tomatoes", max_length=64,
                max_train_samples=12, max_eval_samples=5),
        tokenizer,
    )
    raw = rotten_tomatoes(seed=0)["test"]
    assert len(data.test) == len(raw) == 1275  # max_eval_samples caps validation only: the test split stays whole
    first = tokenizer(raw[0]["text"], truncation=True, max_length=64)["input_ids"]
    assert data.test[0]["input_ids"] == first and data.test[0]["labels"] == raw[0]["label"]
    assert not {r["text"] for r in raw} & set(rotten_tomatoes(seed=0)["validation"]["text"])


def test_a_dataset_without_a_test_split_has_none(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    csv = tmp_path / "rows.csv"
    csv.write_text("text,label\n" + "\n".join(f"row {i},{i % 2}" for i in range(20)) + "\n")
    data = load_task_data(_recipe(task="text-classification", dataset_files=[str(csv)]), tokenizer)
    assert data.test is None and len(data.train) + len(data.eval) == 20
