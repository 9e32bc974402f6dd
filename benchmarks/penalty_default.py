"""Which uniform penalty is safe on a language model? The default of `CollapseConfig`, chosen by measurement.

SmolLM2-135M (offline) is fine-tuned on the offline Shakespeare blocks with the schedule of the quality
benchmark's `smollm2` study (40 steps x 4 blocks of 128 tokens, lr 5e-5), once without the penalty (vanilla,
transformers' `Trainer`) and once per candidate penalty (`CollapseTrainer`, uniform over every layer): raw MSW and
MSW relative to the layer input's RMS (`msw_normalization: input_rms`), at several λ. Every run sees the same
rows in the same order and keeps all its layers: the question is only what the penalty costs the full-depth
model.

Protocol (choose on one split, report on another): the candidate that becomes the default is the strongest
penalty (largest λ, relative penalties preferred) whose **validation** perplexity stays within `--budget`
(10 %) of the vanilla run's; the **test** and out-of-domain (health tweets) perplexities of every run are then
reported, the chosen one marked, and the script says whether the chosen one also holds the budget on test.

    python -m benchmarks.penalty_default            # about 25 min on 2 CPU cores
    python -m benchmarks.penalty_default --quick    # a smoke run of the machinery (tests); says nothing about quality

Results go to `benchmarks/records/penalty_default/results.json` (`outputs/benchmarks/penalty_default-quick` with
--quick; a rerun skips the runs already there); the full run also replaces its section of `benchmarks/RESULTS.md` (between the penalty-default markers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.outputs import default_output
from benchmarks.quality.context import Context
from benchmarks.quality.studies import get_study
from benchmarks.sections import OWNED_SECTIONS, RESULTS_MD, publish_section

SECTION_BEGIN, SECTION_END = OWNED_SECTIONS[1]

# (msw_normalization, λ): today's default (raw, 1.0), the value the docs used to suggest (raw, 0.3), and relative
# penalties over two decades. Listed from the weakest to the strongest within each normalisation.
CANDIDATES = (
    ("none", 0.3),
    ("none", 1.0),
    ("input_rms", 0.01),
    ("input_rms", 0.03),
    ("input_rms", 0.1),
    ("input_rms", 0.3),
    ("input_rms", 1.0),
)
QUICK_CANDIDATES = (("none", 1.0), ("input_rms", 0.1))


def run_name(normalization: str, weight: float) -> str:
    return f"{'raw' if normalization == 'none' else 'rms'}_{weight:g}"


def measure(ctx: Context, seed: int, fields: dict | None) -> dict:
    """Fine-tune a fresh copy of the pretrained model (vanilla when `fields` is None) and measure it at full depth."""
    model = ctx.pretrained(seed)
    seconds = ctx.fit(model, seed, ctx.study.steps, penalty=fields is not None, penalty_fields=fields)
    model.eval()
    return {
        "fields": fields,
        "seconds": round(seconds, 1),
        "validation": ctx.metric(model, ctx.validation),
        "test": ctx.metric(model, ctx.test),
        "ood": ctx.metric(model, ctx.ood),
    }


def choose(results: dict, budget: float) -> str | None:
    """The strongest candidate within `budget` of vanilla on VALIDATION perplexity (relative before raw)."""
    limit = results["vanilla"]["validation"] * (1 + budget)
    within = [
        (norm == "input_rms", weight, run_name(norm, weight))
        for norm, weight in CANDIDATES
        if run_name(norm, weight) in results and results[run_name(norm, weight)]["validation"] <= limit
    ]
    return max(within)[2] if within else None


def section(results: dict, chosen: str | None, budget: float, notes: str) -> str:
    vanilla = results["vanilla"]
    lines = [
        SECTION_BEGIN,
        "## The default penalty on SmolLM2-135M (full depth, no layer removed)",
        "",
        f"`python -m benchmarks.penalty_default`: {notes}. The default is the strongest penalty whose "
        f"validation perplexity stays within {budget:.0%} of the vanilla fine-tune's; test and out-of-domain "
        "(health tweets) are reported after the choice.",
        "",
        "| run | normalisation | λ | validation ppl | test ppl | test / vanilla | out-of-domain ppl | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results.items():
        fields = entry["fields"] or {}
        mark = " (chosen)" if name == chosen else ""
        lines.append(
            f"| {name}{mark} | {fields.get('msw_normalization', '—')} | {fields.get('msw_weight', '—')} | "
            f"{entry['validation']:.2f} | {entry['test']:.2f} | {entry['test'] / vanilla['test']:.3f} | "
            f"{entry['ood']:.2f} | {entry['seconds']:.0f} |"
        )
    lines.append("")
    if chosen is None:
        lines.append("No candidate holds the budget on validation.")
    else:
        ratio = results[chosen]["test"] / vanilla["test"]
        verdict = "holds" if ratio <= 1 + budget else "does not hold"
        lines.append(f"Chosen on validation: **{chosen}**; on test it is at {ratio:.3f}× vanilla, so it {verdict} the budget.")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.penalty_default", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny schedule and splits: checks the machinery only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.10, help="allowed validation perplexity increase (0.10 = 10%%)")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/penalty_default; outputs/benchmarks/penalty_default-quick with --quick)")
    parser.add_argument("--results", type=Path, help=f"markdown file whose section is replaced (default {RESULTS_MD}; none with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not 0 < args.budget < 10:
        print(f"error: --budget must be in (0, 10), got {args.budget}", file=sys.stderr)
        return 2
    study = get_study("smollm2", quick=args.quick)
    out = args.output or default_output("penalty_default", args.quick)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    ctx = Context(study, log=lambda line: print(line, flush=True))
    candidates = QUICK_CANDIDATES if args.quick else CANDIDATES
    runs = [("vanilla", None)] + [
        (run_name(n, w), {"msw_normalization": n, "msw_weight": w, "msw_warmup_steps": study.msw_warmup_steps})
        for n, w in candidates
    ]
    for name, fields in runs:
        if name in results:
            continue
        start = time.perf_counter()
        results[name] = measure(ctx, args.seed, fields)
        print(f"{name}: validation {results[name]['validation']:.2f}, test {results[name]['test']:.2f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        path.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
        path.with_suffix(".tmp").replace(path)
    chosen = choose(results, args.budget)
    text = section(results, chosen, args.budget, study.notes + (" (QUICK smoke run)" if args.quick else ""))
    publish_section(text, out, args.results, args.quick, SECTION_BEGIN, SECTION_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
