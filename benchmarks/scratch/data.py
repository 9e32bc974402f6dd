"""The studies' data: Shakespeare as character blocks (whole works held out) and scikit-learn's 8×8 digits."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from datasets import Dataset

from hf_collapse import assets
from hf_collapse.data import shakespeare_split

__all__ = ["CharTokenizer", "Splits", "digits_splits", "shakespeare_splits"]


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


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset
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


def _batches(dataset: Dataset, rows: int, batch_size: int) -> list[dict]:
    part = dataset.select(range(min(rows, len(dataset)))).with_format("torch")
    return [part[i : i + batch_size] for i in range(0, len(part), batch_size)]


def shakespeare_splits(block_size: int, validation_rows: int, test_rows: int, calibration_rows: int, batch: int) -> Splits:
    """Character blocks of the offline Shakespeare works, split by whole work as `offline:shakespeare` is."""
    works = assets.shakespeare_works()
    tokenizer = CharTokenizer(works.values())
    by_split: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for index, text in enumerate(works.values()):
        by_split[shakespeare_split(index)].append(text)
    train = _lm_rows(_blocks(by_split["train"], tokenizer, block_size))
    splits = Splits(
        train=train,
        validation=_lm_rows(_sample(_blocks(by_split["validation"], tokenizer, block_size), validation_rows)),
        test=_lm_rows(_sample(_blocks(by_split["test"], tokenizer, block_size), test_rows)),
        calibration=[{k: v for k, v in b.items() if k != "labels"} for b in _batches(train, calibration_rows, batch)],
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

    def rows(index: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"pixel_values": pixels[index].tolist(), "labels": labels[index].tolist()}).with_format("torch")

    test, validation = order[:test_rows], order[test_rows : test_rows + validation_rows]
    train = rows(order[test_rows + validation_rows :])
    return Splits(
        train=train,
        validation=rows(validation),
        test=rows(test),
        calibration=[{"pixel_values": b["pixel_values"]} for b in _batches(train, calibration_rows, batch)],
        source="scikit-learn's `load_digits` (BSD-3-Clause; the UCI optical digits test set)",
    )
