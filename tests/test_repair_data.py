"""The rows a repair is fitted on, apart from the rows that score the layers (issue 20): `repair_calibration` on
`collapse_model`, `repair_dataset` on the trainer, and the recipes' `repair_dataset_name` / `repair_mix` that mix a
second dataset's text into them (the measured lever against a map that fits its own domain only)."""

import copy
import json

import pytest
import torch
from test_heal import tiny_recipe
from test_repair import LLAMA, calibration, logits, unchanged
from test_target_repair import ROWS, repair_config, trained
from test_target_repair import trained_state  # noqa: F401  (the module fixture)
from test_trainer import lm_dataset

from hf_collapse import CollapseTrainer, collapse_model
from hf_collapse.repair import fit_repair, repaired_reference


def test_the_repair_is_fitted_on_its_own_rows_and_the_scores_on_the_calibration():
    scoring, fitting, probe = calibration(seed=0), calibration(seed=1), LLAMA.inputs()
    original = LLAMA.build()
    plan = fit_repair(original, [1, 2], fitting, "linear")
    with repaired_reference(original, plan, [1, 2]):
        expected = logits(original, probe)
    model, report = collapse_model(LLAMA.build(), layers=[1, 2], calibration=scoring, repair_calibration=fitting,
                                   repair="linear", score_method="block_influence", calibration_source="the other rows")
    assert torch.allclose(logits(model, probe), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # the same cut fitted on the scoring rows is another model: the fit did read repair_calibration
    own, own_report = collapse_model(LLAMA.build(), layers=[1, 2], calibration=scoring, repair="linear",
                                     score_method="block_influence")
    assert not torch.allclose(logits(own, probe), expected, atol=1e-4)
    # the scores are the scoring rows' (the card's per-layer column), not the repair rows'
    assert report.scores == own_report.scores
    assert report.repair["data"] == "the other rows" and report.repair["rows"] == 16


def test_the_block_strategy_fits_every_run_on_the_repair_rows():
    scoring, fitting = calibration(seed=0), calibration(seed=1)
    validation = calibration(rows=8, seed=2)

    def choose_on(model):  # lower is better: the mean next-token loss on rows that neither scored nor fitted
        with torch.no_grad():
            return sum(float(model(**b, labels=b["input_ids"]).loss) for b in validation) / len(validation)

    runs = {}
    for fit_rows in (fitting, scoring):
        model, report = collapse_model(LLAMA.build(), num_layers=2, strategy="block", calibration=scoring,
                                       repair_calibration=fit_rows if fit_rows is fitting else None, repair="linear",
                                       repair_check=False, score_method="block_influence", choose_on=choose_on,
                                       higher_is_better=False)
        runs[fit_rows is fitting] = report
    # each run's figure is measured with the map fitted on the rows given: they differ between the two fits
    mixed, own = runs[True].selection_curve, runs[False].selection_curve
    assert [run for run, _ in mixed] == [run for run, _ in own] == [[1, 2], [2, 3]]
    assert all(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(mixed, own))
    # and the best run's folded map is the one fitted on repair_calibration
    best = min(mixed, key=lambda item: item[1])[0]
    original = LLAMA.build()
    plan = fit_repair(original, best, fitting, "linear")
    with repaired_reference(original, plan, best):
        expected = logits(original, LLAMA.inputs())
    model = collapse_model(LLAMA.build(), layers=best, calibration=scoring, repair_calibration=fitting, repair="linear")[0]
    assert torch.allclose(logits(model, LLAMA.inputs()), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(repair="none", repair_calibration=calibration()), r"repair_calibration= is the data a repair is fitted on"),
    (dict(repair="linear", repair_calibration=iter(calibration())), r"reads repair_calibration after the scoring pass"),
], ids=["no repair", "one-shot iterator"])
def test_repair_calibration_refusals_leave_the_model_unchanged(kwargs, pattern):
    model = LLAMA.build()
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match=pattern):
        collapse_model(model, layers=[1, 2], calibration=calibration(), **kwargs)
    assert unchanged(model, reference)


# ------------------------------------------------------------------------------------------ the trainer

def test_target_repair_is_fitted_on_the_trainers_repair_dataset(tmp_path, trained_state):  # noqa: F811
    train, other = lm_dataset(ROWS, seed=0), lm_dataset(ROWS, seed=5)
    frozen = dict(learning_rate=0.0, max_steps=1)  # the fold at step 0 is all that changes the weights
    trainer = CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "t", **frozen), train_dataset=train,
                              eval_dataset=train.select(range(8)), repair_dataset=other, repair_source="16 rows of elsewhere")
    trainer.train()
    record = trainer.training_record().repair
    assert record["data"] == "16 rows of elsewhere" and record["rows"] == ROWS
    site = "model.layers.1.mlp.down_proj.weight"
    got = dict(trainer.model.named_parameters())[site]
    for rows, same in ((other, True), (train, False)):
        reference = trained(trained_state)
        batches = [{k: torch.tensor(v) for k, v in rows[i:i + 8].items() if k != "labels"} for i in (0, 8)]
        fit_repair(reference, [2], batches, "linear").fold(reference)
        assert torch.allclose(dict(reference.named_parameters())[site], got, rtol=1e-4, atol=1e-5) == same


