"""The quality benchmark end to end on the real MiniLM (`--quick`: tiny schedule and splits), its resume, and
its refusals of bad input before any training."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.quality import ARMS, StudyError, check_study, get_study, run_study
from benchmarks.quality.__main__ import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "minilm"
    assert main(["minilm", "--quick", "--output", str(out)]) == 0
    return out


def test_quick_study_writes_every_arm_and_the_report(quick_run: Path):
    study = get_study("minilm", quick=True)
    files = sorted(quick_run.glob("*/seed*_k*.json"))
    expected = sum(1 if ARMS[a].full_depth else len(study.ks) for a in study.arms) * len(study.seeds)
    assert len(files) == expected
    for path in files:
        r = json.loads(path.read_text())
        assert r["train_steps"] == study.steps and r["train_batch"] == study.batch_size
        for split in ("test", "ood"):
            acc, n = r[split]["accuracy"], r[split]["rows"]
            assert 0 <= acc <= 1
            if r["arm"] != "vanilla_random":  # a mean over draws carries the mean of the draws' SEs
                assert r[split]["se"] == pytest.approx(math.sqrt(acc * (1 - acc) / n))
        assert r["test"]["rows"] == study.test_rows and r["ood"]["rows"] == study.ood_rows
        if r["k"] > 0 and r["layers"] is not None:
            assert len(r["layers"]) == r["k"] and r["num_layers"] == 6 - r["k"]
        # no counter on this CPU: "not measured" with a reason, never a number
        assert r["energy"]["joules"] is None and r["energy"]["reason"]
    results = (quick_run / "RESULTS.md").read_text()
    assert "| prune_then_finetune |" in results and "Not measured" in results
    assert (quick_run / "plots" / "quality_minilm_test.png").stat().st_size > 1000


def test_measured_selection_keeps_trials_and_costs(quick_run: Path):
    full = json.loads((quick_run / "vanilla_measured" / "seed0_k2.json").read_text())
    cheap = json.loads((quick_run / "vanilla_measured_cheap" / "seed0_k2.json").read_text())
    study = get_study("minilm", quick=True)
    # full greedy: baseline + 6 + 5 candidates, each on all validation rows
    assert full["selection"]["evaluations"] == 1 + 6 + 5 == len(full["trials"])
    assert full["selection"]["forward_passes"] == 12 * study.validation_rows
    assert {t[1][0] for t in full["trials"] if t[0] == 1} == set(range(6))
    # cheap: baseline + 3 + 3 candidates on the subset, plus one Block Influence calibration pass
    assert cheap["selection"]["evaluations"] == 1 + 3 + 3
    assert cheap["selection"]["forward_passes"] == 7 * study.cheap_rows + study.calibration_rows
    # screened: every single-layer cost once on the subset, then greedy over the 3 cheapest
    screened = json.loads((quick_run / "vanilla_measured_screened" / "seed0_k2.json").read_text())
    assert screened["selection"]["evaluations"] == (1 + 6) + (1 + 3 + 3)
    assert screened["selection"]["forward_passes"] == 14 * study.cheap_rows
    k1 = json.loads((quick_run / "vanilla_measured" / "seed0_k1.json").read_text())
    assert k1["layers"] == [full["trials"][i][1][0] for i in range(1, 7) if full["trials"][i][2] == k1["validation"]][:1]


def test_prune_then_heal_spends_the_same_budget(quick_run: Path):
    r = json.loads((quick_run / "prune_then_heal" / "seed0_k1.json").read_text())
    assert r["train_steps"] == get_study("minilm", quick=True).steps and r["heal_steps"] == 2
    assert r["rule"] in {c["method"] for c in r["candidates"]}
    best = max(c["validation"] for c in r["candidates"])
    assert r["validation"] == best


def test_target_arms_remove_what_training_targeted(quick_run: Path):
    study = get_study("minilm", quick=True)
    for name in ("target_fade", "target_fade_msw", "target_fade_distill", "target_msw_heal", "score_fade", "target_fade_late"):
        r = json.loads((quick_run / name / "seed0_k1.json").read_text())
        start = r["schedule"][0]
        assert start["event"] == "targets" and start["targets"] == r["layers"] and len(r["layers"]) == 1
        assert r["train_steps"] == study.steps and r["num_layers"] == 5
        assert r["selection"]["evaluations"] == start["evaluations"] > 0
    # the gradual prune-then-fine-tune: Block Influence of the pretrained model at step 0, one pass over the rows
    score = json.loads((quick_run / "score_fade" / "seed0_k2.json").read_text())
    assert score["schedule"][0]["step"] == 0 and score["schedule"][0]["choice"] == "score"
    assert score["selection"]["forward_passes"] == study.validation_rows
    assert score["selection"]["method"].startswith("block_influence ranking")
    # the late choice: half-way, on every validation row
    late = json.loads((quick_run / "target_fade_late" / "seed0_k2.json").read_text())
    assert late["schedule"][0]["step"] == study.steps // 2
    assert late["selection"]["forward_passes"] == late["selection"]["evaluations"] * study.validation_rows
    heal = json.loads((quick_run / "target_msw_heal" / "seed0_k1.json").read_text())
    assert heal["heal_steps"] == study.heal_steps
    distill = json.loads((quick_run / "target_fade_distill" / "seed0_k1.json").read_text())
    assert distill["teacher_forward_rows"] == (study.steps - distill["schedule"][0]["step"]) * study.batch_size


def test_the_gpu_section_of_results_survives_a_report(quick_run: Path, tmp_path):
    from benchmarks.gpu_recipe import SECTION_BEGIN, SECTION_END
    from benchmarks.quality.report import write_report

    results = tmp_path / "RESULTS.md"
    gpu = f"{SECTION_BEGIN}\nH200 figures\n{SECTION_END}"
    results.write_text(f"stale tables\n\n{gpu}\n")
    write_report([quick_run], results, tmp_path / "plots", str(quick_run))
    text = results.read_text()
    assert text.count(gpu) == 1 and "stale tables" not in text and "| prune_then_finetune |" in text


def test_rerun_resumes_and_a_changed_protocol_is_refused(quick_run: Path, capsys):
    study = get_study("minilm", quick=True)
    before = {p: p.stat().st_mtime_ns for p in quick_run.glob("*/seed*_k*.json")}
    run_study(study, quick_run, log=print)
    assert "0 to run" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in quick_run.glob("*/seed*_k*.json")}

    # a new k reuses the cached shared fine-tune instead of training it again
    assert (quick_run / "cache" / "vanilla-seed0.pt").is_file()
    run_study(dataclasses.replace(study, arms=("vanilla_last_k",), ks=(3,)), quick_run, log=print)
    out = capsys.readouterr().out
    assert "loaded the vanilla fine-tune of seed 0" in out and "fine-tuned vanilla" not in out
    assert json.loads((quick_run / "vanilla_last_k" / "seed0_k3.json").read_text())["layers"] == [2, 3, 4]
    with pytest.raises(StudyError, match="different configuration.*steps"):
        check_study(dataclasses.replace(study, steps=5), quick_run)


def test_a_repair_calibration_set_of_its_own(quick_run: Path, tmp_path):
    """`repair_rows` fits the maps on more (or other) training rows than the scores use; the layers chosen stay the
    same, and the field is part of the protocol once set (unset, older folders still match)."""
    study = dataclasses.replace(get_study("minilm", quick=True), arms=("vanilla_block_influence_scale",), ks=(2,), repair_rows=12)
    assert "repair_rows" not in get_study("minilm", quick=True).protocol() and study.protocol()["repair_rows"] == 12
    with pytest.raises(StudyError, match="different configuration.*repair_rows"):
        check_study(study, quick_run)
    out = tmp_path / "minilm"
    shutil.copytree(quick_run / "cache", out / "cache")  # the shared fine-tune, not trained again
    run_study(study, out, log=print)
    r = json.loads((out / "vanilla_block_influence_scale" / "seed0_k2.json").read_text())
    before = json.loads((quick_run / "vanilla_block_influence_scale" / "seed0_k2.json").read_text())
    assert (r["repair"]["rows"], r["repair"]["forward_passes"]) == (12, 12) != (before["repair"]["rows"], before["repair"]["forward_passes"])
    assert r["repair"]["data"] == f"12 training rows of {study.dataset}"
    assert r["layers"] == before["layers"]  # chosen on the calibration rows, as before


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"arms": ("vanilla", "no_such_arm")}, "unknown arm"), ({"ks": (6,)}, "at least one layer"), ({"ks": (0,)}, "1 to 5")],
)
def test_bad_input_is_refused_before_training(tmp_path, changes, message):
    study = dataclasses.replace(get_study("minilm", quick=True), **changes)
    with pytest.raises(StudyError, match=message):
        run_study(study, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_model_is_refused_before_training(tmp_path):
    study = dataclasses.replace(get_study("minilm", quick=True), model="offline:no-such-model")
    with pytest.raises(StudyError, match="cannot use the model 'offline:no-such-model'"):
        run_study(study, tmp_path / "out")


def test_unknown_study_is_a_clear_error(capsys):
    assert main(["nonesuch", "--quick"]) == 2
    assert "unknown study" in capsys.readouterr().err


def test_paired_differences_match_seed_by_seed_and_render():
    """The paired table subtracts (accuracy) or divides (perplexity) within one seed and k, skips seeds the
    reference lacks, and counts the seeds that favour the arm."""
    from benchmarks.quality.report import _paired_section, paired_differences

    def r(arm, seed, k, test, ood, metric="accuracy"):
        return {"arm": arm, "seed": seed, "k": k, "metric": metric, "test": {metric: test}, "ood": {metric: ood}}

    results = [
        r("prune_then_finetune", 0, 2, 0.70, 0.60), r("prune_then_finetune", 1, 2, 0.80, 0.70),
        r("score_fade", 0, 2, 0.72, 0.59), r("score_fade", 1, 2, 0.81, 0.72), r("score_fade", 2, 2, 0.99, 0.99),
    ]
    assert paired_differences(results, "score_fade", 2, "test") == pytest.approx([0.02, 0.01])
    assert paired_differences(results, "score_fade", 2, "ood") == pytest.approx([-0.01, 0.02])
    assert paired_differences(results, "score_fade", 1, "test") == []
    row = next(line for line in _paired_section(results, ["prune_then_finetune", "score_fade"], [2], "accuracy") if line.startswith("| score_fade"))
    assert row == "| score_fade | +1.5 ± 0.7 (2/2) / +0.5 ± 2.1 (1/2) |"
    ppl = [r("prune_then_finetune", 0, 4, 50.0, 200.0, "perplexity"), r("score_fade", 0, 4, 45.0, 220.0, "perplexity")]
    assert paired_differences(ppl, "score_fade", 4, "test") == pytest.approx([0.9])
    row = next(line for line in _paired_section(ppl, ["score_fade"], [4], "perplexity") if line.startswith("| score_fade"))
    assert row == "| score_fade | ×0.90 (1/1) / ×1.10 (0/1) |"


def test_the_quickstart_is_the_arm_it_claims_to_be():
    """recipes/quickstart.yaml says it is the benchmark's score_fade arm: its target fields are that arm's, and its
    schedule is the MiniLM study's."""
    from hf_collapse.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    text = (root / "recipes" / "quickstart.yaml").read_text()
    assert "`score_fade` arm" in text
    recipe, config, _ = load_recipe(root / "recipes" / "quickstart.yaml")
    for name, value in ARMS["score_fade"].fn.fields.items():
        assert getattr(config, name) == value, name
    study = get_study("minilm")
    assert (config.max_steps, config.per_device_train_batch_size, config.learning_rate, config.warmup_steps) == (
        study.steps, study.batch_size, study.learning_rate, study.warmup_steps)
    assert (recipe.max_length, recipe.max_train_samples, recipe.max_eval_samples) == (
        study.max_length, study.train_rows, study.validation_rows)
    assert config.target_choice_samples == 128 and config.collapse_num_layers == 2


