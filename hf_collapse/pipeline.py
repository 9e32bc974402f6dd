"""The whole job of a recipe: fine-tune with the penalty, score, choose, collapse, evaluate, export."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, set_seed

from .checkpoints import resolve_resume
from .config import CollapseConfig
from .data import repair_rows, training_split_name
from .evaluation import compare_latency
from .launch import launch_problem
from .export import export_collapsed
from .hub import take_hub_push
from .layerwise import score_layers_layerwise
from .lmeval import LmEvalError, benchmark_results, check_lm_eval_tasks, run_lm_eval, sample_limit
from .models import remote_code_refused, resolve_model
from .paths import check_output_folder, check_replaceable, inside, overlap
from .post import collapse_model, heal, selection_sentence
from .recipe import RecipeArguments, RecipeError, layer_choice
from .sentence_recipe import SentenceEmbeddingTask, check_sentence_recipe
from .tasks import TaskStrategy, TransformersTask, choice_and_report_rows

__all__ = ["RecipeRun", "RunSummary", "latency_setup", "preflight", "run_recipe", "timed_pair"]


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
    comparison = compare_latency(full, model, batch, repeats=repeats)
    fields = {
        "latency_ms_before": comparison.a.median_ms,
        "latency_ms_after": comparison.b.median_ms,
        "latency_setup": latency_setup(comparison, batch, model),
    }
    return fields, comparison.speedup


def export_and_push(model, report, recipe: RecipeArguments, config: CollapseConfig, hub_push, stage, *,
                    processing_class, source=None) -> Path:
    """Export the collapsed model to the recipe's export folder, then push it when the recipe asked; the folder."""
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
    name = recipe.model_name_or_path
    resolved = resolve_model(name)
    source = Path(resolved.path).expanduser()
    local = source.exists()  # resolve_model refused a local path that does not exist
    if local and source.is_dir() and not (source / "config.json").is_file():
        raise RecipeError(f"model folder {name} has no config.json: point model_name_or_path at a saved transformers model")
    export_dir = Path(recipe.export_dir) if recipe.export_dir else Path(config.output_dir) / "collapsed"
    if local:
        for what, path in (("export_dir", export_dir), ("output_dir", Path(config.output_dir))):
            if (recipe.collapse or what == "output_dir") and overlap(path, source):
                raise RecipeError(
                    f"{what} {path} overlaps the source checkpoint {source}: write to a separate folder so the source "
                    "stays untouched"
                )
    _check_output_folders(recipe, Path(config.output_dir), export_dir)
    if recipe.lm_eval_tasks:
        _check_lm_eval(recipe)
    if recipe.task == "sentence-embedding":
        check_sentence_recipe(recipe, config, source if local else None)
    if recipe.layerwise_scoring and (train or not local or not source.is_dir()):
        raise RecipeError(
            "layerwise_scoring reads the layers of a saved local checkpoint from its shards: "
            + ("this run trains the model first, so score after training in memory (drop layerwise_scoring), or score "
               "the saved checkpoint with hf-collapse score" if train else
               f"{name} is not a local folder; download it first (hf download REPO --local-dir DIR) and give the folder")
        )
    if train:
        try:
            resolve_resume(config.resume_from_checkpoint, config.output_dir)
        except FileNotFoundError as error:
            raise RecipeError(str(error)) from None
        problem = launch_problem(recipe, config)  # DeepSpeed's precision; a collapse in one go under sharding
        if problem:
            raise RecipeError(problem)
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
            try:
                layer_choice(recipe, config).check_depth(depth)
            except ValueError as error:
                raise RecipeError(str(error)) from None
    limit = getattr(text, "max_position_embeddings", None)
    if recipe.task != "image-classification" and isinstance(limit, int) and 0 < limit < recipe.max_length:
        raise RecipeError(
            f"max_length {recipe.max_length} is above the model's position limit of {limit} tokens "
            f"(max_position_embeddings): lower max_length to {limit} or less"
        )


