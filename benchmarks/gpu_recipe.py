"""The SmolLM2 recipe end to end on one CUDA GPU in bf16, with the figures the CPU runs cannot give.

Records, into a JSON file and a section of benchmarks/RESULTS.md labelled with the GPU's name:

- step-time ratio of CollapseTrainer (penalty on, the recipe's settings) to a plain Trainer: the two arms'
  training steps interleaved one by one on the same model and batch, medians;
- peak GPU memory of each arm over its timed steps (`torch.cuda.max_memory_allocated`, reset before each arm);
- the recipe run itself (`hf_collapse.pipeline.run_recipe`, shortened to `--train-steps`, bf16): layers removed,
  validation perplexity before and after;
- prefill and per-token decode speed-up of the collapsed model over the full one
  (`hf_collapse.evaluation.compare_latency`, interleaved);
- inference energy of full and collapsed model over the same generation workload, from the NVML counter
  (`benchmarks/energy.py`, J per 1,000 generated tokens).

The RESULTS.md section sits between `SECTION_BEGIN` / `SECTION_END` markers; only that part of the file is
replaced, so the rest (the quality studies' tables) stays as it is. Without a CUDA GPU the script refuses.

    python -m benchmarks.gpu_recipe                       # about 5 minutes on an H200, most of it the recipe run
    python -m benchmarks.gpu_recipe --report-only outputs/gpu_recipe/result.json   # rewrite the section only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.sections import OWNED_SECTIONS, replace_section

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m_causal-lm.yaml"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION_BEGIN, SECTION_END = OWNED_SECTIONS[0]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe to run (default: the SmolLM2 one)")
    parser.add_argument("--train-steps", type=_positive, default=200, help="optimizer steps of the recipe run")
    parser.add_argument("--timing-steps", type=_positive, default=30, help="timed training steps per arm")
    parser.add_argument("--warmup", type=_positive, default=5, help="untimed steps per arm first")
    parser.add_argument("--batch-size", type=_positive, default=16, help="rows of 128 tokens per timed step")
    parser.add_argument("--latency-repeats", type=_positive, default=30, help="interleaved repeats per latency mode")
    parser.add_argument("--energy-seconds", type=float, default=10.0, help="generation time per model for energy")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_recipe", help="folder for the run and JSON")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="the RESULTS.md whose section is replaced")
    parser.add_argument("--report-only", type=Path, metavar="JSON", help="only rewrite the section from this JSON")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def require_gpu() -> str:
    """The GPU's name, or SystemExit saying why this script cannot run here."""
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/gpu_recipe.py needs a CUDA GPU (torch.cuda.is_available() is False here): it measures bf16 "
            "step time, GPU memory and NVML energy, which a CPU run cannot stand in for"
        )
    if not torch.cuda.is_bf16_supported():
        raise SystemExit(f"{torch.cuda.get_device_name(0)} does not run bf16, which the recipe run uses")
    return torch.cuda.get_device_name(0)


# ---- measurements (GPU only) ---------------------------------------------------------------------------------------


