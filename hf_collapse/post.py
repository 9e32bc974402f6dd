"""After training: score, choose, collapse and evaluate (`collapse_model`); fine-tune what is left (`heal`).

One path for the recipe runner, the CLI and Python users alike.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from .choice import LayerChoice, contiguous_blocks, greedy_bypass, selection_sentence
from .config import MSWArguments
from .distillation import check_teacher, teacher_layer_map
from .healing import adjacent_parameter_names, train_only
from .layers import eval_mode, find_layer_stacks, unwrap_model
from .repair import RepairPlan, check_foldable, fit_repair, fold_verified, measure_runs
from .report import CollapseReport
from .scoring import LayerScores, bypassed_metric, finite_metric, score_layers
from .surgery import collapse_layers
from .trainer import CollapseTrainer

__all__ = ["HealResult", "collapse_model", "heal", "selection_sentence"]

Evaluate = Callable[[nn.Module], float]


def collapse_model(
    model: nn.Module,
    choice: LayerChoice | None = None,
    *,
    calibration: Any = None,
    scores: LayerScores | None = None,
    repair: str = "none",
    repair_check: bool = True,
    repair_calibration: Any = None,
    calibration_source: str | None = None,
    score_method: str = "msw",
    choose_on: Evaluate | None = None,
    evaluate: Evaluate | None = None,
    metric_name: str | None = None,
    higher_is_better: bool = True,
    base_model: str | None = None,
    selection: str | None = None,
    report_fields: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    **choice_fields: Any,
) -> tuple[nn.Module, CollapseReport]:
    """Score, choose and remove layers of a trained model, measuring it before and after; the library's
    post-training step.

    What goes is a [`LayerChoice`] (exactly one of explicit `layers`, a `num_layers` budget and a `tolerance`),
    given as `choice` or as its fields (`layers=`, `num_layers=`, `tolerance=`, `strategy=`, `candidates=`,
    `protect_first=`, `protect_last=`). The model is modified in place (see [`collapse_layers`]) and returned with
    the [`CollapseReport`] that [`export_collapsed`] writes.

    Args:
        model (`nn.Module`): a plain transformers model (merge PEFT adapters first).
        choice ([`LayerChoice`], *optional*): which layers go; or give its fields as keywords. With `num_layers`, the
            lowest-scoring layers go (`strategy="ranked"`) or, one at a time, the one whose bypass hurts `choose_on`
            least (`"measured"`); with `tolerance`, layers go while `choose_on` stays within it of the full model.
        calibration (*optional*): data for [`score_layers`] (batches, rows or texts). Needed to choose by score;
            with given `layers` it only fills the card's per-layer scores. A repair is fitted on it too.
        scores ([`LayerScores`], *optional*): scores computed already (e.g. layer by layer from the checkpoint's
            shards, [`~layerwise.score_layers_layerwise`]); then `calibration` is not scored again.
        repair (`str`, defaults to `"none"`): after the layers are chosen, fit a map for each removed span on the
            calibration activations of the full model and fold it into the weights of the last kept layer before
            it: `"scale"`, `"linear"` or `"transport"` (see [`fit_repair`]); `"none"` removes layers only.
        repair_check (`bool`, defaults to `True`): with `choose_on`, fold the repair only if it scores no worse there
            (see `choose_on`); `False` folds it whatever that metric says.
        repair_calibration (*optional*): data to fit the repair on instead of `calibration` (same forms), e.g. rows
            of the fine-tuning domain mixed with general text: a map fitted on one domain alone can cost a lot outside
            it. `calibration` still gives the scores. With the `block` strategy every run's map is fitted on it.
        calibration_source (`str`, *optional*): what the repair's data is, in words, for the report's repair record.
        score_method (`str`, defaults to `"msw"`): the score of [`score_layers`].
        choose_on (`Callable[[model], float]`, *optional*): the metric that measured selection evaluates
            (validation rows). Needed by `"measured"`, `"block"` and by `tolerance`. With a `repair`, it also decides whether
            the fitted maps are kept: they are folded only if the chosen layers bypassed with the maps score no worse
            on it than without (else the cut is left unrepaired and the report's repair record says `folded: false`).
        evaluate (`Callable[[model], float]`, *optional*): the metric reported before and after, on rows that
            did not choose the layers (a test split); without it the card says nothing was measured.
        metric_name (`str`, *optional*): the name of those metrics (e.g. `"accuracy"`).
        higher_is_better (`bool`, defaults to `True`): the direction of the metrics.
        base_model (`str`, *optional*): the model id for the card (default `config.name_or_path`).
        selection (`str`, *optional*): overrides the card's sentence on how the layers were chosen.
        report_fields (`Mapping`, *optional*): more [`CollapseReport`] fields (datasets, license, recipe, ...).
        log (*optional*): called with progress lines.

    Raises:
        `ValueError`: an invalid choice (see [`LayerChoice`]), a choice that needs data or a metric it was not
            given, or what [`collapse_layers`] refuses (the model is then unchanged); a repair the family cannot
            fold exactly, a repair without calibration data, with nothing removed, with a span starting at layer 0
            or with fewer calibration tokens than its fit needs (all before anything changes).
    """
    choice = _the_choice(choice, choice_fields)
    fit_rows = _repair_data(model, repair, calibration, repair_calibration)
    (stack, *rest) = find_layer_stacks(model)
    if rest:
        raise ValueError("collapse_model handles one-stack models; for encoder-decoder models call collapse_layers per stack")
    depth = len(stack)
    removable = choice.check_depth(depth)
    if scores is not None and len(scores) != depth:
        raise ValueError(f"the scores cover {len(scores)} layers but the model has {depth}: score this model")
    if not choice.given and calibration is None and scores is None and choice.strategy == "ranked":
        raise ValueError("choosing layers by score needs calibration data: pass calibration=, or give layers=")
    if choice.needs_metric and choose_on is None:
        raise ValueError(
            "measured and block selection and a tolerance evaluate the model with layers bypassed: pass choose_on "
            "(a function model -> metric on validation rows), or use strategy='ranked' / layers="
        )
    log = log or (lambda text: None)
    if scores is None and calibration is not None:
        scores = score_layers(model, calibration, method=score_method, progress=False)
    if scores is not None:
        log("scores: " + ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(scores.values)))
    metric_before = evaluate(model) if evaluate is not None else None
    if metric_before is not None:
        log(f"{metric_name} of the full model: {metric_before:.4f}")
    if choice.strategy == "block" and not choice.given:
        removed, curve, plan = _choose_block(model, stack, choice, removable, choose_on, higher_is_better, repair,
                                             fit_rows, log)
    else:
        (removed, curve), plan = _choose(model, stack, choice, removable, scores, choose_on, higher_is_better, log), None
    earlier_removed = copy.deepcopy(getattr(model.config, "collapsed_layers", None))
    # a block's curve holds its metric with the repair applied: the check measures the unrepaired cut itself
    known = [] if plan is not None else curve
    check = _RepairCheck(model, partial(bypassed_metric, model, choose_on, stack.name), removed, metric_name or "metric",
                         higher_is_better, known) if choose_on is not None and repair != "none" and repair_check else None
    record, repaired = _collapse_and_repair(model, removed, repair, fit_rows, calibration_source, log, check, plan)
    log(f"removed layers {removed}: {depth} -> {depth - len(removed)} layers")
    report = CollapseReport(
        base_model=base_model or getattr(model.config, "name_or_path", "") or type(model).__name__,
        removed_layers=removed,
        layers_before=depth,
        num_parameters_before=record.parameters_before,
        num_parameters_after=record.parameters_after,
        scores=list(scores.values) if scores is not None else None,
        score_method=scores.method if scores is not None else None,
        task_metric=metric_name if evaluate is not None else None,
        metric_before=metric_before,
        metric_after=evaluate(model) if evaluate is not None else None,
        earlier_removed=earlier_removed,
        selection=selection or selection_sentence(choice, metric_name=metric_name or "metric", repair=repair),
        selection_curve=curve or None,
        repair=repaired,
        **dict(report_fields or {}),
    )
    return model, report


def _repair_data(model: nn.Module, repair: str, calibration, repair_calibration):
    """The data a `repair` is fitted on (`repair_calibration`, else `calibration`), refused before anything runs when
    the family cannot fold that repair, when there is none, or when it is a one-shot iterator."""
    check_foldable(model, repair)
    if repair == "none":
        if repair_calibration is not None:
            raise ValueError("repair_calibration= is the data a repair is fitted on, and repair is 'none': pass "
                             "repair='scale', 'linear' or 'transport', or leave repair_calibration out")
        return None
    rows, name = (repair_calibration, "repair_calibration") if repair_calibration is not None else (calibration, "calibration")
    if rows is None:
        raise ValueError(f"repair={repair!r} is fitted on calibration data: pass calibration= or repair_calibration= "
                         "(rows, texts or batches)")
    if iter(rows) is rows:
        raise ValueError(f"repair={repair!r} reads {name} after the scoring pass: give a list, a dataset or a "
                         "DataLoader, not a one-shot iterator")
    return rows


@dataclasses.dataclass
class _RepairCheck:
    """The validation metric of the model with the chosen `layers` bypassed, before and after a fold: measured in eval
    mode as `_choose` measures, and taken from the selection curve where that already measured those layers."""

    model: nn.Module
    bypassed: Callable[[list[int]], float]  # bypassed_metric bound to the model, choose_on and the stack
    layers: list[int]
    metric: str
    higher_is_better: bool
    curve: list

    def measure(self, *, folded: bool) -> float:
        if not folded:
            known = [value for bypassed, value in self.curve if sorted(bypassed) == self.layers]
            if known:
                return known[-1]
        with eval_mode(self.model):
            return self.bypassed(self.layers)

    def keeps(self, unrepaired: float, repaired: float) -> bool:
        return repaired >= unrepaired if self.higher_is_better else repaired <= unrepaired


def _collapse_and_repair(model, removed: list[int], repair: str, calibration, source: str | None, log,
                         check: _RepairCheck | None = None, plan: RepairPlan | None = None):
    """Fit the repair on the full model (refusing before any change; `plan` when the choice fitted it already),
    fold it (verified), then remove the layers; a failed removal puts the weights back. With `check` (the rows that
    chose the layers), a fold that makes their metric worse than the unrepaired cut is undone and recorded as not
    folded. Returns the collapse record and the repair's report record (or None)."""
    if repair == "none":
        return collapse_layers(model, removed), None
    plan = plan if plan is not None else fit_repair(model, removed, calibration, repair)
    unrepaired = check.measure(folded=False) if check is not None else None
    undo = fold_verified(model, plan, removed)
    summary = plan.summary(source)
    if check is not None:
        repaired = check.measure(folded=True)
        folded = check.keeps(unrepaired, repaired)
        summary.update(folded=folded, validation={"metric": check.metric, "unrepaired": unrepaired, "repaired": repaired})
        if not folded:
            undo()
            log(f"repair ({repair}): not folded, it made the {check.metric} of the rows that chose the layers worse "
                f"({unrepaired:.4g} with the cut unrepaired, {repaired:.4g} repaired)")
            return collapse_layers(model, removed), summary
    try:
        record = collapse_layers(model, removed)
    except BaseException:
        undo()
        raise
    for fit in plan.fits:
        if fit.rejected_error is not None:
            log(f"repair ({repair}) of layers {fit.first}-{fit.last}: left unrepaired, the fitted map would have raised the "
                f"relative error after the cut from {fit.error_before:.4g} to {fit.rejected_error:.4g} on its own "
                f"{fit.tokens} calibration tokens")
            continue
        log(f"repair ({repair}) of layers {fit.first}-{fit.last}, folded into {fit.site}: relative error after the cut "
            f"{fit.error_before:.4g} -> {fit.error_after:.4g} on {fit.tokens} calibration tokens")
    return record, summary


def _the_choice(choice: LayerChoice | None, fields: Mapping[str, Any]) -> LayerChoice:
    if choice is not None and fields:
        raise ValueError(f"give the choice as choice= or as its fields, not both (got {', '.join(fields)} too)")
    if choice is not None:
        return choice
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(LayerChoice)})
    if unknown:
        raise TypeError(f"collapse_model() got unexpected keyword arguments {unknown}")
    return LayerChoice(**fields)


