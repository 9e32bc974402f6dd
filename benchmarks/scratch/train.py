"""Build a model from its config (random initialisation) and train it with CollapseTrainer, logging the curves."""

from __future__ import annotations

import tempfile
import time

import torch
import transformers
from transformers import PrinterCallback, TrainerCallback, default_data_collator

import hf_collapse

from .data import Splits
from .studies import ScratchStudy

__all__ = ["Curves", "build_model", "train_arm"]


def build_model(study: ScratchStudy, splits: Splits, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the study's architecture (seeded), never loaded from weights."""
    fields = {k: v for k, v in study.model.items() if k != "model_type"}
    transformers.set_seed(seed)
    if study.kind == "decoder":
        fields.update(vocab_size=splits.vocab_size, max_position_embeddings=study.block_size, pad_token_id=0)
        fields.pop("bos_token_id", None), fields.pop("eos_token_id", None)
        config = transformers.LlamaConfig(**fields)
        return transformers.LlamaForCausalLM(config)
    fields.update(image_size=8, num_channels=1, num_labels=10)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**fields))


class Curves(TrainerCallback):
    """Collects every logged per-layer distance (`msw/layer_<i>`), λ and the training loss, by optimizer step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.distances: list[list[float]] = []
        self.loss: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        layers = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in logs.items() if k.startswith("msw/layer_"))
        if layers and "loss" in logs:
            self.steps.append(state.global_step)
            self.distances.append([v for _, v in layers])
            self.loss.append(float(logs["loss"]))

    def to_dict(self) -> dict:
        return {"steps": self.steps, "msw": self.distances, "loss": self.loss}


def train_arm(study: ScratchStudy, splits: Splits, seed: int, penalty: dict | None) -> tuple[torch.nn.Module, dict, float]:
    """Train a fresh model for `study.steps` steps; `penalty` None is vanilla (λ 0: distances logged, not added).

    Every arm of a seed sees the same rows in the same order and starts from the same weights.
    """
    model = build_model(study, splits, seed)
    fields = penalty or {"msw_weight": 0.0, "msw_normalization": "none"}
    with tempfile.TemporaryDirectory(prefix="hf-collapse-scratch-") as tmp:
        args = hf_collapse.CollapseConfig(
            output_dir=tmp, max_steps=study.steps, per_device_train_batch_size=study.batch_size,
            learning_rate=study.learning_rate, warmup_steps=study.warmup_steps, lr_scheduler_type="cosine",
            weight_decay=0.01, logging_steps=study.log_every, save_strategy="no", eval_strategy="no", report_to="none",
            seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **fields,
        )
        curves = Curves()
        trainer = hf_collapse.CollapseTrainer(
            model=model, args=args, train_dataset=splits.train, data_collator=default_data_collator, callbacks=[curves]
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model.eval()
    return model, curves.to_dict(), seconds