def test_training_free_repair_arms_fit_after_the_choice(quick_run: Path):
    """Each rule's repaired arm removes the layers its plain arm removes, fits the map on the calibration rows of
    training data (one pass, counted in the choice's cost), and MiniLM (post-norm) folds only the scale."""
    study = get_study("minilm", quick=True)
    for rule in ("block_influence", "angular", "msw", "last_k"):
        plain = json.loads((quick_run / f"vanilla_{rule}" / "seed0_k2.json").read_text())
        r = json.loads((quick_run / f"vanilla_{rule}_scale" / "seed0_k2.json").read_text())
        repair = r["repair"]
        assert repair["method"] == "scale" and repair["verified"] and repair["rows"] == study.calibration_rows
        assert repair["data"] == f"{study.calibration_rows} training rows of {study.dataset}"
        assert repair["forward_passes"] == study.calibration_rows
        assert sorted(i for span in repair["spans"] for i in span["removed"]) == r["layers"]
        assert all(s["folded_into"].endswith("output.LayerNorm") for s in repair["spans"])
        assert r["num_layers"] == 4 and r["train_steps"] == study.steps
        assert r["layers"] == plain["layers"]
        assert r["selection"]["forward_passes"] == plain["selection"]["forward_passes"] + study.calibration_rows
    assert "vanilla_block_influence_linear" not in study.arms  # refused by the library for a post-norm encoder