def _check_output_folders(recipe: RecipeArguments, output_dir: Path, export_dir: Path) -> None:
    """The output and export folders: real folders of their own (no symlink, no broad target); the export neither is
    nor holds the output folder (replacing it would delete the checkpoints); a non-empty export is replaced only with
    `overwrite_export` and only when it is a previous export."""
    try:
        check_output_folder(output_dir, "output_dir")
        if output_dir.exists() and not output_dir.is_dir():
            raise RecipeError(f"output_dir {output_dir} exists and is not a folder: choose another path")
        if not recipe.collapse:
            return
        check_output_folder(export_dir, "export_dir")
        if inside(output_dir, export_dir):  # the same folder, or the export holding the checkpoints
            raise RecipeError(
                f"export_dir {export_dir} is or holds output_dir {output_dir}, where the checkpoints are written: "
                "give the export a folder of its own (by default it is <output_dir>/collapsed)"
            )
        if export_dir.exists() and not export_dir.is_dir():
            raise RecipeError(f"export_dir {export_dir} exists and is not a folder: choose another path")
        if export_dir.is_dir() and any(export_dir.iterdir()) and not recipe.overwrite_export:
            raise RecipeError(
                f"export_dir {export_dir} already exists and is not empty: choose another folder, or set "
                "overwrite_export: true to replace it once the new export is complete"
            )
        if recipe.overwrite_export:
            check_replaceable(export_dir)
    except (ValueError, FileExistsError) as error:
        if isinstance(error, RecipeError):
            raise
        raise RecipeError(str(error)) from None


def _check_lm_eval(recipe: RecipeArguments) -> None:
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
    try:
        return run_lm_eval(
            model, recipe.lm_eval_tasks, tokenizer=processor, include_path=recipe.lm_eval_include,
            num_fewshot=recipe.lm_eval_fewshot, limit=sample_limit(recipe.lm_eval_limit),
            batch_size=recipe.lm_eval_batch_size,
        )
    except LmEvalError as error:  # one line (the CLI reports it as a failure after work began)
        raise RecipeError(str(error)) from None


