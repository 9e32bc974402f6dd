"""The arms, as a registry: one function each, `(context, seed, k) -> result dict`.

A result holds the test and out-of-domain metrics of the model the arm produces (`report`), the layers
removed, what choosing them cost (`selection`: forward passes, evaluations, seconds) and the training
budget spent (`train_steps` optimizer steps of `batch_size` rows; healing steps included). `k = 0` is the
full-depth model (only the arms registered with `full_depth=True` run it).

To add an arm (a new training mode), write one function and decorate it:

    @arm("target_depth", "fine-tune with the penalty on k targeted layers, then delete them")
    def target_depth(ctx, seed, k):
        model = ctx.pretrained(seed)
        ctx.fit(model, seed, ctx.study.steps, penalty=True)
        ...
        return result(ctx, key, model, selection, train_steps=ctx.study.steps)

then name it in a study's `arms` (benchmarks/quality/studies.py).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import hf_collapse
from hf_collapse.healing import adjacent_parameter_names

from .context import Context, ModelKey, Selection

__all__ = ["ARMS", "Arm", "arm", "result"]


@dataclass(frozen=True)
class Arm:
    name: str
    description: str
    fn: Callable[[Context, int, int], dict]
    full_depth: bool = False  # runs at k = 0 only (a full-depth reference)
    family: str = "post-hoc"  # "reference", "post-hoc", "ours", "baseline"


ARMS: dict[str, Arm] = {}


def arm(name: str, description: str, *, full_depth: bool = False, family: str = "post-hoc"):
    def register(fn):
        if name in ARMS:
            raise ValueError(f"arm {name!r} is registered twice")
        ARMS[name] = Arm(name, description, fn, full_depth, family)
        return fn

    return register


def result(ctx: Context, key: ModelKey, model, selection: Selection | None, *, train_steps: int, **extra) -> dict:
    """The standard result of an arm: the report of `model` (`key` says which model it is, and which layers it
    already lacks) without the selected layers."""
    layers = selection.layers if selection is not None else []
    out = ctx.report(key, model, layers)
    out.update(
        train_steps=train_steps,
        train_batch=ctx.study.batch_size,
        selection=selection.cost() if selection is not None else None,
        validation=selection.validation if selection is not None else None,
        trials=selection.trials if selection is not None else None,
    )
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------- references


@arm("vanilla", "ordinary full-depth fine-tune (transformers Trainer)", full_depth=True, family="reference")
def vanilla(ctx: Context, seed: int, k: int) -> dict:
    return result(ctx, ModelKey("vanilla", seed), ctx.finetuned("vanilla", seed), None, train_steps=ctx.study.steps)


@arm("penalty", "full-depth fine-tune with the uniform MSW penalty (CollapseTrainer)", full_depth=True, family="reference")
def penalty(ctx: Context, seed: int, k: int) -> dict:
    return result(ctx, ModelKey("penalty", seed), ctx.finetuned("penalty", seed), None, train_steps=ctx.study.steps)


# ---------------------------------------------------------------------------------------------- post-hoc peers


def _posthoc(recipe: str, method: str):
    def run(ctx: Context, seed: int, k: int) -> dict:
        model = ctx.finetuned(recipe, seed)
        key = ModelKey(recipe, seed)
        return result(ctx, key, model, ctx.ranked(key, model, method, k), train_steps=ctx.study.steps)

    return run


arm("vanilla_block_influence", "vanilla fine-tune, k lowest Block Influence (ShortGPT) removed")(
    _posthoc("vanilla", "block_influence")
)
arm("vanilla_angular", "vanilla fine-tune, k lowest angular distance (Gromov et al.) removed")(
    _posthoc("vanilla", "angular")
)
arm("vanilla_msw", "vanilla fine-tune, k lowest MSW removed (the paper's ablation: MSW ranking without the penalty)")(
    _posthoc("vanilla", "msw")
)
arm("penalty_msw", "uniform penalty, k lowest MSW removed", family="ours")(_posthoc("penalty", "msw"))


@arm("vanilla_last_k", "vanilla fine-tune, the k layers before the final one removed")
def vanilla_last_k(ctx: Context, seed: int, k: int) -> dict:
    n = ctx.num_layers
    selection = Selection(list(range(n - 1 - k, n - 1)), "last k before the final layer")
    return result(ctx, ModelKey("vanilla", seed), ctx.finetuned("vanilla", seed), selection, train_steps=ctx.study.steps)


# ---------------------------------------------------------------------------------------------- repair at the cut

RULES = {
    "block_influence": "k lowest Block Influence",
    "angular": "k lowest angular distance",
    "msw": "k lowest MSW",
    "last_k": "the k layers before the final one",
}
REPAIRS = ("scale", "linear", "transport")


def _rule_selection(ctx: Context, key: ModelKey, model, rule: str, k: int) -> Selection:
    if rule == "last_k":
        n = ctx.num_layers
        return Selection(list(range(n - 1 - k, n - 1)), "last k before the final layer")
    return ctx.ranked(key, model, rule, k)


def collapsed_result(ctx: Context, key: ModelKey, model, layers: list[int], *, train_steps: int, **extra) -> dict:
    """The standard result of a model whose `layers` (original numbering) are already removed (`key` is the model
    before they were)."""
    # the report cache is keyed by (model, layers deleted now): the layers already removed go into the model's key,
    # or two ks of one arm would share the first one's figures
    out = result(ctx, key.without(layers), model, None, train_steps=train_steps)
    out.update(layers=sorted(layers), num_layers=ctx.num_layers - len(layers))
    out.update(extra)
    return out


def _posthoc_repair(rule: str, repair: str, *, mixed: bool = False):
    """A post-hoc rule on the vanilla fine-tune, then `repair` fitted on the calibration rows after the choice and
    folded, through hf_collapse.collapse_model(..., repair=...). No training after the fine-tune. Where the library
    refuses the repair (a family where it does not fold, a span at layer 0), the result is the unrepaired cut with
    the refusal recorded under `repair`. With `mixed`, half the repair rows come from a third domain
    (Context.mixed_repair_calibration)."""

    def run(ctx: Context, seed: int, k: int) -> dict:
        model, key = ctx.finetuned("vanilla", seed), ModelKey("vanilla", seed)
        selection = _rule_selection(ctx, key, model, rule, k)
        repaired, record = ctx.repaired(model, selection.layers, repair, mixed=mixed)
        if repaired is None:
            ctx.log(f"  {rule} + {repair} k={k} seed {seed}: repair refused ({record['refused']}); reporting the plain cut")
            return result(ctx, key, model, selection, train_steps=ctx.study.steps, repair=record)
        repaired_key = ModelKey(f"vanilla/{rule}+{repair}{'-mixed' if mixed else ''}", seed)
        out = collapsed_result(ctx, repaired_key, repaired, selection.layers, train_steps=ctx.study.steps, repair=record)
        cost = selection.cost()  # choosing, then one calibration pass to fit the map
        cost.update(forward_passes=cost["forward_passes"] + record["forward_passes"],
                    seconds=round(cost["seconds"] + record["seconds"], 3), method=f"{cost['method']}, then {repair} repair")
        out.update(selection=cost, validation=selection.validation, trials=selection.trials)
        return out

    return run


for _rule, _what in RULES.items():
    for _repair in REPAIRS:
        arm(
            f"vanilla_{_rule}_{_repair}",
            f"vanilla fine-tune, {_what} removed, then a {_repair} repair fitted on the calibration rows and folded "
            "into the last kept layer before each cut (training-free)",
        )(_posthoc_repair(_rule, _repair))
arm(
    "vanilla_block_influence_linear_mixed",
    "as vanilla_block_influence_linear, with half the repair rows from a third domain (Rotten Tomatoes critic "
    "snippets, packed into the study's blocks; causal-LM studies only): does a map fitted off the fine-tuning domain "
    "keep the out-of-domain score",
)(_posthoc_repair("block_influence", "linear", mixed=True))


def _block_fields(selection: Selection, record: dict, repair: str = "linear", *, folded: bool = True) -> dict:
    """What an arm that removes a `block` choice records beside the standard result: the repair, the choice's cost,
    its validation figure and every run's trial."""
    fate = "folded" if folded else "left out (the run removed without it)"
    cost = dict(selection.cost(), method=f"{selection.method}, its {repair} map {fate}")
    return dict(repair=record, selection=cost, validation=selection.validation, trials=selection.trials)