def test_prune_repair_finetune_keeps_the_repair_best_on_validation(quick_run: Path):
    r = json.loads((quick_run / "prune_repair_finetune" / "seed0_k1.json").read_text())
    ptf = json.loads((quick_run / "prune_then_finetune" / "seed0_k1.json").read_text())
    assert r["layers"] == ptf["layers"] and r["train_steps"] == ptf["train_steps"]
    candidates = {c["method"]: c for c in r["repair"]["candidates"]}
    assert set(candidates) == {"none", "scale", "linear", "transport"}
    assert "only repair='scale' folds" in candidates["linear"]["refused"]
    assert r["repair"]["method"] == "scale" and r["repair"]["validation"] == candidates["scale"]["validation"]


def test_prune_then_distill_is_prune_then_finetune_with_a_teacher(quick_run: Path):
    """The same Block Influence cut of the pretrained model and the same budget as prune-then-fine-tune, trained
    with the vanilla full-depth fine-tune as teacher: one teacher row per training row, and its fine-tune counted."""
    study = json.loads((quick_run / "study.json").read_text())["protocol"]
    r = json.loads((quick_run / "prune_then_distill" / "seed0_k1.json").read_text())
    ptf = json.loads((quick_run / "prune_then_finetune" / "seed0_k1.json").read_text())
    assert r["layers"] == ptf["layers"] and r["train_steps"] == ptf["train_steps"] == study["steps"]
    assert r["teacher"] == "vanilla" and r["teacher_training_steps"] == study["steps"]
    assert r["teacher_forward_rows"] == study["steps"] * study["batch_size"]
    assert r["selection"]["forward_passes"] == ptf["selection"]["forward_passes"]


