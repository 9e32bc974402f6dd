"""The recipe task `sentence-embedding`: fine-tune a sentence-transformers model with the penalty (its own trainer
and loss), choose and remove layers of its transformer, export the whole pipeline.

The rows are labelled texts. A sentence-transformers loss that reads classes (by default `BatchAllTripletLoss`:
texts of one class closer than texts of two) trains the embeddings; the metric that chooses the layers and is
reported is the **nearest-centroid accuracy**: each class's mean embedding over the calibration rows (training
rows), and the share of rows whose embedding is closest (cosine) to its own class's centroid. Layers are chosen
on validation rows, the figures are reported on the test split (or the other half of validation), as for every
recipe. The export keeps the pipeline's modules (`SentenceTransformer(out)` loads it) and its card is a
sentence-transformers card.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from .config import CollapseConfig
from .recipe import RecipeArguments, RecipeError

__all__ = ["SENTENCE_METRIC", "centroid_accuracy", "run_sentence_recipe"]

SENTENCE_METRIC = "nearest-centroid accuracy"


def _sentence_transformers():
    try:
        import sentence_transformers
    except ModuleNotFoundError:
        raise RecipeError(
            "task sentence-embedding trains a sentence-transformers model: pip install 'hf-collapse[sentence-transformers]'"
        ) from None
    return sentence_transformers


def check_sentence_recipe(recipe: RecipeArguments, config: CollapseConfig, source: Path | None) -> None:
    """The refusals of a sentence-embedding recipe that need neither weights nor rows."""
    _sentence_transformers()
    if source is not None and source.is_dir() and not (source / "modules.json").is_file():
        raise RecipeError(
            f"task sentence-embedding needs a sentence-transformers checkpoint (a modules.json describing its "
            f"pipeline), and {recipe.model_name_or_path} has none: use text-classification for a plain transformers model"
        )
    for what, asked in (
        ("use_peft", recipe.use_peft), ("heal_steps", config.heal_steps), ("distill_weight", config.distill_weight),
    ):
        if asked:
            raise RecipeError(f"task sentence-embedding does not support {what} yet: remove it from the recipe")
    if config.has_target and config.collapse_layers is None and config.target_choice == "score":
        raise RecipeError(
            "task sentence-embedding chooses targets by measured bypass (the loss on validation rows) or takes "
            "collapse_layers: set target_choice: measured"
        )
    from sentence_transformers.sentence_transformer import losses

    if not isinstance(getattr(losses, recipe.sentence_loss, None), type):
        known = sorted(name for name in dir(losses) if name.endswith("Loss"))
        raise RecipeError(
            f"sentence_loss {recipe.sentence_loss!r} is not a sentence-transformers loss: choose one of "
            f"{', '.join(known[:8])}, ... (a loss for labelled single texts, e.g. BatchAllTripletLoss)"
        )


@torch.no_grad()
def centroid_accuracy(model, reference, rows, *, batch_size: int = 64) -> float:
    """Nearest-centroid accuracy of a sentence-transformers model: class centroids (mean unit embedding) from the
    `reference` rows, then the share of `rows` closest (cosine) to their own class's centroid. Both are datasets
    with `sentence` and `label` columns."""
    def embed(texts):
        vectors = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        return torch.nn.functional.normalize(vectors.float(), dim=-1)

    labels = torch.tensor(reference["label"])
    vectors = embed(reference["sentence"])
    classes = sorted(set(labels.tolist()))
    centroids = torch.nn.functional.normalize(torch.stack([vectors[labels == c].mean(0) for c in classes]), dim=-1)
    predicted = torch.tensor(classes)[(embed(rows["sentence"]) @ centroids.T).argmax(-1).cpu()]
    return float((predicted == torch.tensor(rows["label"])).float().mean())


def _st_config(config: CollapseConfig):
    from dataclasses import fields

    from .sentence_trainer import CollapseSentenceTransformerConfig

    wanted = {f.name for f in fields(CollapseSentenceTransformerConfig) if f.init}
    values = {f.name: getattr(config, f.name) for f in fields(CollapseConfig) if f.init and f.name in wanted}
    return CollapseSentenceTransformerConfig(**values)


def run_sentence_recipe(recipe: RecipeArguments, config: CollapseConfig, resolved_recipe: dict, *, train: bool, stage):
    """[`run_recipe`] for `task: sentence-embedding` (called from it after the preflight checks)."""
    st = _sentence_transformers()
    from sentence_transformers.sentence_transformer import losses

    from .data import load_task_data
    from .hub import take_hub_push
    from .models import resolve_model
    from .pipeline import (
        RunSummary, _target_clause, _training_fields, choice_and_report_rows, export_and_push, timed_pair,
    )
    from .post import collapse_model, selection_sentence
    from .sentence_trainer import CollapseSentenceTransformerTrainer

    resolved = resolve_model(recipe.model_name_or_path)
    stage(f"loading {recipe.model_name_or_path} ({resolved.path}) as a sentence-transformers pipeline")
    device = "cpu" if config.use_cpu or not torch.cuda.is_available() else None
    pipeline = st.SentenceTransformer(str(resolved.path), device=device, trust_remote_code=recipe.trust_remote_code)
    saved_length = pipeline.max_seq_length
    pipeline.max_seq_length = min(recipe.max_length, saved_length or recipe.max_length)
    data = load_task_data(recipe, pipeline.tokenizer)
    test = data.test
    stage(f"data: {len(data.train)} training rows, {len(data.eval)} validation rows"
          + (f", {len(test)} test rows" if test is not None else "") + f" ({', '.join(data.dataset_ids)})")
    hub_push = take_hub_push(config)
    args = _st_config(config)
    trainer = CollapseSentenceTransformerTrainer(
        model=pipeline, args=args, train_dataset=data.train, eval_dataset=data.eval,
        loss=getattr(losses, recipe.sentence_loss)(pipeline),
    )
    if train:
        stage(f"fine-tuning with {recipe.sentence_loss} and the MSW penalty (weight {config.msw_weight})")
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if not trainer.is_world_process_zero():
        return None
    pipeline.eval()
    inner = pipeline[0].auto_model

    calibration = data.train.select(range(min(recipe.calibration_samples, len(data.train))))
    choice_rows, report_rows, selection_split, eval_split = choice_and_report_rows(data, recipe)
    batch_size = config.per_device_eval_batch_size

    def metric_on(rows):
        def measure(model) -> float:
            if model is not inner:
                raise ValueError("the sentence-embedding metric measures the pipeline's own transformer")
            return centroid_accuracy(pipeline, calibration, rows, batch_size=batch_size)
        return measure

    def features(rows):
        texts = list(rows["sentence"])
        batch = pipeline.preprocess(texts) if hasattr(pipeline, "preprocess") else pipeline.tokenize(texts)
        return {k: v.to(inner.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    batches = [features(calibration.select(range(i, min(i + batch_size, len(calibration)))))
               for i in range(0, len(calibration), batch_size)]
    targeted = train and config.has_target
    layers = trainer.collapse_targets if targeted else config.collapse_layers
    full = copy.deepcopy(inner) if recipe.latency_repeats else None
    stage(f"scoring, choosing ({'training targets' if targeted else recipe.collapse_strategy}) and collapsing")
    _, report = collapse_model(
        inner, layers=layers, num_layers=None if layers is not None else config.collapse_num_layers,
        tolerance=None if layers is not None or config.collapse_num_layers is not None else recipe.collapse_tolerance,
        calibration=batches, score_method=recipe.collapse_score_method, strategy=recipe.collapse_strategy,
        candidates=recipe.collapse_candidates, protect_first=config.collapse_protect_first,
        protect_last=config.collapse_protect_last, choose_on=metric_on(choice_rows), evaluate=metric_on(report_rows),
        metric_name=SENTENCE_METRIC, higher_is_better=True, base_model=resolved.base_model,
        selection=selection_sentence(targeted=_target_clause(trainer.msw_schedule[0])) if targeted else None,
        log=stage,
    )
    pipeline.max_seq_length = saved_length
    latency, speedup = {}, None
    if full is not None:
        stage(f"timing both transformers ({recipe.latency_repeats} interleaved forward passes each)")
        batch = features(report_rows.select(range(min(batch_size, len(report_rows)))))
        latency, speedup = timed_pair(full, inner, batch, recipe.latency_repeats)
        del full
    report = dataclasses.replace(
        report, datasets=list(data.dataset_ids), eval_dataset=recipe.dataset_name, eval_split=eval_split,
        selection_split=selection_split if (targeted or layers is None) else None, license=resolved.license,
        **(_training_fields(config, trainer, 0, False) if train else {}),
        recipe=resolved_recipe if train else None, limitations=list(resolved.limitations), **latency,
    )
    export_dir = export_and_push(inner, report, pipeline.tokenizer, recipe, config, hub_push, stage, source=resolved.path)
    depth = report.layers_before
    return RunSummary(
        layers_before=depth, layers_after=depth - len(report.removed_layers), removed=list(report.removed_layers),
        parameters_before=report.num_parameters_before, parameters_after=inner.num_parameters(),
        metric_name=SENTENCE_METRIC, metric_before=report.metric_before, metric_after=report.metric_after,
        perplexity_before=None, perplexity_after=None, speedup=speedup, export_dir=export_dir.resolve(),
        selection_curve=report.selection_curve or [], train_steps=trainer.state.global_step if train else 0,
        targets=list(trainer.collapse_targets or []) if targeted else None, msw_schedule=list(trainer.msw_schedule),
    )