@arm(
    "vanilla_contiguous_linear",
    "vanilla fine-tune, the contiguous block of k layers (layer 0 kept) whose linear repair, fitted on the repair "
    "rows and applied, gives the best validation metric; removed and the map folded (ReplaceMe's setting, "
    "training-free; hf_collapse's collapse_strategy 'block')",
)
def vanilla_contiguous_linear(ctx: Context, seed: int, k: int) -> dict:
    model, key = ctx.finetuned("vanilla", seed), ModelKey("vanilla", seed)
    repaired, record, selection = ctx.block_repaired(key, model, k, "linear")
    return collapsed_result(ctx, ModelKey("vanilla/contiguous+linear", seed), repaired, selection.layers,
                            train_steps=ctx.study.steps, **_block_fields(selection, record))


@arm("vanilla_random", "vanilla fine-tune, k random layers removed (mean of the draws)")
def vanilla_random(ctx: Context, seed: int, k: int) -> dict:
    model, key = ctx.finetuned("vanilla", seed), ModelKey("vanilla", seed)
    draws = []
    for draw in range(ctx.study.random_draws):
        rng = random.Random(1000 * seed + 10 * k + draw)
        layers = sorted(rng.sample(range(ctx.num_layers), k))
        draws.append(ctx.report(key, model, layers))
    out = dict(draws[0])
    for split in ("test", "ood"):
        values = [d[split][ctx.metric_name] for d in draws]
        out[split] = dict(draws[0][split], **{ctx.metric_name: statistics.fmean(values)})
        if ctx.classification:  # the SE of a mean over draws of the same rows: the mean of their SEs
            out[split]["se"] = statistics.fmean(d[split]["se"] for d in draws)
    out.update(
        layers=None,
        draws=[{"layers": d["layers"], "test": d["test"], "ood": d["ood"]} for d in draws],
        train_steps=ctx.study.steps,
        train_batch=ctx.study.batch_size,
        selection={"method": f"{len(draws)} random draws", "forward_passes": 0, "evaluations": 0, "seconds": 0.0},
        validation=None,
        trials=None,
    )
    return out


