"""The whole job of a recipe: fine-tune with the penalty, score, choose, collapse, evaluate, export."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from .config import CollapseConfig
from .data import TaskData, load_task_data
from .adapters import merge_dequantized
from .models import PIPELINE_TAGS, check_head_trained, describe_quantization, load_model, load_processor, resolve_model
from .recipe import RecipeArguments, RecipeError
from .post import collapse_model, heal, selection_sentence
from .schedule import TargetChoice
from .trainer import CollapseTrainer

__all__ = ["RunSummary", "preflight", "run_recipe", "task_evaluator"]


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
    train_steps: int = 0
    heal_steps: int = 0
    targets: list[int] | None = None
    msw_schedule: list = field(default_factory=list)
    benchmarks: list = field(default_factory=list)  # BenchmarkResult: lm-eval tasks before and after

    def table(self) -> str:
        rows = [
            ("layers", f"{self.layers_before}", f"{self.layers_after}"),
            ("parameters", f"{self.parameters_before:,}", f"{self.parameters_after:,}"),
            (self.metric_name, f"{self.metric_before:.4f}", f"{self.metric_after:.4f}"),
        ]
        if self.perplexity_before is not None and self.metric_name != "perplexity":
            rows.append(("perplexity", f"{self.perplexity_before:.2f}", f"{self.perplexity_after:.2f}"))
        for bench in self.benchmarks:
            before = "—" if bench.before is None else f"{bench.before:.4f}"
            rows.append((f"lm-eval {bench.task} {bench.metric}", before, f"{bench.after:.4f}"))
        if self.speedup is not None:
            rows.append(("measured speed-up", "1.00x", f"{self.speedup:.2f}x"))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}}  {'before':>14}  {'after':>14}"]
        lines += [f"{name:{width}}  {before:>14}  {after:>14}" for name, before, after in rows]
        if self.train_steps or self.heal_steps:
            total = self.train_steps + self.heal_steps
            lines.append(f"optimizer steps: {self.train_steps} training + {self.heal_steps} healing = {total}")
        if self.targets is not None:
            lines.append(f"training targeted layers {self.targets}")
        lines.append(f"removed layers (0-based, original numbering): {self.removed}")
        if self.export_dir is not None:
            lines.append(f"output: {self.export_dir}")
        return "\n".join(lines)


def task_evaluator(task: str, dataset, collator, batch_size: int):
    """(metric name, higher is better, model -> metric) on one split of a recipe's data."""
    from .evaluation import evaluate_classification, perplexity

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


def _target_clause(start: TargetChoice) -> str:
    return start.clause()


def _training_fields(config: CollapseConfig, trainer: CollapseTrainer, heal_steps: int, lora: bool) -> dict:
    """What the card records of the training method: targets and their choice, λ as applied, fade, distillation, healing."""
    record = dataclasses.replace(trainer.training_record(), healing_steps=heal_steps, healing_lora=lora)
    return record.to_report_fields()


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


def timed_pair(full, model, batch: dict, repeats: int) -> tuple[dict, float]:
    """The card's latency fields (before, after, how it was measured) and the speed-up of `model` over `full`."""
    from .evaluation import compare_latency

    comparison = compare_latency(full, model, batch, repeats=repeats)
    fields = {
        "latency_ms_before": comparison.a.median_ms,
        "latency_ms_after": comparison.b.median_ms,
        "latency_setup": latency_setup(comparison, batch, model),
    }
    return fields, comparison.speedup


