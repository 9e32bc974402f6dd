"""After training: score, choose, collapse and evaluate (`collapse_model`); fine-tune what is left (`heal`).

One path for the recipe runner, the CLI and Python users alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .report import CollapseReport
from .config import MSWArguments
from .layers import find_layer_stacks, unwrap_model
from .scoring import LayerScores, score_layers, select_by_tolerance, select_explicit, select_lowest
from .surgery import collapse_layers

__all__ = ["collapse_model", "heal", "selection_sentence"]

Evaluate = Callable[[nn.Module], float]


def selection_sentence(
    *, layers=None, num_layers=None, tolerance=None, strategy="measured", candidates=None, metric_name="metric",
    targeted: str | None = None,
) -> str:
    """How the layers were chosen, as a clause for the card."""
    if targeted is not None:
        return f"training targeted the layers it removed ({targeted})"
    if layers is not None:
        return "the layers to remove were given"
    pool = f"among the {candidates} lowest-scoring ones" if candidates else "among all"
    measured = f"each time the remaining layer ({pool}) whose bypass hurt validation {metric_name} least"
    if num_layers is not None:
        if strategy == "ranked":
            return f"the {num_layers} lowest-scoring layers were chosen"
        return f"{num_layers} layers were chosen one at a time, {measured}"
    within = f"while validation {metric_name} stayed within {tolerance} of the full model"
    if strategy == "ranked":
        return f"layers were chosen in score order {within}"
    return f"layers were chosen one at a time, {measured}, {within}"


def collapse_model(
    model: nn.Module,
    *,
    layers: Iterable[int] | None = None,
    num_layers: int | None = None,
    tolerance: float | None = None,
    calibration: Any = None,
    score_method: str = "msw",
    strategy: str = "measured",
    candidates: int | None = None,
    protect_first: int = 0,
    protect_last: int = 0,
    choose_on: Evaluate | None = None,
    evaluate: Evaluate | None = None,
    metric_name: str | None = None,
    higher_is_better: bool = True,
    base_model: str | None = None,
    selection: str | None = None,
    report_fields: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, CollapseReport]:
    """Score, choose and remove layers of a trained model, measuring it before and after; the library's
    post-training step.

    Exactly one of `layers`, `num_layers` and `tolerance` says what to remove. The model is modified in place
    (see [`collapse_layers`]) and returned with the [`CollapseReport`] that [`export_collapsed`] writes.

    Args:
        model (`nn.Module`): a plain transformers model (merge PEFT adapters first).
        layers (`Iterable[int]`, *optional*): remove exactly these 0-based layers; no data is needed.
        num_layers (`int`, *optional*): remove this many: the lowest-scoring ones (`strategy="ranked"`) or one
            at a time the one whose bypass hurts `choose_on` least (`"measured"`).
        tolerance (`float`, *optional*): remove layers while `choose_on` stays within this of the full model.
        calibration (*optional*): data for [`score_layers`] (batches, rows or texts). Needed to choose by score;
            with given `layers` it only fills the card's per-layer scores.
        score_method, strategy, candidates, protect_first, protect_last: as in [`score_layers`] and
            [`select_by_tolerance`].
        choose_on (`Callable[[model], float]`, *optional*): the metric that measured selection evaluates
            (validation rows). Needed by `"measured"` and by `tolerance`.
        evaluate (`Callable[[model], float]`, *optional*): the metric reported before and after, on rows that
            did not choose the layers (a test split); without it the card says nothing was measured.
        metric_name (`str`, *optional*): the name of those metrics (e.g. `"accuracy"`).
        higher_is_better (`bool`, defaults to `True`): the direction of the metrics.
        base_model (`str`, *optional*): the model id for the card (default `config.name_or_path`).
        selection (`str`, *optional*): overrides the card's sentence on how the layers were chosen.
        report_fields (`Mapping`, *optional*): more [`CollapseReport`] fields (datasets, license, recipe, ...).
        log (*optional*): called with progress lines.

    Raises:
        `ValueError`: not exactly one way to choose, a choice that needs data or a metric it was not given,
            or what [`collapse_layers`] refuses (the model is then unchanged).
    """
    chosen_ways = [name for name, value in (("layers", layers), ("num_layers", num_layers), ("tolerance", tolerance)) if value is not None]
    if len(chosen_ways) != 1:
        raise ValueError(f"give exactly one of layers, num_layers and tolerance (got {', '.join(chosen_ways) or 'none'})")
    if layers is None and calibration is None and strategy == "ranked":
        raise ValueError("choosing layers by score needs calibration data: pass calibration=, or give layers=")
    if layers is None and strategy == "measured" or tolerance is not None:
        if choose_on is None:
            raise ValueError(
                "measured selection and a tolerance evaluate the model with layers bypassed: pass choose_on "
                "(a function model -> metric on validation rows), or use strategy='ranked' / layers="
            )
    log = log or (lambda text: None)
    (stack, *rest) = find_layer_stacks(model)
    if rest:
        raise ValueError("collapse_model handles one-stack models; for encoder-decoder models call collapse_layers per stack")
    depth = len(stack)
    scores: LayerScores | None = None
    if calibration is not None:
        scores = score_layers(model, calibration, method=score_method, progress=False)
        log("scores: " + ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(scores.values)))
    metric_before = evaluate(model) if evaluate is not None else None
    if metric_before is not None:
        log(f"{metric_name} of the full model: {metric_before:.4f}")

    protect = dict(protect_first=protect_first, protect_last=protect_last)
    curve: list = []
    if layers is not None:
        removed = select_explicit(list(layers), depth, **protect)
    elif num_layers is not None and strategy == "ranked":
        removed = select_lowest(scores, num_layers, **protect)
    else:
        if scores is None:  # measured without calibration: every layer is a candidate, in index order
            scores = LayerScores(method="none", values=(0.0,) * depth)
        result = select_by_tolerance(
            model, scores, choose_on, tolerance if tolerance is not None else math.inf, max_layers=num_layers,
            higher_is_better=higher_is_better, strategy=strategy, num_candidates=candidates, progress=False, **protect,
        )
        removed = list(result.layers)
        curve = [[list(bypassed), value] for bypassed, value in result.curve]
        for bypassed, value in curve:
            log(f"    bypassed {bypassed or 'none'}: {value:.4f}")

    earlier_removed = copy.deepcopy(getattr(model.config, "collapsed_layers", None))
    record = collapse_layers(model, removed)
    log(f"removed layers {removed}: {depth} -> {depth - len(removed)} layers")
    metric_after = evaluate(model) if evaluate is not None else None
    if selection is None:
        selection = selection_sentence(
            layers=layers, num_layers=num_layers, tolerance=tolerance, strategy=strategy, candidates=candidates,
            metric_name=metric_name or "metric",
        )
    has_scores = scores is not None and scores.method != "none"
    report = CollapseReport(
        base_model=base_model or getattr(model.config, "name_or_path", "") or type(model).__name__,
        removed_layers=removed,
        layers_before=depth,
        num_parameters_before=record.parameters_before,
        num_parameters_after=record.parameters_after,
        scores=list(scores.values) if has_scores else None,
        score_method=scores.method if has_scores else None,
        task_metric=metric_name if evaluate is not None else None,
        metric_before=metric_before,
        metric_after=metric_after,
        earlier_removed=earlier_removed,
        selection=selection,
        selection_curve=curve or None,
        **dict(report_fields or {}),
    )
    return model, report


def heal(
    model: nn.Module,
    args: MSWArguments,
    train_dataset,
    *,
    data_collator=None,
    processing_class=None,
    eval_dataset=None,
    teacher: nn.Module | None = None,
    peft_config=None,
    callbacks=None,
) -> tuple[nn.Module, int]:
    """Fine-tune a collapsed model for `args.heal_steps` optimizer steps, so the remaining layers adapt.

    The other training settings (learning rate and schedule, batch size, precision) are those of `args`; the
    penalty is off and nothing is targeted. With `args.distill_weight > 0` and a `teacher` (typically the
    full-depth model before the collapse), the loss adds logit distillation from it. With a `peft_config`, LoRA
    adapters are trained and merged back, so a plain model comes out.

    Returns:
        `(model, steps)`: the healed plain model and the optimizer steps that healing ran.

    Raises:
        `ValueError`: a model that was not collapsed (no `config.collapsed_layers`), `heal_steps` of 0, or
            distillation asked without a teacher.
    """
    from .trainer import CollapseTrainer

    inner = unwrap_model(model)
    if not getattr(inner.config, "collapsed_layers", None):
        raise ValueError(
            "heal fine-tunes a collapsed model, and this one has no config.collapsed_layers: remove layers first "
            "(collapse_model or collapse_layers), or fine-tune it with CollapseTrainer"
        )
    if args.heal_steps < 1:
        raise ValueError("heal_steps is 0: set the number of healing steps (at least 1)")
    if args.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 during healing needs the teacher (the full-depth model before the collapse)")
    heal_args = dataclasses.replace(
        args, output_dir=str(Path(args.output_dir) / "heal"), max_steps=args.heal_steps, msw_weight=0.0,
        collapse_layers=None, collapse_num_layers=None, fade_steps=0, heal_steps=0, msw_layers=None,
        msw_warmup_steps=0, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        push_to_hub=False, distill_weight=args.distill_weight if teacher is not None else 0.0,
    )
    if peft_config is not None:
        import peft

        model = peft.get_peft_model(model, peft_config)
    trainer = CollapseTrainer(
        model=model, args=heal_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=processing_class, callbacks=callbacks,
        teacher_model=teacher if heal_args.distill_weight > 0 else None,
    )
    trainer.train()
    healed = trainer.model
    if peft_config is not None:
        healed = healed.merge_and_unload()
    return unwrap_model(healed).eval(), trainer.state.global_step