def _measured(recipe: str, cheap: bool):
    def run(ctx: Context, seed: int, k: int) -> dict:
        model, key = ctx.finetuned(recipe, seed), ModelKey(recipe, seed)
        return result(ctx, key, model, ctx.measured(key, model, k, cheap=cheap), train_steps=ctx.study.steps)

    return run


arm("vanilla_measured", "vanilla fine-tune, greedy measured bypass (every layer, all validation rows)")(
    _measured("vanilla", False)
)
arm("vanilla_measured_cheap", "vanilla fine-tune, cheap greedy bypass (best few by Block Influence, validation subset)")(
    _measured("vanilla", True)
)
arm("penalty_measured", "uniform penalty, greedy measured bypass (every layer, all validation rows)", family="ours")(
    _measured("penalty", False)
)
arm("penalty_measured_cheap", "uniform penalty, cheap greedy bypass", family="ours")(_measured("penalty", True))
arm(
    "vanilla_measured_screened",
    "vanilla fine-tune, cheap greedy bypass ranked by measured single-layer costs on a validation subset",
)(_measured("vanilla", "screened"))
arm("penalty_measured_screened", "uniform penalty, cheap greedy bypass ranked by measured single-layer costs", family="ours")(
    _measured("penalty", "screened")
)


# ---------------------------------------------------------------------------------------------- strong baselines


