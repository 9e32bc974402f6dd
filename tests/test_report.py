"""The report as data: its sections, flat construction and updates, and `collapse_report.json` files written before
the report had sections (tests/fixtures/, written by hf-collapse at commit 68d38b1 with their rendered cards)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from hf_collapse.card import render_card
from hf_collapse.report import BenchmarkResult, CollapseReport, Measurements, Provenance, Removal, Training
from hf_collapse.version import __version__

FIXTURES = Path(__file__).parent / "fixtures"
OLD_REPORTS = ["causal_lm", "seq2seq", "sentence_transformers"]


def with_current_versions(card: str) -> str:
    """The card's framework versions are those of the environment that renders it, not the report's."""
    for name, version in (("hf_collapse", __version__), ("transformers", transformers.__version__),
                          ("torch", torch.__version__)):
        card = re.sub(rf"^- {name}: .*$", f"- {name}: {version}", card, flags=re.MULTILINE)
    return card


@pytest.mark.parametrize("name", OLD_REPORTS)
def test_flat_json_of_older_exports_loads_and_renders_the_same_card(name):
    stored = json.loads((FIXTURES / f"collapse_report_{name}.json").read_text(encoding="utf-8"))
    report = CollapseReport.from_dict(stored["report"])
    assert report.to_dict() == stored["report"]  # still the same flat JSON
    expected = with_current_versions((FIXTURES / f"collapse_report_{name}.md").read_text(encoding="utf-8"))
    assert render_card(report, repo_id=stored["repo_id"]) == expected


def test_flat_fields_land_in_their_sections():
    stored = json.loads((FIXTURES / "collapse_report_causal_lm.json").read_text(encoding="utf-8"))["report"]
    report = CollapseReport.from_dict(stored)
    assert isinstance(report.removal, Removal) and report.removal.removed_layers == [3, 5]
    assert isinstance(report.training, Training) and report.training.fade_window == [60, 90]
    assert isinstance(report.measurements, Measurements) and report.measurements.metric_after == 0.79
    assert isinstance(report.provenance, Provenance) and report.provenance.pipeline_tag == "text-generation"
    assert report.measurements.benchmarks[0] == BenchmarkResult(
        "hellaswag", "acc_norm", 0.41, 0.38, split="validation", dataset="Rowan/hellaswag", num_fewshot=0,
        harness="lm-evaluation-harness 0.4.9",
    )
    assert report.removed_layers == [3, 5] and report.base_model == "HuggingFaceTB/SmolLM2-135M"  # flat reads
    assert report.flat_fields().keys() == stored.keys()
    assert report.training.msw_penalty_used and report.training.trained


def test_updated_returns_a_checked_copy_and_reports_are_frozen():
    report = CollapseReport(base_model="m", removed_layers=[1], layers_before=4, num_parameters_before=100,
                            num_parameters_after=75, scores=None, score_method=None)
    changed = report.updated(task_metric="accuracy", metric_after=0.5, limitations=["tiny"])
    assert (changed.metric_after, changed.limitations, changed.removed_layers) == (0.5, ["tiny"], [1])
    assert report.metric_after is None and report.limitations == []
    assert changed == CollapseReport(**changed.flat_fields()) and changed != report
    with pytest.raises(ValueError, match="task_metric"):
        report.updated(metric_after=0.5)
    with pytest.raises(AttributeError):
        report.metric_after = 0.5
    with pytest.raises(TypeError, match="'metric'"):
        report.updated(metric=0.5)
    with pytest.raises(AttributeError):
        report.no_such_field


def test_a_report_from_whole_sections_and_dataclasses_replace_with_flat_names():
    removal = Removal(removed_layers=[1], layers_before=4, num_parameters_before=100, num_parameters_after=75,
                      scores=None, score_method=None)
    report = CollapseReport(removal=removal, provenance=Provenance(base_model="m"), layers_before=5)
    assert report.removal.layers_before == 5 and report.removal.removed_layers == [1]  # flat keywords win
    assert report.training == Training() and report.measurements == Measurements()
    assert dataclasses.replace(report, license="mit") == report.updated(license="mit")
    with pytest.raises(ValueError, match="removed_layers"):
        report.updated(removed_layers=[7])


def test_a_card_of_the_uniform_penalty_says_where_it_has_been_measured_to_pay():
    stored = json.loads((FIXTURES / "collapse_report_causal_lm.json").read_text(encoding="utf-8"))
    report = CollapseReport.from_dict(stored["report"])
    line = "fine-tuned with the paper's uniform MSW penalty, which in hf-collapse's own measurements has not clearly"
    assert line not in render_card(report)  # a target schedule, not the uniform penalty
    uniform = report.updated(penalty_schedule=None, recipe={**report.training.recipe, "msw_weight": 0.03})
    assert uniform.training.msw_penalty_used and line in render_card(uniform)
    unpenalised = report.updated(penalty_schedule=None, recipe={**report.training.recipe, "msw_weight": 0.0})
    assert line not in render_card(unpenalised)
