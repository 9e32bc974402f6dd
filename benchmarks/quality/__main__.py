"""Command line of the quality benchmark (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .arms import ARMS
from .report import write_report
from .runner import StudyError, run_study
from .studies import STUDIES, get_study

from ..outputs import RECORDS as ROOT, SMOKE as QUICK_ROOT, default_output
RESULTS_MD = Path("benchmarks/RESULTS.md")
PLOTS = Path("benchmarks/plots")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _budget(args) -> int:
    from .budget import run_budgets

    if args.arms or args.ks:
        print("error: the budget sweep has its own arms and k (see benchmarks/quality/budget.py)", file=sys.stderr)
        return 2
    budgets = args.budgets or ([2, 4] if args.quick else [200, 2000])
    try:
        path = run_budgets(budgets, args.output or (QUICK_ROOT if args.quick else ROOT), quick=args.quick, seeds=args.seeds, results_md=args.results)
    except (StudyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}" if path else "budget sweep done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("command", help=f"a study ({', '.join(STUDIES)}), 'budget' (the budget sweep, see "
                        "benchmarks/quality/budget.py), 'report' or 'arms'")
    parser.add_argument("--budgets", type=_ints, help="budget: comma-separated optimizer steps (default 200,2000)")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke run (tiny schedule and splits)")
    parser.add_argument("--output", type=Path, help="result folder (default benchmarks/records/<study>, outputs/benchmarks/<study>-quick with --quick)")
    parser.add_argument("--arms", help="comma-separated arms (default: the study's)")
    parser.add_argument("--seeds", type=_ints, help="comma-separated seeds (default: the study's)")
    parser.add_argument("--ks", type=_ints, help="comma-separated numbers of layers to remove (default: the study's)")
    parser.add_argument("--results", type=Path, help="RESULTS.md to write (default benchmarks/RESULTS.md; <output>/RESULTS.md with --quick)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md after the run")
    args = parser.parse_args(argv)

    if args.command == "arms":
        for name, entry in ARMS.items():
            print(f"{name:26s} {entry.family:9s} {entry.description}")
        return 0
    if args.command == "budget":
        return _budget(args)
    if args.command == "report":
        dirs = [ROOT / name for name in STUDIES]
        path = write_report(dirs, args.results or RESULTS_MD, PLOTS, str(ROOT))
        print(f"wrote {path}")
        return 0
    try:
        study = get_study(
            args.command, quick=args.quick, arms=args.arms.split(",") if args.arms else None, seeds=args.seeds, ks=args.ks
        )
        out = args.output or default_output(study.name, args.quick)
        start = time.perf_counter()
        run_study(study, out)
        print(f"{study.name}: done in {time.perf_counter() - start:.0f} s")
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        if "unknown study" in str(error):
            print(f"error: {error}", file=sys.stderr)
            return 2
        raise
    if not args.no_report:
        if args.quick or args.output is not None:
            results = args.results or out / "RESULTS.md"
            path = write_report([out], results, out / "plots", str(out))
        else:
            path = write_report([ROOT / name for name in STUDIES], args.results or RESULTS_MD, PLOTS, str(ROOT))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