@arm("prune_then_finetune", "delete k layers of the pretrained model (Block Influence on calibration rows), then fine-tune the whole budget", family="baseline")
def prune_then_finetune(ctx: Context, seed: int, k: int) -> dict:
    model = ctx.pretrained(seed)
    key = ModelKey("pretrained", seed)
    selection = ctx.ranked(key, model, "block_influence", k)
    hf_collapse.collapse_layers(model, selection.layers)
    seconds = ctx.fit(model, seed, ctx.study.steps)
    model.eval()
    ctx.log(f"  prune-then-fine-tune k={k} seed {seed}: removed {selection.layers}, trained in {seconds:.0f} s")
    out = result(ctx, ModelKey(f"ptf-{k}", seed, selection.layers), model, None, train_steps=ctx.study.steps)
    out.update(layers=selection.layers, selection=selection.cost(), num_layers=ctx.num_layers - k)
    return out


@arm(
    "prune_repair_finetune",
    "as prune_then_finetune, with the repair (scale, linear or transport) best on validation fitted on the calibration "
    "rows and folded at the cut before the fine-tune",
    family="baseline",
)
def prune_repair_finetune(ctx: Context, seed: int, k: int) -> dict:
    model = ctx.pretrained(seed)
    key = ModelKey("pretrained", seed)
    selection = ctx.ranked(key, model, "block_influence", k)
    repaired, record = ctx.best_repair(model, selection.layers, key)
    if repaired is None:  # every repair refused: the plain cut, said so in the record
        repaired = model
        hf_collapse.collapse_layers(repaired, selection.layers)
    del model
    seconds = ctx.fit(repaired, seed, ctx.study.steps)
    repaired.eval()
    ctx.log(f"  prune-repair-fine-tune k={k} seed {seed}: removed {selection.layers}, repair {record['method']}, "
            f"trained in {seconds:.0f} s")
    cost = selection.cost()
    cost.update(forward_passes=cost["forward_passes"] + record["forward_passes"], evaluations=len(record["candidates"]),
                seconds=round(cost["seconds"] + record["seconds"], 3), method=f"{cost['method']}, repair best on validation")
    return collapsed_result(ctx, ModelKey(f"prf-{k}", seed), repaired, selection.layers, train_steps=ctx.study.steps,
                            repair=record, selection=cost)


def _block_cut_finetune(name: str, *, mixed: bool, fold: bool = True):
    """The `block` cut of the pretrained model with its linear map folded (fitted on the study's repair rows, or with
    `mixed` on half of them and as many rows of a third domain), then the whole fine-tune budget. With `fold=False`
    the same layers are removed without the map (an ablation: where the cut is, apart from what the map does)."""

    def run(ctx: Context, seed: int, k: int) -> dict:
        model = ctx.pretrained(seed)
        repaired, record, selection = ctx.block_repaired(ModelKey("pretrained", seed), model, k, "linear", mixed=mixed)
        if not fold:  # the same layers from the untouched pretrained copy, without the map
            del repaired
            hf_collapse.collapse_layers(model, selection.layers)
            repaired, record = model, dict(record, folded=False)
        del model
        seconds = ctx.fit(repaired, seed, ctx.study.steps)
        repaired.eval()
        ctx.log(f"  {name} k={k} seed {seed}: removed {selection.layers}, trained in {seconds:.0f} s")
        return collapsed_result(ctx, ModelKey(f"{name}-{k}", seed), repaired, selection.layers,
                                train_steps=ctx.study.steps, **_block_fields(selection, record, folded=fold))

    return run