def test_the_trainer_refuses_a_repair_dataset_it_would_not_read_or_could_not_feed(tmp_path, trained_state):  # noqa: F811
    import datasets

    data = lm_dataset(ROWS)
    eval_rows = data.select(range(8))
    with pytest.raises(ValueError, match="this run has no target_repair"):
        CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "a", target_repair="none"),
                        train_dataset=data, eval_dataset=eval_rows, repair_dataset=data)
    text = datasets.Dataset.from_dict({"text": ["to be or not to be"] * 4})
    with pytest.raises(ValueError, match=r"repair_dataset has none of the columns LlamaForCausalLM takes \(it has text\)"):
        CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "b"), train_dataset=data,
                        eval_dataset=eval_rows, repair_dataset=text)
    with pytest.raises(ValueError, match="non-empty map-style dataset"):
        CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "c"), train_dataset=data,
                        eval_dataset=eval_rows, repair_dataset=data.select([]))
    # an iterable training set is fine when the repair has rows of its own
    CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "d"), train_dataset=data.to_iterable_dataset(),
                    eval_dataset=eval_rows, repair_dataset=data)


# ------------------------------------------------------------------------------------------ recipes

def _recipe(tmp_path, extra: str):
    from hf_collapse.recipe import load_recipe

    return load_recipe(tiny_recipe(tmp_path, extra))


def test_repair_rows_mix_the_first_training_rows_with_the_second_datasets_blocks(tmp_path):
    from transformers import AutoTokenizer

    from hf_collapse.data import load_task_data, repair_rows

    recipe, _, _ = _recipe(tmp_path, "collapse_layers: [1]\ntarget_choice: post_hoc\ncollapse_repair: linear\n"
                                     "repair_dataset_name: offline:rotten_tomatoes\nrepair_mix: 0.25\n")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "src")
    own = load_task_data(recipe, tokenizer).train
    rows, source = repair_rows(recipe, tokenizer, own, 8)
    assert len(rows) == 8 and rows[:6]["input_ids"] == own[:6]["input_ids"]
    snippets = load_task_data(recipe.__class__(model_name_or_path=str(tmp_path / "src"), task="causal-lm",
                                               dataset_name="offline:rotten_tomatoes", max_length=32), tokenizer).train
    assert rows[6:]["input_ids"] == snippets[:2]["input_ids"]
    assert all(len(ids) == 32 for ids in rows["input_ids"])
    assert source == "the train split of train.txt (6 rows) and the train split of offline:rotten_tomatoes (2 rows)"
    whole, source = repair_rows(recipe.__class__(**{**vars(recipe), "repair_mix": 1.0}), tokenizer, own, 4)
    assert whole["input_ids"] == snippets[:4]["input_ids"] and source == "the train split of offline:rotten_tomatoes (4 rows)"
    with pytest.raises(ValueError, match=r"gave \d+ blocks of 32 tokens from its validation split, and repair_mix 0.25 of "
                                         r"100000 repair rows needs 25000: lower repair_mix"):
        repair_rows(recipe.__class__(**{**vars(recipe), "repair_dataset_split": "validation"}), tokenizer, own, 100000)


