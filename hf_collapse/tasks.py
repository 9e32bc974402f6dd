"""Task strategies of a recipe run: what differs between a transformers task and a sentence-transformers pipeline.

A [`RecipeRun`] does the same steps for every task; a strategy supplies the parts that depend on it: loading the
model and data, the trainer, the plain model to collapse after training, label-free calibration batches, the
evaluators that choose and report, a latency batch, the task's own report fields and the export source.
[`TransformersTask`] serves `text-classification`, `causal-lm` and `image-classification`; the
sentence-transformers strategy lives in `sentence_recipe.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from .data import TaskData, load_task_data
from .evaluation import evaluate_classification, perplexity
from .models import PIPELINE_TAGS, check_head_trained, load_model, load_processor
from .quantization import describe_quantization, merge_dequantized
from .recipe import RecipeArguments
from .trainer import CollapseTrainer

if TYPE_CHECKING:
    from .pipeline import RecipeRun

__all__ = [
    "TaskStrategy", "TransformersTask", "choice_and_report_rows", "first_batch", "label_free_batches", "task_evaluator",
]


def label_free_batches(rows, collator, batch_size: int, device=None, *, limit: int | None = None) -> list[dict]:
    """`rows` (the first `limit` of them) batched by `collator`, without the `labels` column, on `device`: the
    calibration batches that score layers, and the batches that time a model."""
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=collator)
    return [{k: (v.to(device) if device is not None else v) for k, v in b.items() if k != "labels"} for b in loader]


def task_evaluator(task: str, dataset, collator, batch_size: int):
    """(metric name, higher is better, model -> metric) on one split of a recipe's data."""
    if task == "causal-lm":
        return "perplexity", False, lambda model: perplexity(model, dataset, batch_size=batch_size, progress=False)
    return "accuracy", True, lambda model: evaluate_classification(
        model, dataset, batch_size=batch_size, collator=collator, progress=False
    )["accuracy"]


def choice_and_report_rows(data: TaskData, recipe: RecipeArguments):
    """(rows that choose the layers, rows the figures are reported on, and their split names): validation and test,
    or, for data without a test split, the two halves of the validation rows."""
    if data.test is not None:
        return data.eval, data.test, recipe.eval_split, "test"
    halves = data.eval.train_test_split(test_size=0.5, seed=recipe.split_seed)
    return halves["train"], halves["test"], f"{recipe.eval_split} (half A)", f"{recipe.eval_split} (half B)"


def data_line(data: TaskData) -> str:
    test = data.test
    return (
        f"data: {len(data.train)} training rows, {len(data.eval)} validation rows"
        + (f", {len(test)} test rows" if test is not None else "") + f" ({', '.join(data.dataset_ids)})"
    )


class TaskStrategy:
    """What a [`RecipeRun`] asks of a task. Subclasses set the attributes and implement the methods."""

    metric_name: str
    higher_is_better: bool = True
    timed = "models"  # what the latency line says it times

    def load(self, run: RecipeRun) -> None:
        """Load the model, processing class and data: set `run.model`, `run.processor`, `run.data`."""
        raise NotImplementedError

    def make_trainer(self, run: RecipeRun):
        raise NotImplementedError

    def training_line(self, run: RecipeRun) -> str:
        raise NotImplementedError

    def collapsible(self, run: RecipeRun) -> torch.nn.Module:
        """The trained model as the plain module whose layers are removed (adapters merged)."""
        raise NotImplementedError

    def batches(self, run: RecipeRun, rows) -> list[dict]:
        """Label-free model inputs of `rows`, batched by the evaluation batch size."""
        raise NotImplementedError

    def evaluator(self, run: RecipeRun, rows) -> Callable[[torch.nn.Module], float]:
        raise NotImplementedError

    def full_copy(self, run: RecipeRun) -> torch.nn.Module:
        """A copy of the model to collapse, taken before the collapse (the latency reference, a teacher)."""
        return copy.deepcopy(run.model)

    def latency_batch(self, run: RecipeRun) -> dict:
        raise NotImplementedError

    def after_collapse(self, run: RecipeRun) -> None:
        """Restore what loading changed for the run (nothing by default)."""

    def report_fields(self, run: RecipeRun) -> dict[str, Any]:
        """The task's own report fields (pipeline tag, quantisation, ...)."""
        return {}

    def export_args(self, run: RecipeRun) -> dict[str, Any]:
        """`processing_class` and `source` for [`export_collapsed`]."""
        return {"processing_class": run.processor}


