"""Command line of the from-scratch study (see the package docstring)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from benchmarks.outputs import default_output
from benchmarks.sections import publish_section

from .report import load_results, section, section_markers, write_plots
from .runner import run_study
from .studies import STUDIES, ScratchError, check_config_source, get_study

PLOTS = Path("benchmarks/plots")


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _whole(value: float) -> int | float:
    """An integral float as an int; anything else unchanged, for the study's checks to refuse with its reason."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scratch", description=__doc__)
    parser.add_argument("study", choices=list(STUDIES), help="the model family to train from scratch")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model and schedule)")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/scratch-<study>; outputs/benchmarks/scratch-<study>-quick with --quick)")
    parser.add_argument("--seeds", type=_numbers, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--steps", type=float, help="optimizer steps of every arm (the training budget)")
    parser.add_argument("--lambdas", type=_numbers, help="λ of the raw-distance arms (default 0.1,1,5: the paper's range)")
    parser.add_argument("--rms-lambda", type=float, help="λ of the relative-distance arm (default 0.03, the library's)")
    parser.add_argument("--random-lambda", type=float, help="λ of the random-direction arm (default 5)")
    parser.add_argument("--directions", type=float, help="random directions of the random-direction arm (default 50)")
    parser.add_argument("--config", help="a config.json (or a folder holding only one) for the architecture; never weights")
    parser.add_argument("--results", type=Path, help="markdown file whose section is replaced (default benchmarks/RESULTS.md; none with --quick)")
    return parser


def build_study(args: argparse.Namespace):
    """The study the arguments ask for, every input checked (nothing is loaded or trained here)."""
    model = check_config_source(args.config, STUDIES[args.study].kind) if args.config is not None else None
    return get_study(
        args.study, quick=args.quick, steps=None if args.steps is None else _whole(args.steps),
        seeds=None if args.seeds is None else tuple(_whole(s) for s in args.seeds),
        lambdas=None if args.lambdas is None else tuple(args.lambdas), rms_lambda=args.rms_lambda,
        random_lambda=args.random_lambda, random_directions=None if args.directions is None else _whole(args.directions),
        model=model,
    )


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        study = build_study(args)
        out = args.output or default_output(f"scratch-{study.name}", study.quick)
        start = time.perf_counter()
        run_study(study, out, log=lambda line: print(line, flush=True))
    except ScratchError as error:
        print(f"python -m benchmarks.scratch {args.study}: error: {error}", file=sys.stderr)
        return 2
    print(f"{study.name}: done in {time.perf_counter() - start:.0f} s")
    recorded, results = load_results(out)
    quick = study.quick or args.output is not None
    plots = write_plots(recorded, results, out / "plots" if quick else PLOTS, list(study.arms()))
    text = section(recorded, results, plots, "plots", list(study.arms()))
    target = publish_section(text, out, args.results, quick, *section_markers(study.name), echo=False)
    if target is not None:
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