def test_a_pretrained_teacher_is_refused_for_classification():
    from benchmarks.quality.context import Context

    ctx = Context(get_study("minilm", quick=True))
    with pytest.raises(ValueError, match="untrained classification head"):
        ARMS["prune_block_repair_distill_pretrained"].fn(ctx, 0, 1)


def test_healing_variants_share_the_choice_and_budget(quick_run: Path):
    """Distilled and adjacent healing heal exactly what plain prune-then-heal chose, for the same steps; the
    teacher's rows are reported apart, and the adjacent scope trains a fraction of the parameters."""
    study = get_study("minilm", quick=True)
    plain = json.loads((quick_run / "prune_then_heal" / "seed0_k1.json").read_text())
    distill = json.loads((quick_run / "prune_then_heal_distill" / "seed0_k1.json").read_text())
    adjacent = json.loads((quick_run / "prune_then_heal_adjacent" / "seed0_k1.json").read_text())
    for r in (distill, adjacent):
        assert r["layers"] == plain["layers"] and r["candidates"] == plain["candidates"]
        assert r["train_steps"] == plain["train_steps"] and r["heal_steps"] == plain["heal_steps"] == study.heal_steps
    assert distill["teacher_forward_rows"] == study.heal_steps * study.batch_size and adjacent["teacher_forward_rows"] == 0
    assert distill["heal_scope"] == "full" and adjacent["heal_scope"] == "adjacent"
    assert 0 < adjacent["trainable_parameters"] < distill["trainable_parameters"] / 3
    fade = json.loads((quick_run / "score_fade_repair" / "seed0_k1.json").read_text())
    assert fade["layers"] == json.loads((quick_run / "score_fade" / "seed0_k1.json").read_text())["layers"]
    assert fade["repair"]["method"] == "scale" and fade["train_steps"] == study.steps