def _step_arms(path: Path, batch_size: int, steps: int, warmup: int, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_collapse import CollapseConfig, CollapseTrainer, assets

    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = assets.shakespeare_lm(tokenizer, block_size=128, max_train=batch_size, max_validation=0)["train"]
    batch = {k: torch.tensor(rows[k]).cuda() for k in ("input_ids", "attention_mask", "labels")}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    common = dict(output_dir=str(out), report_to=[], save_strategy="no", disable_tqdm=True, bf16=True)
    recipe = _recipe_msw_fields()
    trainers = {
        "plain": Trainer(model=model, args=TrainingArguments(**common)),
        "collapse": CollapseTrainer(model=model, args=CollapseConfig(**common, **recipe)),
    }
    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is called directly here

    def step(arm: str) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        trainers[arm].training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {arm: [] for arm in trainers}
    peaks: dict[str, int] = {}
    for arm in trainers:
        for _ in range(warmup):
            step(arm)
    for repeat in range(steps):
        for arm in ("plain", "collapse") if repeat % 2 == 0 else ("collapse", "plain"):
            times[arm].append(step(arm))
    for arm in trainers:  # peaks one arm at a time: an interleaved peak would be the larger arm's for both
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step(arm)
        peaks[arm] = torch.cuda.max_memory_allocated()
    medians = {arm: statistics.median(values) for arm, values in times.items()}
    return {
        "batch": [batch_size, 128],
        "msw": recipe,
        "median_step_s": medians,
        "step_time_ratio": medians["collapse"] / medians["plain"],
        "peak_memory_bytes": peaks,
        "peak_memory_ratio": peaks["collapse"] / peaks["plain"],
        "times_s": times,
    }


def _recipe_msw_fields() -> dict:
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    return {k: v for k, v in raw.items() if k.startswith("msw_") and k != "msw_warmup_steps"}


def _recipe_run(recipe: Path, train_steps: int, out: Path) -> dict:
    from hf_collapse.pipeline import run_recipe
    from hf_collapse.recipe import load_recipe

    overrides = [
        "--max_steps", str(train_steps), "--bf16", "true", "--use_cpu", "false",
        "--output_dir", str(out / "run"), "--export_dir", str(out / "slim"),
    ]
    args, config, resolved = load_recipe(recipe, overrides)
    started = time.perf_counter()
    summary = run_recipe(args, config, resolved)
    return {
        "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
        "train_steps": train_steps,
        "seconds": time.perf_counter() - started,
        "layers_before": summary.layers_before,
        "layers_after": summary.layers_after,
        "removed": list(summary.removed),
        "metric": summary.metric_name,
        "metric_before": summary.metric_before,
        "metric_after": summary.metric_after,
        "export_dir": str(summary.export_dir),
    }


def _speed_and_energy(full_path: Path, slim_path: Path, repeats: int, energy_seconds: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_collapse import assets
    from benchmarks.energy import NvmlCounter, measure_energy
    from hf_collapse.evaluation import compare_latency

    tokenizer = AutoTokenizer.from_pretrained(full_path)
    rows = assets.shakespeare_lm(tokenizer, block_size=128, max_train=0, max_validation=8)["validation"]
    batch = {k: torch.tensor(rows[k]).cuda() for k in ("input_ids", "attention_mask")}
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
        for name, path in (("full", full_path), ("collapsed", slim_path))
    }
    result: dict = {"batch": [8, 128]}
    for mode in ("prefill", "decode"):
        comparison = compare_latency(models["full"], models["collapsed"], batch, mode=mode, repeats=repeats, new_tokens=32)
        result[mode] = {
            "full_median_ms": comparison.a.median_ms,
            "collapsed_median_ms": comparison.b.median_ms,
            "speedup": comparison.speedup,
        }
    try:
        counter = NvmlCounter(torch.cuda.current_device())
    except RuntimeError as error:
        result["energy"] = {"reason": str(error)}
        return result
    new_tokens = 64

    def generate(model) -> int:
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return batch["input_ids"].shape[0] * new_tokens

    energy = {}
    for name, model in models.items():
        generate(model)  # warm-up
        start, rounds = time.perf_counter(), 0
        while time.perf_counter() - start < energy_seconds / 4:
            generate(model)
            rounds += 1
        rounds = max(1, round(rounds * 4))  # about energy_seconds of generation, measured in one reading
        tokens, reading = measure_energy(lambda m=model, n=rounds: sum(generate(m) for _ in range(n)), 1, counter=counter)
        energy[name] = {"joules": reading.joules, "tokens": tokens, "seconds": reading.seconds, "source": reading.source}
        energy[name]["joules_per_1000_tokens"] = reading.joules * 1000 / tokens
    energy["ratio"] = energy["collapsed"]["joules_per_1000_tokens"] / energy["full"]["joules_per_1000_tokens"]
    result["energy"] = energy
    return result


def run(args: argparse.Namespace) -> dict:
    gpu = require_gpu()
    from hf_collapse.assets import smollm2_path

    args.out.mkdir(parents=True, exist_ok=True)
    full_path = smollm2_path()
    started = time.perf_counter()
    result = {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": "SmolLM2-135M-Instruct (dequantised Q4_1 copy, offline asset)",
        "dtype": "bfloat16",
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["steps"] = _step_arms(full_path, args.batch_size, args.timing_steps, args.warmup, Path(tmp))
    torch.cuda.empty_cache()
    result["recipe_run"] = _recipe_run(args.recipe, args.train_steps, args.out)
    torch.cuda.empty_cache()
    result["inference"] = _speed_and_energy(
        full_path, Path(result["recipe_run"]["export_dir"]), args.latency_repeats, args.energy_seconds
    )
    result["seconds"] = time.perf_counter() - started
    return result


# ---- the RESULTS.md section (no GPU needed) -------------------------------------------------------------------------


def results_section(result: dict) -> str:
    """The Markdown section (markers included) for one result JSON."""
    steps, recipe, inference = result["steps"], result["recipe_run"], result["inference"]
    gib = 2**30
    lines = [
        SECTION_BEGIN,
        f"## GPU run: SmolLM2 recipe on {result['gpu']}",
        "",
        f"{result['model']}, {result['dtype']}, torch {result['torch']} (CUDA {result['cuda']}); "
        f"`python -m benchmarks.gpu_recipe`, {result['seconds'] / 60:.1f} min in all. Generated from its JSON.",
        "",
        "| figure | plain Trainer / full model | CollapseTrainer / collapsed model | ratio |",
        "|---|---|---|---|",
        f"| median train step ({steps['batch'][0]}×{steps['batch'][1]} tokens, interleaved) | "
        f"{steps['median_step_s']['plain'] * 1e3:.1f} ms | {steps['median_step_s']['collapse'] * 1e3:.1f} ms | "
        f"{steps['step_time_ratio']:.3f} |",
        f"| peak GPU memory in those steps | {steps['peak_memory_bytes']['plain'] / gib:.2f} GiB | "
        f"{steps['peak_memory_bytes']['collapse'] / gib:.2f} GiB | {steps['peak_memory_ratio']:.3f} |",
    ]
    for mode, label in (("prefill", "prefill (8×128 prompt)"), ("decode", "decode, per token (8 rows)")):
        figures = inference[mode]
        lines.append(
            f"| {label} | {figures['full_median_ms']:.2f} ms | {figures['collapsed_median_ms']:.2f} ms | "
            f"{figures['speedup']:.2f}× faster |"
        )
    energy = inference["energy"]
    if "ratio" in energy:
        lines.append(
            f"| generation energy ({energy['full']['source']}) | {energy['full']['joules_per_1000_tokens']:.3g} J / "
            f"1,000 tokens | {energy['collapsed']['joules_per_1000_tokens']:.3g} J / 1,000 tokens | "
            f"{energy['ratio']:.3f} |"
        )
    else:
        lines.append(f"| generation energy | not measured: {energy['reason']} | | |")
    lines += [
        "",
        f"Recipe run (`{recipe['recipe']}`, {recipe['train_steps']} optimizer steps, {recipe['seconds']:.0f} s): "
        f"{recipe['layers_before']} → {recipe['layers_after']} layers (removed {recipe['removed']}, 0-based), "
        f"validation {recipe['metric']} {recipe['metric_before']:.2f} → {recipe['metric_after']:.2f}.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def update_results(path: Path, section: str) -> Path:
    """Replace the section between the markers in `path` (or append it); nothing else in the file changes."""
    return replace_section(path, SECTION_BEGIN, SECTION_END, section)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.report_only is not None:
        result = json.loads(args.report_only.read_text())
    else:
        result = run(args)
        (args.out / "result.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out / 'result.json'}")
    print(f"updated {update_results(args.results, results_section(result))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
