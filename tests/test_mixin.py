"""MSWPenaltyMixin on other trainers (TRL's SFT and DPO, hand-written ones), its capture contract, packing, and
the library's post-training step `collapse_model` (issue 11). Tiny models built from configs, no Hub."""

import copy
import json
import runpy
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import peft
import pytest
import torch
from test_trainer import VOCAB, FixedDirection, LogRecorder, SequentialTrainer, config, lm_dataset, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from hf_collapse import MSWArguments, MSWPenaltyMixin, collapse_model, max_sliced_wasserstein
from hf_collapse.layers import LayerCapture, bypass_layers

trl = pytest.importorskip("trl")
from hf_collapse import CollapseSFTConfig, CollapseSFTTrainer  # noqa: E402  (only with trl installed)

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(100)]
# plain SGD, no clipping, constant rate: an update is -lr * gradient, so (update with λ) - (update without λ)
# is exactly the penalty's share of the gradient
SGD = dict(learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def texts(n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (length,), generator=g).tolist()) for _ in range(n)]


def sft_config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
        per_device_train_batch_size=4, logging_steps=1, max_length=32, bf16=False, msw_normalization="none", **SGD,
    )  # TRL turns bf16 on by default; float32 keeps the gradient comparisons exact; raw distances, as the references
    return CollapseSFTConfig(**{**defaults, **kwargs})


def params(model, only=None):
    return {n: p.detach().clone() for n, p in model.named_parameters() if only is None or only in n}


def difference(a, b):
    return {n: a[n] - b[n] for n in a}


def largest(tensors):
    return max(float(t.abs().max()) for t in tensors.values())


