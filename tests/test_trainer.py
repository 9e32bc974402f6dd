"""CollapseTrainer on tiny models built from configs: loss, accumulation, checkpointing, logging, errors."""

import math

import datasets
import peft
import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_collapse import CollapseConfig, CollapseTrainer, DirectionSearch, max_sliced_wasserstein
from hf_collapse.layers import LayerCapture

VOCAB = 128


def tiny_llama(seed=0, layers=3):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_bert(seed=0, layers=3):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64, num_labels=2,
    )
    return BertForSequenceClassification(config)


def lm_dataset(n=16, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * length] * n})


def cls_dataset(n=32, length=10, seed=0):
    # the label is whether token 5 occurs: learnable, so training moves the weights meaningfully
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    ids[: n // 2, 3] = 5
    labels = (ids == 5).any(dim=1).long().tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels}
    )


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, logging_steps=1, use_cpu=True,
    )
    return CollapseConfig(**{**defaults, **kwargs})


class FixedDirection:
    """Stands in for DirectionSearch where a test needs the same slicing direction in every call."""

    def __init__(self, d, seed=0):
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn(d, generator=g)
        self.theta = theta / theta.norm()

    def __call__(self, x, y, key=None):
        return self.theta.to(x.device)


class SequentialCollapseTrainer(CollapseTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_logging_keys_reach_report_callbacks_in_train_and_eval(tmp_path):
    recorder = LogRecorder()
    data = lm_dataset()
    trainer = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=4, msw_weight=2.0, eval_strategy="steps", eval_steps=2),
        train_dataset=data, eval_dataset=data.select(range(8)), callbacks=[recorder],
    )
    trainer.train()
    train_logs = [log for log in recorder.logs if "loss" in log]
    eval_logs = [log for log in recorder.logs if "eval_loss" in log]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    for log in train_logs:
        layers = [log[f"msw/layer_{i}"] for i in range(3)]
        assert all(v > 0 and math.isfinite(v) for v in layers)
        assert log["msw/mean"] == pytest.approx(sum(layers) / 3, rel=1e-6)
        assert log["msw/weight"] == 2.0
        assert log["msw/penalty"] == pytest.approx(2.0 * log["msw/mean"], rel=1e-6)
    for log in eval_logs:
        assert {f"eval_msw/layer_{i}" for i in range(3)} | {"eval_msw/penalty", "eval_msw/mean"} <= set(log)
    metrics = trainer.evaluate()
    assert metrics["eval_msw/layer_2"] > 0
    # the hooks exist only during a step: nothing is left on the user's model
    assert all(len(layer._forward_hooks) == 0 for layer in trainer.model.model.layers)


def test_eval_loss_is_the_task_loss_alone(tmp_path):
    data = lm_dataset(8)
    model = tiny_llama()
    penalised = CollapseTrainer(model=model, args=config(tmp_path / "a", msw_weight=100.0), eval_dataset=data)
    plain = Trainer(model=model, args=config(tmp_path / "b"), eval_dataset=data)
    assert penalised.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


def test_padding_changes_nothing(tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8))
    lengths = [8, 5, 7]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    padded_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.long)], dim=1)
    results = []
    for batch_ids, batch_mask in [(ids, mask), (padded_ids, padded_mask)]:
        model = tiny_llama().eval()
        trainer = CollapseTrainer(model=model, args=config(tmp_path))
        trainer._search = DirectionSearch(num_projections=16, seed=0, keep_directions=False)
        labels = batch_ids.masked_fill(batch_mask == 0, -100)
        with torch.no_grad():
            trainer.compute_loss(model, {"input_ids": batch_ids, "attention_mask": batch_mask, "labels": labels})
        results.append([trainer._msw_metrics["eval"][f"msw/layer_{i}"][0] for i in range(3)])
    assert results[0] == pytest.approx(results[1], rel=1e-4)


def _one_step_params(tmp_path, model_fn, data, *, batch, accumulation, weight, trainer_cls=SequentialCollapseTrainer):
    model = model_fn()
    kwargs = dict(
        max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
    )
    if trainer_cls is SequentialTrainer:
        args = config(tmp_path, **kwargs)
    else:
        args = config(tmp_path, msw_weight=weight, **kwargs)
    trainer = trainer_cls(model=model, args=args, train_dataset=data)
    if isinstance(trainer, CollapseTrainer):
        trainer._search = FixedDirection(32)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_fn,data_fn", [(tiny_llama, lm_dataset), (tiny_bert, cls_dataset)])
