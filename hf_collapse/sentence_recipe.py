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

import dataclasses
from pathlib import Path

import torch

from .config import CollapseConfig
from .data import load_task_data
from .recipe import RecipeArguments, RecipeError
from .tasks import TaskStrategy, data_line

__all__ = ["SENTENCE_METRIC", "SentenceEmbeddingTask", "centroid_accuracy", "check_sentence_recipe"]

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
    if config.target_repair != "none":
        raise RecipeError(
            f"task sentence-embedding cannot fit target_repair: {config.target_repair} (the map is fitted on the "
            "transformer's own inputs, which sentence-transformers batches are not): set target_repair: none, or "
            "repair after training with collapse_repair and fade_steps: 0"
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
    from .sentence_trainer import CollapseSentenceTransformerConfig

    wanted = {f.name for f in dataclasses.fields(CollapseSentenceTransformerConfig) if f.init}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(CollapseConfig) if f.init and f.name in wanted}
    return CollapseSentenceTransformerConfig(**values)


class SentenceEmbeddingTask(TaskStrategy):
    """The task strategy of `sentence-embedding`: the pipeline trains with its own loss, the layers of its
    transformer are removed, and the whole pipeline is exported."""

    metric_name = SENTENCE_METRIC
    higher_is_better = True
    timed = "transformers"

    def __init__(self, recipe: RecipeArguments):
        self.pipeline = None
        self.saved_length = None
        self.calibration = None

    def load(self, run) -> None:
        st = _sentence_transformers()
        recipe, config = run.recipe, run.config
        run.stage(f"loading {recipe.model_name_or_path} ({run.resolved.path}) as a sentence-transformers pipeline")
        device = "cpu" if config.use_cpu or not torch.cuda.is_available() else None
        self.pipeline = st.SentenceTransformer(str(run.resolved.path), device=device, trust_remote_code=recipe.trust_remote_code)
        self.saved_length = self.pipeline.max_seq_length
        self.pipeline.max_seq_length = min(recipe.max_length, self.saved_length or recipe.max_length)
        run.processor = self.pipeline.tokenizer
        run.data = load_task_data(recipe, self.pipeline.tokenizer)
        run.model = self.pipeline
        run.stage(data_line(run.data))

    def make_trainer(self, run):
        from sentence_transformers.sentence_transformer import losses

        from .sentence_trainer import CollapseSentenceTransformerTrainer

        return CollapseSentenceTransformerTrainer(
            model=self.pipeline, args=_st_config(run.config), train_dataset=run.data.train, eval_dataset=run.data.eval,
            loss=getattr(losses, run.recipe.sentence_loss)(self.pipeline),
        )

    def training_line(self, run) -> str:
        return f"fine-tuning with {run.recipe.sentence_loss} and the MSW penalty (weight {run.config.msw_weight})"

    def collapsible(self, run) -> torch.nn.Module:
        self.pipeline.eval()
        self.calibration = run.calibration_rows()
        return self.pipeline[0].auto_model

    def batches(self, run, rows) -> list[dict]:
        size = run.config.per_device_eval_batch_size
        return [self._features(run, rows.select(range(i, min(i + size, len(rows))))) for i in range(0, len(rows), size)]

    def _features(self, run, rows) -> dict:
        texts = list(rows["sentence"])
        pipeline = self.pipeline
        batch = pipeline.preprocess(texts) if hasattr(pipeline, "preprocess") else pipeline.tokenize(texts)
        return {k: v.to(run.model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def evaluator(self, run, rows):
        inner, size = run.model, run.config.per_device_eval_batch_size

        def measure(model) -> float:
            if model is not inner:
                raise ValueError("the sentence-embedding metric measures the pipeline's own transformer")
            return centroid_accuracy(self.pipeline, self.calibration, rows, batch_size=size)

        return measure

    def latency_batch(self, run) -> dict:
        rows = run.report_rows
        return self._features(run, rows.select(range(min(run.config.per_device_eval_batch_size, len(rows)))))

    def after_collapse(self, run) -> None:
        self.pipeline.max_seq_length = self.saved_length

    def export_args(self, run) -> dict:
        return {"processing_class": self.pipeline.tokenizer, "source": run.resolved.path}
