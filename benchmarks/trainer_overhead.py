"""Step time and peak memory of CollapseTrainer against a plain Trainer, on real models and data.

Step time: one process, arms interleaved step by step (plain, random, refine, then rotated), each
arm's median over the repeats, reported as ratios to the plain arm's median.
Peak memory: each arm runs in its own child process (the peak RSS of a process only grows); the
growth of the peak over the loaded model's RSS is compared, medians over interleaved repeats.

Run with one thread (the default here): two threads per process were at times 3-4x slower on the
2-core development machine because of contention outside the process.

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py --model minilm --repeats 10
    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py --model smollm2 --repeats 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARMS = ("plain", "random", "refine")


def build(model_name: str):
    """Model and one real batch: MiniLM 16x128 rotten-tomatoes tokens, SmolLM2 4x128 Shakespeare tokens."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hf_collapse import assets

    if model_name == "minilm":
        path = assets.minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        data = assets.rotten_tomatoes(max_train=16 * 8)["train"]
        texts, labels = list(data["text"]), list(data["label"])
        # eight snippets per row, truncated to 128 tokens: no padding, the worst case for the penalty's cost
        rows = [" ".join(texts[i * 8 : (i + 1) * 8]) for i in range(16)]
        batch = tokenizer(rows, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        batch["labels"] = torch.tensor(labels[:16])
    elif model_name == "smollm2":
        path = assets.smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        rows = assets.shakespeare_lm(tokenizer, block_size=128, max_train=4, max_validation=0)["train"]
        batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}
    else:
        raise ValueError(f"unknown model {model_name!r}: choose minilm or smollm2")
    return model, dict(batch)


def make_trainer(arm: str, model, out_dir: str):
    from transformers import Trainer, TrainingArguments

    from hf_collapse import CollapseConfig, CollapseTrainer

    common = dict(output_dir=out_dir, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    if arm == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    else:
        trainer = CollapseTrainer(model=model, args=CollapseConfig(msw_search=arm, msw_weight=1.0, **common))
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called directly here
    return trainer


def step(trainer, model, batch, optimizer) -> float:
    start = time.perf_counter()
    trainer.training_step(model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def time_arms(model_name: str, repeats: int, warmup: int) -> dict:
    model, batch = build(model_name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {arm: make_trainer(arm, model, tmp) for arm in ARMS}
        for arm in ARMS:
            for _ in range(warmup):
                step(trainers[arm], model, batch, optimizer)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(repeats):
            order = ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]
            for arm in order:
                times[arm].append(step(trainers[arm], model, batch, optimizer))
    medians = {arm: statistics.median(v) for arm, v in times.items()}
    return {"median_s": medians, "ratio": {arm: medians[arm] / medians["plain"] for arm in ARMS}, "times": times}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memory(model_name: str, arm: str, steps: int) -> None:
    model, batch = build(model_name)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(arm, model, tmp)
        before = _rss_mb()
        for _ in range(steps):
            step(trainer, model, batch, optimizer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"arm": arm, "growth_mb": peak - before, "peak_mb": peak}))


def memory_arms(model_name: str, repeats: int, steps: int) -> dict:
    growth: dict[str, list[float]] = {arm: [] for arm in ARMS}
    peak: dict[str, list[float]] = {arm: [] for arm in ARMS}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for r in range(repeats):
        for arm in ARMS[r % len(ARMS):] + ARMS[: r % len(ARMS)]:
            out = subprocess.run(
                [sys.executable, __file__, "--model", model_name, "--child-memory", arm, "--steps", str(steps)],
                capture_output=True, text=True, env=env, check=True,
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            growth[arm].append(record["growth_mb"])
            peak[arm].append(record["peak_mb"])
    medians = {arm: statistics.median(v) for arm, v in growth.items()}
    peaks = {arm: statistics.median(v) for arm, v in peak.items()}
    return {
        "median_growth_mb": medians,
        "ratio": {arm: medians[arm] / medians["plain"] for arm in ARMS},
        "median_peak_mb": peaks,
        "peak_ratio": {arm: peaks[arm] / peaks["plain"] for arm in ARMS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    parser.add_argument("--memory-repeats", type=int, default=3, help="child processes per arm (0 skips memory)")
    parser.add_argument("--steps", type=int, default=3, help="steps per memory child")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--child-memory", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child_memory:
        child_memory(args.model, args.child_memory, args.steps)
        return
    result = {"model": args.model, "threads": 1, "time": time_arms(args.model, args.repeats, args.warmup)}
    if args.memory_repeats:
        result["memory"] = memory_arms(args.model, args.memory_repeats, args.steps)
    print("| arm | median step (s) | step-time ratio | peak RSS (MB) | peak ratio | peak growth in steps (MB) | growth ratio |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        mem = result.get("memory", {})
        cells = [mem.get(k, {}).get(arm, float("nan")) for k in ("median_peak_mb", "peak_ratio", "median_growth_mb", "ratio")]
        print(
            f"| {arm} | {result['time']['median_s'][arm]:.3f} | {result['time']['ratio'][arm]:.3f} "
            f"| {cells[0]:.0f} | {cells[1]:.3f} | {cells[2]:.0f} | {cells[3]:.3f} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
