"""The studies' data: Shakespeare as character blocks (whole works held out) and scikit-learn's 8×8 digits."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from datasets import Dataset

from hf_collapse import assets
from hf_collapse.data import shakespeare_split

__all__ = ["CharTokenizer", "Splits", "TensorRows", "digits_splits", "shakespeare_splits"]


class CharTokenizer:
    """One id per character seen in the works (id 0 is reserved for padding, which the blocks never need)."""

    pad_token_id = 0

    def __init__(self, texts) -> None:
        chars = sorted({c for text in texts for c in text})
        self.vocab = {c: i + 1 for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.vocab) + 1

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": [self.vocab[c] for c in text]}


class TensorRows(torch.utils.data.Dataset):
    """Training rows held as tensors (row i = the i-th slice of each): the trainer's loader reads them without
    converting Python lists at every step, which costs more than the tiny models' own step."""

    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict:
        return {name: values[index] for name, values in self.columns.items()}


@dataclass
class Splits:
    train: TensorRows
    validation: Dataset | list[dict]  # rows as the library's metrics read them
    test: Dataset | list[dict]
    calibration: list[dict]  # batches of training rows, for the post-hoc scores
    vocab_size: int | None = None
    source: str = ""


def _blocks(texts: list[str], tokenizer: CharTokenizer, size: int) -> list[list[int]]:
    blocks = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        blocks.extend(ids[i : i + size] for i in range(0, len(ids) - size + 1, size))
    return blocks


def _lm_rows(blocks: list[list[int]]) -> Dataset:
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": blocks})


def _sample(rows: list, count: int, seed: int = 1234) -> list:
    """`count` rows drawn once with a fixed seed, so that a capped split spans every held-out work."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:count]


def _batches(rows: TensorRows, count: int, batch_size: int, names: tuple[str, ...]) -> list[dict]:
    """The first `count` rows as batches of the named columns (calibration data for the post-hoc scores)."""
    count = min(count, len(rows))
    return [{n: rows.columns[n][i : min(i + batch_size, count)] for n in names} for i in range(0, count, batch_size)]


def shakespeare_splits(block_size: int, validation_rows: int, test_rows: int, calibration_rows: int, batch: int) -> Splits:
    """Character blocks of the offline Shakespeare works, split by whole work as `offline:shakespeare` is."""
    works = assets.shakespeare_works()
    tokenizer = CharTokenizer(works.values())
    by_split: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for index, text in enumerate(works.values()):
        by_split[shakespeare_split(index)].append(text)
    ids = torch.tensor(_blocks(by_split["train"], tokenizer, block_size), dtype=torch.long)
    train = TensorRows(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    splits = Splits(
        train=train,
        validation=_lm_rows(_sample(_blocks(by_split["validation"], tokenizer, block_size), validation_rows)),
        test=_lm_rows(_sample(_blocks(by_split["test"], tokenizer, block_size), test_rows)),
        calibration=_batches(train, calibration_rows, batch, ("input_ids", "attention_mask")),
        vocab_size=len(tokenizer),
        source="the `shakespeare` package (MIT; Project Gutenberg texts, public domain)",
    )
    return splits


def digits_splits(validation_rows: int, test_rows: int, calibration_rows: int, batch: int) -> Splits:
    """scikit-learn's digits (1,797 8×8 grey images, BSD-3-Clause), one fixed shuffle (seed 1234): the first
    `test_rows` images for test, the next `validation_rows` for validation, the rest for training. Pixels are scaled from 0–16 to [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    if validation_rows + test_rows >= len(order):
        raise ValueError(f"{validation_rows} validation + {test_rows} test rows leave no digit to train on ({len(order)} in all)")

    def rows(index: torch.Tensor) -> list[dict]:
        return [{"pixel_values": pixels[i], "labels": labels[i]} for i in index.tolist()]

    test, validation = order[:test_rows], order[test_rows : test_rows + validation_rows]
    rest = order[test_rows + validation_rows :]
    train = TensorRows(pixel_values=pixels[rest], labels=labels[rest])
    return Splits(
        train=train,
        validation=rows(validation),
        test=rows(test),
        calibration=_batches(train, calibration_rows, batch, ("pixel_values",)),
        source="scikit-learn's `load_digits` (BSD-3-Clause; the UCI optical digits test set)",
    )