def _choose(model, stack, choice: LayerChoice, removable: list[int], scores: LayerScores | None, choose_on,
            higher_is_better: bool, log) -> tuple[list[int], list]:
    """The layers `choice` removes (sorted) and the measured curve ([] when nothing was measured)."""
    if choice.given:
        return sorted(choice.layers), []
    ranking = scores.ranking() if scores is not None else list(range(len(stack)))  # no data: index order
    order = [i for i in ranking if i in removable]
    if choice.strategy == "ranked" and choice.tolerance is None:
        return sorted(order[: choice.num_layers]), []

    with eval_mode(model):
        result = greedy_bypass(
            partial(bypassed_metric, model, choose_on, stack.name), order, choice.num_layers or len(stack) - 1,
            pool=1 if choice.strategy == "ranked" else choice.candidates, higher_is_better=higher_is_better,
            tolerance=choice.tolerance if choice.tolerance is not None else math.inf,
        )
    curve = [[list(bypassed), value] for bypassed, value in result.curve]
    for bypassed, value in curve:
        log(f"    bypassed {bypassed or 'none'}: {value:.4f}")
    return sorted(result.layers), curve


def _choose_block(model, stack, choice: LayerChoice, removable: list[int], choose_on, higher_is_better: bool,
                  repair: str, calibration, log) -> tuple[list[int], list, RepairPlan | None]:
    """The `block` strategy: every run of `num_layers` consecutive removable layers (with a repair, not one starting
    at layer 0, which has no kept layer to fold into), each measured on `choose_on` bypassed, its repair applied by
    hooks (all fitted in one calibration pass); the best run, the `[run, metric]` of every run, and the best run's
    plan (None without a repair)."""
    blocks = contiguous_blocks(removable, choice.num_layers)
    if repair != "none":
        blocks = [block for block in blocks if block[0] > 0]
    if not blocks:
        raise ValueError(
            f"collapse_strategy 'block' found no run of {choice.num_layers} consecutive removable layers"
            + (" after layer 0 (a repair folds into the kept layer before the run)" if repair != "none" else "")
            + ": lower collapse_num_layers or the protection, or use strategy 'measured'"
        )

    def measure(block: list[int], repaired: bool) -> float:
        if not repaired:
            return bypassed_metric(model, choose_on, stack.name, block)
        return finite_metric(choose_on, model, f"layers {block} bypassed and repaired")

    with eval_mode(model):
        curve, plans = measure_runs(model, blocks, repair, calibration, measure, log=lambda line: log("    " + line))
    sign = 1 if higher_is_better else -1
    best = max(range(len(blocks)), key=lambda i: sign * curve[i][1])  # the first of equals
    return blocks[best], curve, plans[best]