prune_block_repair_finetune = arm(
    "prune_block_repair_finetune",
    "as prune_then_finetune, with the layers chosen as vanilla_contiguous_linear chooses them on the pretrained model "
    "(the contiguous block whose linear map gives the best validation metric), the map folded, then the same "
    "fine-tune",
    family="baseline",
)(_block_cut_finetune("pbrf", mixed=False))
arm(
    "prune_block_repair_mixed_finetune",
    "as prune_block_repair_finetune, every run's linear map fitted on half the repair rows and as many rows of a third "
    "domain (vanilla_block_influence_linear_mixed's calibration; causal-LM only); chosen on the study's validation rows",
    family="baseline",
)(_block_cut_finetune("pbrmf", mixed=True))
arm(
    "prune_block_finetune_unrepaired",
    "the layers prune_block_repair_finetune chooses (the contiguous block whose linear map gives the best validation "
    "metric on the pretrained model), removed without the map, then the same fine-tune: an ablation that separates "
    "where the cut is from what the folded map does",
    family="baseline",
)(_block_cut_finetune("pbfu", mixed=False, fold=False))


def _distilled_cut(name: str, *, block: bool, teacher: str):
    """A cut of the pretrained model trained for the whole budget through hf_collapse.heal with logit distillation
    (weight 1, T 2) added to the task loss: the layers by Block Influence (`block=False`, as prune_then_finetune) or
    the contiguous block with its linear map folded (`block=True`, as prune_block_repair_finetune). The teacher is
    the vanilla full-depth fine-tune of the same seed (`teacher="vanilla"`: its own training is extra compute, said
    in the record) or the untouched pretrained model (`teacher="pretrained"`, causal-LM studies: no extra training).
    The teacher's forward passes are reported apart (`teacher_forward_rows`)."""

    def run(ctx: Context, seed: int, k: int) -> dict:
        if teacher == "pretrained" and ctx.classification:
            raise ValueError(f"{name}: the pretrained model has an untrained classification head and cannot teach; "
                             "use a teacher='vanilla' arm (prune_then_distill) for classification studies")
        teacher_model = ctx.finetuned("vanilla", seed) if teacher == "vanilla" else ctx.pretrained(seed).eval()
        model, key = ctx.pretrained(seed), ModelKey("pretrained", seed)
        if block:
            student, record, selection = ctx.block_repaired(key, model, k, "linear")
            del model
            fields = _block_fields(selection, record)
        else:
            selection = ctx.ranked(key, model, "block_influence", k)
            hf_collapse.collapse_layers(model, selection.layers)
            student = model
            fields = dict(selection=selection.cost())
        student, seconds, teacher_rows = ctx.heal(student, seed, teacher=teacher_model, whole_budget=True)
        if teacher == "pretrained":
            del teacher_model
        ctx.log(f"  {name} k={k} seed {seed}: removed {selection.layers}, trained {ctx.study.steps} steps distilled "
                f"from the {teacher} model in {seconds:.0f} s")
        return collapsed_result(ctx, ModelKey(f"{name}-{k}", seed), student, selection.layers,
                                train_steps=ctx.study.steps, teacher=teacher, teacher_forward_rows=teacher_rows,
                                teacher_training_steps=ctx.study.steps if teacher == "vanilla" else 0, **fields)

    return run


arm(
    "prune_then_distill",
    "as prune_then_finetune, trained with logit distillation (weight 1, T 2) from the vanilla full-depth fine-tune of "
    "the same seed added to the task loss (the teacher's fine-tune is extra training; its forward passes reported "
    "apart)",
    family="baseline",
)(_distilled_cut("ptd", block=False, teacher="vanilla"))
arm(
    "prune_block_repair_distill_pretrained",
    "as prune_block_repair_finetune, trained with logit distillation (weight 1, T 2) from the untouched pretrained "
    "model added to the task loss (no extra training; the teacher's forward passes reported apart; causal-LM only)",
    family="baseline",
)(_distilled_cut("pbrd-pretrained", block=True, teacher="pretrained"))


