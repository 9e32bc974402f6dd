"""Prune, repair, fine-tune (`target_repair`, issue 20): the repair of the targets' cut fitted on training rows at the
target choice, folded into the weights, the targets bypassed from that step, and what the report and card say."""

import copy
import json

import peft
import pytest
import torch
from test_heal import tiny_recipe
from test_trainer import config, lm_dataset, tiny_bert, tiny_llama

from hf_collapse import CollapseTrainer, collapse_layers
from hf_collapse.repair import fit_repair

SGD = dict(optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, learning_rate=0.1,
           per_device_train_batch_size=16, per_device_eval_batch_size=8)
ROWS = 16


@pytest.fixture(scope="module")
def trained_state(tmp_path_factory):
    """A tiny 4-layer Llama that memorised its training rows: removing a layer costs loss, so a repair has work."""
    from transformers import Trainer

    model = tiny_llama(layers=4)
    args = config(tmp_path_factory.mktemp("pretrain"), max_steps=40, learning_rate=1e-2, per_device_train_batch_size=8)
    Trainer(model=model, args=args, train_dataset=lm_dataset(ROWS)).train()
    return copy.deepcopy(model.state_dict())


def trained(state):
    model = tiny_llama(layers=4)
    model.load_state_dict(state)
    return model


def repair_config(tmp_path, **fields):
    defaults = dict(max_steps=3, collapse_layers=[2], target_choice_steps=0, fade_steps=1, msw_weight=0.0,
                    msw_adaptive=False, target_repair="linear", target_repair_samples=ROWS, **SGD)
    return config(tmp_path, **{**defaults, **fields})


def test_prune_repair_finetune_equals_repairing_the_cut_then_training_the_collapsed_model(tmp_path, trained_state):
    data = lm_dataset(ROWS)
    model = trained(trained_state)
    trainer = CollapseTrainer(model=model, args=repair_config(tmp_path / "t"), train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    record = trainer.training_record()
    assert record.repair["method"] == "linear" and record.repair["step"] == 0 and record.repair["folded"] is True
    assert record.repair["rows"] == ROWS and record.repair["tokens"] == ROWS * 12 and record.repair["verified"] is True
    assert record.repair["validation"]["repaired"] < record.repair["validation"]["unrepaired"]
    assert record.fade_window == (0, 0) and trainer.fade_alpha() == 0.0
    (span,) = record.repair["spans"]
    assert span["removed"] == [2] and span["folded_into"] == "model.layers.1.mlp.down_proj"
    assert span["error_after"] < span["error_before"]

    # the reference: the same map fitted on the same rows, folded, the layer removed, then the same three SGD steps
    reference = trained(trained_state)
    batches = [{k: torch.tensor(v) for k, v in data[i:i + 8].items() if k != "labels"} for i in (0, 8)]
    fit_repair(reference, [2], batches, "linear").fold(reference)
    collapse_layers(reference, [2])
    CollapseTrainer(model=reference, args=config(tmp_path / "r", max_steps=3, msw_weight=0.0, **SGD), train_dataset=data).train()
    collapse_layers(model, trainer.collapse_targets)
    got = dict(model.named_parameters())
    assert got.keys() == dict(reference.named_parameters()).keys()
    for name, weight in reference.named_parameters():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5)
    # and the repair mattered: without it the same training ends elsewhere
    plain = trained(trained_state)
    collapse_layers(plain, [2])
    CollapseTrainer(model=plain, args=config(tmp_path / "p", max_steps=3, msw_weight=0.0, **SGD), train_dataset=data).train()
    site = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(dict(plain.named_parameters())[site], got[site], atol=1e-3)