def test_mixed_repair_rows_take_half_from_a_third_domain():
    """The mixed-calibration arm fits on half the study's own training blocks and half Rotten Tomatoes blocks, packed
    the same way (block length, labels = inputs); a classification study is refused it."""
    from benchmarks.quality.context import Context

    ctx = Context(get_study("smollm2", quick=True, arms=["vanilla_block_influence_linear_mixed"]))
    own, mixed = ctx.repair_calibration, ctx.mixed_repair_calibration()
    half = len(own) // 2
    assert len(mixed) == len(own) >= 2 and mixed.column_names == own.column_names
    assert mixed[: len(own) - half]["input_ids"] == own[: len(own) - half]["input_ids"]
    block = ctx.study.max_length
    for row in mixed.select(range(len(own) - half, len(own))):
        assert len(row["input_ids"]) == block and row["labels"] == row["input_ids"]
        assert row["input_ids"] not in own["input_ids"]
    text = ctx.processor.decode(mixed[len(mixed) - 1]["input_ids"])
    assert "Shakespeare" not in text and ctx.processor.eos_token in text  # snippets, one per eos
    assert ctx.mixed_repair_source == (f"the train split of {ctx.study.dataset} ({len(own) - half} rows) and the train "
                                       f"split of offline:rotten_tomatoes ({half} rows)")
    minilm = Context(get_study("minilm", quick=True))
    with pytest.raises(ValueError, match="causal-LM studies"):
        minilm.mixed_repair_calibration()


def test_the_target_repair_arm_is_a_valid_recipe(tmp_path):
    """The trainer arm of prune, repair, fine-tune: its fields pass CollapseConfig's checks as a recipe's would, with
    the immediate cut and layer 0 protected."""
    import hf_collapse

    fields = ARMS["target_repair"].fn.fields
    config = hf_collapse.CollapseConfig(output_dir=str(tmp_path), collapse_num_layers=8, **fields)
    assert (config.target_repair, config.fade_steps, config.target_choice_steps) == ("linear", 1, 0.0)
    assert config.collapse_protect_first == 1 and ARMS["target_repair"].family == "ours"


def test_the_report_has_the_training_free_retention_table(quick_run: Path):
    text = (quick_run / "RESULTS.md").read_text()
    assert "### Training-free: retention of the full model's score per rule and repair" in text
    assert "| rule | none | scale | linear | transport |" in text
    assert "accuracy / full-depth accuracy" in text