def export_and_push(model, report, processing_class, recipe: RecipeArguments, config: CollapseConfig, hub_push,
                    stage, *, source=None) -> Path:
    """Export the collapsed model to the recipe's export folder, then push it when the recipe asked; the folder."""
    from .export import export_collapsed

    export_dir = Path(recipe.export_dir or Path(config.output_dir) / "collapsed")
    stage(f"exporting to {export_dir}")
    export_collapsed(
        model, export_dir, report=report, processing_class=processing_class, source=source,
        repo_id=recipe.export_repo_id or (hub_push.repo_id if hub_push else None), overwrite=recipe.overwrite_export,
    )
    if hub_push is not None:
        stage(f"pushing {export_dir} to {hub_push.repo_id} (one commit)")
        stage(f"pushed: {hub_push.push(export_dir).commit_url}")
    return export_dir


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _local_model_path(name: str) -> bool:
    """Whether a model name that does not exist on disk was meant as a local path (not a Hub id)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def preflight(recipe: RecipeArguments, config: CollapseConfig, *, train: bool = True) -> None:
    """Every refusal that needs neither the weights nor the data rows, before anything is loaded or written.

    Checks: the model path exists (a local path) and has a `config.json`; a layer budget or explicit layers fit the
    model's depth and protected layers; `max_length` is within the model's position limit; the export and output
    folders do not overlap the source checkpoint; a non-empty export folder needs `overwrite_export`; a checkpoint to
    resume from exists and is complete; a Hub push names its repo; a checkpoint that needs its own code has
    `trust_remote_code` set.

    Raises:
        [`RecipeError`]: the first problem found, in one sentence that says what to change.
    """
    from transformers import AutoConfig

    from .models import remote_code_refused
    from .checkpoints import resolve_resume

    name = recipe.model_name_or_path
    resolved = resolve_model(name)
    source = Path(resolved.path).expanduser()
    local = source.exists()
    if not local and not name.startswith("offline:") and _local_model_path(name):
        raise RecipeError(
            f"cannot load the tokenizer and model of {name}: that path does not exist; give an existing folder, a Hub id "
            "or an offline:... model"
        )
    if local and source.is_dir() and not (source / "config.json").is_file():
        raise RecipeError(f"model folder {name} has no config.json: point model_name_or_path at a saved transformers model")
    export_dir = Path(recipe.export_dir) if recipe.export_dir else Path(config.output_dir) / "collapsed"
    if local:
        for what, path in (("export_dir", export_dir), ("output_dir", Path(config.output_dir))):
            if (recipe.collapse or what == "output_dir") and _overlaps(path, source):
                raise RecipeError(
                    f"{what} {path} overlaps the source checkpoint {source}: write to a separate folder so the source "
                    "stays untouched"
                )
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        raise RecipeError(f"output_dir {config.output_dir} exists and is not a folder: choose another path")
    if recipe.collapse:
        if export_dir.exists() and not export_dir.is_dir():
            raise RecipeError(f"export_dir {export_dir} exists and is not a folder: choose another path")
        if export_dir.is_dir() and any(export_dir.iterdir()) and not recipe.overwrite_export:
            raise RecipeError(
                f"export_dir {export_dir} already exists and is not empty: choose another folder, or set "
                "overwrite_export: true to replace it once the new export is complete"
            )
    if recipe.lm_eval_tasks:
        _check_lm_eval(recipe)
    if recipe.task == "sentence-embedding":
        from .sentence_recipe import check_sentence_recipe

        check_sentence_recipe(recipe, config, source if local else None)
    if train:
        try:
            resolve_resume(config.resume_from_checkpoint, config.output_dir)
        except FileNotFoundError as error:
            raise RecipeError(str(error)) from None
    if not local:
        return  # a Hub id: its config is read when the model loads
    try:  # the flag is always given: left unset, transformers may ask on the terminal whether to run the code
        model_config = AutoConfig.from_pretrained(str(source), trust_remote_code=bool(recipe.trust_remote_code))
    except Exception as error:  # transformers raises many types; the user needs one sentence
        if "trust_remote_code" in str(error):
            raise remote_code_refused(name) from None
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RecipeError(f"cannot read the config of {name}: {first}") from None
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if not getattr(model_config, "is_encoder_decoder", False):
        depth = getattr(text, "num_hidden_layers", None)
        if isinstance(depth, int) and recipe.collapse:
            _check_budget(config, depth)
    limit = getattr(text, "max_position_embeddings", None)
    if recipe.task != "image-classification" and isinstance(limit, int) and 0 < limit < recipe.max_length:
        raise RecipeError(
            f"max_length {recipe.max_length} is above the model's position limit of {limit} tokens "
            f"(max_position_embeddings): lower max_length to {limit} or less"
        )


def _check_lm_eval(recipe: RecipeArguments) -> None:
    from .lmeval import LmEvalError, check_lm_eval_tasks

    if not recipe.collapse:
        raise RecipeError(
            "lm_eval_tasks compare the full-depth and the collapsed model, but collapse is false: set collapse: true, "
            "or run `hf-collapse evaluate --lm-eval-tasks` on the saved model"
        )
    try:
        check_lm_eval_tasks(recipe.lm_eval_tasks, recipe.lm_eval_include, load=True)  # data out of reach: now
    except LmEvalError as error:
        raise RecipeError(str(error)) from None


def _lm_eval_run(recipe: RecipeArguments, model, processor) -> dict:
    """The recipe's lm-eval tasks on a model in memory (see [`hf_collapse.lmeval.run_lm_eval`])."""
    from .lmeval import LmEvalError, run_lm_eval, sample_limit

    try:
        return run_lm_eval(
            model, recipe.lm_eval_tasks, tokenizer=processor, include_path=recipe.lm_eval_include,
            num_fewshot=recipe.lm_eval_fewshot, limit=sample_limit(recipe.lm_eval_limit),
            batch_size=recipe.lm_eval_batch_size,
        )
    except LmEvalError as error:  # one line (the CLI reports it as a failure after work began)
        raise RecipeError(str(error)) from None