def _heal_choice(ctx: Context, seed: int, k: int):
    """prune-then-heal's choice: the partial vanilla fine-tune (steps - heal_steps), every post-hoc rule and the
    greedy bypass, the best on validation. Returns the (uncollapsed) model, the best selection, the candidates and
    the choice's cost."""
    model = ctx.partial(seed)
    key = ModelKey("partial", seed)
    candidates = [ctx.ranked(key, model, m, k) for m in ("block_influence", "angular", "msw")]
    candidates.append(Selection(list(range(ctx.num_layers - 1 - k, ctx.num_layers - 1)), "last k before the final layer"))
    greedy = ctx.measured(key, model, k, cheap="screened" if ctx.num_layers > 12 else False)
    forward, seconds = greedy.forward_passes, greedy.seconds
    for candidate in candidates:  # the rankings' own validation metric; the greedy path measured its own
        start = time.perf_counter()
        candidate.validation = ctx.validation_metric(model, candidate.layers, key)
        seconds += time.perf_counter() - start + candidate.seconds
        forward += len(ctx.validation) + candidate.forward_passes
    candidates.append(greedy)
    sign = 1 if ctx.higher_is_better else -1
    best = max(candidates, key=lambda c: sign * c.validation)
    cost = {
        "method": f"best of {len(candidates)} post-hoc rules on validation",
        "forward_passes": forward,
        "evaluations": greedy.evaluations + len(candidates) - 1,
        "seconds": round(seconds, 3),
    }
    return model, best, candidates, cost


def _heal_result(ctx: Context, name: str, seed: int, k: int, model, best: Selection, candidates, cost, **extra) -> dict:
    out = result(ctx, ModelKey(f"{name}-{k}", seed, best.layers), model, None, train_steps=ctx.study.steps)
    out.update(
        layers=best.layers,
        num_layers=ctx.num_layers - k,
        rule=best.method,
        validation=best.validation,
        heal_steps=ctx.study.heal_steps,
        candidates=[{"method": c.method, "layers": c.layers, "validation": c.validation} for c in candidates],
        selection=cost,
    )
    out.update(extra)
    return out


def _heal_variant(name: str, *, distill: bool, scope: str):
    """prune-then-heal's choice, healed through hf_collapse.heal: with `distill`, logit distillation (weight 1, T 2)
    from the full-depth fine-tune as it was just before the removal (the same steps; its forward passes reported
    apart as `teacher_forward_rows`); with `scope="adjacent"`, only the kept layers next to each cut and the head
    train."""

    def run(ctx: Context, seed: int, k: int) -> dict:
        model, best, candidates, cost = _heal_choice(ctx, seed, k)
        teacher = copy.deepcopy(model) if distill else None
        hf_collapse.collapse_layers(model, best.layers)
        names = set(adjacent_parameter_names(model)) if scope == "adjacent" else None
        trainable = sum(p.numel() for n, p in model.named_parameters() if names is None or n in names)
        model, seconds, teacher_rows = ctx.heal(model, seed, teacher=teacher, scope=scope)
        del teacher
        ctx.log(f"  {name} k={k} seed {seed}: {best.method} removed {best.layers}, healed {ctx.study.heal_steps} steps "
                f"({scope}{', distilled' if distill else ''}) in {seconds:.0f} s")
        return _heal_result(ctx, name, seed, k, model, best, candidates, cost, heal_scope=scope,
                            teacher_forward_rows=teacher_rows, trainable_parameters=trainable)

    return run


@arm("prune_then_heal", "vanilla fine-tune for steps - heal_steps, remove k layers by the post-hoc rule best on validation, heal for heal_steps", family="baseline")
def prune_then_heal(ctx: Context, seed: int, k: int) -> dict:
    model, best, candidates, cost = _heal_choice(ctx, seed, k)
    hf_collapse.collapse_layers(model, best.layers)
    heal = ctx.fit(model, seed, ctx.study.heal_steps, **ctx.heal_schedule())
    model.eval()
    ctx.log(f"  prune-then-heal k={k} seed {seed}: {best.method} removed {best.layers}, healed {ctx.study.heal_steps} steps in {heal:.0f} s")
    return _heal_result(ctx, "pth", seed, k, model, best, candidates, cost)


