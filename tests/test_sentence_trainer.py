"""The MSW penalty on sentence-transformers' own trainer (issue #12: "the penalty trains such a model too").

A sentence-transformers loss runs the model once per text column with inputs that are not the trainer's; the
penalty must still reach the weights exactly as computed by hand from those passes (with each pass's padding), a
measured target must work through the trainer's own loss, and the trained, collapsed pipeline must export as a
sentence-transformers model. A tiny BERT with the real MiniLM tokenizer keeps it fast.
"""

import datasets
import pytest
import torch
from test_trainer import FixedDirection
from transformers import AutoTokenizer, BertConfig, BertModel

from hf_collapse import collapse_model, export_collapsed, max_sliced_wasserstein
from hf_collapse.assets import minilm_path
from hf_collapse.layers import LayerCapture, bypass_layers, find_layer_stacks, unwrap_model

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import losses  # noqa: E402
from hf_collapse import CollapseSentenceTransformerConfig, CollapseSentenceTransformerTrainer  # noqa: E402

SGD = dict(learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
ANCHORS = ["a quiet moving film about grief", "the plot makes no sense", "popcorn fun and nothing more at all here",
           "a bold, strange and wonderful debut"]
POSITIVES = ["a tender story of loss", "nonsense from start to finish, with a cast that looks lost", "light fun",
             "an odd but brilliant first feature"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny sentence-transformers checkpoint (Transformer → mean Pooling → Normalize) saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny-st")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # no dropout: updates comparable across runs
    bert_dir = folder / "bert"
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    transformer = Transformer(str(bert_dir), max_seq_length=32)
    model = st.SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()], device="cpu")
    model.save(str(folder / "st"))
    return folder / "st"


def load(source):
    return st.SentenceTransformer(str(source), device="cpu")


def pairs():
    return datasets.Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES})


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                    use_cpu=True, per_device_train_batch_size=4, max_steps=1, logging_steps=1, **SGD)
    return CollapseSentenceTransformerConfig(**{**defaults, **kwargs})


def train(source, tmp_path, weight, **kwargs):
    model = load(source)
    loss = losses.MultipleNegativesRankingLoss(model)
    trainer = CollapseSentenceTransformerTrainer(
        model=model, args=config(tmp_path, msw_weight=weight, **kwargs), train_dataset=pairs(), loss=loss,
    )
    trainer._search = FixedDirection(32)
    trainer.train()
    return trainer


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def hand_penalty_share(model, weight, lr):
    """-lr · ∇(λ · mean over layers of the mean over the two column passes of MSW), each pass with its own padding
    mask given explicitly (the ordinary capture path), from the same rows."""
    inner = model[0].auto_model
    search = FixedDirection(32)
    per_layer = {}

    def record(stack, index, x, y):
        per_layer.setdefault(index, []).append(max_sliced_wasserstein(x, y, search=search))

    model.train()
    for texts in (ANCHORS, POSITIVES):
        features = model.tokenize(texts)
        assert not bool(features["attention_mask"].all())  # the batch really has padding
        with LayerCapture(inner, record) as capture, capture.armed(features):
            inner(**features)
    assert all(len(v) == 2 for v in per_layer.values()) and len(per_layer) == 4
    penalty = weight * torch.stack([torch.stack(v).mean() for v in per_layer.values()]).mean()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(penalty, [p for _, p in named], allow_unused=True)
    model.zero_grad(set_to_none=True)
    return {n: -lr * (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}


def test_the_layers_of_a_sentence_transformers_pipeline_are_its_transformers_layers(source):
    model = load(source)
    assert unwrap_model(model) is model[0].auto_model
    (stack,) = find_layer_stacks(model)
    assert len(stack) == 4 and stack.layers is model[0].auto_model.encoder.layer


def test_the_penalty_reaches_the_weights_as_computed_by_hand_from_every_column_pass(source, tmp_path):
    weight, lr = 3.0, SGD["learning_rate"]
    start = weights(load(source))
    without = weights(train(source, tmp_path / "a", 0.0).model)
    trainer = train(source, tmp_path / "b", weight)
    expected = hand_penalty_share(load(source), weight, lr)
    actual = {n: weights(trainer.model)[n] - without[n] for n in expected}
    assert max(float(t.abs().max()) for t in expected.values()) > 1e-3
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(without[n], start[n]) for n in start)  # the task loss trained too
    logged = [log for log in trainer.state.log_history if "msw/layer_0" in log]
    assert logged and all(log[f"msw/layer_{i}"] > 0 for log in logged for i in range(4))


