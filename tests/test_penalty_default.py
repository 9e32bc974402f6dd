"""benchmarks/penalty_default.py: the machinery that chose the default penalty (the quick run trains the real
SmolLM2 for a few steps), the choice rule (validation only) and its RESULTS.md section."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import penalty_default
from benchmarks.sections import OWNED_SECTIONS, carry_sections, publish_section, replace_section


def test_quick_run_measures_vanilla_and_each_candidate_on_three_splits(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# tables\n")
    assert penalty_default.main(["--quick", "--output", str(tmp_path / "out"), "--results", str(results_md)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["vanilla", "raw_1", "rms_0.1"]
    assert results["vanilla"]["fields"] is None
    assert results["rms_0.1"]["fields"]["msw_normalization"] == "input_rms"
    for entry in results.values():
        assert all(math.isfinite(entry[split]) and entry[split] > 1 for split in ("validation", "test", "ood"))
    # the penalised runs really differ from vanilla (the penalty acted on the weights)
    assert results["raw_1"]["test"] != results["vanilla"]["test"]
    text = results_md.read_text()
    assert text.startswith("# tables\n") and text.count(penalty_default.SECTION_BEGIN) == 1
    assert "| vanilla | — | — |" in text and "QUICK smoke run" in text
    # a rerun reuses every run already measured and writes the same section
    assert penalty_default.main(["--quick", "--output", str(tmp_path / "out"), "--results", str(results_md)]) == 0
    assert results_md.read_text() == text


def entry(validation, test):
    return {"fields": {}, "validation": validation, "test": test, "ood": 1.0, "seconds": 1.0}


def test_the_default_is_chosen_on_validation_alone():
    results = {
        "vanilla": entry(100.0, 100.0),
        "raw_0.3": entry(105.0, 105.0),
        "raw_1": entry(140.0, 101.0),  # fine on test, out on validation: not chosen
        "rms_0.1": entry(108.0, 130.0),  # within on validation: chosen although test is bad, and the section says so
        "rms_0.3": entry(111.0, 100.0),
    }
    assert penalty_default.choose(results, 0.10) == "rms_0.1"
    assert penalty_default.choose(results, 0.02) is None
    section = penalty_default.section(results, "rms_0.1", 0.10, "notes")
    assert "**rms_0.1**" in section and "1.300× vanilla, so it does not hold the budget" in section


def test_owned_sections_survive_a_rewrite_and_a_broken_one_is_refused(tmp_path):
    path = tmp_path / "RESULTS.md"
    for begin, end in OWNED_SECTIONS:
        replace_section(path, begin, end, f"{begin}\nfigures\n{end}\n")
    old = path.read_text()
    new = carry_sections(old, "# regenerated tables\n")
    assert new.startswith("# regenerated tables\n") and all(new.count(b) == 1 and new.count(e) == 1 for b, e in OWNED_SECTIONS)
    begin = OWNED_SECTIONS[1][0]
    with pytest.raises(ValueError, match="one penalty-default marker without the other"):
        carry_sections(f"{begin}\n", "x")


def test_publish_section_writes_prints_and_replaces_only_where_asked(tmp_path, capsys, monkeypatch):
    begin, end = OWNED_SECTIONS[1]
    text = f"{begin}\nnew figures\n{end}\n"
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(f"# tables\n\n{begin}\nold figures\n{end}\n")
    (tmp_path / "out").mkdir()
    assert publish_section(text, tmp_path / "out", results_md, True, begin, end) == results_md  # asked: even when quick
    assert (tmp_path / "out" / "section.md").read_text() == text and capsys.readouterr().out == text + "\n"
    assert results_md.read_text() == f"# tables\n\n{begin}\nnew figures\n{end}\n"
    # not asked: a quick run writes no RESULTS.md, a full run the default one (relative to the working folder)
    monkeypatch.chdir(tmp_path)
    assert publish_section(text, None, None, True, begin, end, echo=False) is None
    assert not (tmp_path / "benchmarks").exists() and capsys.readouterr().out == ""
    assert publish_section(text, None, None, False, begin, end, echo=False) == Path("benchmarks/RESULTS.md")
    assert (tmp_path / "benchmarks" / "RESULTS.md").read_text() == text


def test_bad_budget_is_refused_before_anything_loads(capsys):
    assert penalty_default.main(["--budget", "0"]) == 2
    assert "--budget must be in (0, 10)" in capsys.readouterr().err