def assert_same_share(actual, expected, rtol=1e-4, atol=1e-6):
    assert largest(expected) > 1e-3  # the penalty does move the weights (well above atol), so equality means something
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def penalty_share(model, batch, weight, lr, only=None):
    """-lr · ∇(λ · mean over layers of MSW) from one forward pass of `batch`, computed by hand (FixedDirection)."""
    search = FixedDirection(32)
    values = []

    def record(stack, index, x, y):
        values.append(max_sliced_wasserstein(x, y, search=search))

    model.train()
    with LayerCapture(model, record) as capture, capture.armed(batch):
        model(**batch)
    penalty = weight * torch.stack(values).mean()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (only is None or only in n)]
    grads = torch.autograd.grad(penalty, [p for _, p in named], allow_unused=True)
    model.zero_grad(set_to_none=True)
    return {n: -lr * (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}


# ----------------------------------------------------------------------------------------------------
# TRL's SFTTrainer


def build_sft(tmp_path, tokenizer, weight, steps=2, **kwargs):
    data = datasets.Dataset.from_dict({"text": texts(4 * steps, 10)})
    recorder = LogRecorder()
    trainer = CollapseSFTTrainer(
        model=tiny_llama(), args=sft_config(tmp_path, max_steps=steps, msw_weight=weight, **kwargs.pop("args", {})),
        train_dataset=data, processing_class=tokenizer, callbacks=[recorder], **kwargs,
    )
    trainer._search = FixedDirection(32)
    return trainer, recorder


def run_sft(tmp_path, tokenizer, weight, steps=2, **kwargs):
    trainer, recorder = build_sft(tmp_path, tokenizer, weight, steps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates compute_loss_func and label smoothing
        trainer.train()
    return trainer, params(trainer.model), [log for log in recorder.logs if "loss" in log]


def test_sft_penalty_reaches_the_weights_and_is_logged(tmp_path, tokenizer):
    """The bug of the issue: an SFT run with the penalty ended bit-identical to one without."""
    _, without, logs_without = run_sft(tmp_path / "a", tokenizer, 0.0)
    _, with_penalty, logs = run_sft(tmp_path / "b", tokenizer, 5.0)
    assert largest(difference(with_penalty, without)) > 1e-4
    assert len(logs) == 2 and len(logs_without) == 2
    for log in logs:
        layers = [log[f"msw/layer_{i}"] for i in range(3)]
        assert log["msw/weight"] == 5.0 and log["msw/penalty"] > 0
        assert log["msw/penalty"] == pytest.approx(5.0 * sum(layers) / 3, rel=1e-5)
        assert "mean_token_accuracy" in log  # TRL's own metrics are still logged next to ours
    assert all(log["msw/penalty"] == 0.0 for log in logs_without)
    # the first step sees the same weights, so the same distances, with and without the penalty
    assert logs[0]["msw/layer_1"] == pytest.approx(logs_without[0]["msw/layer_1"], rel=1e-6)


def test_sft_penalty_weighs_the_same_with_gradient_accumulation(tmp_path, tokenizer):
    """TRL's loss is already scaled for accumulation (num_items_in_batch): the penalty must be divided by the mixin."""
    from torch.utils.data import SequentialSampler

    class Sequential(CollapseSFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    pair = texts(2, 10, seed=4)
    data = datasets.Dataset.from_dict({"text": pair + pair})  # [a, b, a, b]: each half holds the same tokens

    def run(weight, batch, accumulation):
        args = sft_config(
            tmp_path, max_steps=1, msw_weight=weight, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = Sequential(model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer)
        trainer._search = FixedDirection(32)
        trainer.train()
        return params(trainer.model)

    full = difference(run(5.0, 4, 1), run(0.0, 4, 1))
    accumulated = difference(run(5.0, 2, 2), run(0.0, 2, 2))
    assert_same_share(accumulated, full, rtol=1e-3)


def _sft_first_batch(tmp_path, tokenizer):
    trainer, _ = build_sft(tmp_path, tokenizer, 0.0, steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def _cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize(
    "loss_path",
    [dict(), dict(args=dict(label_smoothing_factor=0.1)), dict(compute_loss_func=_cross_entropy)],
    ids=["fused_nll", "label_smoothing", "compute_loss_func"],
)
def test_sft_penalty_gradient_is_that_of_one_forward_on_every_loss_path(tmp_path, tokenizer, loss_path):
    """Label smoothing and compute_loss_func run a second, no-grad forward in TRL: it must not take the penalty."""
    _, without, _ = run_sft(tmp_path / "a", tokenizer, 0.0, steps=1, **copy.deepcopy(loss_path))
    _, with_penalty, logs = run_sft(tmp_path / "b", tokenizer, 5.0, steps=1, **copy.deepcopy(loss_path))
    # equal-length texts: every batch is the same 4 rows (in some order), without padding
    batch = _sft_first_batch(tmp_path / "c", tokenizer)
    assert batch["input_ids"].shape == (4, 11) and bool(batch["attention_mask"].all())
    expected = penalty_share(tiny_llama(), batch, 5.0, SGD["learning_rate"])
    assert_same_share(difference(with_penalty, without), expected)
    assert logs[0]["msw/penalty"] > 0


@pytest.mark.parametrize("choice", ["score", "measured"])
def test_sft_chooses_targets_on_its_evaluation_rows(tmp_path, tokenizer, choice):
    model = tiny_llama()
    with torch.no_grad():  # layer 1 is exactly the identity: its distance is 0 and bypassing it costs nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    data = datasets.Dataset.from_dict({"text": texts(8, 10)})
    args = sft_config(
        tmp_path, max_steps=3, learning_rate=1e-5, collapse_num_layers=1, target_choice=choice, target_choice_steps=1,
        target_choice_samples=4, msw_adapt_steps=1,
    )
    trainer = CollapseSFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tokenizer)
    trainer.train()
    event, *adaptations = trainer.msw_schedule
    assert event.targets == trainer.collapse_targets
    # one scoring pass or 3 single-layer bypasses, plus the reference loss of the adaptation
    assert event.evaluations == (1 if choice == "score" else 3) + 1
    assert [a.step for a in adaptations] == [2]
    if choice == "score":
        assert trainer.collapse_targets == [1]


def test_sft_refuses_distillation_at_construction(tmp_path, tokenizer):
    data = datasets.Dataset.from_dict({"text": texts(4, 10)})
    args = sft_config(tmp_path, max_steps=4, collapse_layers=[1], target_choice_steps=2, msw_adaptive=False, distill_weight=1.0)
    with pytest.raises(ValueError, match="distill_weight > 0 needs the student's logits"):
        CollapseSFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer)


# ----------------------------------------------------------------------------------------------------
# The capture contract on hand-written trainers


class DoubleForwardTrainer(SequentialTrainer):
    """A trainer whose compute_loss also runs a no-grad pass on other inputs (like a reference model would)."""

    order = "reference_first"

    def reference_pass(self, model, inputs):
        other = {"input_ids": inputs["input_ids"].flip(0).roll(1, dims=1), "attention_mask": inputs["attention_mask"]}
        with torch.no_grad():
            model(**other)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.order == "reference_first":
            self.reference_pass(model, inputs)
        if self.order == "two_gradient_passes":
            first = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            second = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            loss = (first + second) / 2
        else:
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.order == "reference_after":
            self.reference_pass(model, inputs)
        return loss


class AdapterReferenceTrainer(DoubleForwardTrainer):
    """The reference is the base model: the PEFT adapter disabled, as DPO does for a PEFT policy."""

    def reference_pass(self, model, inputs):
        with torch.no_grad(), model.disable_adapter():
            model(**inputs)


class CollapseDoubleForward(MSWPenaltyMixin, DoubleForwardTrainer):
    pass


class CollapseAdapterReference(MSWPenaltyMixin, AdapterReferenceTrainer):
    pass


class SequentialCollapse(MSWPenaltyMixin, SequentialTrainer):
    pass


def _one_step(tmp_path, trainer_cls, model, weight, order=None, only=None):
    recorder = LogRecorder()
    data = lm_dataset(4, seed=3)
    trainer = trainer_cls(
        model=model, args=config(tmp_path, max_steps=1, msw_weight=weight, **SGD), train_dataset=data,
        callbacks=[recorder],
    )
    if order is not None:
        trainer.order = order
    trainer._search = FixedDirection(32)
    trainer.train()
    return params(model, only), [log for log in recorder.logs if "loss" in log][0]


@pytest.mark.parametrize("order", ["reference_first", "reference_after", "two_gradient_passes"])
def test_a_second_forward_in_the_step_neither_overwrites_nor_nulls_the_penalty(tmp_path, order):
    single, single_log = _one_step(tmp_path, SequentialCollapse, tiny_llama(), 5.0)
    base, _ = _one_step(tmp_path, SequentialCollapse, tiny_llama(), 0.0)
    double, double_log = _one_step(tmp_path, CollapseDoubleForward, tiny_llama(), 5.0, order)
    double_base, _ = _one_step(tmp_path, CollapseDoubleForward, tiny_llama(), 0.0, order)
    assert_same_share(difference(double, double_base), difference(single, base))
    for i in range(3):
        assert double_log[f"msw/layer_{i}"] == pytest.approx(single_log[f"msw/layer_{i}"], rel=1e-6)
    assert double_log["msw/penalty"] == pytest.approx(single_log["msw/penalty"], rel=1e-6)


def _lora_llama():
    # non-zero adapters from the start: the reference (adapter disabled) differs from the policy in step 1
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    return peft.get_peft_model(tiny_llama(), lora)


@pytest.mark.parametrize("order", ["reference_first", "reference_after"])
def test_a_reference_pass_with_the_adapter_disabled_changes_nothing(tmp_path, order):
    single, single_log = _one_step(tmp_path, SequentialCollapse, _lora_llama(), 5.0, only="lora_")
    base, _ = _one_step(tmp_path, SequentialCollapse, _lora_llama(), 0.0, only="lora_")
    double, double_log = _one_step(tmp_path, CollapseAdapterReference, _lora_llama(), 5.0, order, only="lora_")
    double_base, _ = _one_step(tmp_path, CollapseAdapterReference, _lora_llama(), 0.0, order, only="lora_")
    assert_same_share(difference(double, double_base), difference(single, base))
    assert double_log["msw/penalty"] == pytest.approx(single_log["msw/penalty"], rel=1e-6)


def test_dpo_on_a_peft_model_gets_the_policy_pass_penalty(tmp_path, tokenizer):
    """The two-line recipe on TRL's DPOTrainer; the reference is the base model (adapter disabled)."""
    from trl import DPOConfig, DPOTrainer

    @dataclass
    class CollapseDPOConfig(MSWArguments, DPOConfig):
        pass

    class CollapseDPOTrainer(MSWPenaltyMixin, DPOTrainer):
        pass

    prompts, chosen, rejected = texts(4, 4, seed=1), texts(4, 5, seed=2), texts(4, 5, seed=3)
    data = datasets.Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)

    def build(weight, name):
        args = CollapseDPOConfig(
            output_dir=str(tmp_path / name), report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
            max_steps=1, per_device_train_batch_size=4, logging_steps=1, msw_weight=weight, bf16=False,
            msw_normalization="none", **SGD,
        )
        torch.manual_seed(5)
        trainer = CollapseDPOTrainer(
            model=tiny_llama(), args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
        trainer._search = FixedDirection(32)
        assert trainer.ref_model is None  # the reference pass is the policy with its adapter disabled
        return trainer

    runs = {}
    for weight, name in [(0.0, "base"), (5.0, "msw")]:
        trainer = build(weight, name)
        if weight:
            batch = next(iter(trainer.get_train_dataloader()))
            policy_batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
            expected = penalty_share(trainer.model, policy_batch, weight, SGD["learning_rate"], only="lora_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        runs[name] = (params(trainer.model, "lora_"), trainer.state.log_history[0])
    share = difference(runs["msw"][0], runs["base"][0])
    # adapters that were not trained (none here) would hold zero share; every lora parameter is trainable
    assert_same_share(share, expected, rtol=1e-3, atol=1e-6)
    log = runs["msw"][1]
    assert log["msw/penalty"] > 0 and log["rewards/chosen"] != 0  # a real reference, different from the policy


# ----------------------------------------------------------------------------------------------------
# Packing and masks


class CountingCollapse(SequentialCollapse):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clouds = []

    def _on_layer(self, stack, index, tokens_in, tokens_out):
        self.clouds.append((index, tokens_in.shape[0], tokens_in.detach().clone()))
        super()._on_layer(stack, index, tokens_in, tokens_out)


def test_padding_free_batches_count_every_packed_token(tmp_path):
    """TRL's padding-free packing: input_ids (1, N), position_ids restarting per document, no attention_mask."""
    documents = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 3, 6)]
    packed = torch.cat(documents).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(d)) for d in documents]).unsqueeze(0)
    batch = {"input_ids": packed, "position_ids": position_ids, "labels": packed.clone()}
    model = tiny_llama()
    trainer = CountingCollapse(model=model, args=config(tmp_path, msw_weight=1.0, msw_normalization="none"))
    trainer._search = FixedDirection(32)
    model.train()
    loss = trainer.compute_loss(model, batch)
    assert [n for _, n, _ in trainer.clouds] == [14, 14, 14]
    loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    # the samples are the tokens of all documents: the value is that of the whole (14, d) cloud
    logged = trainer._msw_metrics["train"]["msw/layer_0"][0]
    values = {}

    def record(stack, index, x, y):
        values[index] = float(max_sliced_wasserstein(x, y, search=FixedDirection(32)))

    with torch.no_grad(), LayerCapture(model, record) as capture, capture.armed({}):
        model(input_ids=packed, position_ids=position_ids)
    assert logged == pytest.approx(values[0], rel=1e-5)