def test_the_repair_at_the_choice_survives_a_resume(tmp_path, trained_state):
    data = lm_dataset(ROWS)
    args = repair_config(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    whole = CollapseTrainer(model=trained(trained_state), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    whole.train()
    resumed = CollapseTrainer(model=trained(trained_state), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.training_record().repair == whole.training_record().repair
    assert resumed.training_record().repair["step"] == 0
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(fade_steps=0.5), "set fade_steps: 1"),
        (dict(fade_steps=0), "set fade_steps: 1"),
        (dict(collapse_layers=None, fade_steps=0, collapse_num_layers=None), "repairs the cut of targeted layers"),
        (dict(collapse_layers=[0]), "layer 0 could be targeted"),
        (dict(collapse_layers=None, collapse_num_layers=1, target_choice="score"), "set collapse_protect_first: 1"),
        (dict(target_repair="cubic"), "target_repair must be one of none, scale, linear, transport"),
        (dict(target_repair_samples=0), "target_repair_samples must be at least 1"),
    ],
    ids=["gradual fade", "no fade", "no target", "layer 0 given", "layer 0 choosable", "unknown", "no rows"],
)
def test_target_repair_settings_that_cannot_act_are_refused_by_the_config(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        repair_config(tmp_path, **fields)


def test_target_repair_is_refused_before_training_where_it_cannot_fold(tmp_path, trained_state):
    data = lm_dataset(ROWS)
    eval_rows = data.select(range(8))
    # a post-norm encoder folds only a per-channel scale
    with pytest.raises(ValueError, match="only repair='scale' folds there"):
        CollapseTrainer(model=tiny_bert(layers=4), args=repair_config(tmp_path / "b"), train_dataset=data, eval_dataset=eval_rows)
    # LoRA adapters: exact only while they are zero, at a step-0 choice
    lora = peft.get_peft_model(trained(trained_state), peft.LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    with pytest.raises(ValueError, match="set target_choice_steps: 0"):
        CollapseTrainer(model=lora, args=repair_config(tmp_path / "l", target_choice_steps=1), train_dataset=data,
                        eval_dataset=eval_rows)
    with pytest.raises(ValueError, match="choice rows score the repaired cut no worse than the unrepaired one: pass eval_dataset"):
        CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "e"), train_dataset=data)
    with pytest.raises(ValueError, match="map-style dataset"):
        CollapseTrainer(model=trained(trained_state), args=repair_config(tmp_path / "i"), train_dataset=data.to_iterable_dataset(),
                        eval_dataset=eval_rows)
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "blei")