class HealResult(tuple):
    """What [`heal`] returns: `(model, steps)` (it unpacks as a pair), with the healing's record as attributes:
    `scope` (`"full"`, `"lora"` or `"adjacent"`), `trainable_parameters`, and the teacher's forward passes
    (`teacher_forward_passes`, `teacher_forward_rows`: work done outside the student's training budget)."""

    def __new__(cls, model: nn.Module, steps: int, **record: Any):
        result = super().__new__(cls, (model, steps))
        result.__dict__.update(record)
        return result


def _heal_scope(args: MSWArguments, peft_config) -> str:
    scope = args.heal_scope or ("lora" if peft_config is not None else "full")
    if scope == "lora" and peft_config is None:
        raise ValueError("heal_scope='lora' trains LoRA adapters: pass peft_config (a peft.LoraConfig), or use "
                         "heal_scope='full' or 'adjacent'")
    if scope != "lora" and peft_config is not None:
        raise ValueError(f"heal_scope={scope!r} trains the model's own weights, and a peft_config was given too: "
                         "use heal_scope='lora' to train adapters, or leave peft_config out")
    return scope


def _check_heal(model: nn.Module, args: MSWArguments, teacher: nn.Module | None, peft_config) -> tuple[str, bool]:
    """Every refusal of [`heal`], before anything changes. Returns the scope and whether a teacher is used."""
    inner = unwrap_model(model)
    if not getattr(inner.config, "collapsed_layers", None):
        raise ValueError(
            "heal fine-tunes a collapsed model, and this one has no config.collapsed_layers: remove layers first "
            "(collapse_model or collapse_layers), or fine-tune it with CollapseTrainer"
        )
    if args.heal_steps < 1:
        raise ValueError("heal_steps is 0: set the number of healing steps (at least 1)")
    distilling = args.distill_weight > 0 or args.distill_hidden_weight > 0
    if distilling and teacher is None:
        raise ValueError("distill_weight or distill_hidden_weight > 0 during healing needs the teacher (the full-depth "
                         "model before the collapse)")
    if distilling:
        check_teacher(inner, unwrap_model(teacher))  # another architecture or vocabulary
        teacher_layer_map(inner, teacher)  # a depth that does not match the student's collapse record
    scope = _heal_scope(args, peft_config)
    if scope == "adjacent":
        adjacent_parameter_names(inner)  # a model where no head or no layer next to the cut is found
    return scope, distilling


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
) -> HealResult:
    """Fine-tune a collapsed model for `args.heal_steps` optimizer steps, so the remaining layers adapt.

    The other training settings (learning rate and schedule, batch size, precision) are those of `args`; the
    penalty is off and nothing is targeted. With a `teacher` (typically the full-depth model just before the
    collapse), the loss adds logit distillation from it (`args.distill_weight`, `distill_temperature`) and, with
    `args.distill_hidden_weight`, the mean squared difference between the hidden state after each kept layer and
    the teacher's after the same original layer. `args.heal_scope` says what trains: every weight (`"full"`), LoRA
    adapters from `peft_config`, merged back so a plain model comes out (`"lora"`, the default when a
    `peft_config` is given), or only the layers next to each removed span and the head (`"adjacent"`; the other
    weights stay bit-identical).

    Returns:
        [`HealResult`]: `(model, steps)`, the healed plain model and the optimizer steps that healing ran, with
        `scope`, `trainable_parameters`, `teacher_forward_passes` and `teacher_forward_rows` as attributes.

    Raises:
        `ValueError` (all before anything changes): a model that was not collapsed (no `config.collapsed_layers`),
            `heal_steps` of 0, distillation asked without a teacher, a teacher of another architecture or
            vocabulary, a teacher whose depth does not match the student's collapse record (teacher layers ≠ student
            layers + removed), `heal_scope="lora"` without a `peft_config` (or another scope with one).
    """
    scope, distilling = _check_heal(model, args, teacher, peft_config)
    heal_args = dataclasses.replace(
        args, output_dir=str(Path(args.output_dir) / "heal"), max_steps=args.heal_steps, msw_weight=0.0,
        collapse_layers=None, collapse_num_layers=None, fade_steps=0, heal_steps=0, msw_layers=None,
        msw_warmup_steps=0, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        push_to_hub=False, distill_weight=args.distill_weight if teacher is not None else 0.0,
        distill_hidden_weight=args.distill_hidden_weight if teacher is not None else 0.0,
    )
    names = adjacent_parameter_names(model) if scope == "adjacent" else None
    if scope == "lora":
        import peft

        model = peft.get_peft_model(model, peft_config)
    with train_only(model, names) if names is not None else contextlib.nullcontext():
        trainer = CollapseTrainer(
            model=model, args=heal_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            data_collator=data_collator, processing_class=processing_class, callbacks=callbacks,
            teacher_model=teacher if distilling else None,
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    healed = trainer.model
    if scope == "lora":
        healed = healed.merge_and_unload()
    return HealResult(
        unwrap_model(healed).eval(), trainer.state.global_step, scope=scope, trainable_parameters=trainable,
        teacher_forward_passes=trainer.teacher_forward_passes, teacher_forward_rows=trainer.teacher_forward_rows,
    )