def test_retention_and_the_highlighted_arms():
    from benchmarks.quality.report import highlighted, repair_retention_section, retention

    def e(arm, k, test, ood, family="post-hoc", metric="perplexity"):
        return {"arm": arm, "k": k, "metric": metric, "family": family, "seeds": [0],
                "test": {"mean": test, "std": 0.0}, "ood": {"mean": ood, "std": 0.0}}

    table = {
        ("vanilla", 0): e("vanilla", 0, 20.0, 100.0, "reference"),
        ("vanilla_angular", 4): e("vanilla_angular", 4, 40.0, 400.0),
        ("vanilla_angular_linear", 4): e("vanilla_angular_linear", 4, 25.0, 500.0),
        ("score_fade", 4): e("score_fade", 4, 30.0, 150.0, "ours"),
        ("prune_then_heal", 4): e("prune_then_heal", 4, 35.0, 150.0, "baseline"),
        ("prune_then_heal_distill", 4): e("prune_then_heal_distill", 4, 28.0, 150.0, "baseline"),
        ("prune_then_finetune", 4): e("prune_then_finetune", 4, 33.0, 150.0, "baseline"),
    }
    assert retention(table[("vanilla_angular_linear", 4)], table[("vanilla", 0)], "test") == pytest.approx(0.8)
    assert retention(table[("vanilla_angular_linear", 4)], table[("vanilla", 0)], "ood") == pytest.approx(0.2)
    lines = repair_retention_section(table, [4], "perplexity")
    assert "| angular | 50.0 % / 25.0 % | — | 80.0 % / 20.0 % | — |" in lines
    assert any("full-depth perplexity / pruned perplexity" in line for line in lines)
    best = highlighted(table, [a for a, _ in table], [4], "perplexity")
    assert best == {"post-hoc": "vanilla_angular_linear", "ours": "score_fade",
                    "prune-then-heal": "prune_then_heal_distill", "prune-then-fine-tune": "prune_then_finetune"}
    accuracy = {("vanilla", 0): e("vanilla", 0, 0.8, 0.6, "reference", "accuracy"),
                ("vanilla_msw_scale", 1): e("vanilla_msw_scale", 1, 0.6, 0.3, metric="accuracy")}
    assert retention(accuracy[("vanilla_msw_scale", 1)], accuracy[("vanilla", 0)], "test") == pytest.approx(0.75)


def bare_context(monkeypatch, num_layers: int):
    """A Context with only what `report` and `forget` read (no data, no model); the "test metric" of a model is its
    layer count and parameter count, so a report shows which model it was computed on."""
    from types import SimpleNamespace

    from benchmarks.quality import context

    ctx = context.Context.__new__(context.Context)
    ctx._models, ctx._scores, ctx._greedy, ctx._reports, ctx._validations = {}, {}, {}, {}, {}
    ctx.num_layers, ctx.test, ctx.ood, ctx.device = num_layers, [0] * 3, [0] * 2, "cpu"
    ctx.study = SimpleNamespace(batch_size=4)
    ctx.split_result = lambda model, split: {"layers": model.config.num_hidden_layers, "size": model.num_parameters()}
    monkeypatch.setattr(context, "measure_energy", lambda run, rows, device: (run(), SimpleNamespace(to_dict=dict)))
    return ctx