def test_penalty_weighs_the_same_with_gradient_accumulation(tmp_path, model_fn, data_fn):
    # [a, b, a, b]: each micro-batch of 2 and the full batch of 4 hold the same token distribution, so
    # the per-step penalty must be identical with and without accumulation. With plain SGD and no
    # clipping an update is linear in the gradient, so (update with λ) - (update without λ) isolates the
    # penalty's share. (The task loss is compared separately: BertForSequenceClassification accepts
    # loss kwargs but ignores num_items_in_batch, so its own loss is not GA-correct in transformers.)
    pair = data_fn(2, seed=3)
    data = datasets.concatenate_datasets([pair, pair])
    shares = []
    for batch, accumulation in [(4, 1), (2, 2)]:
        with_penalty = _one_step_params(tmp_path, model_fn, data, batch=batch, accumulation=accumulation, weight=5.0)
        without = _one_step_params(tmp_path, model_fn, data, batch=batch, accumulation=accumulation, weight=0.0)
        shares.append({n: with_penalty[n] - without[n] for n in with_penalty})
    full, accumulated = shares
    assert max(float(v.abs().max()) for v in full.values()) > 1e-4  # the penalty did move the weights
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-3, atol=1e-6, msg=name)


def test_whole_update_is_the_same_with_gradient_accumulation_for_a_causal_lm(tmp_path):
    pair = lm_dataset(2, seed=3)
    data = datasets.concatenate_datasets([pair, pair])
    full = _one_step_params(tmp_path, tiny_llama, data, batch=4, accumulation=1, weight=5.0)
    accumulated = _one_step_params(tmp_path, tiny_llama, data, batch=2, accumulation=2, weight=5.0)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_zero_weight_equals_plain_trainer(tmp_path):
    data = lm_dataset(8)
    ours = _one_step_params(tmp_path, tiny_llama, data, batch=4, accumulation=1, weight=0.0)
    plain = _one_step_params(tmp_path, tiny_llama, data, batch=4, accumulation=1, weight=0.0, trainer_cls=SequentialTrainer)
    for name in ours:
        torch.testing.assert_close(ours[name], plain[name], rtol=0, atol=0, msg=name)


# transformers renamed the field within 5.x; use the installed version's name (no deprecation warning)
CHECKPOINTING = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") else "gradient_checkpointing"


def test_gradient_checkpointing_captures_each_layer_once_and_gives_the_same_update(tmp_path):
    data = lm_dataset(4)
    calls = []

    class Counting(SequentialCollapseTrainer):
        def _on_layer(self, stack, index, tokens_in, tokens_out):
            calls.append(index)
            super()._on_layer(stack, index, tokens_in, tokens_out)

    def run(checkpointing):
        calls.clear()
        model = tiny_llama()
        args = config(
            tmp_path, max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=0.0, msw_weight=5.0, **{CHECKPOINTING: checkpointing},
        )
        trainer = Counting(model=model, args=args, train_dataset=data)
        trainer._search = FixedDirection(32)
        trainer.train()
        assert getattr(model, f"is_{CHECKPOINTING}") is checkpointing  # it really was on (or off)
        return list(calls), {n: p.detach().clone() for n, p in model.named_parameters()}

    calls_plain, params_plain = run(False)
    calls_ckpt, params_ckpt = run(True)
    assert calls_plain == [0, 1, 2]
    assert calls_ckpt == [0, 1, 2]
    for name in params_plain:
        torch.testing.assert_close(params_ckpt[name], params_plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_captured_hidden_states_are_released_after_each_step(tmp_path, checkpointing):
    import gc
    import weakref

    refs = []

    class Watching(CollapseTrainer):
        def _on_layer(self, stack, index, tokens_in, tokens_out):
            refs.extend((weakref.ref(tokens_in), weakref.ref(tokens_out)))
            super()._on_layer(stack, index, tokens_in, tokens_out)

    step_ends = []

    class CheckAtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gc.collect()
            step_ends.append((len(refs), sum(ref() is not None for ref in refs)))

    args = config(tmp_path, max_steps=2, learning_rate=1e-3, msw_weight=1.0, **{CHECKPOINTING: checkpointing})
    trainer = Watching(model=tiny_llama(), args=args, train_dataset=lm_dataset(8), callbacks=[CheckAtStepEnd()])
    trainer.train()
    # 3 layers x (input, output) captured per step, none of them still alive once the step is over
    assert step_ends == [(6, 0), (12, 0)]


def _layer_msw(model, data, seed=0):
    values = {}
    search = DirectionSearch(num_projections=64, seed=seed, keep_directions=False)

    def record(stack, index, x, y):
        values.setdefault(index, []).append(float(max_sliced_wasserstein(x, y, search=search)))

    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with LayerCapture(model, record) as capture, capture.armed(batch), torch.no_grad():
        model(**batch)
    return [values[i][0] for i in sorted(values)]


def test_penalty_lowers_every_layer_msw_compared_with_plain_trainer(tmp_path):
    data = cls_dataset(64)
    common = dict(max_steps=30, learning_rate=1e-3, per_device_train_batch_size=8)
    plain_model, penalised_model = tiny_bert(), tiny_bert()
    Trainer(model=plain_model, args=config(tmp_path / "plain", **common), train_dataset=data).train()
    CollapseTrainer(model=penalised_model, args=config(tmp_path / "msw", msw_weight=5.0, **common), train_dataset=data).train()
    plain = _layer_msw(plain_model, data)
    penalised = _layer_msw(penalised_model, data)
    for before, after in zip(plain, penalised):
        assert after < 0.8 * before, (plain, penalised)


def test_msw_layers_restricts_the_penalty(tmp_path):
    recorder = LogRecorder()
    trainer = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=2, msw_layers=[0, 2], msw_weight=3.0),
        train_dataset=lm_dataset(), callbacks=[recorder],
    )
    trainer.train()
    for log in [log for log in recorder.logs if "loss" in log]:
        assert log["msw/mean"] == pytest.approx((log["msw/layer_0"] + log["msw/layer_2"]) / 2, rel=1e-6)
        assert log["msw/layer_1"] > 0  # still logged


