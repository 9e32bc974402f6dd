"""Issue 21, part 2: does the uniform penalty's gap close, open or flip as the fine-tuning budget grows?

MiniLM on the whole Rotten Tomatoes train split (8,530 rows, not the 3,200 of the `minilm` study), the same
protocol as every quality study (layers chosen on validation rows, figures on the test split and the out-of-domain
tweets), at several budgets: 200 optimizer steps of 16 rows (the quickstart's, under one epoch) up to 2,000 (about
3.75 epochs, 10x). Warm-up (learning rate and penalty) is a tenth of the budget, prune-then-heal heals its last
quarter. One study folder per budget, `benchmarks/records/minilm-budget-<steps>`; results are recorded there per arm,
seed and k (in git), so an interrupted sweep resumes where it stopped, in this checkout or a new one.

    python -m benchmarks.quality budget                       # budgets 200 and 2000, k = 2, seeds 0-2
    python -m benchmarks.quality budget --budgets 200,600,2000 --seeds 0
    python -m benchmarks.quality budget --quick               # minutes: budgets 2 and 4, tiny splits

The table and the plot (accuracy after removal against the budget, one line per arm) go between the
`minilm-budget` markers of `benchmarks/RESULTS.md` (with `--quick`, into the output folder only).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from benchmarks.sections import publish_section

from .report import aggregate, load_results, paired_differences
from .runner import run_study
from .studies import Study, get_study

__all__ = ["BUDGET_ARMS", "BUDGET_BEGIN", "BUDGET_END", "budget_section", "budget_study", "run_budgets"]

BUDGET_BEGIN = "<!-- minilm-budget:begin (python -m benchmarks.quality budget writes this section) -->"
BUDGET_END = "<!-- minilm-budget:end -->"
# the four: the uniform penalty (removal by its own MSW ranking, and by the greedy validation bypass), vanilla
# with the best post-hoc rule (the greedy validation bypass chooses among all of them), score_fade, prune-then-fine-tune
BUDGET_ARMS = (
    "vanilla", "penalty", "vanilla_measured", "penalty_msw", "penalty_measured", "score_fade", "prune_then_finetune",
)
REFERENCE = "vanilla_measured"  # the paired differences are against the best post-hoc rule on the vanilla fine-tune


def budget_study(steps: int, *, quick: bool = False, seeds=None, ks=(2,)) -> Study:
    """The `minilm` study on the whole train split at `steps` optimizer steps (warm-ups a tenth, healing a quarter)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"a budget is a positive number of optimizer steps, got {steps!r}")
    base = get_study("minilm", quick=quick)
    study = dataclasses.replace(
        base, name=f"minilm-budget-{steps}", arms=BUDGET_ARMS, ks=tuple(ks), steps=steps,
        warmup_steps=max(1, steps // 10), msw_warmup_steps=max(1, steps // 10), heal_steps=max(1, steps // 4),
        train_rows=base.train_rows if quick else None,
        notes=f"budget sweep: {steps} steps x {base.batch_size} rows on the whole train split, warm-ups {max(1, steps // 10)} "
        f"steps, healing the last {max(1, steps // 4)}",
    )
    if seeds is not None:
        study = dataclasses.replace(study, seeds=tuple(int(s) for s in seeds))
    return study


def _row(entry: dict | None) -> str:
    if entry is None:
        return "—"
    test, seeds = entry["test"], len(entry["seeds"])
    return f"{test['mean']:.3f} ± {test['std']:.3f}" + ("" if seeds == 3 else f" [{seeds} seed{'s' if seeds > 1 else ''}]")


def budget_section(folders: list[Path], plot_path: Path | None, plot_link: str | None) -> str:
    """The table (test accuracy per arm and budget, k = 2), the paired differences against `REFERENCE`, the
    out-of-domain row of each arm, and the plot, from the study folders of a sweep."""
    runs = []
    for folder in folders:
        if (Path(folder) / "study.json").is_file():
            config, results = load_results(folder)
            if results:
                runs.append((config["study"]["steps"], config["study"], results))
    runs.sort(key=lambda run: run[0])
    if not runs:
        raise ValueError("no budget study has results yet: run python -m benchmarks.quality budget first")
    budgets = [steps for steps, _, _ in runs]
    tables = {steps: aggregate(results) for steps, _, results in runs}
    k = runs[0][1]["ks"][0]
    lines = [BUDGET_BEGIN, "", "## Penalty against training budget: MiniLM on the whole Rotten Tomatoes train split (issue 21)", ""]
    lines.append(
        f"`python -m benchmarks.quality budget` — {runs[0][1]['model']}, the `minilm` study's protocol and splits but all "
        f"train rows; budgets {', '.join(map(str, budgets))} optimizer steps x {runs[0][1]['batch_size']} rows "
        f"(warm-ups a tenth, healing a quarter); k = {k} layers removed; λ {runs[0][1]['msw_weight']:g} for the uniform "
        f"penalty (the `minilm` table's). Mean ± std over seeds of the test accuracy; [n seeds] where fewer than 3 ran."
    )
    lines += ["", "| arm | " + " | ".join(f"{b} steps" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for arm in BUDGET_ARMS:
        key = (arm, 0 if arm in ("vanilla", "penalty") else k)
        label = arm + (" (full depth)" if key[1] == 0 else "")
        lines.append(f"| {label} | " + " | ".join(_row(tables[b].get(key)) for b in budgets) + " |")
    lines += ["", f"Paired by seed against {REFERENCE} (accuracy points, mean over the seeds both ran; test / out of "
              "domain):", "", "| arm | " + " | ".join(f"{b} steps" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for arm in (a for a in BUDGET_ARMS if a not in ("vanilla", "penalty", REFERENCE)):
        cells = []
        for steps, _, results in runs:
            test, ood = (paired_differences(results, arm, k, split, REFERENCE) for split in ("test", "ood"))
            cells.append("—" if not test else f"{100 * statistics.fmean(test):+.1f} / {100 * statistics.fmean(ood):+.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if plot_path is not None:
        _plot(tables, budgets, k, plot_path)
        lines += ["", f"![accuracy after removal against budget]({plot_link or plot_path})"]
    lines += ["", BUDGET_END, ""]
    return "\n".join(lines)


def _plot(tables: dict, budgets: list[int], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for arm in BUDGET_ARMS:
        key = (arm, 0 if arm in ("vanilla", "penalty") else k)
        points = [(b, tables[b][key]["test"]) for b in budgets if key in tables[b]]
        if not points:
            continue
        style = dict(linestyle="--", linewidth=1) if key[1] == 0 else dict(marker="o", capsize=3, linewidth=2)
        axes.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                      label=arm + (" (full depth)" if key[1] == 0 else f" (k = {k})"), **style)
    axes.set_xscale("log")
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xticks([], minor=True)  # the log axis would label 3x10^2, 4x10^2, ... between the budgets
    axes.set_xlabel("training budget (optimizer steps of 16 rows)")
    axes.set_ylabel("test accuracy (mean ± std over seeds)")
    axes.set_title(f"MiniLM on Rotten Tomatoes: accuracy after removing {k} of 6 layers against budget")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def run_budgets(budgets: list[int], root: Path, *, quick: bool = False, seeds=None, results_md: Path | None = None,
                plots: Path = Path("benchmarks/plots"), log=print) -> Path | None:
    """Run (or resume) one study per budget under `root`, then publish the section (see the module)."""
    if not budgets:
        raise ValueError("give at least one budget")
    studies = [budget_study(b, quick=quick, seeds=seeds) for b in budgets]  # every budget checked before any training
    folders = []
    for study in studies:
        folder = root / (study.name + ("-quick" if quick else ""))
        run_study(study, folder, log=log)
        folders.append(folder)
    plot = (root / "plots" if quick else plots) / "quality_minilm_budget.png"
    link = str(plot) if quick else f"plots/{plot.name}"
    text = budget_section(folders, plot, link)
    return publish_section(text, root if quick else None, results_md, quick, BUDGET_BEGIN, BUDGET_END, echo=False)