def test_the_report_cache_keeps_apart_models_that_lack_other_layers(monkeypatch):
    """Two ks of one training-free repair arm: each arm model already lacks its k layers and is reported with none
    deleted now. Keyed by a string without the removed layers (before 85f44c0), k = 2 got k = 1's figures."""
    from tiny_models import TINY_MODELS

    import hf_collapse
    from benchmarks.quality import ModelKey
    from benchmarks.quality.arms import collapsed_result

    ctx = bare_context(monkeypatch, num_layers=4)
    full = TINY_MODELS["bert"].build()
    reports = {}
    for seed in (0, 1):
        for layers in ([1], [1, 2]):
            model = TINY_MODELS["bert"].build()
            hf_collapse.collapse_layers(model, layers)
            out = collapsed_result(ctx, ModelKey("vanilla/msw+scale", seed), model, layers, train_steps=5)
            reports[seed, len(layers)] = out
            assert out["test"] == {"layers": 4 - len(layers), "size": model.num_parameters()}
            assert out["layers"] == layers and out["num_layers"] == 4 - len(layers) and out["train_steps"] == 5
    assert reports[0, 1]["parameters"] > reports[0, 2]["parameters"] and full.num_parameters() > reports[0, 1]["parameters"]
    assert set(ctx._reports) == {(ModelKey("vanilla/msw+scale", s, layers), ()) for s in (0, 1) for layers in ((1,), (1, 2))}

    # the fields of the key, not a string made of them: sorted layers, and another seed is another model
    assert ModelKey("m", 0).without([2, 1]) == ModelKey("m", 0, (1, 2)) == ModelKey("m", 0, [2, 1]).without([])
    assert ModelKey("m", 0, (1, 2)) != ModelKey("m", 1, (1, 2)) and ModelKey("m", 0, (1,)).without([2]).removed == (1, 2)
    with pytest.raises(TypeError, match="report keys are ModelKey"):
        ctx.report("vanilla/0", full, [1])
    # a seed's reports go when the runner moves on (string keys ending in "/without[1]" never did)
    ctx.forget(0)
    assert {key[0].seed for key in ctx._reports} == {1} and len(ctx._reports) == 2


def test_a_report_without_records_keeps_the_published_study_sections(tmp_path):
    """A new checkout has no per-run records of a study run in an earlier one: the report keeps what was published
    instead of dropping the study's tables (and still carries the owned sections once)."""
    from benchmarks.gpu_recipe import SECTION_BEGIN, SECTION_END
    from benchmarks.quality.report import write_report

    minilm = "## minilm: offline:all-MiniLM-L6-v2 on offline:rotten_tomatoes\n\n### k = 2\n\n| arm | test |\n|---|---:|\n| x | 0.8 |\n"
    smollm2 = "## smollm2: offline:SmolLM2-135M-Instruct on offline:shakespeare\n\n| arm | ppl |\n|---|---:|\n| y | 38.8 |\n"
    gpu = f"{SECTION_BEGIN}\nH200 figures\n{SECTION_END}"
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# Quality benchmark results\n\nold header\n\n{minilm}\n{smollm2}\n{gpu}\n")
    write_report([tmp_path / "records" / "minilm", tmp_path / "records" / "smollm2"], results, tmp_path / "plots", "records")
    text = results.read_text()
    assert minilm in text and smollm2 in text and text.count(gpu) == 1
    assert text.index(minilm) < text.index(smollm2) < text.index(gpu) and "old header" not in text