def _check_budget(config: CollapseConfig, depth: int) -> None:
    protected = set(range(config.collapse_protect_first)) | set(range(depth - config.collapse_protect_last, depth))
    removable = depth - len(protected & set(range(depth)))
    if config.collapse_layers is not None:
        bad = [i for i in config.collapse_layers if i >= depth]
        if bad:
            raise RecipeError(
                f"collapse_layers {bad} do not exist: the model has {depth} layers, numbered 0-{depth - 1}"
            )
        if len(config.collapse_layers) >= depth:
            raise RecipeError(f"removing all {depth} layers would leave none: name at most {depth - 1}")
        hit = sorted(set(config.collapse_layers) & protected)
        if hit:
            raise RecipeError(f"collapse_layers {hit} are protected (collapse_protect_first/last): choose other layers")
    wanted = config.collapse_num_layers
    if wanted is not None:
        if wanted >= depth:
            raise RecipeError(
                f"collapse_num_layers {wanted} would remove all of the model's {depth} layers or more: ask for at most "
                f"{depth - 1}"
            )
        if wanted > removable:
            raise RecipeError(
                f"collapse_num_layers {wanted}, but only {removable} of the model's {depth} layers are not protected "
                f"(collapse_protect_first={config.collapse_protect_first}, collapse_protect_last={config.collapse_protect_last})"
            )


