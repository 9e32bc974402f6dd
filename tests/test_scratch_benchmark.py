"""benchmarks/scratch: models trained from random initialisation with the MSW penalty, layers removed without
fine-tuning. The quick runs train tiny real models (a Llama-style decoder on Shakespeare characters, a ViT on
scikit-learn's digits) for a few steps; the refusals happen before any data loads or any training starts."""

from __future__ import annotations

import json
import math

import pytest

import hf_collapse
from benchmarks.scratch import RULES, get_study
from benchmarks.scratch.__main__ import build_study, main, make_parser
from benchmarks.scratch.report import section_markers


def run_quick(kind, tmp_path, *extra):
    out, results_md = tmp_path / kind, tmp_path / "RESULTS.md"
    if not results_md.exists():
        results_md.write_text("# tables\n")
    code = main([kind, "--quick", "--output", str(out), "--results", str(results_md), *extra])
    return code, out, results_md


def check_results(kind, out):
    study = get_study(kind, quick=True)
    layers = study.model["num_hidden_layers"]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*.json"))]
    # every arm × seed, each trained for the same number of steps
    assert sorted((r["arm"], r["seed"]) for r in results) == sorted((a, s) for a in study.arms() for s in study.seeds)
    assert len(study.arms()) == 6 and {r["steps"] for r in results} == {study.steps}
    by_arm = {(r["arm"], r["seed"]): r for r in results}
    assert by_arm[("vanilla", 0)]["penalty"] is None
    assert by_arm[("random50_raw_5", 0)]["penalty"]["msw_search"] == "random"
    assert by_arm[("random50_raw_5", 0)]["penalty"]["msw_num_projections"] == 50
    for r in results:
        curves = r["curves"]
        # the curves have every logged step (every `log_every` steps) and one distance per layer
        assert curves["steps"] == list(range(study.log_every, study.steps + 1, study.log_every))
        assert all(len(row) == layers and all(math.isfinite(v) and v >= 0 for v in row) for row in curves["msw"])
        assert len(curves["loss"]) == len(curves["steps"])
        for rule in RULES:
            rows = r["rules"][rule]["by_k"]
            assert [row["k"] for row in rows] == list(range(1, layers))
            assert all(len(row["layers"]) == row["k"] and set(row["layers"]) <= set(range(layers)) for row in rows)
            assert 0 <= r["rules"][rule]["removable"] <= layers - 1
        assert r["rules"]["last_k"]["by_k"][0]["layers"] == [layers - 2]
        chosen = r["chosen"]["by_k"]
        # the rule chosen at each k is the best on validation, and its test number is that rule's
        for k, entry in chosen.items():
            best = [r["rules"][rule]["by_k"][int(k) - 1]["validation"] for rule in RULES]
            assert entry["validation"] == (max(best) if r["higher_is_better"] else min(best))
            assert entry["test"] == r["rules"][entry["rule"]]["by_k"][int(k) - 1]["test"]
    # the penalty acted: the strongest raw penalty ends with other distances than vanilla at the same seed
    assert by_arm[("raw_5", 0)]["scores"]["msw"] != by_arm[("vanilla", 0)]["scores"]["msw"]
    return results


