"""LaCoOT's MSW penalty as a mixin for any `Trainer`, and `CollapseTrainer` = the mixin + `Trainer`.

The mixin adds, to whatever loss the trainer computes:

- the per-layer Max-Sliced Wasserstein penalty, read from forward hooks on the layer modules;
- with a target depth, the targeting schedule ([`TargetSchedule`]): choose the layers to remove (measured bypass
  cost or score), penalise only them with an adaptive λ, fade their residual update to zero, distil from a frozen
  teacher. The schedule decides; the mixin measures (bypass losses on evaluation rows) and applies its answers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from huggingface_hub import ModelCard
from torch.utils.data import DataLoader, Subset
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .quantization import disable_cpu_repacking, is_quantized
from .checkpoints import PenaltyState, load_penalty_state, load_teacher, penalty_settings, resolve_resume, save_penalty_state
from .choice import contiguous_blocks, greedy_bypass
from .config import CollapseConfig, MSWArguments
from .distillation import check_teacher, distillation_loss, hidden_state_loss, layer_outputs, teacher_layer_map
from .layers import (
    LayerCapture, LayerStack, bypass_layers, eval_mode, find_layer_stacks, resolve_layer_selection, scale_residual_updates,
    unwrap_model,
)
from .msw import DirectionSearch, max_sliced_wasserstein
from .repair import check_foldable, fit_repair, fold_verified, measure_runs
from .schedule import ScheduleEntry, TargetSchedule, TrainingRecord
from .scoring import score_layers

__all__ = ["CollapseTrainer", "MSWPenaltyMixin"]

logger = logging.get_logger(__name__)


class MSWPenaltyMixin:
    """Adds LaCoOT's Max-Sliced Wasserstein penalty (and target-depth training) to any `Trainer` subclass.

    Put it first in the bases and give the trainer arguments that carry the [`MSWArguments`] fields:

    ```python
    class MyCollapseTrainer(MSWPenaltyMixin, MyTrainer): ...

    @dataclass
    class MyCollapseConfig(MSWArguments, MyTrainingArguments): ...
    ```

    The penalty is `λ · mean over regularised layers of MSW(layer input, layer output)`, on the non-padding
    tokens of the batch. Each layer's input and output are read by forward hooks that exist only while
    `compute_loss` runs. **Capture contract:** during training only the forward passes that carry gradients
    count (a second, no-grad pass in the same step, such as a DPO reference pass with the adapter disabled,
    neither overwrites nor dilutes the penalty); several gradient passes in one step are averaged per layer.
    In evaluation every pass counts and the penalty is logged, never added (`eval_loss` stays the task loss).

    With a target depth (`collapse_num_layers` / `collapse_layers`, see [`MSWArguments`]), at
    `target_choice_steps` the targets are chosen (unless given), the penalty starts on them alone (nothing is
    penalised before), λ adapts to
    their measured bypass cost (`msw_adaptive`), their residual update fades to zero (`fade_steps`) or, with
    `target_repair`, is replaced at once by a map fitted on training rows and folded into the weights, and a
    frozen teacher (the model at that step, or `teacher_model`) is distilled into the student
    (`distill_weight`). `collapse_targets` and `msw_schedule` record what was applied, `target_schedule` holds the
    schedule's state and [`training_record`] sums it up.

    Logged through the trainer's normal logging, averaged over the logging window and across processes:
    `msw/layer_<i>` (every layer), `msw/mean`, `msw/weight` (λ), `msw/penalty` (λ · mean, added to the loss),
    `msw/target/layer_<i>` (targets), `fade/alpha`, `distill/loss`.

    Args:
        teacher_model (`PreTrainedModel`, *optional*):
            The frozen teacher of the distillation term (same architecture and output width as the model);
            default: a frozen copy of the model taken when targeting starts.
        repair_dataset (`datasets.Dataset`, *optional*):
            The rows `target_repair` is fitted on (its first `target_repair_samples`), in the form the data collator
            takes (tokenized as `train_dataset` is); default: the first rows of `train_dataset`. Mixing general text
            into them keeps a map fitted on the fine-tuning domain alone from costing as much outside it.
        repair_source (`str`, *optional*): what `repair_dataset` holds, in words, for the repair's record and card.
        *args, **kwargs: those of the trainer the mixin is combined with; `args` must carry the `msw_*` fields.
    """

    _msw_tag_names = ("hf-collapse", "lacoot")

    def __init__(self, *args, teacher_model: torch.nn.Module | None = None, repair_dataset=None,
                 repair_source: str | None = None, **kwargs):
        _check_training_arguments(type(self).__name__, kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        self.repair_dataset, self.repair_source = repair_dataset, repair_source
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support torch.nn.DataParallel (several GPUs in one process): "
                "launch one process per GPU with `accelerate launch` or `torchrun` instead"
            )
        # a 4-bit model on CPU must keep its trainable layout through evaluations and measured choices (see there)
        if disable_cpu_repacking(self.model):
            logger.info("bitsandbytes' CPU repacking of 4-bit layers is off: gradients keep flowing after evaluations")
        self._init_penalty_state()
        self.target_schedule = TargetSchedule.from_arguments(self.args)
        self.teacher_model = teacher_model
        stacks = self._layer_capture().stacks  # fail early on a model without a recognisable stack or bad layers
        if self.args.has_target:
            self._check_target_request(stacks)
            self._check_choice_rows()
            self._check_target_repair()
        if repair_dataset is not None:
            self._check_repair_dataset()
        self._init_teacher(teacher_model)

    def _init_penalty_state(self) -> None:
        args = self.args
        self._search = DirectionSearch(
            num_projections=args.msw_num_projections,
            mode=args.msw_search,
            refine_steps=args.msw_refine_steps,
            keep_directions=args.msw_keep_directions,
            search_tokens=args.msw_search_tokens or None,
            seed=args.seed + args.process_index,
        )
        self._msw_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._capture: LayerCapture | None = None
        self._captured_model: torch.nn.Module | None = None
        self._regularised: set[str] = set()
        self._step_values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._layers_seen = 0  # layer passes of the current compute_loss, with or without real tokens
        self._recording_training = False
        self._teacher_taken = False  # the teacher is a copy taken at the target choice (saved in checkpoints)
        self._block_choice: tuple[list, object] | None = None  # target_choice block: (curve, plan of the best run)

    def _check_choice_rows(self) -> None:
        args = self.args
        # choosing the targets (by cost or by score) and adapting λ both read evaluation rows
        if (self.collapse_targets is None or args.msw_adaptive) and self.eval_dataset is None:
            what = "msw_adaptive=True" if self.collapse_targets else f"choosing targets (target_choice={args.target_choice!r})"
            raise ValueError(
                f"{what} measures the model on evaluation rows: pass eval_dataset (validation data) to the trainer, "
                "or give collapse_layers with msw_adaptive: false"
            )

    def _check_target_repair(self) -> None:
        """Refuse, before training, a `target_repair` that could not be folded at the choice."""
        method = self.args.target_repair
        if method == "none":
            return
        check_foldable(self.model, method)
        engine = "DeepSpeed" if self.is_deepspeed_enabled else "FSDP" if self.is_fsdp_enabled else None
        if is_quantized(unwrap_model(self.model)) or engine:
            what = f"under {engine} the weights are sharded or mirrored in the optimizer" if engine else "the weights are quantized"
            raise ValueError(
                f"target_repair: {method} folds a fitted map into full-precision weights in place at the choice, and "
                f"{what}: train without target_repair here, or repair a full-precision model before training "
                "(`hf-collapse collapse --repair`)"
            )
        if hasattr(self.model, "peft_config") and self.args.target_choice_steps != 0:
            raise ValueError(
                f"target_repair: {method} with LoRA adapters folds into the base weights, which is exact only while the "
                "adapters are still zero: set target_choice_steps: 0 (prune, repair, then fine-tune)"
            )
        if self.eval_dataset is None:
            raise ValueError(f"target_repair: {method} is folded only if the choice rows score the repaired cut no worse "
                             "than the unrepaired one: pass eval_dataset (validation data) to the trainer")
        if self.repair_dataset is None and not hasattr(self.train_dataset, "select"):
            raise ValueError(f"target_repair: {method} is fitted on the first target_repair_samples training rows: give a "
                             "map-style dataset (datasets.Dataset), not an iterable one, or pass repair_dataset")

    def _check_repair_dataset(self) -> None:
        """Refuse, before training, a `repair_dataset` that nothing reads or that the model cannot take."""
        if self.args.target_repair == "none" or not self.args.has_target:
            raise ValueError("repair_dataset holds the rows target_repair is fitted on, and this run has no target_repair: "
                             "set target_repair (with a target depth), or leave repair_dataset out")
        if not hasattr(self.repair_dataset, "select") or len(self.repair_dataset) == 0:
            raise ValueError("repair_dataset must be a non-empty map-style dataset (datasets.Dataset) of tokenized rows")
        try:
            self._remove_unused_columns(self.repair_dataset.select(range(1)), description="repair")
        except ValueError as error:
            raise ValueError(f"repair_dataset has none of the columns {type(unwrap_model(self.model)).__name__} takes "
                             f"(it has {', '.join(self.repair_dataset.column_names)}): tokenize it as train_dataset is "
                             f"({error})") from None

    def _init_teacher(self, teacher_model: torch.nn.Module | None) -> None:
        self.teacher_forward_passes = 0  # forward passes of the teacher, and the rows they ran (outside the budget)
        self.teacher_forward_rows = 0
        self._hidden_pairs = None
        if teacher_model is not None:
            check_teacher(unwrap_model(self.model), unwrap_model(teacher_model))
            if self.args.distill_hidden_weight > 0 and not self.args.has_target:
                self._hidden_pairs = teacher_layer_map(unwrap_model(self.model), unwrap_model(teacher_model))
            teacher_model.eval().requires_grad_(False)
            if getattr(teacher_model, "hf_device_map", None) is None:  # Trainer moves the student, not the teacher
                teacher_model.to(self.args.device)
        elif self.args.distill_weight > 0 and not self.args.has_target:
            raise ValueError(
                "distill_weight > 0 without a target depth distils from a given teacher: pass teacher_model= (for "
                "example the full-depth model), or set collapse_num_layers to distil from the model at the target choice"
            )

    # ----------------------------------------------------------------------------------------------
    # capture

    def _layer_capture(self) -> LayerCapture:
        inner = unwrap_model(self.model)
        if self._capture is None or self._captured_model is not inner:
            stacks = find_layer_stacks(inner)
            if self.args.msw_mask_key is not None and len(stacks) != 1:
                raise ValueError("msw_mask_key names one padding mask; an encoder-decoder model has one per stack: unset it")
            self._capture = LayerCapture(inner, self._on_layer)  # every layer is logged
            self._captured_model = inner
            self._regularised = self._regularised_keys(stacks)
        return self._capture

    def _regularised_keys(self, stacks: list[LayerStack]) -> set[str]:
        wanted = self.args.msw_layers
        if wanted is None:
            return {stack.key(i) for stack in stacks for i in range(len(stack))}
        if len(stacks) != 1:
            raise ValueError(
                "msw_layers cannot be used with an encoder-decoder model (its layer numbers are ambiguous "
                "between the encoder and decoder stacks): leave msw_layers unset to regularise every layer"
            )
        (stack,) = stacks
        return {stack.key(i) for i in resolve_layer_selection(stacks, wanted)[stack.name]}

    def _check_target_request(self, stacks: list[LayerStack]) -> None:
        if len(stacks) != 1:
            raise ValueError(
                "a target depth needs a model with one layer stack; for encoder-decoder models use target_choice: "
                "post_hoc and choose the layers after training"
            )
        self.args.target_choice_of().check_depth(len(stacks[0]))

    def _on_layer(self, stack: LayerStack, index: int, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> None:
        if self._recording_training and not torch.is_grad_enabled():
            return  # not the student's gradient pass (a reference or other no-grad forward in the same step)
        self._layers_seen += 1
        if tokens_in.shape[0] == 0:
            return  # a batch with no real token (all padding): this layer contributes nothing this step
        key = stack.key(index)
        with torch.set_grad_enabled(torch.is_grad_enabled() and key in self._penalised_keys()):
            value = max_sliced_wasserstein(tokens_in, tokens_out, search=self._search, key=key)
            if self.args.msw_normalization == "input_rms":
                rms = tokens_in.detach().float().pow(2).mean().sqrt()
                value = value / rms.clamp_min(torch.finfo(torch.float32).eps)
        self._step_values[key].append(value)

    def _mask_module(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """A module whose every call carries the padding masks of one pass of the layers, for trainers whose
        inputs are not the model's keyword arguments (see `LayerCapture.armed`); None: the trainer's inputs."""
        return None

    def _capture_inputs(self, inputs: dict) -> dict:
        key = self.args.msw_mask_key
        if key is None:
            return inputs
        (stack,) = self._capture.stacks
        return {stack.mask_key: inputs.get(key)}

    # ----------------------------------------------------------------------------------------------
    # schedule: the mixin measures, `target_schedule` decides (λ, targets, fade)

    @property
    def collapse_targets(self) -> list[int] | None:
        """The 0-based layers targeted (given, or chosen when targeting starts; None before a choice)."""
        return self.target_schedule.targets

    @collapse_targets.setter
    def collapse_targets(self, targets: list[int] | None) -> None:
        self.target_schedule.targets = targets

    @property
    def msw_schedule(self) -> list[ScheduleEntry]:
        """What the schedule applied: the target choice, then each adaptation of λ."""
        return self.target_schedule.entries

    @property
    def targeting(self) -> bool:
        """Whether the target phase has begun (targets known and penalised)."""
        return self.target_schedule.targeting

    def _penalised_keys(self) -> set[str]:
        if not self.args.has_target:
            return self._regularised
        (stack,) = self._capture.stacks
        # nothing targeted yet, or the targets are faded out (they no longer act)
        return {stack.key(i) for i in self.target_schedule.acting_targets(self.state.global_step, self.state.max_steps)}

    def current_msw_weight(self) -> float:
        """λ at the current optimizer step (warm-up ramp included; 0 before targeting starts)."""
        return self.target_schedule.current_weight(self.state.global_step)

    def fade_alpha(self) -> float:
        """How much of the targets' residual update is kept now: 1 before the fade, 0 once it is over."""
        return self.target_schedule.fade_alpha(self.state.global_step, self.state.max_steps)

    @contextlib.contextmanager
    def _fade(self) -> Iterator[None]:
        alpha = self.fade_alpha()
        if alpha == 1.0:
            yield
            return
        (stack,) = self._capture.stacks
        # alpha 0 returns the input itself: the faded model is then exactly the one without the layers
        with scale_residual_updates([stack.layers[i] for i in self.collapse_targets], alpha):
            yield

    def training_step(self, *args, **kwargs):
        if self.args.has_target and self.target_schedule.prepare(self.state.global_step):
            self._advance_schedule(args[0] if args else kwargs["model"])
        return super().training_step(*args, **kwargs)

    def _advance_schedule(self, model: torch.nn.Module) -> None:
        step, total = self.state.global_step, self.state.max_steps
        if not self.targeting:
            self.args.check_schedule(total)
            if self.target_schedule.choice_due(step, total):
                self._start_targeting(model, step)
        elif self.target_schedule.adaptation_due(step, total):
            self._adapt_weight(model, step)

    def _start_targeting(self, model: torch.nn.Module, step: int) -> None:
        choosers = {"measured": self._choose_measured, "block": self._choose_block}
        chooser = choosers.get(self.args.target_choice, self._choose_by_score)
        entry = self.target_schedule.begin(
            step, choose=lambda: chooser(model), bypass_loss=lambda layers, fade: self._bypass_loss(model, layers, fade)
        )
        if self._block_choice is not None:  # set only by _choose_block, which given targets never call
            entry.candidates = self._block_choice[0]
        if self.args.distill_weight > 0 and self.teacher_model is None:  # a given teacher was frozen at construction
            self.teacher_model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)
            self._teacher_taken = True
        logger.info(f"step {step}: targeting layers {entry.targets} ({entry.choice})")
        if self.args.target_repair != "none":
            self.target_schedule.repair = self._repair_at_choice(model, step)

    def _repair_at_choice(self, model: torch.nn.Module, step: int) -> dict:
        """Prune, repair, fine-tune: fit `target_repair` for the targets on training rows, fold it (verified), and keep
        it only if the choice rows' loss with the targets bypassed is no worse than without it. Every process fits on
        the same rows; the main process's folded weights are then sent to all, so they stay identical."""
        args, targets, inner = self.args, list(self.collapse_targets), unwrap_model(model)
        started = time.perf_counter()
        rows = self._repair_rows()
        if self._block_choice is not None and self._block_choice[1] is not None:  # the map the block was measured with
            plan = self._block_choice[1]
        else:
            plan = fit_repair(inner, targets, self._repair_batches(rows), args.target_repair)
        unrepaired = self._bypass_loss(model, targets)
        undo = fold_verified(inner, plan, targets)
        repaired = self._bypass_loss(model, targets)
        folded = repaired <= unrepaired
        if not folded:
            undo()
        if self.accelerator.num_processes > 1:
            for module, _ in plan.sites(inner):
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        torch.distributed.broadcast(tensor.data, src=0)
        logger.info(f"step {step}: {args.target_repair} repair of the cut {'folded' if folded else 'declined'} "
                    f"(choice-row loss {unrepaired:.4g} unrepaired, {repaired:.4g} repaired)")
        record = dict(
            plan.summary(data=self._repair_description(rows)), folded=folded, step=step,
            validation={"metric": "loss", "unrepaired": unrepaired, "repaired": repaired},
            seconds=round(time.perf_counter() - started, 3),
        )
        if self._block_choice is not None:  # target_choice block: every run's choice-row loss with its own map
            record["candidates"] = [[list(run), loss] for run, loss in self._block_choice[0]]
        return record

    def _repair_rows(self):
        source = self.repair_dataset if self.repair_dataset is not None else self.train_dataset
        rows = source.select(range(min(self.args.target_repair_samples, len(source))))
        return self._remove_unused_columns(rows, description="repair")

    def _repair_description(self, rows) -> str:
        if self.repair_dataset is None:
            return "the first rows of the training set"
        return self.repair_source or f"{len(rows)} rows of the trainer's repair_dataset"

    def _repair_batches(self, rows) -> list[dict]:
        loader = DataLoader(rows, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator)
        return self._model_inputs(loader)

    def _adapt_weight(self, model: torch.nn.Module, step: int) -> None:
        self.target_schedule.adapt(step, bypass_loss=lambda layers, fade: self._bypass_loss(model, layers, fade))

    def training_record(self) -> TrainingRecord:
        """What this run applied: its steps and, with a target phase, the targets, their choice, λ over the
        steps, the fade window and the distillation term (healing is filled in by whoever heals)."""
        schedule, args = self.target_schedule, self.args
        record = TrainingRecord(steps=self.state.global_step)
        if not args.has_target or not schedule.entries:
            return record
        record.targets = list(schedule.targets)
        record.choice = schedule.entries[0]
        record.penalty_schedule = [(entry.step, entry.weight) for entry in schedule.entries]
        record.fade_window = schedule.fade_window(self.state.max_steps)
        record.repair = schedule.repair
        if args.distill_weight:
            record.distillation_weight, record.distillation_temperature = args.distill_weight, args.distill_temperature
        return record

    # ----------------------------------------------------------------------------------------------
    # measuring bypass costs on evaluation rows

    def _choice_loader(self):
        dataset = self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        n = min(self.args.target_choice_samples, len(dataset))
        subset = dataset.select(range(n)) if hasattr(dataset, "select") else Subset(dataset, range(n))
        return self.get_eval_dataloader(subset)

    def _model_inputs(self, loader) -> list[dict]:
        """The loader's batches on the trainer's device, without labels (what scoring and fitting a repair read)."""
        return [{k: v for k, v in self._prepare_inputs(b).items() if k != "labels"} for b in loader]

    def _bypass_loss(self, model: torch.nn.Module, layers: list[int], fade: bool = False) -> float:
        """The mean task loss on the choice rows with `layers` bypassed (and the current fade, if asked)."""
        total = torch.zeros(2, device=self.args.device)
        # a trainer that logs from its compute_loss (TRL's `_metrics`) must not count these measurement passes
        logged = copy.deepcopy(getattr(self, "_metrics", None))
        with eval_mode(model), torch.no_grad(), bypass_layers(unwrap_model(model), layers):
            for batch in self._choice_loader():
                batch = self._prepare_inputs(batch)
                with self._fade() if fade else contextlib.nullcontext(), self.compute_loss_context_manager():
                    loss = super().compute_loss(model, batch)
                rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
                total += torch.stack([loss.detach().float() * rows, torch.tensor(float(rows), device=total.device)])
        if logged is not None:
            self._metrics = logged
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()

    def _choose_measured(self, model: torch.nn.Module) -> tuple[list[int], int]:
        """Greedy by measured bypass cost: every allowed layer alone, then per round the `target_choice_candidates`
        cheapest of those on top of the layers chosen so far (see [`greedy_bypass`])."""
        (stack,) = self._capture.stacks
        choice = self.args.target_choice_of()
        result = greedy_bypass(
            lambda layers: self._bypass_loss(model, layers), choice.removable(len(stack)), choice.num_layers,
            pool=choice.candidates, rerank=True, higher_is_better=False, baseline=False,
        )
        return sorted(result.layers), result.evaluations

    def _choose_block(self, model: torch.nn.Module) -> tuple[list[int], int]:
        """ReplaceMe's setting at the choice step: every run of `collapse_num_layers` consecutive allowed layers,
        measured by the choice-row loss with the run bypassed and, with `target_repair`, its map (all fitted in one
        pass over the repair rows) applied by hooks; the best run (the first of equals). Its curve and plan are kept
        for the record and for the fold, so the map folded is the one that was measured."""
        (stack,) = self._capture.stacks
        choice, method, inner = self.args.target_choice_of(), self.args.target_repair, unwrap_model(model)
        runs = contiguous_blocks(choice.removable(len(stack)), choice.num_layers)  # never empty: the removable
        # layers are one range (protection cuts its ends) and target_choice_of refused a depth longer than it
        def measure(run: list[int], repaired: bool) -> float:
            loss = self._bypass_loss(model, [] if repaired else run)  # repaired: measure_runs bypassed it already
            if not math.isfinite(loss):
                raise ValueError(f"target_choice: block measured a non-finite choice-row loss ({loss}) with layers {run} "
                                 "bypassed: check the evaluation rows and the model's numerics before training")
            return loss

        rows = self._repair_batches(self._repair_rows()) if method != "none" else None
        curve, plans = measure_runs(inner, runs, method, rows, measure, log=lambda line: logger.info("  " + line))
        best = min(range(len(runs)), key=lambda i: curve[i][1])
        self._block_choice = (curve, plans[best])
        return list(runs[best]), len(runs)

    def _choose_by_score(self, model: torch.nn.Module) -> tuple[list[int], int]:
        batches = self._model_inputs(self._choice_loader())
        scores = score_layers(
            unwrap_model(model), batches, method=self.args.target_score, normalization=self.args.msw_normalization,
            progress=False,
        )
        if self.accelerator.num_processes > 1:  # every rank must remove the same layers
            scores = broadcast_object_list([scores])[0]
        choice = self.args.target_choice_of()
        removable = choice.removable(len(scores))
        return sorted([i for i in scores.ranking() if i in removable][: choice.num_layers]), 1

    # ----------------------------------------------------------------------------------------------
    # loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when True, the Trainer will NOT divide the returned loss by the
        # number of accumulation steps, so a per-micro-batch term has to be divided here.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        capture = self._layer_capture()
        distill = mode == "train" and self.args.distill_weight > 0 and (self.targeting or not self.args.has_target)
        hidden = {} if mode == "train" and self._hidden_pairs is not None else None  # the student's layer outputs
        self._step_values = defaultdict(list)
        self._layers_seen = 0
        self._recording_training = model.training
        armed = capture.armed(self._capture_inputs(inputs), masks_from=self._mask_module(model))
        kept = layer_outputs(unwrap_model(model), hidden) if hidden is not None else contextlib.nullcontext()
        with capture, armed, self._fade(), kept:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs or distill, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if (return_outputs or distill) else (result, None)
        values = {key: torch.stack(v).mean() for key, v in self._step_values.items()}
        self._step_values = defaultdict(list)
        if not values and self._layers_seen:
            # every position of the batch is padding: no cloud to compare, the task loss alone trains this step
            self._msw_metrics[mode]["msw/empty_batches"].append(1.0)
            logger.warning(
                f"step {self.state.global_step}: a batch has no real token (its attention mask is all zeros); the MSW "
                "penalty adds nothing for it"
            )
            return (loss, outputs) if return_outputs else loss
        if not values:
            raise RuntimeError(
                f"{type(self).__name__}.compute_loss ran no forward pass of the model's layer stack"
                f"{' with gradients' if mode == 'train' else ''}, so the MSW penalty has nothing to act on: the mixin "
                "needs a compute_loss that calls the model being trained"
            )
        penalty = self._penalty(values, mode)
        if mode == "train":
            scale = self.current_gradient_accumulation_steps if self._loss_is_scaled_for_ga(num_items_in_batch) else 1
            if penalty is not None:
                loss = loss + (penalty / scale).to(loss.dtype)
            if distill or hidden is not None:
                kd, mse = self._distillation_loss(outputs if distill else None, inputs, hidden)
                if kd is not None:
                    self._msw_metrics[mode]["distill/loss"].append(kd.item())
                    loss = loss + (self.args.distill_weight * kd / scale).to(loss.dtype)
                if mse is not None:
                    self._msw_metrics[mode]["distill/hidden_loss"].append(mse.item())
                    loss = loss + (self.args.distill_hidden_weight * mse / scale).to(loss.dtype)
            if self.targeting:
                self._msw_metrics[mode]["fade/alpha"].append(self.fade_alpha())
        return (loss, outputs) if return_outputs else loss

    def _penalty(self, values: dict[str, torch.Tensor], mode: str) -> torch.Tensor | None:
        """Log every layer's distance; return λ · mean over penalised layers (None when nothing is added)."""
        keys = list(values)
        floats = torch.stack([values[k].detach() for k in keys]).tolist()  # one device sync per step
        penalised = self._penalised_keys()
        for key, value in zip(keys, floats):
            if key in penalised and not math.isfinite(value):
                raise FloatingPointError(
                    f"the MSW penalty of {key} is {value} at step {self.state.global_step}: that layer's input or "
                    "output holds NaN/Inf. Training stopped before the optimizer step, so this step changed no weight; "
                    "lower the learning rate or msw_weight, or use bf16 instead of fp16."
                )
            self._msw_metrics[mode][f"msw/{key}"].append(value)
            if self.targeting and key in penalised:
                self._msw_metrics[mode][f"msw/target/{key}"].append(value)
        chosen = [k for k in keys if k in penalised]
        weight = self.current_msw_weight()
        self._msw_metrics[mode]["msw/weight"].append(weight)
        if not chosen:
            self._msw_metrics[mode]["msw/penalty"].append(0.0)
            return None
        mean_value = sum(floats[keys.index(k)] for k in chosen) / len(chosen)
        if mode == "train" and weight and not abs(weight * mean_value) <= torch.finfo(torch.float32).max:
            raise FloatingPointError(
                f"λ × MSW penalty is {weight:g} × {mean_value:g} at step {self.state.global_step}, beyond what a float32 "
                "loss can hold: training stopped before the optimizer step, so this step changed no weight; lower "
                "msw_weight (or the learning rate)"
            )
        self._msw_metrics[mode]["msw/mean"].append(mean_value)
        self._msw_metrics[mode]["msw/penalty"].append(weight * mean_value)
        if mode != "train" or weight == 0:
            return None
        return weight * torch.stack([values[k] for k in chosen]).mean()

    def _distillation_loss(self, outputs, inputs: dict, hidden: dict | None = None):
        """One teacher pass: the logit term (when `outputs` is given) and the hidden-state term (when `hidden` holds
        the student's layer outputs); each `None` when not asked. The pass is counted in `teacher_forward_*`."""
        logits = None
        if outputs is not None:
            logits = getattr(outputs, "logits", None) if not isinstance(outputs, dict) else outputs.get("logits")
            if logits is None or not logits.requires_grad:
                raise ValueError(
                    f"distill_weight needs the student's logits with gradients, and {type(self).__name__}.compute_loss "
                    "does not return them (TRL's fused LM head does not build logits): set distill_weight: 0"
                )
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        taught: dict[int, torch.Tensor] = {}
        with torch.no_grad(), layer_outputs(self.teacher_model, taught) if hidden is not None else contextlib.nullcontext():
            teacher_logits = self.teacher_model(**model_inputs).logits
        self.teacher_forward_passes += 1
        first = next((v for v in model_inputs.values() if isinstance(v, torch.Tensor)), None)
        self.teacher_forward_rows += int(first.shape[0]) if first is not None and first.dim() else 0
        mask = inputs.get(self.args.msw_mask_key or "attention_mask")
        kd = None
        if logits is not None:
            kd = distillation_loss(logits, teacher_logits, self.args.distill_temperature, mask if logits.dim() == 3 else None)
        mse = hidden_state_loss(hidden, taught, self._hidden_pairs, mask) if hidden is not None else None
        return kd, mse

    # ----------------------------------------------------------------------------------------------
    # checkpoints: the penalty state is saved with every checkpoint and restored on resume

    def _process(self) -> int | None:
        return self.args.process_index if self.args.world_size > 1 else None

    def _save_penalty_state(self, folder: str | os.PathLike) -> None:
        """Write what the penalty needs to continue exactly: kept directions and generators, the schedule (λ,
        targets, reference loss), the logging window's unflushed values, and a teacher copied at the target choice."""
        state = PenaltyState(
            global_step=self.state.global_step,
            settings=penalty_settings(self.args),
            schedule=self.target_schedule.state_dict(),
            teacher="taken" if self._teacher_taken else ("given" if self.teacher_model is not None else None),
            pending_metrics={k: list(v) for k, v in self._msw_metrics["train"].items()},
            directions=self._search.state_dict(),
        )
        teacher = self.teacher_model if self._teacher_taken and self.args.should_save else None
        save_penalty_state(folder, state, process=self._process(), teacher=teacher)

    def _load_penalty_state(self, folder: str | os.PathLike) -> None:
        """Restore what [`_save_penalty_state`] wrote; refuses a checkpoint written with other penalty settings."""
        state = load_penalty_state(
            folder, penalty_settings(self.args), process=self._process(), teacher_given=self.teacher_model is not None
        )
        self._search.load_state_dict(state.directions)
        self.target_schedule.load_state_dict(state.schedule)
        self._msw_metrics["train"] = defaultdict(list, state.pending_metrics)
        if state.teacher == "taken":
            self.teacher_model = load_teacher(folder, unwrap_model(self.model), self.args.device)
            self._teacher_taken = True

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._save_penalty_state(folder)  # first: trainer_state.json, written last, then marks a complete checkpoint
        with self._token_off_disk():
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self._token_off_disk():
            super().save_model(output_dir, _internal_call)

    @contextlib.contextmanager
    def _token_off_disk(self) -> Iterator[None]:
        """Keep `hub_token` out of the pickled `training_args.bin` that Trainer saves next to weights.

        The token is only needed for uploads; without `push_to_hub` none happens, so it is unset while saving."""
        token = getattr(self.args, "hub_token", None)
        if token is None or self.args.push_to_hub:
            yield
            return
        self.args.hub_token = None
        try:
            yield
        finally:
            self.args.hub_token = token

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, resuming the penalty state too.

        `resume_from_checkpoint=True` (or `"true"` / `"latest"`) takes the latest *complete* checkpoint in
        `output_dir` (see [`latest_checkpoint`]). Resumed with the same settings and seed, the run logs the same
        losses as an uninterrupted one. A teacher copied at the target choice is restored from the checkpoint; a
        given `teacher_model` must be passed again. A checkpoint written with other `msw_*` / target settings is
        refused.
        """
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None:
            self._load_penalty_state(checkpoint)
            checkpoint = str(checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # model card

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """Write the trainer's card, tagged with our tags, unless `output_dir` holds an hf-collapse card.

        `push_to_hub` and checkpoint pushes call this before uploading `output_dir`; a collapse card written
        by [`export_collapsed`] (which says what was removed and what it cost) is never replaced.
        """
        readme = Path(self.args.output_dir) / "README.md"
        if readme.is_file() and "hf-collapse" in (ModelCard.load(readme).data.tags or []):
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in self._msw_tag_names if tag not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # logging

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        metrics = self._msw_metrics[mode]
        if not metrics:
            return {}
        keys = sorted(metrics)
        means = torch.tensor([sum(metrics[k]) / len(metrics[k]) for k in keys], device=self.args.device)
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        metrics.clear()
        return dict(zip(keys, means.tolist()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log; evaluation metrics are merged in evaluation_loop
            logs = {**logs, **self._flush_metrics("train")}
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for key, value in self._flush_metrics("eval").items():
            output.metrics[f"{metric_key_prefix}_{key}"] = value
        return output


def _check_training_arguments(trainer: str, training_args) -> None:
    if not isinstance(training_args, MSWArguments):
        got = "no args" if training_args is None else type(training_args).__name__
        raise TypeError(
            f"{trainer} needs training arguments with the msw_* fields (a subclass of "
            f"hf_collapse.MSWArguments and TrainingArguments, such as CollapseConfig), got {got}"
        )


class CollapseTrainer(MSWPenaltyMixin, Trainer):
    """[`~transformers.Trainer`] that trains with LaCoOT's Max-Sliced Wasserstein penalty: [`MSWPenaltyMixin`]
    on a plain `Trainer`.

    Args:
        model, ...: as for [`~transformers.Trainer`].
        args ([`CollapseConfig`]): training arguments with the penalty settings (any `TrainingArguments`
            subclass that mixes in [`MSWArguments`]); a plain `TrainingArguments` is refused.
        teacher_model (*optional*): the distillation teacher (see [`MSWPenaltyMixin`]).
    """

    def __init__(self, model=None, args: CollapseConfig | None = None, **kwargs):
        if args is None:
            raise ValueError("CollapseTrainer needs args=CollapseConfig(output_dir=...) to know the penalty settings")
        super().__init__(model=model, args=args, **kwargs)