def test_padding_is_read_from_each_pass_so_it_changes_nothing(source, tmp_path):
    """Every anchor padded with extra [PAD] positions (attention 0) must give the same update: padding is removed
    per forward pass. Without the per-pass masks the padded tokens would join the clouds."""
    trainer = train(source, tmp_path / "c", 3.0)
    model = load(source)
    loss = losses.MultipleNegativesRankingLoss(model)
    model.tokenizer.padding_side = "right"
    original_tokenize = model.tokenize

    def padded_tokenize(texts, **kwargs):
        features = original_tokenize(texts, **kwargs)
        extra = 5
        for key, value in list(features.items()):
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                fill = model.tokenizer.pad_token_id if key == "input_ids" else 0
                features[key] = torch.cat([value, torch.full((value.shape[0], extra), fill, dtype=value.dtype)], 1)
        return features

    model.tokenize = padded_tokenize
    padded = CollapseSentenceTransformerTrainer(
        model=model, args=config(tmp_path / "d", msw_weight=3.0), train_dataset=pairs(), loss=loss,
    )
    padded._search = FixedDirection(32)
    padded.train()
    a, b = weights(trainer.model), weights(padded.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_measured_target_is_chosen_by_the_trainers_own_loss_and_exports_as_sentence_transformers(source, tmp_path):
    model = load(source)
    loss = losses.MultipleNegativesRankingLoss(model)
    trainer = CollapseSentenceTransformerTrainer(
        model=model, args=config(tmp_path / "t", max_steps=4, learning_rate=1e-3, collapse_num_layers=1,
                                 target_choice="measured", target_choice_steps=1, fade_steps=2, msw_weight=0.3,
                                 msw_adaptive=False),
        train_dataset=pairs(), eval_dataset=pairs(), loss=loss,
    )
    trainer.train()
    (target,) = trainer.collapse_targets
    assert trainer.msw_schedule[0].choice == "measured" and trainer.msw_schedule[0].evaluations == 4
    texts = ANCHORS + POSITIVES
    model.eval()
    with torch.no_grad(), bypass_layers(model, [target]):
        bypassed = model.encode(texts, convert_to_tensor=True)
    assert trainer.fade_alpha() == 0.0  # faded out: the last steps trained the pipeline without the target
    with torch.no_grad(), trainer._fade():  # and the faded model is the bypassed one, exactly
        assert torch.equal(model.encode(texts, convert_to_tensor=True), bypassed)
    collapsed, report = collapse_model(model[0].auto_model, layers=[target], base_model=str(source))
    out = export_collapsed(collapsed, tmp_path / "out", report=report, processing_class=model.tokenizer, source=source)
    loaded = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert len(loaded[0].auto_model.encoder.layer) == 3
    cosine = torch.nn.functional.cosine_similarity(loaded.encode(texts, convert_to_tensor=True), bypassed, dim=-1)
    assert torch.all(cosine > 1 - 1e-5), cosine


def test_a_block_target_is_the_run_with_the_least_loss_of_the_trainers_own_eval(source, tmp_path):
    """target_choice: block on a sentence-transformers pipeline: every run of two consecutive layers after layer 0
    is measured by the trainer's own loss on eval_dataset with the run bypassed; the least costly run is targeted,
    and each run's figure is what Trainer.evaluate gives on an untouched copy with that run bypassed."""
    args = dict(max_steps=2, learning_rate=1e-3, collapse_num_layers=2, target_choice="block", target_choice_steps=0,
                fade_steps=1, msw_weight=0.0, msw_adaptive=False, collapse_protect_first=1)
    model = load(source)
    trainer = CollapseSentenceTransformerTrainer(
        model=model, args=config(tmp_path / "t", **args), train_dataset=pairs(), eval_dataset=pairs(),
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    trainer.train()
    choice = trainer.msw_schedule[0]
    assert choice.choice == "block" and choice.step == 0 and choice.evaluations == 2
    assert [run for run, _ in choice.candidates] == [[1, 2], [2, 3]]
    assert trainer.collapse_targets == min(choice.candidates, key=lambda c: c[1])[0]
    fresh = load(source)
    reference = CollapseSentenceTransformerTrainer(
        model=fresh, args=config(tmp_path / "r", **args), train_dataset=pairs(), eval_dataset=pairs(),
        loss=losses.MultipleNegativesRankingLoss(fresh),
    )
    for run, loss in choice.candidates:
        with torch.no_grad(), bypass_layers(fresh, run):
            assert reference.evaluate()["eval_loss"] == pytest.approx(loss, rel=1e-5), run


@pytest.mark.parametrize(("fields", "message"), [
    (dict(distill_weight=1.0, collapse_num_layers=1), "distill_weight > 0 needs the student's logits"),
    (dict(collapse_num_layers=1, target_choice="score"), "target_choice: score scores the layers"),
    (dict(collapse_num_layers=1, target_choice="block", target_repair="scale", collapse_protect_first=1, fade_steps=1),
     "target_repair: scale fits its map on the transformer's own inputs"),
])
def test_what_a_sentence_transformers_batch_cannot_feed_is_refused_at_construction(source, tmp_path, fields, message):
    model = load(source)
    with pytest.raises(ValueError, match=message):
        CollapseSentenceTransformerTrainer(
            model=model, args=config(tmp_path, max_steps=4, **fields), train_dataset=pairs(), eval_dataset=pairs(),
            loss=losses.MultipleNegativesRankingLoss(model),
        )


# ----------------------------------------------------------------------------------------------------
# the recipe task `sentence-embedding`

def _cli(*args):
    import contextlib
    import io
    import types

    from hf_collapse.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _recipe(tmp_path, source, **fields):
    values = dict(
        model_name_or_path=str(source), task="sentence-embedding", dataset_name="offline:rotten_tomatoes",
        max_length=24, max_train_samples=48, max_eval_samples=24, max_test_samples=40, output_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "model"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
        warmup_steps=0, save_strategy="no", report_to="none", use_cpu=True, msw_weight=0.3, msw_warmup_steps=0,
        collapse_num_layers=1, target_choice="measured", target_choice_steps=2, fade_steps=2,
        target_choice_samples=16, calibration_samples=32, latency_repeats=0,
    )
    values.update(fields)
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def test_the_sentence_embedding_recipe_trains_collapses_and_exports_a_sentence_transformers_model(source, tmp_path):
    from huggingface_hub import ModelCard

    from hf_collapse.data import load_task_data
    from hf_collapse.recipe import load_recipe
    from hf_collapse.sentence_recipe import centroid_accuracy

    recipe_path = _recipe(tmp_path, source)
    result = _cli("train", recipe_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "model"
    import json

    report = json.loads((out / "collapse_report.json").read_text())["report"]
    (target,) = report["target_layers"]
    assert report["removed_layers"] == [target] and report["training_steps"] == 6
    assert report["task_metric"] == "nearest-centroid accuracy"
    assert (report["selection_split"], report["eval_split"]) == ("validation", "test")
    loaded = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert len(loaded[0].auto_model.encoder.layer) == 3 and loaded.max_seq_length == 32  # the source's, kept
    # the published figure is the loaded export's, measured again here on the same rows (test split, training
    # rows for the centroids); the recipe measured at its training length (max_length 24)
    recipe, _, _ = load_recipe(recipe_path)
    data = load_task_data(recipe, loaded.tokenizer)
    loaded.max_seq_length = 24
    calibration = data.train.select(range(32))
    assert centroid_accuracy(loaded, calibration, data.test) == pytest.approx(report["metric_after"], abs=1e-9)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert "nearest-centroid accuracy" in card.text


@pytest.mark.parametrize(("fields", "message"), [
    (dict(sentence_loss="NoSuchLoss"), "sentence_loss 'NoSuchLoss' is not a sentence-transformers loss"),
    (dict(use_peft=True), "does not support use_peft"),
    (dict(heal_steps=2), "does not support heal_steps"),
    (dict(target_choice="score"), "set target_choice: measured"),
    (dict(target_repair="scale", collapse_protect_first=1, fade_steps=1), "cannot fit target_repair: scale"),
])
def test_sentence_embedding_refusals_come_before_anything_is_written(source, tmp_path, fields, message):
    result = _cli("train", _recipe(tmp_path, source, **fields))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "model").exists()


def test_a_sentence_embedding_recipe_repairs_its_cut_after_training(source, tmp_path):
    """What the target_repair refusal points to: collapse_repair is fitted after training on the recipe's tokenized
    calibration rows and folded into the LayerNorm before the cut (a post-norm encoder), and the export still loads
    as a sentence-transformers pipeline of one layer fewer."""
    import json

    result = _cli("train", _recipe(tmp_path, source, collapse_repair="scale", collapse_protect_first=1, fade_steps=0,
                                   target_choice_steps=0))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "model" / "collapse_report.json").read_text())["report"]
    (span,) = report["repair"]["spans"]
    assert report["repair"]["method"] == "scale" and report["repair"]["verified"] and report["repair"]["folded"]
    assert span["removed"] == report["removed_layers"] and report["repair"]["data"].endswith("offline:rotten_tomatoes")
    assert span["folded_into"] == f"encoder.layer.{span['removed'][0] - 1}.output.LayerNorm"
    assert span["error_after"] < span["error_before"]
    loaded = st.SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert len(loaded[0].auto_model.encoder.layer) == 3


def test_sentence_embedding_needs_a_sentence_transformers_checkpoint(source, tmp_path):
    plain = source.parent / "bert"  # the tiny BERT folder, without modules.json
    result = _cli("train", _recipe(tmp_path, plain))
    assert result.returncode == 2
    assert "needs a sentence-transformers checkpoint" in result.stderr and "text-classification" in result.stderr