def run_recipe(
    recipe: RecipeArguments, config: CollapseConfig, resolved_recipe: dict, *, train: bool = True, log=print
) -> RunSummary | None:
    """Run a recipe end to end: train (with the penalty and any target), then [`collapse_model`], [`heal`],
    latency and export. Returns `None` on non-main processes (they only take part in training)."""
    started = time.perf_counter()

    def stage(text: str) -> None:
        log(f"[{time.perf_counter() - started:6.0f}s] {text}")

    preflight(recipe, config, train=train)
    resolved = resolve_model(recipe.model_name_or_path)
    # before anything random: a new classification head and LoRA's initial weights come from the global RNG
    set_seed(config.seed)
    if recipe.task == "sentence-embedding":
        from .sentence_recipe import run_sentence_recipe

        return run_sentence_recipe(recipe, config, resolved_recipe, train=train, stage=stage)
    stage(f"loading {recipe.model_name_or_path} ({resolved.path})")
    processor = load_processor(recipe, resolved)
    data = load_task_data(recipe, processor)
    model = load_model(recipe, resolved, processor, data.label_names, device=config.device if recipe.quantized else None)
    test = getattr(data, "test", None)
    stage(
        f"data: {len(data.train)} training rows, {len(data.eval)} validation rows"
        + (f", {len(test)} test rows" if test is not None else "") + f" ({', '.join(data.dataset_ids)})"
    )
    if recipe.task == "image-classification":
        config.remove_unused_columns = False  # the image transform needs the raw image column

    lora = None
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
        target = None
        if config.has_target:
            target = "targeting " + (str(config.collapse_layers) if config.collapse_layers else f"{config.collapse_num_layers} layers")
        if config.msw_weight > 0:
            stage(f"fine-tuning with the MSW penalty (weight {config.msw_weight}, {target or 'uniform'}, {config.msw_search} directions)")
        else:
            fade = f", faded out (fade_steps {config.fade_steps})" if config.fade_steps else ""
            stage(f"fine-tuning without the MSW penalty ({target + fade if target else 'a plain fine-tune'}; distances are still logged)")
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if not recipe.collapse:
        # every rank: under FSDP or DeepSpeed the weights are gathered collectively
        trainer.save_model(config.output_dir)
        if trainer.is_world_process_zero():
            stage(f"saved the fine-tuned model to {config.output_dir} (collapse: false)")
        return None
    if not trainer.is_world_process_zero():
        return None
    quantized_training = describe_quantization(trainer.model)  # QLoRA: read before the merge drops the config
    if recipe.use_peft:  # merge_and_unload() would quantise the merged sum again
        model = merge_dequantized(trainer.model) if quantized_training else trainer.model.merge_and_unload()
    else:
        model = trainer.model
    model.eval()
    check_head_trained(model, "measure it on the task or choose layers by its metric")

    batch_size = config.per_device_eval_batch_size
    calibration = data.train.select(range(min(recipe.calibration_samples, len(data.train))))
    if len(calibration) == 0:
        raise RecipeError("the training split is empty: there is no calibration data to score the layers")
    loader = DataLoader(calibration, batch_size=batch_size, collate_fn=data.collator)
    batches = [{k: v.to(model.device) for k, v in b.items() if k != "labels"} for b in loader]
    # Layers are chosen on validation rows and the figures are reported on rows that chose nothing: the test split,
    # or, for data without one, the second half of the validation rows (the first half chooses).
    choice_rows, report_rows, selection_split, eval_split = choice_and_report_rows(data, recipe)
    metric_name, higher_is_better, choose_on = task_evaluator(recipe.task, choice_rows, data.collator, batch_size)
    _, _, evaluate = task_evaluator(recipe.task, report_rows, data.collator, batch_size)

    targeted = train and config.has_target
    layers = trainer.collapse_targets if targeted else config.collapse_layers
    heal_teacher = None
    if config.heal_steps and config.distill_weight > 0:
        # the full-depth model before surgery; a faded model already equals the collapsed one, so its teacher is
        # the copy taken when targeting started
        faded = targeted and config.fade_steps
        heal_teacher = trainer.teacher_model if faded else copy.deepcopy(model)
    full = copy.deepcopy(model) if recipe.latency_repeats else None
    lm_eval_before = None
    if recipe.lm_eval_tasks:
        stage(f"lm-eval on the full-depth model: {', '.join(recipe.lm_eval_tasks)}")
        lm_eval_before = _lm_eval_run(recipe, model, processor)
    stage(f"scoring, choosing ({'training targets' if targeted else recipe.collapse_strategy}) and collapsing")
    model, report = collapse_model(
        model,
        layers=layers,
        num_layers=None if layers is not None else config.collapse_num_layers,
        tolerance=None if layers is not None or config.collapse_num_layers is not None else recipe.collapse_tolerance,
        calibration=batches, score_method=recipe.collapse_score_method, strategy=recipe.collapse_strategy,
        candidates=recipe.collapse_candidates, protect_first=config.collapse_protect_first,
        protect_last=config.collapse_protect_last, choose_on=choose_on, evaluate=evaluate, metric_name=metric_name,
        higher_is_better=higher_is_better, base_model=resolved.base_model,
        selection=selection_sentence(targeted=_target_clause(trainer.msw_schedule[0])) if targeted else None,
        log=lambda text: stage(text),
    )
    metric_before, metric_after = report.metric_before, report.metric_after
    heal_steps_done = 0
    if config.heal_steps:
        stage(f"healing: {config.heal_steps} fine-tuning steps of the collapsed model" + (" with distillation" if heal_teacher else ""))
        model, heal_steps_done = heal(
            model, config, data.train, data_collator=data.collator, processing_class=processor,
            teacher=heal_teacher, peft_config=lora,
        )
        metric_after = evaluate(model)
        stage(f"{metric_name} after healing: {metric_after:.4f}")
    benchmarks = []
    if lm_eval_before is not None:
        from .lmeval import benchmark_results

        stage(f"lm-eval on the collapsed model: {', '.join(recipe.lm_eval_tasks)}")
        benchmarks = benchmark_results(lm_eval_before, _lm_eval_run(recipe, model, processor))
    # for a causal LM the task metric is the perplexity itself
    perplexity_before, perplexity_after = (metric_before, metric_after) if recipe.task == "causal-lm" else (None, None)

    latency, speedup = {}, None
    if full is not None:
        stage(f"timing both models ({recipe.latency_repeats} interleaved forward passes each)")
        latency, speedup = timed_pair(full, model, _first_batch(data, batch_size, model.device), recipe.latency_repeats)
        del full

    measured_choice = targeted or layers is None
    report = dataclasses.replace(
        report,
        metric_after=metric_after,
        perplexity_before=perplexity_before,
        perplexity_after=perplexity_after,
        datasets=list(data.dataset_ids),
        eval_dataset=recipe.dataset_name,
        eval_split=eval_split,
        selection_split=selection_split if measured_choice else None,
        license=resolved.license,
        **(_training_fields(config, trainer, heal_steps_done, lora is not None) if train else {}),
        pipeline_tag=PIPELINE_TAGS[recipe.task],
        recipe=resolved_recipe if train else None,
        healed=heal_steps_done > 0,
        benchmarks=list(report.benchmarks) + benchmarks,
        limitations=list(resolved.limitations),
        quantized_training=quantized_training,
        dequantized_dtype=str(model.dtype).removeprefix("torch.") if quantized_training else None,
        **latency,
    )
    export_dir = export_and_push(model, report, processor, recipe, config, hub_push, stage)
    depth = report.layers_before
    return RunSummary(
        layers_before=depth, layers_after=depth - len(report.removed_layers), removed=list(report.removed_layers),
        parameters_before=report.num_parameters_before, parameters_after=model.num_parameters(),
        metric_name=metric_name, metric_before=metric_before, metric_after=metric_after,
        perplexity_before=perplexity_before, perplexity_after=perplexity_after,
        speedup=speedup, export_dir=export_dir.resolve(), selection_curve=report.selection_curve or [],
        train_steps=trainer.state.global_step if train else 0, heal_steps=heal_steps_done,
        targets=list(trainer.collapse_targets or []) if targeted else None, msw_schedule=list(trainer.msw_schedule),
        benchmarks=benchmarks,
    )
