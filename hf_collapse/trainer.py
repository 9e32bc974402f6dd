"""`CollapseTrainer`: a `Trainer` whose loss adds LaCoOT's per-layer MSW penalty."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer

from .config import CollapseConfig
from .layers import LayerCapture, LayerStack, find_layer_stacks, unwrap_model
from .msw import DirectionSearch, max_sliced_wasserstein

__all__ = ["CollapseTrainer"]


class CollapseTrainer(Trainer):
    """[`~transformers.Trainer`] that trains with LaCoOT's Max-Sliced Wasserstein penalty.

    The loss is `task loss + λ · mean over regularised layers of MSW(layer input, layer output)`, with
    λ = `args.msw_weight` (ramped up over `args.msw_warmup_steps`). Each layer's input and output are
    read by forward hooks that exist only during the step's forward pass, so the model carries no
    hooks outside training or evaluation calls, PEFT-wrapped models work, and gradient checkpointing
    does not count a layer twice.

    Logged through the normal Trainer logging (and so to every `report_to` integration), averaged
    over the logging window and across processes:

    - `msw/layer_<i>`: every layer's MSW (regularised or not; `encoder_layer_<i>` / `decoder_layer_<i>` for
      encoder-decoder models);
    - `msw/mean`: the mean over regularised layers; `msw/weight`: the current λ; `msw/penalty`: λ · mean,
      the amount added to the loss.

    In evaluation the same keys appear with the `eval_` prefix; `eval_loss` stays the task loss alone,
    so it is comparable with a plain `Trainer`.

    Args:
        model, ...: as for [`~transformers.Trainer`].
        args ([`CollapseConfig`]): training arguments with the penalty settings. A plain
            `TrainingArguments` is not accepted.
    """

    _tag_names = ["hf-collapse", "lacoot"]

    def __init__(self, model=None, args: CollapseConfig | None = None, **kwargs):
        if args is None:
            raise ValueError("CollapseTrainer needs args=CollapseConfig(output_dir=...) to know the penalty settings")
        if not isinstance(args, CollapseConfig):
            raise TypeError(
                f"args must be a CollapseConfig (a TrainingArguments subclass with the msw_* fields), got {type(args).__name__}"
            )
        super().__init__(model=model, args=args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                "CollapseTrainer does not support torch.nn.DataParallel (several GPUs in one process): "
                "launch one process per GPU with `accelerate launch` or `torchrun` instead"
            )
        self._search = DirectionSearch(
            num_projections=args.msw_num_projections,
            mode=args.msw_search,
            refine_steps=args.msw_refine_steps,
            keep_directions=args.msw_keep_directions,
            search_tokens=args.msw_search_tokens or None,
            seed=args.seed + args.process_index,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._capture: LayerCapture | None = None
        self._captured_model: torch.nn.Module | None = None
        self._regularised: set[str] = set()
        self._step_values: dict[str, torch.Tensor] = {}
        self._layer_capture()  # fail early on a model without a recognisable stack or bad msw_layers

    # ----------------------------------------------------------------------------------------------
    # capture

    def _layer_capture(self) -> LayerCapture:
        inner = unwrap_model(self.model)
        if self._capture is None or self._captured_model is not inner:
            stacks = find_layer_stacks(inner)
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
        for index in wanted:
            if index >= len(stack):
                raise ValueError(
                    f"layer {index} does not exist: the model has {len(stack)} layers, numbered 0-{len(stack) - 1} "
                    "(check msw_layers)"
                )
        return {stack.key(i) for i in wanted}

    def _on_layer(self, stack: LayerStack, index: int, tokens_in: torch.Tensor, tokens_out: torch.Tensor) -> None:
        key = stack.key(index)
        with torch.set_grad_enabled(torch.is_grad_enabled() and key in self._regularised):
            value = max_sliced_wasserstein(tokens_in, tokens_out, search=self._search, key=key)
            if self.args.msw_normalization == "input_rms":
                rms = tokens_in.detach().float().pow(2).mean().sqrt()
                value = value / rms.clamp_min(torch.finfo(torch.float32).eps)
        self._step_values[key] = value

    # ----------------------------------------------------------------------------------------------
    # loss

    def current_msw_weight(self) -> float:
        """λ at the current optimizer step (after warm-up)."""
        warmup = self.args.msw_warmup_steps
        if warmup == 0:
            return self.args.msw_weight
        return self.args.msw_weight * min(1.0, self.state.global_step / warmup)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: when True, the Trainer will NOT divide the returned loss by the
        # number of accumulation steps, so a per-micro-batch term has to be divided here.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        capture = self._layer_capture()
        self._step_values = {}
        with capture, capture.armed(inputs):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        values, self._step_values = self._step_values, {}
        if not values:
            raise RuntimeError(
                "no layer reported its hidden states during the forward pass: the model's layer stack was "
                "not called (is the model wrapped in a way that replaces its modules?)"
            )

        keys = list(values)
        floats = torch.stack([values[k].detach() for k in keys]).tolist()  # one device sync per step
        for key, value in zip(keys, floats):
            if key in self._regularised and not math.isfinite(value):
                raise FloatingPointError(
                    f"the MSW penalty of {key} is {value} at step {self.state.global_step}: that layer's input or "
                    "output holds NaN/Inf. Training stopped before the optimizer step so the weights stay finite; "
                    "lower the learning rate or msw_weight, or use bf16 instead of fp16."
                )
            self._metrics[mode][f"msw/{key}"].append(value)

        regularised = [k for k in keys if k in self._regularised]
        mean_value = sum(floats[keys.index(k)] for k in regularised) / len(regularised)
        weight = self.current_msw_weight()
        self._metrics[mode]["msw/mean"].append(mean_value)
        self._metrics[mode]["msw/weight"].append(weight)
        self._metrics[mode]["msw/penalty"].append(weight * mean_value)
        penalty = weight * torch.stack([values[k] for k in regularised]).mean()

        if mode == "train" and weight > 0:
            if self._loss_is_scaled_for_ga(num_items_in_batch):
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------
    # model card

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """Write the default Trainer card, tagged with our tags, unless `output_dir` holds an hf-collapse card.

        `push_to_hub` and checkpoint pushes call this before uploading `output_dir`; a collapse card written
        by [`export_collapsed`] (which says what was removed and what it cost) is never replaced.
        """
        from huggingface_hub import ModelCard

        readme = Path(self.args.output_dir) / "README.md"
        if readme.is_file() and "hf-collapse" in (ModelCard.load(readme).data.tags or []):
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in self._tag_names if tag not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # logging

    def _flush_metrics(self, mode: str) -> dict[str, float]:
        metrics = self._metrics[mode]
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
