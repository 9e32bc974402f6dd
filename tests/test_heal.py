"""Healing from the full-depth model (issue 20): hidden-state distillation of the kept layers, the adjacent scope,
the teacher's forward passes counted apart, and the refusals of bad teachers and scopes before anything changes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from test_targets import SGD, identity_layers_llama, largest_change, params, probe, trained_state  # noqa: F401
from test_trainer import config, lm_dataset, tiny_bert, tiny_llama
from tiny_models import write_lm_recipe, write_lm_source
from transformers import LlamaConfig, LlamaForCausalLM

from hf_collapse import CollapseConfig, CollapseTrainer, collapse_layers, heal
from hf_collapse.card import render_card
from hf_collapse.distillation import hidden_state_loss, layer_outputs, teacher_layer_map
from hf_collapse.healing import adjacent_layers, adjacent_parameter_names
from hf_collapse.report import CollapseReport

FIXTURES = Path(__file__).parent / "fixtures"


def collapsed_copy(model, layers):
    student = copy.deepcopy(model)
    collapse_layers(student, layers)
    return student


def batch():
    rows = lm_dataset(4)
    return {k: torch.tensor(rows[k]) for k in ("input_ids", "labels", "attention_mask")}


# ------------------------------------------------------------------------------------------ hidden states


def test_the_layer_map_pairs_kept_layers_with_their_original_index():
    teacher = tiny_llama(layers=6)
    student = collapsed_copy(teacher, [1, 2, 4])
    assert teacher_layer_map(student, teacher) == [(0, 0), (1, 3), (2, 5)]
    # a teacher that was itself collapsed before: its own numbering
    earlier = collapsed_copy(teacher, [1])
    assert teacher_layer_map(student, earlier) == [(0, 0), (1, 2), (2, 4)]
    assert teacher_layer_map(teacher, copy.deepcopy(teacher)) == [(i, i) for i in range(6)]


def test_hidden_loss_is_zero_when_the_removed_layer_was_the_identity(trained_state):  # noqa: F811
    teacher = identity_layers_llama(trained_state, [2]).eval()
    student = collapsed_copy(teacher, [2])
    pairs = teacher_layer_map(student, teacher)
    s, t = {}, {}
    with torch.no_grad(), layer_outputs(student, s), layer_outputs(teacher, t):
        student(**probe())
        teacher(**probe())
    mask = probe()["attention_mask"]
    assert pairs == [(0, 0), (1, 1), (2, 3)]
    assert float(hidden_state_loss(s, t, pairs, mask)) == pytest.approx(0.0, abs=1e-10)
    # a layer that does something: the kept layers after it no longer match
    other = identity_layers_llama(trained_state, []).eval()
    t2 = {}
    with torch.no_grad(), layer_outputs(other, t2):
        other(**probe())
    loss = float(hidden_state_loss(s, t2, pairs, mask))
    expected = sum(float((s[a] - t2[b]).pow(2).mean()) for a, b in pairs) / 3
    assert loss > 1e-4 and loss == pytest.approx(expected, rel=1e-5)


def test_the_trainer_adds_the_weighted_hidden_term_and_nothing_for_an_identity_cut(tmp_path, trained_state):  # noqa: F811
    inputs = batch()
    for identity, removed in ((True, [2]), (False, [2])):
        teacher = identity_layers_llama(trained_state, [2] if identity else [])
        student = collapsed_copy(teacher, removed)
        losses = {}
        for weight in (0.0, 3.0):
            args = config(tmp_path / f"w{weight}", max_steps=1, distill_hidden_weight=weight, msw_weight=0.0)
            trainer = CollapseTrainer(model=student, args=args, train_dataset=lm_dataset(), teacher_model=teacher)
            student.train()
            losses[weight] = float(trainer.compute_loss(student, dict(inputs)))
            assert trainer.teacher_forward_passes == (1 if weight else 0)
        s, t = {}, {}
        with torch.no_grad(), layer_outputs(student, s), layer_outputs(teacher, t):
            student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            teacher.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        mse = float(hidden_state_loss(s, t, teacher_layer_map(student, teacher), inputs["attention_mask"]))
        assert losses[3.0] == pytest.approx(losses[0.0] + 3.0 * mse, rel=1e-5, abs=1e-6)
        assert (mse < 1e-10) == identity


def test_healing_with_hidden_distillation_counts_the_teachers_passes(tmp_path):
    teacher = tiny_llama(layers=4).eval()
    student = collapsed_copy(teacher, [1])
    args = config(tmp_path, heal_steps=3, learning_rate=1e-2, distill_weight=0.5, distill_hidden_weight=1.0,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, **SGD)
    healed = heal(student, args, lm_dataset(), teacher=teacher)
    model, steps = healed
    assert steps == 3 and healed.scope == "full"
    assert healed.teacher_forward_passes == 3 * 2 and healed.teacher_forward_rows == 3 * 2 * 2
    assert healed.trainable_parameters == sum(p.numel() for p in model.parameters())
    plain = heal(collapsed_copy(tiny_llama(layers=4), [1]), config(tmp_path / "plain", heal_steps=2), lm_dataset())
    assert plain.teacher_forward_passes == plain.teacher_forward_rows == 0


# ------------------------------------------------------------------------------------------ adjacent scope


@pytest.mark.parametrize(
    ("removed", "depth", "adjacent"),
    [([2, 3], 6, [1, 2]), ([0, 1], 6, [0]), ([5], 6, [4]), ([1, 3], 5, [0, 1, 2]), ([1, 4], 6, [0, 1, 2, 3])],
)
def test_adjacent_layers_in_the_collapsed_numbering(removed, depth, adjacent):
    assert adjacent_layers(removed, depth) == adjacent


def test_the_adjacent_scope_trains_only_the_layers_next_to_the_cut_and_the_head(tmp_path):
    student = collapsed_copy(tiny_llama(layers=6), [2, 3])  # kept 0 1 4 5 -> 0 1 2 3; next to the cut: 1 and 2
    names = adjacent_parameter_names(student)
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"1", "2"}
    assert "model.norm.weight" in names and "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    before = params(student)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    healed = heal(student, config(tmp_path, heal_steps=3, learning_rate=5e-2, heal_scope="adjacent", **SGD), lm_dataset())
    model, steps = healed
    assert steps == 3 and healed.scope == "adjacent"
    assert healed.trainable_parameters == sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    for name, p in model.named_parameters():
        if name in names:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # bit-identical
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_the_adjacent_scope_of_a_classifier_and_of_tied_embeddings():
    bert = collapsed_copy(tiny_bert(layers=4), [1])
    names = adjacent_parameter_names(bert)
    layers = {n.split(".")[3] for n in names if n.startswith("bert.encoder.layer.")}
    assert layers == {"0", "1"} and any(n.startswith("classifier.") for n in names)
    assert any(n.startswith("bert.pooler.") for n in names) and not any(n.startswith("bert.embeddings.") for n in names)
    torch.manual_seed(0)
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    tied = collapsed_copy(tied, [3])
    assert "model.embed_tokens.weight" in adjacent_parameter_names(tied)  # the lm_head is the embedding matrix


# ------------------------------------------------------------------------------------------ refusals


def other_vocabulary():
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize(
    ("teacher", "fields", "peft_config", "message"),
    [
        (other_vocabulary, dict(distill_weight=1.0), None, r"the teacher's vocab_size is 96 but the student's is 128"),
        (lambda: tiny_llama(layers=3), dict(distill_weight=1.0), None,
         r"the teacher has 3 layers, but the student's collapse record says the model it was cut from had 4 \(3 kept \+ 1 "
         r"removed, config.collapsed_layers=\[1\]\)"),
        (lambda: tiny_llama(layers=5), dict(distill_hidden_weight=1.0), None, r"the teacher has 5 layers"),
        (lambda: collapsed_copy(tiny_llama(layers=4), [2]), dict(distill_weight=1.0), None, r"the teacher lacks layers \[2\] that the student still has"),
        (None, dict(distill_hidden_weight=1.0), None, r"needs the teacher"),
        (None, dict(heal_scope="lora"), None, r"heal_scope='lora' trains LoRA adapters: pass peft_config"),
        (None, dict(heal_scope="adjacent"), peft.LoraConfig(r=2, target_modules=["q_proj"]), r"heal_scope='adjacent' trains"),
    ],
    ids=["vocabulary", "shallower teacher", "deeper teacher", "teacher lacks a layer", "no teacher", "lora without peft",
         "adjacent with peft"],
)
def test_bad_teachers_and_scopes_are_refused_before_anything_changes(tmp_path, teacher, fields, peft_config, message):
    student = collapsed_copy(tiny_llama(layers=4), [1])
    before = params(student)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        heal(student, config(out, heal_steps=2, **fields), lm_dataset(), teacher=teacher() if teacher else None,
             peft_config=peft_config)
    assert largest_change(student, before) == 0 and type(student) is LlamaForCausalLM
    assert all(p.requires_grad for p in student.parameters())
    assert not out.exists()


def test_an_unknown_scope_and_a_negative_hidden_weight_are_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match=r"heal_scope must be one of full, lora, adjacent \(or unset\); got 'layers'"):
        CollapseConfig(output_dir=str(tmp_path), heal_scope="layers")
    with pytest.raises(ValueError, match=r"distill_hidden_weight must be a number >= 0"):
        CollapseConfig(output_dir=str(tmp_path), distill_hidden_weight=-1.0)


# ------------------------------------------------------------------------------------------ the card


def test_the_card_records_the_scope_and_the_teachers_passes_apart():
    stored = json.loads((FIXTURES / "collapse_report_causal_lm.json").read_text(encoding="utf-8"))
    report = CollapseReport.from_dict(stored["report"]).updated(
        healing_steps=10, healing_scope="adjacent", distillation_hidden_weight=0.5, distillation_weight=1.0,
        teacher_forward_passes=10, teacher_forward_rows=40,
    )
    card = render_card(report)
    assert "10 steps (only the layers next to each removed span and the head)" in card
    assert "teacher forward passes during healing (not in the training budget)" in card and "10 (40 rows)" in card
    assert "hidden-state distillation during healing" in card
    again = CollapseReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.training.teacher_forward_rows == 40 and again.training.healing_scope == "adjacent"


def test_a_faded_models_card_says_it_trained_without_the_layers_and_names_its_before_column():
    """Issue 20 part 4: after a fade the card no longer says the model was not fine-tuned without the layers, and the
    evaluation's first column is named for what it measured (the fine-tuned model with the faded layers put back)."""
    stored = json.loads((FIXTURES / "collapse_report_causal_lm.json").read_text(encoding="utf-8"))
    report = CollapseReport.from_dict(stored["report"])  # faded over steps 60-90 of 100, healed 20 steps
    assert report.training.fade_window == [60, 90] and report.training.training_steps == 100
    card = render_card(report)
    assert ("- The removed layers were faded out of the residual stream over training steps 60–90, so the model trained "
            "its last 10 of 100 steps (10 %) without them; deleting them afterwards changed no output (a faded layer "
            "returns its input).") in card
    assert "not fine-tuned after the layers were removed" not in card
    assert "| metric | fine-tuned, faded layers put back (" in card and "| metric | base model" not in card
    assert "the fine-tuned model with the faded layers switched back on" in card
    # faded and not healed: the quickstart's shape (200 steps, faded over 0-60)
    quick = report.updated(fade_window=(0, 60), training_steps=200, healing_steps=None, healing_lora=None, healed=False)
    text = render_card(quick)
    assert "trained its last 140 of 200 steps (70 %) without them" in text
    assert "and there was no fine-tuning after the deletion." in text and "not fine-tuned after" not in text
    # trained without a fade: the fine-tuned model before removal; no training at all: the base model
    plain = report.updated(fade_window=None, healing_steps=None, healing_lora=None, healed=False)
    text = render_card(plain)
    assert "| metric | fine-tuned, before removal (" in text and "not fine-tuned after the layers were removed" in text
    untrained = report.updated(fade_window=None, healing_steps=None, healing_lora=None, healed=False, recipe=None, training_steps=None,
                               target_layers=None, target_choice=None, penalty_schedule=None)
    assert "| metric | base model (" in render_card(untrained)