@pytest.mark.parametrize("kind", ["decoder", "vision"])
def test_quick_study_reports_every_arm_and_seed_with_curves(kind, tmp_path):
    code, out, results_md = run_quick(kind, tmp_path)
    assert code == 0
    results = check_results(kind, out)
    begin, end = section_markers(kind)
    text = results_md.read_text()
    assert text.startswith("# tables\n") and text.count(begin) == 1 and text.count(end) == 1
    for arm in {r["arm"] for r in results}:
        assert f"\n| {arm} | 2 |" in text
    for name in (f"scratch_{kind}_removal.png", f"scratch_{kind}_distances.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    if kind == "decoder":
        # a rerun reuses every result and rewrites the same section; another protocol in that folder is refused
        before = {p: p.read_bytes() for p in out.glob("*/seed*.json")}
        assert run_quick(kind, tmp_path)[0] == 0
        assert results_md.read_text() == text and {p: p.read_bytes() for p in before} == before
        assert run_quick(kind, tmp_path, "--lambdas", "2")[0] == 2


def refused(capsys, argv, tmp_path):
    out = tmp_path / "out"
    code = main([*argv, "--quick", "--output", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists(), "a refusal must write nothing"
    assert len(lines) == 1 and lines[0].startswith(f"python -m benchmarks.scratch {argv[0]}: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["decoder", "--steps", "nan"], "steps (the training budget) must be a whole number >= 1, got nan"),
        (["decoder", "--steps", "0"], "steps (the training budget) must be a whole number >= 1, got 0"),
        (["vision", "--steps", "-5"], "steps (the training budget) must be a whole number >= 1, got -5"),
        (["vision", "--steps", "2.5"], "steps (the training budget) must be a whole number >= 1, got 2.5"),
        (["decoder", "--steps", "inf"], "got inf"),
        (["decoder", "--lambdas", "0.1,inf"], "every λ of the raw-distance arms must be a finite number > 0, got inf"),
        (["decoder", "--lambdas", "0"], "every λ of the raw-distance arms must be a finite number > 0, got 0.0"),
        (["vision", "--rms-lambda", "nan"], "the relative-distance arm's λ must be a finite number > 0, got nan"),
        (["vision", "--random-lambda", "-1"], "the random-direction arm's λ must be a finite number > 0, got -1.0"),
        (["decoder", "--directions", "0"], "msw_search: random needs at least one random direction, got 0"),
        (["decoder", "--directions", "0.5"], "msw_search: random needs at least one random direction, got 0.5"),
        (["vision", "--seeds", "0,0"], "give at least one seed, each a whole number >= 0 and each once; got [0, 0]"),
        (["vision", "--seeds", "1.5"], "got [1.5]"),
        (["decoder", "--config", "offline:SmolLM2-135M-Instruct"], "names a pretrained model: a from-scratch study trains"),
    ],
)
def test_bad_input_is_refused_before_training(capsys, tmp_path, argv, message):
    assert message in refused(capsys, argv, tmp_path)


def test_a_pretrained_checkpoint_is_refused_and_a_bare_config_accepted(capsys, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5,
              "num_attention_heads": 4, "num_key_value_heads": 4}
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    line = refused(capsys, ["decoder", "--config", str(checkpoint)], tmp_path)
    assert "is a pretrained checkpoint (it holds model.safetensors)" in line and "pass its config.json alone" in line
    assert "is a pretrained checkpoint" in refused(capsys, ["decoder", "--config", str(checkpoint / "model.safetensors")], tmp_path)
    # the config file alone is an architecture: accepted, and the study builds that architecture
    study = build_study(make_parser().parse_args(["decoder", "--quick", "--config", str(checkpoint / "config.json")]))
    assert study.model["num_hidden_layers"] == 5 and study.model["hidden_size"] == 32
    (tmp_path / "shallow.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    shallow = build_study(make_parser().parse_args(["decoder", "--quick", "--config", str(tmp_path / "shallow.json")]))
    assert shallow.ks == (1, 2)  # the ks a 3-layer model can take
    assert "does not exist" in refused(capsys, ["decoder", "--config", "./no/such/config.json"], tmp_path)
    # an architecture of the other study's kind is refused
    (tmp_path / "vit.json").write_text(json.dumps({**config, "model_type": "vit"}))
    assert "builds a llama model" in refused(capsys, ["decoder", "--config", str(tmp_path / "vit.json")], tmp_path)


@pytest.mark.parametrize("value", [0, -3, float("nan"), 2.5, True])
def test_collapse_config_refuses_fewer_than_one_whole_direction(value, tmp_path):
    with pytest.raises(ValueError, match=r"msw_num_projections must be at least 1, a whole number .* got "):
        hf_collapse.CollapseConfig(output_dir=str(tmp_path), msw_search="random", msw_num_projections=value)


@pytest.mark.parametrize("value", [0, float("nan"), 2.5, True])
def test_direction_search_refuses_fewer_than_one_whole_direction(value):
    with pytest.raises(ValueError, match="num_projections must be at least 1, a whole number"):
        hf_collapse.DirectionSearch(num_projections=value, mode="random")
