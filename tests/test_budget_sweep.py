"""The penalty-against-budget sweep (issue 21, part 2) in its quick mode on the real MiniLM: one study folder per
budget, the table and the paired differences taken from those results, the plot; bad budgets refused first."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.quality.__main__ import main
from benchmarks.quality.budget import BUDGET_ARMS, BUDGET_BEGIN, BUDGET_END, budget_study


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    assert main(["budget", "--quick", "--output", str(root)]) == 0
    return root


def _accuracy(root, budget: int, arm: str, seed: int = 0) -> dict:
    k = 0 if arm in ("vanilla", "penalty") else 2
    return json.loads((root / f"minilm-budget-{budget}-quick" / arm / f"seed{seed}_k{k}.json").read_text())


def test_each_budget_trains_every_arm_for_its_own_steps(sweep):
    for budget in (2, 4):
        study = json.loads((sweep / f"minilm-budget-{budget}-quick" / "study.json").read_text())["study"]
        assert (study["steps"], study["ks"], study["arms"]) == (budget, [2], list(BUDGET_ARMS))
        for arm in BUDGET_ARMS:
            result = _accuracy(sweep, budget, arm)
            assert result["train_steps"] == budget
            assert len(result["layers"]) == (0 if arm in ("vanilla", "penalty") else 2)


def test_the_section_carries_the_results_and_the_plot(sweep):
    text = (sweep / "section.md").read_text()
    assert text.startswith(BUDGET_BEGIN) and text.rstrip().endswith(BUDGET_END)
    assert "| arm | 2 steps | 4 steps |" in text
    for arm in BUDGET_ARMS:
        label = arm + (" (full depth)" if arm in ("vanilla", "penalty") else "")
        cells = [f"{_accuracy(sweep, b, arm)['test']['accuracy']:.3f} ± 0.000 [1 seed]" for b in (2, 4)]
        assert f"| {label} | {' | '.join(cells)} |" in text, arm
    # paired against the best post-hoc rule on the vanilla fine-tune, seed by seed
    for arm in ("penalty_msw", "score_fade", "prune_then_finetune"):
        cells = []
        for b in (2, 4):
            mine, theirs = _accuracy(sweep, b, arm), _accuracy(sweep, b, "vanilla_measured")
            diff = [100 * (mine[s]["accuracy"] - theirs[s]["accuracy"]) for s in ("test", "ood")]
            cells.append(f"{diff[0]:+.1f} / {diff[1]:+.1f}")
        assert f"| {arm} | {' | '.join(cells)} |" in text, arm
    plot = re.search(r"!\[accuracy after removal against budget\]\((.+)\)", text).group(1)
    assert (sweep / "plots" / "quality_minilm_budget.png").stat().st_size > 1000 and plot.endswith("quality_minilm_budget.png")


def test_a_resumed_sweep_trains_nothing_again(sweep):
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("minilm-budget-*-quick/*/seed*_k*.json")}
    assert len(before) == 2 * len(BUDGET_ARMS)
    assert main(["budget", "--quick", "--output", str(sweep)]) == 0
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("minilm-budget-*-quick/*/seed*_k*.json")} == before


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "200,0"], "a budget is a positive number of optimizer steps, got 0"),
    (["--budgets", "-5"], "got -5"),
    (["--arms", "vanilla"], "the budget sweep has its own arms and k"),
])
def test_bad_budgets_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    assert main(["budget", "--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_full_sweep_uses_the_whole_train_split_and_scaled_warm_ups():
    study = budget_study(2000)
    assert (study.train_rows, study.steps, study.warmup_steps, study.msw_warmup_steps, study.heal_steps) == (
        None, 2000, 200, 200, 500)
    assert study.batch_size * study.steps >= 10 * 200 * 16  # at least ten times the quickstart's rows


def test_full_runs_record_in_the_repository_and_quick_runs_in_outputs(monkeypatch):
    """Hours of CPU must survive a new checkout: a full run's per-run JSON records go to benchmarks/records (in git,
    its shared fine-tunes ignored), a smoke run's to outputs/ (ignored)."""
    import subprocess
    from pathlib import Path

    from benchmarks.quality import __main__ as cli

    seen = []
    monkeypatch.setattr("benchmarks.quality.budget.run_budgets", lambda budgets, root, **kw: seen.append(root))
    monkeypatch.setattr(cli, "run_study", lambda study, out, log=print: seen.append(out))
    monkeypatch.setattr(cli, "write_report", lambda *a, **kw: "report")
    for argv in (["budget"], ["budget", "--quick"], ["minilm"], ["minilm", "--quick"]):
        assert main([*argv, "--no-report"] if argv[0] == "minilm" else argv) == 0
    assert seen == [Path("benchmarks/records"), Path("outputs/benchmarks"), Path("benchmarks/records/minilm"),
                    Path("outputs/benchmarks/minilm-quick")]
    repo = Path(__file__).resolve().parents[1]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "benchmarks/records/minilm-budget-2000/cache/model.safetensors",
         "benchmarks/records/minilm-budget-2000/vanilla/seed0_k0.json.tmp",
         "benchmarks/records/minilm-budget-2000/vanilla/seed0_k0.json", "outputs/benchmarks/minilm-quick/study.json"],
        cwd=repo, capture_output=True, text=True,
    ).stdout.split()
    assert ignored == ["benchmarks/records/minilm-budget-2000/cache/model.safetensors",
                       "benchmarks/records/minilm-budget-2000/vanilla/seed0_k0.json.tmp",
                       "outputs/benchmarks/minilm-quick/study.json"]


def test_the_plot_labels_only_the_budgets_on_its_log_axis(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from benchmarks.quality.budget import _plot

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    entry = {"test": {"mean": 0.8, "std": 0.01}}
    _plot({200: {("vanilla", 0): entry, ("score_fade", 2): entry}, 2000: {("vanilla", 0): entry, ("score_fade", 2): entry}},
          [200, 2000], 2, tmp_path / "plot.png")
    axes = kept[0].axes[0]
    axes.figure.canvas.draw()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["200", "2000"]
    assert [t.get_text() for t in axes.get_xticklabels(minor=True) if t.get_text()] == []