def test_the_contiguous_repaired_block_is_the_libraries_block_choice():
    """vanilla_contiguous_linear's choice is hf_collapse's `block` strategy: every block of k consecutive layers after
    layer 0, each with its linear map (one calibration pass for all), measured on validation with the map applied by
    hooks; the best block is removed from a copy and its map folded, and that copy measures what its trial measured.
    The trained arm takes the same choice on the pretrained model, then fine-tunes the cut, folded model."""
    from benchmarks.quality.arms import prune_block_repair_finetune
    from benchmarks.quality.context import Context, ModelKey

    study = dataclasses.replace(get_study("smollm2", quick=True, arms=["vanilla_contiguous_linear"]), repair_rows=24)
    ctx = Context(study)
    model, k = ctx.pretrained(0), ctx.num_layers - 3
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    repaired, record, selection = ctx.block_repaired(ModelKey("pretrained", 0), model, k, "linear")
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # a copy was cut
    assert [trial[1] for trial in selection.trials] == [list(range(a, a + k)) for a in (1, 2, 3)]
    assert selection.validation == min(trial[2] for trial in selection.trials)
    assert selection.layers == next(t[1] for t in selection.trials if t[2] == selection.validation)
    assert selection.forward_passes == 24 + 3 * len(ctx.validation) and selection.evaluations == 3
    plain = ctx.validation_metric(model, selection.layers)
    assert selection.validation != pytest.approx(plain, rel=1e-3)  # the map was applied
    assert record["verified"] and record["rows"] == 24 and record["forward_passes"] == 24
    assert repaired.config.num_hidden_layers == 3
    assert ctx.metric(repaired, ctx.validation) == pytest.approx(selection.validation, rel=1e-4)
    assert ARMS["vanilla_contiguous_linear"].family == "post-hoc"

    trained = prune_block_repair_finetune(ctx, 0, k)  # the same choice on a fresh pretrained copy, then the fine-tune
    assert trained["layers"] == selection.layers and trained["num_layers"] == 3
    assert trained["train_steps"] == study.steps and trained["repair"]["verified"]
    assert trained["test"]["perplexity"] != pytest.approx(
        ctx.metric(repaired, ctx.test), rel=1e-3)  # it trained after the fold
    assert ARMS["prune_block_repair_finetune"].family == "baseline"
    bare = ARMS["prune_block_finetune_unrepaired"].fn(ctx, 0, k)  # the same layers, removed without the map
    assert bare["layers"] == selection.layers and bare["repair"]["folded"] is False
    assert "map left out" in bare["selection"]["method"] and bare["train_steps"] == study.steps
    assert bare["test"]["perplexity"] != pytest.approx(trained["test"]["perplexity"], rel=1e-4)

    mixed = ARMS["prune_block_repair_mixed_finetune"].fn(ctx, 0, k)  # every run's map fitted on the mixed rows
    assert mixed["repair"]["data"] == ctx.mixed_repair_source and mixed["repair"]["rows"] == 24
    assert ctx.mixed_repair_source in mixed["selection"]["method"] and len(mixed["trials"]) == 3
    assert [t[1] for t in mixed["trials"]] == [t[1] for t in selection.trials]
    assert [t[2] for t in mixed["trials"]] != pytest.approx([t[2] for t in selection.trials], rel=1e-4)

    distilled = ARMS["prune_block_repair_distill_pretrained"].fn(ctx, 0, k)  # the same cut, the pretrained teacher
    assert distilled["layers"] == selection.layers and distilled["teacher"] == "pretrained"
    assert distilled["teacher_forward_rows"] == study.steps * study.batch_size and distilled["teacher_training_steps"] == 0
    assert distilled["test"]["perplexity"] != pytest.approx(trained["test"]["perplexity"], rel=1e-4)

    # the recipe path (target_choice: block): the same runs, measured by the trainer's choice-row loss with their maps
    recipe = ARMS["target_block_repair"].fn(ctx, 0, k)
    curve = recipe["target_repair"]["candidates"]
    assert [run for run, _ in curve] == [list(range(a, a + k)) for a in (1, 2, 3)]
    assert recipe["layers"] == min(curve, key=lambda c: c[1])[0] and recipe["num_layers"] == 3
    rows = min(128, len(ctx.validation))
    assert recipe["selection"]["forward_passes"] == 3 * rows + recipe["target_repair"]["rows"]
    assert recipe["schedule"][0]["choice"] == "block" and ARMS["target_block_repair"].family == "ours"

    # its mixed-domain twin (the trainer's repair_dataset, what repair_dataset_name gives a recipe) is the mixed arm
    recipe_mixed = ARMS["target_block_repair_mixed"].fn(ctx, 0, k)
    fitted = recipe_mixed["target_repair"]
    assert fitted["data"] == ctx.mixed_repair_source and fitted["rows"] == 24 and fitted["folded"]
    assert [run for run, _ in fitted["candidates"]] == [t[1] for t in mixed["trials"]]
    assert [math.exp(loss) for _, loss in fitted["candidates"]] == pytest.approx([t[2] for t in mixed["trials"]], rel=1e-4)
    assert recipe_mixed["layers"] == mixed["layers"]
    assert recipe_mixed["test"]["perplexity"] == pytest.approx(mixed["test"]["perplexity"], rel=1e-4)
    assert recipe_mixed["ood"]["perplexity"] == pytest.approx(mixed["ood"]["perplexity"], rel=1e-4)