# ------------------------------------------------------------------------------------------ recipes


def tiny_recipe(tmp_path, extra: str) -> Path:
    write_lm_source(tmp_path)
    fields = "calibration_samples: 8\nlatency_repeats: 0\nmsw_weight: 0\n" + extra
    return write_lm_recipe(tmp_path / "r.yaml", tmp_path, tmp_path, fields, max_steps=2)


def test_a_recipe_heals_the_adjacent_layers_from_the_full_model_and_records_it(tmp_path):
    from hf_collapse.pipeline import run_recipe
    from hf_collapse.recipe import load_recipe

    path = tiny_recipe(tmp_path, "collapse_layers: [1]\ntarget_choice: post_hoc\nheal_steps: 2\nheal_scope: adjacent\n"
                                 "distill_hidden_weight: 0.5\n")
    recipe, config_, resolved = load_recipe(path)
    summary = run_recipe(recipe, config_, resolved, log=lambda text: None)
    assert summary.heal_steps == 2 and summary.removed == [1]
    report = json.loads((tmp_path / "out" / "collapse_report.json").read_text())["report"]
    assert report["healing_scope"] == "adjacent" and report["distillation_hidden_weight"] == 0.5
    assert report["teacher_forward_passes"] == 2 and report["teacher_forward_rows"] == 2 * 4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| healing after the removal | 2 steps (only the layers next to each removed span and the head) |" in card
    assert "| teacher forward passes during healing (not in the training budget) | 2 (8 rows) |" in card


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("collapse_layers: [1]\ntarget_choice: post_hoc\nheal_scope: adjacent\n",
         "heal_scope says how healing trains, and heal_steps is 0"),
        ("collapse_layers: [1]\ntarget_choice: post_hoc\ndistill_hidden_weight: 1\n",
         "distill_hidden_weight says how healing trains, and heal_steps is 0"),
        ("collapse_layers: [1]\ntarget_choice: post_hoc\nheal_steps: 2\nheal_scope: lora\n",
         "heal_scope: lora trains LoRA adapters, and this recipe has none"),
        ("collapse_num_layers: 1\ntarget_choice: score\nfade_steps: 1\nheal_steps: 2\ndistill_hidden_weight: 1\n",
         "distill_hidden_weight after a fade distils from the copy of the model taken at the target choice"),
    ],
    ids=["scope without healing", "hidden weight without healing", "lora without adapters", "hidden after a fade"],
)
def test_recipe_healing_settings_that_cannot_act_are_refused_when_read(tmp_path, extra, message):
    from hf_collapse.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(tmp_path, extra))
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