arm(
    "prune_then_heal_distill",
    "as prune_then_heal, healed with logit distillation (weight 1, T 2) from the full-depth fine-tune just before "
    "the removal (same steps; teacher forward passes reported apart)",
    family="baseline",
)(_heal_variant("pth-distill", distill=True, scope="full"))
arm(
    "prune_then_heal_adjacent",
    "as prune_then_heal, but healing trains only the kept layers next to each removed span and the head (final "
    "norm, lm_head / classifier and pooler)",
    family="baseline",
)(_heal_variant("pth-adjacent", distill=False, scope="adjacent"))


# ---------------------------------------------------------------------------------------------- ours: target depth


def _targeted(name: str, fields: dict, *, heal: bool = False, repair: bool = False, mixed_repair: bool = False):
    """Target-depth training through the public API: CollapseConfig(collapse_num_layers=k, ...) + CollapseTrainer,
    then the targets removed with collapse_layers (and, with `heal`, hf_collapse.heal for the last heal_steps; with
    `repair`, removed by collapse_model with the repair best on validation, fitted at the end on the calibration
    rows; with `mixed_repair`, `target_repair` fitted on the mixed-domain rows given as the trainer's
    `repair_dataset`)."""

    def run(ctx: Context, seed: int, k: int) -> dict:
        study = ctx.study
        model = ctx.pretrained(seed)
        heal_steps = study.heal_steps if heal else 0
        trainer, seconds = ctx.fit_targeted(model, seed, study.steps - heal_steps, k, heal_steps=heal_steps,
                                            mixed_repair=mixed_repair, **fields)
        targets = list(trainer.collapse_targets)
        choice = trainer.msw_schedule[0]
        fixed = None
        if repair:  # the faded layers are back at full strength once training ends: the map replaces them
            model.eval()
            fixed, fixed_record = ctx.best_repair(model, targets, ModelKey(f"{name}-{k}/trained", seed))
        if fixed is not None:
            model = fixed
        else:
            hf_collapse.collapse_layers(model, targets)
        if heal:
            model, done = hf_collapse.heal(model, trainer.args, ctx.train, data_collator=ctx.data.collator)
            assert done == heal_steps, (done, heal_steps)
        model.eval()
        ctx.log(f"  {name} k={k} seed {seed}: targeted {targets} at step {choice.step}, trained in {seconds:.0f} s")
        out = result(ctx, ModelKey(f"{name}-{k}", seed, targets), model, None, train_steps=study.steps)
        rows = min(fields.get("target_choice_samples", 128), len(ctx.validation))
        teacher_rows = (study.steps - heal_steps - choice.step) * study.batch_size if fields.get("distill_weight") else 0
        how = {"score": f"{choice.score} ranking", "block": "contiguous run with the least measured bypass cost, its map "
               "applied"}.get(choice.choice, "measured bypass")
        rule = f"{how} during training (step {choice.step}, {rows} validation rows)"
        passes, evaluations, spent = choice.evaluations * rows, choice.evaluations, choice.seconds
        if trainer.target_schedule.repair is not None:  # the maps' fit: one pass over the repair rows
            passes += trainer.target_schedule.repair["rows"]
        if repair:  # fitting the candidate maps and choosing one on validation
            passes, spent = passes + fixed_record["forward_passes"], spent + fixed_record["seconds"]
            evaluations += len(fixed_record["candidates"])
            rule += ", then the repair best on validation"
        out.update(
            layers=targets,
            num_layers=ctx.num_layers - k,
            heal_steps=heal_steps,
            teacher_forward_rows=teacher_rows,
            schedule=[entry.to_dict() for entry in trainer.msw_schedule],
            **({"repair": fixed_record} if repair else {}),
            **({"target_repair": trainer.target_schedule.repair} if fields.get("target_repair", "none") != "none" else {}),
            selection={"method": rule, "forward_passes": passes, "evaluations": evaluations, "seconds": spent},
        )
        return out

    run.fields = dict(fields)  # the CollapseConfig fields of the arm (a recipe that claims to be this arm is checked)
    return run