def test_warmup_ramps_the_weight(tmp_path):
    recorder = LogRecorder()
    trainer = CollapseTrainer(
        model=tiny_llama(), args=config(tmp_path, max_steps=6, msw_weight=2.0, msw_warmup_steps=4),
        train_dataset=lm_dataset(24), callbacks=[recorder],
    )
    trainer.train()
    weights = [log["msw/weight"] for log in recorder.logs if "loss" in log]
    assert weights == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_peft_wrapped_model_trains_with_the_penalty(tmp_path):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    recorder = LogRecorder()
    trainer = CollapseTrainer(
        model=model, args=config(tmp_path, max_steps=3, msw_weight=5.0, learning_rate=1e-2),
        train_dataset=lm_dataset(), callbacks=[recorder],
    )
    trainer.train()
    logs = [log for log in recorder.logs if "loss" in log]
    assert len(logs) == 3 and all(log["msw/penalty"] > 0 for log in logs)
    after = dict(model.named_parameters())
    assert any(float((after[n].detach() - before[n]).abs().max()) > 0 for n in before)


def test_bf16_mixed_precision_keeps_the_penalty_in_float32(tmp_path):
    model = tiny_llama()
    trainer = CollapseTrainer(model=model, args=config(tmp_path, max_steps=2, bf16=True), train_dataset=lm_dataset())
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["msw/penalty"]) and log["msw/penalty"] > 0 for log in logs)
    batch = {k: torch.tensor(lm_dataset(4)[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(model.train(), batch)
    assert loss.dtype == torch.float32


def test_non_finite_penalty_stops_before_the_weights_change(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = CollapseTrainer(model=model, args=config(tmp_path, max_steps=2), train_dataset=lm_dataset())
    with pytest.raises(FloatingPointError, match="layer_1"):
        trainer.train()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"msw_weight": -1.0}, "msw_weight must be a number >= 0"),
        ({"msw_weight": float("nan")}, "msw_weight must be a number >= 0"),
        ({"msw_num_projections": 0}, "msw_num_projections must be at least 1"),
        ({"msw_refine_steps": -1}, "msw_refine_steps"),
        ({"msw_search": "best"}, "msw_search must be one of"),
        ({"msw_layers": []}, "msw_layers is empty"),
        ({"msw_layers": [-1]}, "cannot be negative"),
        ({"msw_layers": [1, 1]}, "names a layer twice"),
        ({"msw_normalization": "l2"}, "msw_normalization"),
        ({"msw_warmup_steps": -3}, "msw_warmup_steps"),
        ({"msw_search_tokens": 1}, "msw_search_tokens must be at least 2"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)


def test_trainer_rejects_what_it_cannot_regularise(tmp_path):
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        CollapseTrainer(model=tiny_llama(), args=config(tmp_path, msw_layers=[7]))
    with pytest.raises(ValueError, match="cannot find the transformer layer stack"):
        CollapseTrainer(model=torch.nn.Linear(4, 4), args=config(tmp_path))
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="CollapseConfig"):
        CollapseTrainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_trainer_model_card_is_tagged_and_never_replaces_a_collapse_card(tmp_path):
    from huggingface_hub import ModelCard

    trainer = CollapseTrainer(model=tiny_llama(), args=config(tmp_path, max_steps=1), train_dataset=lm_dataset(4))
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"hf-collapse", "lacoot"} <= set(card.data.tags)
    collapse_card = "---\ntags:\n- hf-collapse\n- layer-pruning\n---\n\n# collapsed: layers 1, 2 removed\n"
    (tmp_path / "README.md").write_text(collapse_card)
    trainer.create_model_card(model_name="tiny")
    assert (tmp_path / "README.md").read_text() == collapse_card
