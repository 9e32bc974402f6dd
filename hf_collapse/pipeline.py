"""The whole job of a recipe: fine-tune with the penalty, score, choose, collapse, evaluate, export."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from .card import CollapseReport
from .config import CollapseConfig
from .data import TaskData, load_task_data
from .layers import find_layer_stacks
from .models import PIPELINE_TAGS, load_model, load_processor, resolve_model
from .recipe import RecipeArguments, RecipeError
from .scoring import LayerScores, score_layers, select_by_tolerance, select_explicit, select_lowest
from .surgery import collapse_layers
from .trainer import CollapseTrainer

__all__ = ["RunSummary", "run_recipe"]


@dataclass
class RunSummary:
    """What a run did; printed as the closing table of `hf-collapse train`."""

    layers_before: int
    layers_after: int
    removed: list[int]
    parameters_before: int
    parameters_after: int
    metric_name: str
    metric_before: float
    metric_after: float
    perplexity_before: float | None
    perplexity_after: float | None
    speedup: float | None
    export_dir: Path | None
    selection_curve: list = field(default_factory=list)

    def table(self) -> str:
        rows = [
            ("layers", f"{self.layers_before}", f"{self.layers_after}"),
            ("parameters", f"{self.parameters_before:,}", f"{self.parameters_after:,}"),
            (self.metric_name, f"{self.metric_before:.4f}", f"{self.metric_after:.4f}"),
        ]
        if self.perplexity_before is not None and self.metric_name != "perplexity":
            rows.append(("perplexity", f"{self.perplexity_before:.2f}", f"{self.perplexity_after:.2f}"))
        if self.speedup is not None:
            rows.append(("measured speed-up", "1.00x", f"{self.speedup:.2f}x"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'before':>14}  {'after':>14}"]
        lines += [f"{name:{width}}  {before:>14}  {after:>14}" for name, before, after in rows]
        lines.append(f"removed layers (0-based, original numbering): {self.removed}")
        if self.export_dir is not None:
            lines.append(f"output: {self.export_dir}")
        return "\n".join(lines)


def _num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _task_evaluator(recipe: RecipeArguments, data: TaskData, batch_size: int):
    """(metric name, higher is better, model -> metric) on the evaluation split."""
    from .evaluation import evaluate_classification, perplexity

    if recipe.task == "causal-lm":
        return "perplexity", False, lambda model: perplexity(model, data.eval, batch_size=batch_size, progress=False)
    return "accuracy", True, lambda model: evaluate_classification(
        model, data.eval, batch_size=batch_size, collator=data.collator, progress=False
    )["accuracy"]


def _selection_sentence(recipe, metric_name: str) -> str:
    """How the layers were chosen, as a clause for the card."""
    if recipe.collapse_layers is not None:
        return "the layers to remove were named in the recipe"
    pool = f"among the {recipe.collapse_candidates} lowest-scoring ones" if recipe.collapse_candidates else "among all"
    measured = f"each time the remaining layer ({pool}) whose bypass hurt validation {metric_name} least"
    if recipe.collapse_num_layers is not None:
        if recipe.collapse_strategy == "ranked":
            return f"the {recipe.collapse_num_layers} lowest-scoring layers were chosen"
        return f"{recipe.collapse_num_layers} layers were chosen one at a time, {measured}"
    within = f"while validation {metric_name} stayed within {recipe.collapse_tolerance} of the full model"
    if recipe.collapse_strategy == "ranked":
        return f"layers were chosen in score order {within}"
    return f"layers were chosen one at a time, {measured}, {within}"


def _choose_layers(recipe, model, scores: LayerScores, evaluate, higher_is_better, log):
    protect = dict(protect_first=recipe.collapse_protect_first, protect_last=recipe.collapse_protect_last)
    if recipe.collapse_layers is not None:
        return select_explicit(recipe.collapse_layers, len(scores), **protect), []
    if recipe.collapse_num_layers is not None and recipe.collapse_strategy == "ranked":
        return select_lowest(scores, recipe.collapse_num_layers, **protect), []
    tolerance = recipe.collapse_tolerance if recipe.collapse_tolerance is not None else math.inf
    selection = select_by_tolerance(
        model, scores, evaluate, tolerance, max_layers=recipe.collapse_num_layers,
        higher_is_better=higher_is_better, strategy=recipe.collapse_strategy,
        num_candidates=recipe.collapse_candidates, **protect,
    )
    for layers, value in selection.curve:
        log(f"    bypassed {list(layers) or 'none'}: {value:.4f}")
    return list(selection.layers), [[list(layers), value] for layers, value in selection.curve]


def _first_batch(data: TaskData, batch_size: int, device) -> dict:
    rows = [data.eval[i] for i in range(min(batch_size, len(data.eval)))]
    batch = data.collator(rows)
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def latency_setup(comparison, batch: dict, model: torch.nn.Module) -> str:
    """How a latency comparison was measured, in one sentence for the card."""
    first = next(iter(batch.values()))
    device = model.device
    threads = comparison.a.threads
    hardware = (
        torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{device.type} ({threads} thread{'' if threads == 1 else 's'})"
    )
    return (
        f"{comparison.a.mode} pass on a batch of shape {tuple(first.shape)}, {model.dtype}, {hardware}; "
        f"median of {len(comparison.a.times_ms)} runs per model, the two models interleaved"
    )


def run_recipe(
    recipe: RecipeArguments, config: CollapseConfig, resolved_recipe: dict, *, train: bool = True, log=print
) -> RunSummary | None:
    """Run a recipe end to end. Returns `None` on non-main processes (they only take part in training)."""
    started = time.perf_counter()

    def stage(text: str) -> None:
        log(f"[{time.perf_counter() - started:6.0f}s] {text}")

    resolved = resolve_model(recipe.model_name_or_path)
    # before anything random: a new classification head and LoRA's initial weights come from the global RNG
    set_seed(config.seed)
    stage(f"loading {recipe.model_name_or_path} ({resolved.path})")
    processor = load_processor(recipe, resolved)
    data = load_task_data(recipe, processor)
    model = load_model(recipe, resolved, processor, data.label_names)
    stage(f"data: {len(data.train)} training rows, {len(data.eval)} evaluation rows ({', '.join(data.dataset_ids)})")
    if recipe.task == "image-classification":
        config.remove_unused_columns = False  # the image transform needs the raw image column

    if recipe.use_peft:
        import peft

        task_type = {"causal-lm": "CAUSAL_LM", "text-classification": "SEQ_CLS"}.get(recipe.task)
        lora = peft.LoraConfig(
            r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=recipe.lora_target_modules or "all-linear", task_type=task_type,
        )
        model = peft.get_peft_model(model, lora)

    from .export import take_hub_push

    hub_push = take_hub_push(config) if recipe.collapse else None  # push the collapsed export, not the full model
    trainer = CollapseTrainer(
        model=model, args=config, train_dataset=data.train, eval_dataset=data.eval,
        data_collator=data.collator, processing_class=processor,
    )
    if train:
        stage(f"fine-tuning with the MSW penalty (weight {config.msw_weight}, {config.msw_search} directions)")
        trainer.train()
    if not recipe.collapse:
        # every rank: under FSDP or DeepSpeed the weights are gathered collectively
        trainer.save_model(config.output_dir)
        if trainer.is_world_process_zero():
            stage(f"saved the fine-tuned model to {config.output_dir} (collapse: false)")
        return None
    if not trainer.is_world_process_zero():
        return None
    if recipe.use_peft:
        model = trainer.model.merge_and_unload()
    else:
        model = trainer.model
    model.eval()

    batch_size = config.per_device_eval_batch_size
    calibration = data.train.select(range(min(recipe.calibration_samples, len(data.train))))
    if len(calibration) == 0:
        raise RecipeError("the training split is empty: there is no calibration data to score the layers")
    loader = DataLoader(calibration, batch_size=batch_size, collate_fn=data.collator)
    stage(f"scoring {len(find_layer_stacks(model)[0])} layers ({recipe.collapse_score_method}) on {len(calibration)} rows")
    batches = [{k: v.to(model.device) for k, v in b.items() if k != "labels"} for b in loader]
    scores = score_layers(model, batches, method=recipe.collapse_score_method)
    stage("scores: " + ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(scores.values)))

    metric_name, higher_is_better, evaluate = _task_evaluator(recipe, data, batch_size)
    metric_before = evaluate(model)
    stage(f"{metric_name} of the full model: {metric_before:.4f}; choosing layers ({recipe.collapse_strategy})")
    removed, curve = _choose_layers(recipe, model, scores, evaluate, higher_is_better, lambda t: stage(t))

    layers_before = len(scores)
    parameters_before = _num_parameters(model)
    full = copy.deepcopy(model) if recipe.latency_repeats else None
    perplexity_before = metric_before if recipe.task == "causal-lm" else None
    earlier_removed = copy.deepcopy(getattr(model.config, "collapsed_layers", None))
    collapse_layers(model, removed)
    stage(f"removed layers {removed}: {layers_before} -> {layers_before - len(removed)} layers")
    metric_after = evaluate(model)
    perplexity_after = metric_after if recipe.task == "causal-lm" else None

    latency = {}
    if full is not None:
        from .evaluation import compare_latency

        stage(f"timing both models ({recipe.latency_repeats} interleaved forward passes each)")
        batch = _first_batch(data, batch_size, model.device)
        comparison = compare_latency(full, model, batch, repeats=recipe.latency_repeats)
        latency = {
            "before_ms": comparison.a.median_ms,
            "after_ms": comparison.b.median_ms,
            "speedup": comparison.speedup,
            "setup": latency_setup(comparison, batch, model),
        }
        del full

    export_dir = Path(recipe.export_dir or Path(config.output_dir) / "collapsed")
    report = CollapseReport(
        base_model=resolved.base_model,
        removed_layers=removed,
        layers_before=layers_before,
        num_parameters_before=parameters_before,
        num_parameters_after=_num_parameters(model),
        scores=list(scores.values),
        score_method=scores.method,
        task_metric=metric_name,
        metric_before=metric_before,
        metric_after=metric_after,
        perplexity_before=perplexity_before,
        perplexity_after=perplexity_after,
        latency_ms_before=latency.get("before_ms"),
        latency_ms_after=latency.get("after_ms"),
        latency_setup=latency.get("setup"),
        datasets=[d for d in data.dataset_ids if not d.startswith("offline:")],
        eval_dataset=recipe.dataset_name,
        eval_split=recipe.eval_split if recipe.dataset_name else None,
        license=resolved.license,
        pipeline_tag=PIPELINE_TAGS[recipe.task],
        recipe=resolved_recipe if train else None,
        limitations=list(resolved.limitations),
        earlier_removed=earlier_removed,
        selection=_selection_sentence(recipe, metric_name),
        selection_curve=curve or None,
    )
    from .export import export_collapsed

    stage(f"exporting to {export_dir}")
    export_collapsed(
        model, export_dir, report=report, processing_class=processor,
        repo_id=recipe.export_repo_id or (hub_push.repo_id if hub_push else None), overwrite=recipe.overwrite_export,
    )
    if hub_push is not None:
        stage(f"pushing {export_dir} to {hub_push.repo_id} (one commit)")
        stage(f"pushed: {hub_push.push(export_dir).commit_url}")
    return RunSummary(
        layers_before=layers_before, layers_after=layers_before - len(removed), removed=removed,
        parameters_before=parameters_before, parameters_after=_num_parameters(model), metric_name=metric_name,
        metric_before=metric_before, metric_after=metric_after, perplexity_before=perplexity_before,
        perplexity_after=perplexity_after, speedup=latency.get("speedup"), export_dir=export_dir.resolve(),
        selection_curve=curve,
    )
