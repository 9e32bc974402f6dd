"""The penalty on sentence-transformers' trainer: `CollapseSentenceTransformerTrainer` and its config (needs the
`sentence-transformers` extra).

A sentence-transformers loss runs the model once per text column of a batch (anchor, positive, ...), with inputs
that are not the trainer's: the layer clouds of every such pass are penalised (their distances averaged), and
each pass's padding mask is read from the transformer's own forward call. The layers are those of the pipeline's
Transformer module; after training, collapse `trainer.model[0].auto_model` (or the pipeline: every hf-collapse
function looks through it) and export it with [`export_collapsed`], which keeps the pipeline's other modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate.utils import extract_model_from_parallel
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

from .config import MSWArguments
from .trainer import MSWPenaltyMixin

__all__ = ["CollapseSentenceTransformerConfig", "CollapseSentenceTransformerTrainer"]


@dataclass
class CollapseSentenceTransformerConfig(MSWArguments, SentenceTransformerTrainingArguments):
    r"""sentence-transformers' [`~sentence_transformers.SentenceTransformerTrainingArguments`] plus the
    [`MSWArguments`] fields (penalty, target depth, fading).

    Distillation (`distill_weight`), score-based target choice (`target_choice: score`) and a repair fitted at the
    choice (`target_repair`) need task inputs of the transformer itself, which a sentence-transformers batch is not:
    keep `distill_weight` 0 (distil with a sentence-transformers loss such as `MSELoss` instead), choose targets by
    measured bypass, by `block` or give them, and keep `target_repair` at `none`.
    """


class CollapseSentenceTransformerTrainer(MSWPenaltyMixin, SentenceTransformerTrainer):
    """sentence-transformers' [`~sentence_transformers.SentenceTransformerTrainer`] with LaCoOT's MSW penalty
    ([`MSWPenaltyMixin`]); takes a [`CollapseSentenceTransformerConfig`]. A measured target choice and λ
    adaptation read the trainer's own loss on `eval_dataset` rows."""

    def _mask_module(self, model):
        # the Transformer module gets each column's features (input_ids, attention_mask, ...) as one dict; the
        # transformers model inside is called through `.forward`, which runs no hooks
        return extract_model_from_parallel(model)[0]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.distill_weight > 0:
            raise ValueError(
                "distill_weight > 0 needs the student's logits, which a sentence-transformers model does not produce: "
                "set distill_weight: 0 (a sentence-transformers distillation loss such as MSELoss does that job)"
            )
        if self.args.has_target and self.args.collapse_layers is None and self.args.target_choice == "score":
            raise ValueError(
                "target_choice: score scores the layers on transformer inputs, which sentence-transformers batches are "
                "not: use target_choice: measured (the loss on eval_dataset rows with each layer bypassed), or give "
                "collapse_layers"
            )
        if self.args.target_repair != "none":
            raise ValueError(
                f"target_repair: {self.args.target_repair} fits its map on the transformer's own inputs, which "
                "sentence-transformers batches are not: set target_repair: none (the recipe task sentence-embedding can "
                "fit collapse_repair on its tokenized rows after training, with fade_steps: 0)"
            )