_TARGET = dict(target_choice="measured", target_choice_steps=0.3, msw_adaptive=False, msw_weight=0.0)
arm("target_fade", "targets chosen by measured bypass at 30 % of training, faded to zero over the next 40 %; no penalty", family="ours")(
    _targeted("target_fade", dict(_TARGET, fade_steps=0.4))
)
arm("target_fade_msw", "as target_fade, plus the MSW penalty on the targets (lambda from 0.3, adaptive)", family="ours")(
    _targeted("target_fade_msw", dict(_TARGET, fade_steps=0.4, msw_weight=0.3, msw_adaptive=True))
)
arm("target_fade_distill", "as target_fade, plus logit distillation (T 2, weight 1) from the model at the choice", family="ours")(
    _targeted("target_fade_distill", dict(_TARGET, fade_steps=0.4, distill_weight=1.0))
)
arm("target_msw_heal", "adaptive MSW penalty on measured targets (no fade), removed at steps - heal_steps, then healed", family="ours")(
    _targeted("target_msw_heal", dict(_TARGET, msw_weight=0.3, msw_adaptive=True), heal=True)
)
arm(
    "score_fade",
    "targets = the k lowest Block Influence layers of the pretrained model (as prune-then-fine-tune chooses), faded to "
    "zero over the first 30 % of training; no penalty (a gradual prune-then-fine-tune)",
    family="ours",
)(_targeted("score_fade", dict(target_choice="score", target_score="block_influence", target_choice_steps=0.0, fade_steps=0.3, msw_adaptive=False, msw_weight=0.0)))
arm(
    "target_fade_late",
    "as target_fade, but chosen at 50 % of training on all validation rows and faded over the next 30 %",
    family="ours",
)(_targeted("target_fade_late", dict(_TARGET, target_choice_steps=0.5, target_choice_samples=100_000, fade_steps=0.3)))
arm(
    "target_repair",
    "prune, repair, fine-tune through the trainer (what recipes run with target_repair: linear): targets = the k lowest "
    "Block Influence layers of the pretrained model at step 0, the linear repair fitted on target_repair_samples "
    "training rows and folded at the choice, the targets bypassed from that step, removed at the end",
    family="ours",
)(_targeted("target_repair", dict(target_choice="score", target_score="block_influence", target_choice_steps=0.0, fade_steps=1, target_repair="linear", collapse_protect_first=1, msw_adaptive=False, msw_weight=0.0)))
arm(
    "target_block_repair",
    "as target_repair, but the targets are the run of k consecutive layers (layer 0 kept) whose linear map, fitted on "
    "target_repair_samples training rows and applied by hooks, gives the least choice-row loss at step 0 (what recipes "
    "run with target_choice: block); that map folded, the run bypassed from that step, removed at the end",
    family="ours",
)(_targeted("target_block_repair", dict(target_choice="block", target_choice_steps=0.0, fade_steps=1, target_repair="linear",
                                       collapse_protect_first=1, msw_adaptive=False, msw_weight=0.0)))
arm(
    "target_block_repair_mixed",
    "as target_block_repair, with every run's map fitted on half the study's own training blocks and half Rotten "
    "Tomatoes blocks (the trainer's repair_dataset; what recipes run with repair_dataset_name: offline:rotten_tomatoes): "
    "the recipe path of prune_block_repair_mixed_finetune",
    family="ours",
)(_targeted("target_block_repair_mixed", dict(target_choice="block", target_choice_steps=0.0, fade_steps=1,
                                             target_repair="linear", collapse_protect_first=1, msw_adaptive=False,
                                             msw_weight=0.0), mixed_repair=True))
arm(
    "score_fade_repair",
    "as score_fade, then the repair (scale, linear or transport) best on validation fitted at the end on the "
    "calibration rows and folded at the cut: the map stands in for the faded layers as they are after training",
    family="ours",
)(_targeted("score_fade_repair", dict(ARMS["score_fade"].fn.fields), repair=True))