def test_lora_prune_repair_finetune_folds_into_the_base_weights_at_step_0(tmp_path, trained_state):
    data = lm_dataset(ROWS)
    model = peft.get_peft_model(trained(trained_state), peft.LoraConfig(r=4, target_modules=["down_proj", "q_proj"]))
    base = model.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight.detach().clone()
    trainer = CollapseTrainer(model=model, args=repair_config(tmp_path, max_steps=2), train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    assert trainer.training_record().repair["folded"] is True
    folded = model.get_base_model().model.layers[1].mlp.down_proj.base_layer.weight
    assert not torch.allclose(folded, base)  # the map went into the frozen base weight, not an adapter


# ------------------------------------------------------------------------------------------ recipes

PRUNE_REPAIR = ("collapse_num_layers: 1\ntarget_choice: score\ntarget_score: block_influence\ntarget_choice_steps: 0\n"
                "fade_steps: 1\ncollapse_protect_first: 1\ntarget_repair: linear\ntarget_repair_samples: 8\n")


def test_a_recipe_runs_prune_repair_finetune_and_the_card_says_when_the_map_was_fitted(tmp_path):
    from hf_collapse.pipeline import run_recipe
    from hf_collapse.recipe import load_recipe

    recipe, config_, resolved = load_recipe(tiny_recipe(tmp_path, PRUNE_REPAIR))
    summary = run_recipe(recipe, config_, resolved, log=lambda text: None)
    report = json.loads((tmp_path / "out" / "collapse_report.json").read_text())["report"]
    repair = report["repair"]
    assert repair["method"] == "linear" and repair["step"] == 0 and repair["rows"] == 8
    assert [span["removed"] for span in repair["spans"]] == [summary.removed]
    card = (tmp_path / "out" / "README.md").read_text()
    if repair["folded"]:
        assert "## Repair at the cut" in card and "At training step 0, when the layers to remove were chosen" in card
        assert "prune, repair, fine-tune" in card
        assert "the repair folded at step 0 is in them, fine-tuned since" in card and "except the" not in card
    else:
        assert "was fitted at training step 0 and not folded" in card
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.num_hidden_layers == 3


def test_a_recipe_that_repairs_after_a_fade_is_pointed_to_target_repair(tmp_path):
    from hf_collapse.recipe import RecipeError, load_recipe

    extra = PRUNE_REPAIR.replace("target_repair: linear\ntarget_repair_samples: 8\n", "collapse_repair: linear\n")
    with pytest.raises(RecipeError, match="use target_repair: linear with fade_steps: 1 and collapse_repair: none"):
        load_recipe(tiny_recipe(tmp_path, extra))


def test_the_block_choice_targets_the_best_run_and_folds_the_map_it_was_measured_with(tmp_path, trained_state):
    """target_choice: block at step 0 with a repair: every run of consecutive allowed layers (layer 0 protected) gets
    its map from one pass over the repair rows and is measured on the choice rows with the map applied by hooks; the
    best run is targeted, and the map folded is that run's: the choice rows score the folded model as its trial did."""
    data = lm_dataset(ROWS)
    args = repair_config(tmp_path / "t", max_steps=1, collapse_layers=None, collapse_num_layers=2, collapse_protect_first=1,
                         target_choice="block")
    trainer = CollapseTrainer(model=trained(trained_state), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    record = trainer.training_record()
    choice = record.choice
    assert choice.choice == "block" and choice.step == 0 and choice.evaluations == 2
    assert [run for run, _ in choice.candidates] == [[1, 2], [2, 3]]
    best_run, best_loss = min(choice.candidates, key=lambda c: c[1])
    assert record.targets == best_run and "consecutive layers" in choice.rule()
    assert record.repair["folded"] is True and [s["removed"] for s in record.repair["spans"]] == [best_run]
    assert record.repair["validation"]["repaired"] == pytest.approx(best_loss, rel=1e-4)
    assert record.repair["candidates"] == [list(c) for c in choice.candidates]
    assert record.repair["validation"]["unrepaired"] != pytest.approx(best_loss, rel=1e-3)  # the trial had its map
    # the same maps fitted apart, on the same rows, give the same curve
    reference = trained(trained_state)
    batches = [{k: torch.tensor(v) for k, v in data[i:i + 8].items() if k != "labels"} for i in (0, 8)]
    for run, loss in choice.candidates:
        plan = fit_repair(reference, run, batches, "linear")
        folded = trained(trained_state)
        plan.fold(folded)
        collapse_layers(folded, run)
        with torch.no_grad():
            rows = data.select(range(8))
            got = folded(**{k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}).loss.item()
        assert got == pytest.approx(loss, rel=1e-3)
    assert json.loads(json.dumps(choice.to_dict()))["candidates"] == [list(c) for c in choice.candidates]


def test_the_block_choice_without_a_repair_measures_each_run_bypassed(tmp_path, trained_state):
    data = lm_dataset(ROWS)
    args = repair_config(tmp_path / "t", max_steps=1, collapse_layers=None, collapse_num_layers=3, target_repair="none")
    args.target_choice = "block"
    trainer = CollapseTrainer(model=trained(trained_state), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    trainer.train()
    record = trainer.training_record()
    assert [run for run, _ in record.choice.candidates] == [[0, 1, 2], [1, 2, 3]] and record.repair is None
    assert record.targets == min(record.choice.candidates, key=lambda c: c[1])[0]



def test_a_recipe_runs_the_block_choice_and_its_report_keeps_every_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_collapse.pipeline import run_recipe
    from hf_collapse.recipe import load_recipe

    block = PRUNE_REPAIR.replace("collapse_num_layers: 1\ntarget_choice: score\ntarget_score: block_influence\n",
                                 "collapse_num_layers: 2\ntarget_choice: block\n")
    recipe, config_, resolved = load_recipe(tiny_recipe(tmp_path, block))
    summary = run_recipe(recipe, config_, resolved, log=lambda text: None)
    report = json.loads((tmp_path / "out" / "collapse_report.json").read_text())["report"]
    candidates = report["repair"]["candidates"]
    assert [run for run, _ in candidates] == [[1, 2], [2, 3]]
    assert summary.removed == min(candidates, key=lambda c: c[1])[0]
    assert [span["removed"] for span in report["repair"]["spans"]] == [summary.removed]
    assert "as the run of consecutive layers with the least measured bypass cost at step 0" in (tmp_path / "out" / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


def test_the_block_choice_refuses_a_loss_it_cannot_compare(tmp_path, trained_state, monkeypatch):
    data = lm_dataset(ROWS)
    args = repair_config(tmp_path / "t", max_steps=1, collapse_layers=None, collapse_num_layers=2, collapse_protect_first=1,
                         target_choice="block")
    trainer = CollapseTrainer(model=trained(trained_state), args=args, train_dataset=data, eval_dataset=data.select(range(8)))
    monkeypatch.setattr(CollapseTrainer, "_bypass_loss", lambda self, model, layers, fade=False: float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"non-finite choice-row loss \(nan\) with layers \[1, 2\] bypassed"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