def test_sft_padding_free_training_runs_the_penalty_on_all_tokens(tmp_path, tokenizer):
    model = tiny_llama()
    lengths = [6, 9, 4, 7]
    data = datasets.Dataset.from_dict({"text": [texts(1, n, seed=n)[0] for n in lengths]})
    seen = []

    class Counting(CollapseSFTTrainer):
        def _on_layer(self, stack, index, tokens_in, tokens_out):
            seen.append(tokens_in.shape[0])
            super()._on_layer(stack, index, tokens_in, tokens_out)

        def compute_loss(self, model, inputs, *args, **kwargs):
            assert "attention_mask" not in inputs and inputs["input_ids"].shape[0] == 1
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = Counting(
        model=model, args=sft_config(tmp_path, max_steps=1, msw_weight=5.0, padding_free=True, max_length=None),
        train_dataset=data, processing_class=tokenizer,
    )
    before = params(model)
    trainer.train()
    assert seen == [sum(lengths) + len(lengths)] * 3  # every token of every document (and its EOS)
    assert largest(difference(params(model), before)) > 0


class RenamedMaskTrainer(SequentialTrainer):
    """A trainer whose collator calls the padding mask `padding_mask`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["padding_mask"], labels=inputs["labels"]).loss


class CollapseRenamedMask(MSWPenaltyMixin, RenamedMaskTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.clouds = {}

    def _on_layer(self, stack, index, tokens_in, tokens_out):
        self.clouds.setdefault(index, []).append(tokens_in.detach().clone())
        super()._on_layer(stack, index, tokens_in, tokens_out)


def test_padding_never_counts_with_a_renamed_mask(tmp_path):
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "padding_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model = tiny_llama().eval()

    def clouds(inputs, **kwargs):
        trainer = CollapseRenamedMask(model=model, args=config(tmp_path, **kwargs))
        trainer._search = FixedDirection(32)
        with torch.no_grad():
            for one in inputs:
                trainer.compute_loss(model, one)
        return {i: torch.cat(v) for i, v in trainer.clouds.items()}

    named = clouds([batch], msw_mask_key="padding_mask")
    assert [len(named[i]) for i in range(3)] == [13, 13, 13]
    # the same samples as the two rows run alone, without their padding (right padding, causal attention)
    rows = [
        {"input_ids": ids[:1], "padding_mask": mask[:1], "labels": ids[:1]},
        {"input_ids": ids[1:, :5], "padding_mask": mask[1:, :5], "labels": ids[1:, :5]},
    ]
    alone = clouds(rows, msw_mask_key="padding_mask")
    for i in range(3):
        torch.testing.assert_close(named[i], alone[i], rtol=1e-5, atol=1e-6)
    # without the key the mixin cannot know the collator's mask: every position is a sample
    assert [len(v) for v in clouds([batch]).values()] == [16, 16, 16]


def test_padded_sft_batches_never_count_padding(tmp_path, tokenizer):
    lengths = [3, 8, 5, 6]
    data = datasets.Dataset.from_dict({"text": [texts(1, n, seed=n)[0] for n in lengths]})
    seen = []

    class Counting(CollapseSFTTrainer):
        def _on_layer(self, stack, index, tokens_in, tokens_out):
            seen.append(tokens_in.shape[0])
            super()._on_layer(stack, index, tokens_in, tokens_out)

    trainer = Counting(
        model=tiny_llama(), args=sft_config(tmp_path, max_steps=1, msw_weight=1.0), train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    assert seen == [sum(lengths) + len(lengths)] * 3  # the real tokens and EOS, not 4 x 9 padded positions


# ----------------------------------------------------------------------------------------------------
# Bad input


class NoModelTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return sum(p.sum() for p in model.parameters()) * 0.0


class NoGradModelTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            model(input_ids=inputs["input_ids"])
        return sum(p.sum() for p in model.parameters()) * 0.0


class CollapseNoModel(MSWPenaltyMixin, NoModelTrainer):
    pass


class CollapseNoGradModel(MSWPenaltyMixin, NoGradModelTrainer):
    pass


@pytest.mark.parametrize("trainer_cls", [CollapseNoModel, CollapseNoGradModel])
def test_a_compute_loss_that_never_runs_the_model_fails_at_the_first_step(tmp_path, trainer_cls):
    model = tiny_llama()
    before = params(model)
    trainer = trainer_cls(model=model, args=config(tmp_path, max_steps=2), train_dataset=lm_dataset(8))
    with pytest.raises(RuntimeError, match=trainer_cls.__name__ + r"\.compute_loss ran no forward pass"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert largest(difference(params(model), before)) == 0


def test_the_mixin_refuses_arguments_without_the_msw_fields(tmp_path, tokenizer):
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="SequentialCollapse needs training arguments with the msw_\\* fields.*TrainingArguments"):
        SequentialCollapse(model=tiny_llama(), args=plain)
    with pytest.raises(TypeError, match="msw_\\* fields.*got SFTConfig"):
        CollapseSFTTrainer(
            model=tiny_llama(), args=trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=datasets.Dataset.from_dict({"text": texts(4, 5)}), processing_class=tokenizer,
        )
    with pytest.raises(TypeError, match="got no args"):
        SequentialCollapse(model=tiny_llama())
    # the arguments given positionally are checked too
    with pytest.raises(TypeError, match="got TrainingArguments"):
        SequentialCollapse(tiny_llama(), plain)


def test_import_hf_collapse_does_not_need_trl():
    import subprocess

    # trl made unimportable, as on a machine without the extra
    code = (
        "import sys, importlib.util\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'trl' else find_spec(name, *a)\n"
        "sys.modules['trl'] = None\n"
        "import hf_collapse\n"
        "print(sorted(n for n in hf_collapse.__all__ if 'SFT' in n), hf_collapse.CollapseTrainer.__mro__[1].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "MSWPenaltyMixin"]


# ----------------------------------------------------------------------------------------------------
# collapse_model: the post-training step


def identity_layer_llama(identity=1, layers=4):
    """A tiny Llama whose layer `identity` is exactly the identity (its residual branches write zeros)."""
    model = tiny_llama(layers=layers)
    with torch.no_grad():
        model.model.layers[identity].self_attn.o_proj.weight.zero_()
        model.model.layers[identity].mlp.down_proj.weight.zero_()
    return model.eval()


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(3, VOCAB, (2, 10), generator=g), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
        for _ in range(n)
    ]


def lm_loss(model, data):
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b, labels=b["input_ids"]).loss) for b in data) / len(data)


def test_collapse_model_with_explicit_layers_needs_no_data():
    model = tiny_llama(layers=4)
    probe = batches(1)[0]
    with torch.no_grad(), bypass_layers(model, [1, 2]):
        expected = model.eval()(**probe).logits
    parameters = model.num_parameters()
    collapsed, report = collapse_model(model, layers=[2, 1])
    assert collapsed is model and len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert report.removed_layers == [1, 2] and report.layers_before == 4
    assert report.num_parameters_before == parameters and report.num_parameters_after == model.num_parameters()
    assert report.scores is None and report.score_method is None
    assert report.task_metric is None and report.metric_before is None and report.metric_after is None
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, expected, rtol=1e-5, atol=1e-5)


def test_collapse_model_ranked_removes_the_lowest_scoring_layer():
    model = identity_layer_llama(identity=2)
    _, report = collapse_model(model, num_layers=1, strategy="ranked", calibration=batches())
    assert report.removed_layers == [2] and report.score_method == "msw"
    assert len(report.scores) == 4 and report.scores[2] == pytest.approx(0.0, abs=1e-6)
    assert min(report.scores[i] for i in (0, 1, 3)) > 1e-4
    assert report.metric_before is None  # nothing evaluated without an evaluate function


def test_collapse_model_measured_chooses_on_the_metric_and_reports_on_another():
    model = identity_layer_llama(identity=1)
    choose_rows, report_rows = batches(2, seed=1), batches(2, seed=2)
    original = copy.deepcopy(model)
    choose_calls = []

    def choose_on(m):
        choose_calls.append(1)
        return -lm_loss(m, choose_rows)

    collapsed, report = collapse_model(
        model, num_layers=1, strategy="measured", choose_on=choose_on,
        evaluate=lambda m: lm_loss(m, report_rows), metric_name="loss", higher_is_better=False,
    )
    assert report.removed_layers == [1]
    assert report.selection_curve[0][0] == [] and report.selection_curve[-1][0] == [1]
    assert report.selection_curve[-1][1] == pytest.approx(report.selection_curve[0][1], abs=1e-6)
    assert len(choose_calls) >= 1 + 4  # the full model and each single-layer bypass
    assert report.task_metric == "loss"
    assert report.metric_before == pytest.approx(lm_loss(original, report_rows), rel=1e-6)
    assert report.metric_after == pytest.approx(lm_loss(collapsed, report_rows), rel=1e-6)
    # removing an identity layer costs nothing
    assert report.metric_after == pytest.approx(report.metric_before, abs=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_layers=1), "pass choose_on"),
        (dict(tolerance=0.1, calibration=batches(1)), "pass choose_on"),
        (dict(num_layers=1, strategy="ranked"), "needs calibration data"),
        (dict(layers=[1], num_layers=1), "give exactly one of layers, num_layers and tolerance"),
        (dict(), "give exactly one of"),
        (dict(layers=[4]), r"collapse_layers \[4\] do not exist: the model has 4 layers"),
        (dict(layers=[0], protect_first=1), "protected"),
    ],
)
def test_collapse_model_refuses_what_it_cannot_do_and_leaves_the_model(kwargs, message):
    model = tiny_llama(layers=4)
    before = params(model)
    with pytest.raises(ValueError, match=message):
        collapse_model(model, **kwargs)
    assert len(model.model.layers) == 4 and largest(difference(params(model), before)) == 0


def _save_tiny(tmp_path, tokenizer, layers=4):
    source = tmp_path / "src"
    tiny_llama(layers=layers).save_pretrained(source)
    tokenizer.save_pretrained(source)
    return source


def test_cli_collapse_with_layers_and_no_data(tmp_path, tokenizer, capsys):
    from hf_collapse.cli import main

    source = _save_tiny(tmp_path, tokenizer)
    saved = {p.name: p.read_bytes() for p in source.iterdir()}
    out = tmp_path / "out"
    assert main(["collapse", str(source), str(out), "--layers", "1,2"]) == 0
    assert "4 -> 2 layers" in capsys.readouterr().out
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["num_hidden_layers"] == 2 and config_json["collapsed_layers"] == [1, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(reloaded.model.layers) == 2
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    probe = batches(1)[0]
    with torch.no_grad(), bypass_layers(original, [1, 2]):
        expected = original(**probe).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**probe).logits, expected, rtol=1e-5, atol=1e-5)
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "layer_scores.png").exists()  # no scores were computed
    assert not (tmp_path / "out.work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == saved


def test_cli_collapse_without_data_refuses_fields_that_need_data(tmp_path, tokenizer, capsys):
    from hf_collapse.cli import main

    source = _save_tiny(tmp_path, tokenizer)
    assert main(["collapse", str(source), str(tmp_path / "out"), "--layers", "1", "--method", "angular"]) == 2
    assert "need data" in capsys.readouterr().err
    assert main(["collapse", str(source), str(tmp_path / "out"), "--layers", "9"]) == 2
    assert "collapse_layers [9] do not exist: the model has 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# The README's TRL example, run on a tiny model


def test_readme_trl_example_runs_on_a_tiny_model(tmp_path, tokenizer, monkeypatch):
    source = _save_tiny(tmp_path, tokenizer)
    out = tmp_path / "collapsed"
    monkeypatch.setattr(sys, "argv", [
        "trl_sft_collapse.py", "--model", str(source), "--texts", *texts(16, 12), "--out", str(out),
        "--max_steps", "2", "--num_layers", "1", "--output_dir", str(tmp_path / "run"), "--cpu",
    ])
    runpy.run_path(str(ROOT / "tests" / "scripts" / "trl_sft_collapse.py"), run_name="__main__")
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["num_hidden_layers"] == 3 and len(config_json["collapsed_layers"]) == 1
    assert len(AutoModelForCausalLM.from_pretrained(out).model.layers) == 3
    card = (out / "README.md").read_text()
    assert "hf-collapse" in card and (out / "layer_scores.png").is_file()