class TransformersTask(TaskStrategy):
    """A transformers model with a task head: `text-classification`, `causal-lm` or `image-classification`."""

    def __init__(self, recipe: RecipeArguments):
        self.task = recipe.task
        self.metric_name, self.higher_is_better = ("perplexity", False) if recipe.task == "causal-lm" else ("accuracy", True)
        self.lora = None
        self.quantized_training = None

    def load(self, run: RecipeRun) -> None:
        recipe, config = run.recipe, run.config
        run.stage(f"loading {recipe.model_name_or_path} ({run.resolved.path})")
        run.processor = load_processor(recipe, run.resolved)
        run.data = load_task_data(recipe, run.processor)
        device = config.device if recipe.quantized else None
        run.model = load_model(recipe, run.resolved, run.processor, run.data.label_names, device=device)
        run.stage(data_line(run.data))
        if recipe.task == "image-classification":
            config.remove_unused_columns = False  # the image transform needs the raw image column
        if recipe.use_peft:
            self._wrap_lora(run)

    def _wrap_lora(self, run: RecipeRun) -> None:
        recipe = run.recipe
        import peft

        task_type = {"causal-lm": "CAUSAL_LM", "text-classification": "SEQ_CLS"}.get(recipe.task)
        self.lora = peft.LoraConfig(
            r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=recipe.lora_target_modules or "all-linear", task_type=task_type,
        )
        run.model = peft.get_peft_model(run.model, self.lora)

    def make_trainer(self, run: RecipeRun):
        mixed = run.training and run.config.target_repair != "none" and run.recipe.repair_dataset_name
        rows, source = run.repair_fit_rows(run.config.target_repair_samples) if mixed else (None, None)
        return CollapseTrainer(
            model=run.model, args=run.config, train_dataset=run.data.train, eval_dataset=run.data.eval,
            data_collator=run.data.collator, processing_class=run.processor, repair_dataset=rows, repair_source=source,
        )

    def training_line(self, run: RecipeRun) -> str:
        config = run.config
        target = None
        if config.has_target:
            target = "targeting " + (str(config.collapse_layers) if config.collapse_layers else f"{config.collapse_num_layers} layers")
        if config.msw_weight > 0:
            return f"fine-tuning with the MSW penalty (weight {config.msw_weight}, {target or 'uniform'}, {config.msw_search} directions)"
        fade = f", faded out (fade_steps {config.fade_steps})" if config.fade_steps else ""
        return f"fine-tuning without the MSW penalty ({target + fade if target else 'a plain fine-tune'}; distances are still logged)"

    def collapsible(self, run: RecipeRun) -> torch.nn.Module:
        if run.trainer is not None:
            trained = run.trainer.model
        else:  # collapsing a checkpoint as it is: on the device a trainer would have used
            trained = run.model if getattr(run.model, "hf_device_map", None) else run.model.to(run.config.device)
        self.quantized_training = describe_quantization(trained)  # QLoRA: read before the merge drops the config
        if run.recipe.use_peft:  # merge_and_unload() would quantise the merged sum again
            model = merge_dequantized(trained) if self.quantized_training else trained.merge_and_unload()
        else:
            model = trained
        model.eval()
        check_head_trained(model, "measure it on the task or choose layers by its metric")
        return model

    def batches(self, run: RecipeRun, rows) -> list[dict]:
        return label_free_batches(rows, run.data.collator, run.config.per_device_eval_batch_size, run.model.device)

    def evaluator(self, run: RecipeRun, rows) -> Callable[[torch.nn.Module], float]:
        return task_evaluator(self.task, rows, run.data.collator, run.config.per_device_eval_batch_size)[2]

    def latency_batch(self, run: RecipeRun) -> dict:
        return first_batch(run.data, run.config.per_device_eval_batch_size, run.model.device)

    def report_fields(self, run: RecipeRun) -> dict[str, Any]:
        quantized = self.quantized_training
        return dict(
            pipeline_tag=PIPELINE_TAGS[self.task],
            quantized_training=quantized,
            dequantized_dtype=str(run.model.dtype).removeprefix("torch.") if quantized else None,
        )


def first_batch(data: TaskData, batch_size: int, device) -> dict:
    """The first `batch_size` validation rows as one label-free batch on `device` (the latency batch)."""
    (batch,) = label_free_batches(data.eval, data.collator, batch_size, device, limit=batch_size)
    return batch