class RecipeRun:
    """A recipe run end to end, one step a method, its state on `self`:

    [`setup`] (checks, seed, the task's model and data, the trainer) → [`train`] → [`collapse`] (score, choose and
    remove layers, measured before and after) → [`heal`] → [`measure`] (lm-eval, latency) → [`export`] (the folder
    and its card, pushed when asked). [`run`] calls them in order. What depends on the task comes from its
    [`TaskStrategy`].
    """

    def __init__(self, recipe: RecipeArguments, config: CollapseConfig, resolved_recipe: dict, *, train: bool = True,
                 log=print):
        self.recipe, self.config, self.resolved_recipe, self.training, self.log = recipe, config, resolved_recipe, train, log
        self.started = time.perf_counter()
        self.model = self.processor = self.data = self.trainer = self.hub_push = self.report = None
        self.heal_steps = 0
        self.healing: dict = {}  # what healing records besides its steps (scope, the teacher's passes)
        self.teacher = self.full = None
        self.collapse_repair_rows = None  # (rows, what they are): collapse_repair's rows with repair_dataset_name
        self.lm_eval_before, self.benchmarks, self.latency, self.speedup = None, [], {}, None

    def stage(self, text: str) -> None:
        self.log(f"[{time.perf_counter() - self.started:6.0f}s] {text}")

    def run(self) -> RunSummary | None:
        """All the steps; `None` when nothing is exported (collapse: false, or a process other than the main one)."""
        self.setup()
        if self.training:
            self.train()
        if not self.recipe.collapse:
            return self.save_trained()
        if self.trainer is not None and not self.trainer.is_world_process_zero():
            return None
        self.collapse()
        if self.config.heal_steps:
            self.heal()
        self.measure()
        return self.export()

    def setup(self) -> None:
        """Checks, the seed, the task's model and data, the Hub push taken over, the trainer."""
        preflight(self.recipe, self.config, train=self.training)
        self.resolved = resolve_model(self.recipe.model_name_or_path)
        # before anything random: a new classification head and LoRA's initial weights come from the global RNG
        set_seed(self.config.seed)
        self.task = strategy_for(self.recipe)
        self.task.load(self)
        if self.recipe.repair_dataset_name and self.recipe.collapse_repair != "none":  # read now: a failure costs no training
            self.collapse_repair_rows = self.repair_fit_rows(self.recipe.calibration_samples)
        sentence = self.recipe.task == "sentence-embedding"
        # push the collapsed export, not the full model
        self.hub_push = take_hub_push(self.config) if self.recipe.collapse or sentence else None
        if self.training or not self.recipe.collapse:  # collapsing a checkpoint as it is needs no trainer
            self.trainer = self.task.make_trainer(self)

    def train(self) -> None:
        self.stage(self.task.training_line(self))
        self.trainer.train(resume_from_checkpoint=self.config.resume_from_checkpoint)

    def save_trained(self) -> None:
        """`collapse: false`: save the fine-tuned model (every rank: FSDP and DeepSpeed gather collectively)."""
        self.trainer.save_model(self.config.output_dir)
        # the main process writes the gathered weights alone; the others wait for it, so that every rank tears down
        # after the last collective work (the exit itself is `launch.leave`: finalization aborted even after a barrier)
        self.trainer.accelerator.wait_for_everyone()
        if self.trainer.is_world_process_zero():
            self.stage(f"saved the fine-tuned model to {self.config.output_dir} (collapse: false)")
        return None

    @property
    def targeted(self) -> bool:
        return self.training and self.config.has_target

    def calibration_rows(self):
        rows = self.data.train.select(range(min(self.recipe.calibration_samples, len(self.data.train))))
        if len(rows) == 0:
            raise RecipeError("the training split is empty: there is no calibration data to score the layers")
        return rows

    def layerwise_scores(self, batches):
        """With `layerwise_scoring`, the source checkpoint's scores read one layer at a time (else None: in memory)."""
        if not self.recipe.layerwise_scoring:
            return None
        self.stage("scoring layer by layer from the checkpoint's shards (one layer's weights in memory at a time)")
        return score_layers_layerwise(self.resolved.path, batches, method=self.recipe.collapse_score_method, progress=False)

    def repair_fit_rows(self, count: int):
        """With `repair_dataset_name`, the `count` rows a repair is fitted on (the first training rows and that
        dataset's blocks, `repair_mix` of them) and what they are in words; see [`repair_rows`]."""
        return repair_rows(self.recipe, self.processor, self.data.train, count)

    def calibration_source(self) -> str:
        """The calibration rows in words, for the repair's record."""
        return training_split_name(self.recipe)

    def collapse(self) -> None:
        """Score, choose and remove layers of the trained model, measured on rows that chose nothing."""
        recipe, config, task = self.recipe, self.config, self.task
        self.model = task.collapsible(self)
        batches = task.batches(self, self.calibration_rows())
        # Layers are chosen on validation rows and the figures are reported on rows that chose nothing: the test
        # split, or, for data without one, the second half of the validation rows (the first half chooses).
        choice_rows, self.report_rows, self.selection_split, self.eval_split = choice_and_report_rows(self.data, recipe)
        self.evaluate = task.evaluator(self, self.report_rows)
        if config.heal_steps and (config.distill_weight > 0 or config.distill_hidden_weight > 0):
            # the full-depth model before surgery; a faded model already equals the collapsed one, so its teacher
            # is the copy taken when targeting started
            self.teacher = self.trainer.teacher_model if self.targeted and config.fade_steps else task.full_copy(self)
        self.full = task.full_copy(self) if recipe.latency_repeats else None
        if recipe.lm_eval_tasks:
            self.stage(f"lm-eval on the full-depth model: {', '.join(recipe.lm_eval_tasks)}")
            self.lm_eval_before = _lm_eval_run(recipe, self.model, self.processor)
        targets = self.trainer.collapse_targets if self.targeted else None
        fit_rows, fit_source = (None, self.calibration_source())
        if self.collapse_repair_rows is not None:
            fit_rows, fit_source = self.collapse_repair_rows
            fit_rows = task.batches(self, fit_rows)
        self.stage(f"scoring, choosing ({'training targets' if self.targeted else recipe.collapse_strategy}) and collapsing")
        self.model, self.report = collapse_model(
            self.model, layer_choice(recipe, config, layers=targets), calibration=batches, scores=self.layerwise_scores(batches),
            repair=recipe.collapse_repair, repair_check=recipe.collapse_repair_check, repair_calibration=fit_rows,
            calibration_source=fit_source,
            score_method=recipe.collapse_score_method, choose_on=task.evaluator(self, choice_rows),
            evaluate=self.evaluate, metric_name=task.metric_name, higher_is_better=task.higher_is_better,
            base_model=self.resolved.base_model,
            selection=selection_sentence(targeted=self.trainer.msw_schedule[0].clause()) if self.targeted else None,
            log=self.stage,
        )
        repaired_at_choice = self.trainer.training_record().repair if self.targeted else None
        if repaired_at_choice is not None:  # target_repair: fitted and folded at the choice, before the fine-tune
            self.report = self.report.updated(repair=repaired_at_choice)
        self.metric_after = self.report.metric_after
        task.after_collapse(self)

    def heal(self) -> None:
        """Fine-tune the collapsed model for `heal_steps` (distilling from the full-depth model when asked)."""
        config = self.config
        self.stage(f"healing: {config.heal_steps} fine-tuning steps of the collapsed model" + (" with distillation" if self.teacher else ""))
        healed = heal(
            self.model, config, self.data.train, data_collator=self.data.collator, processing_class=self.processor,
            teacher=self.teacher, peft_config=getattr(self.task, "lora", None) if config.heal_scope in (None, "lora") else None,
        )
        self.model, self.heal_steps = healed
        self.healing = {"healing_scope": healed.scope}
        if self.teacher is not None:
            self.healing.update(teacher_forward_passes=healed.teacher_forward_passes, teacher_forward_rows=healed.teacher_forward_rows)
            if config.distill_hidden_weight:
                self.healing["distillation_hidden_weight"] = config.distill_hidden_weight
        self.metric_after = self.evaluate(self.model)
        self.stage(f"{self.task.metric_name} after healing: {self.metric_after:.4f}")

    def measure(self) -> None:
        """lm-eval on the collapsed model and the latency of both models, interleaved."""
        recipe = self.recipe
        if self.lm_eval_before is not None:
            self.stage(f"lm-eval on the collapsed model: {', '.join(recipe.lm_eval_tasks)}")
            self.benchmarks = benchmark_results(self.lm_eval_before, _lm_eval_run(recipe, self.model, self.processor))
        if self.full is not None:
            self.stage(f"timing both {self.task.timed} ({recipe.latency_repeats} interleaved forward passes each)")
            self.latency, self.speedup = timed_pair(self.full, self.model, self.task.latency_batch(self), recipe.latency_repeats)
            self.full = None

    def training_fields(self, lora: bool) -> dict:
        """What the card records of the training method: the trainer's own record, with the healing after it."""
        record = self.trainer.training_record()
        if self.healing:  # what healing trained, whatever the training did
            lora = self.healing["healing_scope"] == "lora"
        return dataclasses.replace(record, healing_steps=self.heal_steps, healing_lora=lora, **self.healing).to_report_fields()

    def export(self) -> RunSummary:
        """The report completed, the export folder written (and pushed when asked); the closing summary."""
        recipe, report = self.recipe, self.report
        # for a causal LM the task metric is the perplexity itself
        perplexity = (report.metric_before, self.metric_after) if recipe.task == "causal-lm" else (None, None)
        lora = getattr(self.task, "lora", None) is not None
        self.report = report = report.updated(
            metric_after=self.metric_after, perplexity_before=perplexity[0], perplexity_after=perplexity[1],
            datasets=list(self.data.dataset_ids), eval_dataset=recipe.dataset_name, eval_split=self.eval_split,
            selection_split=self.selection_split if (self.targeted or self.config.collapse_layers is None) else None,
            license=self.resolved.license,
            **(self.training_fields(lora) if self.training else {}),
            recipe=self.resolved_recipe if self.training else None, healed=self.heal_steps > 0,
            benchmarks=list(report.benchmarks) + self.benchmarks, limitations=list(self.resolved.limitations),
            **self.task.report_fields(self), **self.latency,
        )
        export_dir = export_and_push(self.model, report, recipe, self.config, self.hub_push, self.stage, **self.task.export_args(self))
        depth = report.layers_before
        stacks = report.stacks()  # the summary says what was removed in the original numbering, as the config does
        removed = stacks[0].removed_original if len(stacks) == 1 else list(report.removed_layers)
        return RunSummary(
            layers_before=depth, layers_after=depth - len(report.removed_layers), removed=removed,
            parameters_before=report.num_parameters_before, parameters_after=self.model.num_parameters(),
            metric_name=self.task.metric_name, metric_before=report.metric_before, metric_after=self.metric_after,
            perplexity_before=perplexity[0], perplexity_after=perplexity[1], speedup=self.speedup,
            export_dir=export_dir.resolve(), selection_curve=report.selection_curve or [],
            train_steps=self.trainer.state.global_step if self.training else 0, heal_steps=self.heal_steps,
            targets=list(self.trainer.collapse_targets or []) if self.targeted else None,
            msw_schedule=list(self.trainer.msw_schedule) if self.trainer else [], benchmarks=self.benchmarks,
        )


def strategy_for(recipe: RecipeArguments) -> TaskStrategy:
    """The [`TaskStrategy`] of the recipe's task."""
    if recipe.task == "sentence-embedding":
        return SentenceEmbeddingTask(recipe)
    return TransformersTask(recipe)


def run_recipe(
    recipe: RecipeArguments, config: CollapseConfig, resolved_recipe: dict, *, train: bool = True, log=print
) -> RunSummary | None:
    """Run a recipe end to end (see [`RecipeRun`]): train (with the penalty and any target), then
    [`collapse_model`], [`heal`], latency and export. Returns `None` on non-main processes (they only take part in
    training) and with `collapse: false`."""
    return RecipeRun(recipe, config, resolved_recipe, train=train, log=log).run()