def test_a_recipe_fits_its_repair_on_the_mixed_rows_and_the_card_names_both(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_collapse.pipeline import run_recipe

    recipe, config_, resolved = _recipe(
        tmp_path, "collapse_layers: [1, 2]\ntarget_choice: post_hoc\ncollapse_repair: linear\ncollapse_repair_check: false\n"
        "repair_dataset_name: offline:rotten_tomatoes\n")
    summary = run_recipe(recipe, config_, resolved, log=lambda text: None)
    assert summary.removed == [1, 2]
    report = json.loads((tmp_path / "out" / "collapse_report.json").read_text())["report"]
    repair = report["repair"]
    assert repair["rows"] == 8 and repair["tokens"] == 8 * 32
    assert repair["data"] == "the train split of train.txt (4 rows) and the train split of offline:rotten_tomatoes (4 rows)"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Repair at the cut" in card
    assert ("over 8 calibration rows (256 tokens) of the train split of train.txt (4 rows) and the train split of "
            "offline:rotten_tomatoes (4 rows)") in card
    assert report["recipe"]["repair_dataset_name"] == "offline:rotten_tomatoes"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


def test_a_recipe_whose_repair_data_is_too_short_fails_before_training(tmp_path):
    from hf_collapse.pipeline import run_recipe

    recipe, config_, resolved = _recipe(
        tmp_path, "collapse_layers: [1, 2]\ntarget_choice: post_hoc\ncollapse_repair: linear\n"
        "repair_dataset_name: offline:rotten_tomatoes\nrepair_dataset_split: validation\nrepair_mix: 1\n")
    stages = []
    with pytest.raises(ValueError, match=r"from its validation split, and repair_mix 1.0 of 100000 repair rows needs 100000"):
        run_recipe(recipe.__class__(**{**vars(recipe), "calibration_samples": 100000}), config_, resolved, log=stages.append)
    assert not any("fine-tuning" in line for line in stages) and not (tmp_path / "out").exists()


def test_a_recipe_fits_target_repair_on_the_mixed_rows(tmp_path):
    from hf_collapse.pipeline import run_recipe

    extra = ("collapse_num_layers: 1\ntarget_choice: score\ntarget_score: block_influence\ntarget_choice_steps: 0\n"
             "fade_steps: 1\ncollapse_protect_first: 1\ntarget_repair: linear\ntarget_repair_samples: 8\n"
             "repair_dataset_name: offline:rotten_tomatoes\nrepair_mix: 0.5\n")
    recipe, config_, resolved = _recipe(tmp_path, extra)
    run_recipe(recipe, config_, resolved, log=lambda text: None)
    repair = json.loads((tmp_path / "out" / "collapse_report.json").read_text())["report"]["repair"]
    assert repair["step"] == 0 and repair["rows"] == 8
    assert repair["data"] == "the train split of train.txt (4 rows) and the train split of offline:rotten_tomatoes (4 rows)"
    assert repair["folded"]  # this seed's tiny model keeps the map (the check of the unfolded card is in test_target_repair)
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("over 8 rows (256 tokens): the train split of train.txt (4 rows) and the train split of "
            "offline:rotten_tomatoes (4 rows). It maps") in card


@pytest.mark.parametrize("extra,pattern", [
    ("collapse_layers: [1]\ntarget_choice: post_hoc\nrepair_dataset_name: offline:rotten_tomatoes\n",
     r"repair_dataset_name: offline:rotten_tomatoes gives rows to fit a repair on, and the recipe asks for none"),
    ("collapse_layers: [1]\ntarget_choice: post_hoc\ncollapse_repair: linear\nrepair_dataset_name: offline:rotten_tomatoes\n"
     "repair_mix: 0\n", r"repair_mix is the share .* above 0 and at most 1, got 0.0"),
    ("collapse_layers: [1]\ntarget_choice: post_hoc\ncollapse_repair: linear\nrepair_dataset_name: offline:wikitext\n",
     r"unknown offline dataset 'offline:wikitext' in repair_dataset_name"),
    ("collapse_layers: [1]\ntarget_choice: post_hoc\ncollapse_repair: linear\nrepair_dataset_config: en\n",
     r"repair_dataset_config says how repair_dataset_name is read, and repair_dataset_name is not set"),
    ("collapse_layers: [1]\ntarget_choice: post_hoc\ncollapse_repair: linear\nrepair_mix: 0.25\n",
     r"repair_mix says how repair_dataset_name is read, and repair_dataset_name is not set"),
], ids=["no repair", "no share", "unknown offline", "config alone", "share alone"])
def test_recipes_refuse_repair_data_that_cannot_act(tmp_path, extra, pattern):
    from hf_collapse.recipe import RecipeError

    with pytest.raises(RecipeError, match=pattern):
        _recipe(tmp_path, extra)
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_repair_data_is_refused_outside_causal_lm():
    from hf_collapse.recipe import RecipeArguments, RecipeError

    with pytest.raises(RecipeError, match=r"mixes blocks of a second dataset's text into the repair rows of a causal-lm "
                                          r"recipe, and this recipe's task is text-classification"):
        RecipeArguments(model_name_or_path="offline:all-MiniLM-L6-v2", dataset_name="offline:rotten_tomatoes",
                        collapse_repair="scale", repair_dataset_name="offline:shakespeare")


def test_cli_collapse_fits_the_repair_on_rows_half_from_the_repair_data(tmp_path, capsys):
    from test_repair import main
    from tiny_models import write_lm_source

    write_lm_source(tmp_path)
    out = tmp_path / "out"
    code = main(["collapse", str(tmp_path / "src"), str(out), "--layers", "1,2", "--repair", "linear", "--data",
                 str(tmp_path / "train.txt"), "--repair-data", "offline:rotten_tomatoes", "--task", "causal-lm",
                 "--max_length", "32", "--calibration_samples", "8", "--latency_repeats", "0", "--use_cpu", "true",
                 "--max_eval_samples", "8", "--per_device_eval_batch_size", "4", "--collapse_repair_check", "false"])
    assert code == 0, capsys.readouterr().err[-2000:]
    repair = json.loads((out / "collapse_report.json").read_text())["report"]["repair"]
    assert repair["data"] == "the train split of train.txt (4 rows) and the train split of offline:rotten_tomatoes (4 rows)"
    # without --repair the flag has nothing to act on: refused, nothing written
    assert main(["collapse", str(tmp_path / "src"), str(tmp_path / "none"), "--num-layers", "1", "--data",
                 str(tmp_path / "train.txt"), "--repair-data", "offline:rotten_tomatoes"]) != 0
    assert "--repair-data offline:rotten_tomatoes gives rows to fit a repair on: add --repair" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
