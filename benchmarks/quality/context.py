"""What the arms of one study share: data, the pretrained model, fine-tunes (one per seed and recipe, cached),
layer scores, measured selections and evaluations. Everything goes through hf_collapse's public API."""

from __future__ import annotations

import copy
import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import hf_collapse
from hf_collapse import assets
from hf_collapse.data import load_task_data, repair_rows
from hf_collapse.evaluation import evaluate_classification, perplexity
from hf_collapse.recipe import RecipeArguments

from benchmarks.energy import measure_energy
from .studies import Study

__all__ = ["Context", "ModelKey", "Selection"]


@dataclass
class Selection:
    """Layers chosen by a rule, with what choosing cost (forward passes = rows run through the model)."""

    layers: list[int]
    method: str
    forward_passes: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    validation: float | None = None  # the metric on the validation rows it was chosen on, when measured
    trials: list | None = None  # every measured candidate: [step, layers bypassed, metric]

    def cost(self) -> dict:
        return {
            "method": self.method,
            "forward_passes": self.forward_passes,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ModelKey:
    """Which model a cached figure (report, scores, greedy path, validation metric) is of: `name`, what made it (the
    fine-tune or the arm and its steps, e.g. "vanilla", "ptf", "vanilla/msw+scale"), its `seed`, and the layers
    (original numbering) it has already had removed. Each is a field of its own, so two models that differ in any of
    them never share a cache entry (a string key once let two ks of one arm share the first one's figures)."""

    name: str
    seed: int
    removed: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "removed", tuple(sorted(int(i) for i in self.removed)))

    def without(self, layers) -> ModelKey:
        """The key of this model with `layers` (original numbering) removed as well."""
        return dataclasses.replace(self, removed=(*self.removed, *layers))


class _Snapshot(TrainerCallback):
    """Keeps a CPU copy of the weights after optimizer step `at` (prune-then-heal starts from it)."""

    def __init__(self, at: int):
        self.at, self.state_dict = at, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at and model is not None:
            self.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class Context:
    """Shared state of one study run. Built once; arms call its methods."""

    def __init__(self, study: Study, log=print, cache_dir: str | Path | None = None):
        self.study, self.log = study, log
        # shared fine-tunes are kept here, so a resumed or extended study does not train them again
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tmp = Path(tempfile.mkdtemp(prefix="hf-collapse-quality-"))
        self.recipe = RecipeArguments(
            model_name_or_path=study.model,
            task=study.task,
            dataset_name=study.dataset,
            max_length=study.max_length,
            max_train_samples=study.train_rows,
            max_eval_samples=study.validation_rows,
            collapse=False,  # the arms choose and remove layers themselves
        )
        self.resolved = hf_collapse.resolve_model(study.model)
        self.processor = hf_collapse.load_processor(self.recipe, self.resolved)
        self.data = load_task_data(self.recipe, self.processor)
        if self.data.test is None:
            raise ValueError(f"{study.dataset} has no test split: the benchmark reports on held-out test data only")
        self.train = self.data.train
        self.validation = self.data.eval
        self.test = self._cap(self.data.test, study.test_rows)
        self.cheap_validation = self.validation.select(range(min(study.cheap_rows, len(self.validation))))
        self.calibration = self.train.select(range(min(study.calibration_rows, len(self.train))))
        repairing = study.calibration_rows if study.repair_rows is None else study.repair_rows
        self.repair_calibration = self.train.select(range(min(repairing, len(self.train))))
        self.ood = self._ood()
        self.num_layers = self._num_layers()
        self.classification = study.task == "text-classification"
        self._models: dict[str, torch.nn.Module] = {}
        self._snapshots: dict[str, dict] = {}
        self._scores: dict[tuple, hf_collapse.LayerScores] = {}
        self._greedy: dict[tuple, object] = {}
        self._reports: dict[tuple, dict] = {}
        self._validations: dict[tuple, float] = {}
        self._mixed = None  # mixed-domain repair rows and their description, built on first use

    # ------------------------------------------------------------------ data

    @staticmethod
    def _cap(split, rows):
        if rows is None or rows >= len(split):
            return split
        # a fixed shuffle, so that a capped causal-LM test set spans its held-out works, not only the first one
        return split.shuffle(seed=1234).select(range(rows))

    def _ood(self):
        study = self.study
        if study.ood == "sentiment_tweets":
            tweets = assets.sentiment_tweets(max_per_label=max(1, study.ood_rows // 2))

            def encode(batch):
                out = self.processor(batch["text"], truncation=True, max_length=study.ood_max_length)
                out["labels"] = batch["label"]
                return out

            return tweets.map(encode, batched=True, remove_columns=tweets.column_names)
        if study.ood == "health_tweets":
            from datasets import Dataset

            texts = assets.health_tweets(max_rows=study.ood_rows)
            ids = [self.processor(t, truncation=True, max_length=study.ood_max_length)["input_ids"] for t in texts]
            ids = [row for row in ids if len(row) >= 2]
            return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
        raise ValueError(f"unknown out-of-domain set {study.ood!r}: sentiment_tweets or health_tweets")

    def _num_layers(self) -> int:
        config = transformers.AutoConfig.from_pretrained(self.resolved.path)
        return int(config.get_text_config().num_hidden_layers)

    # ------------------------------------------------------------------ models and training

    def pretrained(self, seed: int) -> torch.nn.Module:
        """The pretrained model with a fresh task head (initialised from `seed`)."""
        transformers.set_seed(seed)
        model = hf_collapse.load_model(self.recipe, self.resolved, self.processor, self.data.label_names)
        return model.to(self.device)

    def _arguments(self, seed: int, steps: int, penalty: bool, learning_rate=None, warmup_steps=None, penalty_fields=None):
        study = self.study
        kwargs = dict(
            output_dir=str(self.tmp / "trainer"),
            max_steps=steps,
            per_device_train_batch_size=study.batch_size,
            learning_rate=study.learning_rate if learning_rate is None else learning_rate,
            warmup_steps=study.warmup_steps if warmup_steps is None else warmup_steps,
            lr_scheduler_type="linear",
            logging_steps=max(1, steps),
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=seed,
            use_cpu=self.device == "cpu",
            disable_tqdm=True,
        )
        if penalty:
            # the study's penalty arm is the paper's: raw distances at the study's λ (not the library's default)
            fields = {
                "msw_weight": study.msw_weight, "msw_warmup_steps": study.msw_warmup_steps, "msw_normalization": "none",
                **(penalty_fields or {}),
            }
            return hf_collapse.CollapseConfig(**fields, **kwargs)
        return TrainingArguments(**kwargs)

    def fit(self, model, seed: int, steps: int, *, penalty: bool = False, callbacks=(), **schedule) -> float:
        """Fine-tune `model` in place for `steps` optimizer steps; returns the wall time. `schedule` may change the
        learning rate and warm-up, and (`penalty_fields`) the CollapseConfig fields of a penalised run."""
        args = self._arguments(seed, steps, penalty, **schedule)
        trainer_class = hf_collapse.CollapseTrainer if penalty else Trainer
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=self.train,
            data_collator=self.data.collator,
            callbacks=list(callbacks),
        )
        trainer.remove_callback(PrinterCallback)  # the loss dicts would flood the study's log
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    def _collapse_config(self, seed: int, steps: int, schedule: dict | None = None, **fields) -> hf_collapse.CollapseConfig:
        """The study's training arguments as a CollapseConfig with `fields` (penalty off unless they turn it on)."""
        base = self._arguments(seed, steps, penalty=False, **(schedule or {})).to_dict()
        keep = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        return hf_collapse.CollapseConfig(**{k_: v for k_, v in base.items() if k_ in keep}, **fields)

    def fit_targeted(self, model, seed: int, steps: int, k: int, *, mixed_repair: bool = False, **fields):
        """Fine-tune with a target depth of `k` layers (CollapseConfig + CollapseTrainer, validation rows for the
        measured choice); returns the trainer (its `collapse_targets`, `msw_schedule`) and the wall time. With
        `mixed_repair`, `target_repair` is fitted on `mixed_repair_calibration` (the trainer's `repair_dataset`)."""
        args = self._collapse_config(
            seed, steps, collapse_num_layers=k, msw_warmup_steps=self.study.msw_warmup_steps,
            **{"msw_normalization": "none", **fields},  # as measured
        )
        extra = dict(repair_dataset=self.mixed_repair_calibration(), repair_source=self.mixed_repair_source) if mixed_repair else {}
        trainer = hf_collapse.CollapseTrainer(
            model=model, args=args, train_dataset=self.train, eval_dataset=self.validation, data_collator=self.data.collator,
            **extra,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        return trainer, time.perf_counter() - start

    def finetuned(self, recipe: str, seed: int) -> torch.nn.Module:
        """The full-depth fine-tune `recipe` ("vanilla" or "penalty") for `seed`, trained once per run and shared.

        The vanilla run also keeps its weights after `steps - heal_steps` steps (see `partial`).
        """
        key = f"{recipe}/{seed}"
        if key not in self._models:
            model = self.pretrained(seed)
            cached = self.cache_dir / f"{recipe}-seed{seed}.pt" if self.cache_dir is not None else None
            if cached is not None and cached.is_file():
                saved = torch.load(cached, map_location="cpu", weights_only=True)
                model.load_state_dict(saved["final"])
                snapshot_state = saved["snapshot"]
                self.log(f"  loaded the {recipe} fine-tune of seed {seed} from {cached}")
            else:
                snapshot = _Snapshot(self.study.steps - self.study.heal_steps)
                seconds = self.fit(model, seed, self.study.steps, penalty=recipe == "penalty", callbacks=[snapshot])
                self.log(f"  fine-tuned {recipe} seed {seed}: {self.study.steps} steps in {seconds:.0f} s")
                snapshot_state = snapshot.state_dict
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    final = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
                    torch.save({"final": final, "snapshot": snapshot_state}, cached.with_suffix(".tmp"))
                    cached.with_suffix(".tmp").replace(cached)
            model.eval()
            self._models[key] = model
            self._snapshots[key] = snapshot_state
        return self._models[key]

    def partial(self, seed: int) -> torch.nn.Module:
        """A copy of the vanilla fine-tune as it was after `steps - heal_steps` optimizer steps."""
        self.finetuned("vanilla", seed)
        model = self.pretrained(seed)
        model.load_state_dict(self._snapshots[f"vanilla/{seed}"])
        model.eval()
        return model

    def heal_schedule(self) -> dict:
        """Learning rate for healing: the vanilla run's linear schedule continued from where it was cut."""
        study = self.study
        cut = study.steps - study.heal_steps
        decay = max(1, study.steps - study.warmup_steps)
        factor = min(1.0, (study.steps - cut) / decay) if cut >= study.warmup_steps else 1.0
        return {"learning_rate": study.learning_rate * factor, "warmup_steps": 0}

    def heal(self, model, seed: int, *, teacher=None, scope: str = "full", whole_budget: bool = False) -> tuple[torch.nn.Module, float, int]:
        """Heal the collapsed `model` for `heal_steps` steps (the vanilla schedule continued, `heal_schedule`) with
        hf_collapse.heal: with a `teacher`, logit distillation from it (weight 1, temperature 2) is added to the loss;
        `scope="adjacent"` trains only the layers next to each removed span and the head. With `whole_budget`, it
        trains for the study's whole `steps` on the vanilla schedule instead (a model cut before any fine-tuning).
        Returns the healed model, the wall time and the rows the teacher ran (its forward passes, counted apart from
        the budget)."""
        steps = self.study.steps if whole_budget else self.study.heal_steps
        fields = dict(heal_steps=steps, msw_weight=0.0, distill_weight=1.0 if teacher is not None else 0.0,
                      distill_temperature=2.0, heal_scope=scope)
        args = self._collapse_config(seed, steps, None if whole_budget else self.heal_schedule(), **fields)
        start = time.perf_counter()
        healed = hf_collapse.heal(model, args, self.train, data_collator=self.data.collator, teacher=teacher)
        model, done = healed
        assert done == steps, (done, steps)
        return model.eval(), time.perf_counter() - start, healed.teacher_forward_rows

    def forget(self, seed: int) -> None:
        """Drop what is cached for `seed` (the runner goes seed by seed, so memory stays bounded)."""
        for key in [k for k in self._models if k.endswith(f"/{seed}")]:
            del self._models[key]
            self._snapshots.pop(key, None)
        for cache in (self._scores, self._greedy, self._reports, self._validations):
            for key in [k for k in cache if k[0].seed == seed]:
                del cache[key]

    # ------------------------------------------------------------------ metrics

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.classification else "perplexity"

    @property
    def higher_is_better(self) -> bool:
        return self.classification

    def metric(self, model, split) -> float:
        batch = self.study.eval_batch_size
        if self.classification:
            return evaluate_classification(model, split, batch_size=batch, collator=self.data.collator)["accuracy"]
        return perplexity(model, split, batch_size=batch)

    def split_result(self, model, split) -> dict:
        value = self.metric(model, split)
        result = {self.metric_name: value, "rows": len(split)}
        if self.classification:
            result["se"] = math.sqrt(max(value * (1 - value), 0.0) / len(split))
        return result

    def report(self, key: ModelKey, model, layers: list[int]) -> dict:
        """Test and out-of-domain results of `model` with `layers` deleted (on a copy, with collapse_layers),
        plus inference energy on the test rows. Cached per (model key: name, seed, layers removed before; layers
        deleted now)."""
        if not isinstance(key, ModelKey):
            raise TypeError(f"report keys are ModelKey(name, seed, removed), not {key!r}")
        cache_key = (key, tuple(sorted(layers)))
        if cache_key not in self._reports:
            collapsed = copy.deepcopy(model)
            if layers:
                hf_collapse.collapse_layers(collapsed, sorted(layers))
            test, energy = measure_energy(lambda: self.split_result(collapsed, self.test), len(self.test), device=self.device)
            self._reports[cache_key] = {
                "layers": sorted(layers),
                "num_layers": self.num_layers - len(layers),
                "parameters": collapsed.num_parameters(),
                "test": test,
                "ood": self.split_result(collapsed, self.ood),
                "energy": energy.to_dict(),
            }
            del collapsed
        return copy.deepcopy(self._reports[cache_key])

    # ------------------------------------------------------------------ choosing layers

    def scores(self, key: ModelKey, model, method: str) -> tuple[hf_collapse.LayerScores, float]:
        """Per-layer scores of `model` on the calibration rows (cached), and the wall time they took."""
        cache_key = (key, method)
        if cache_key not in self._scores:
            start = time.perf_counter()
            scores = hf_collapse.score_layers(
                model, self.calibration, method=method, tokenizer=self.processor, batch_size=self.study.eval_batch_size, progress=False
            )
            self._scores[cache_key] = (scores, time.perf_counter() - start)
        return self._scores[cache_key]

    def ranked(self, key: ModelKey, model, method: str, k: int) -> Selection:
        """The k lowest-scoring layers (one calibration pass)."""
        scores, seconds = self.scores(key, model, method)
        layers = hf_collapse.select_lowest(scores, k)
        return Selection(layers, f"{method} ranking", forward_passes=len(self.calibration), seconds=seconds)

    def measured(self, key: ModelKey, model, k: int, *, cheap: bool | str = False) -> Selection:
        """Greedy bypass: each step removes the layer whose bypass hurts the validation metric least.

        - `cheap=False`: every remaining layer tried on all validation rows.
        - `cheap=True`: only the `cheap_candidates` lowest-Block-Influence layers tried, on `cheap_rows`
          validation rows.
        - `cheap="screened"`: every layer's single-layer bypass cost measured once on `cheap_rows` rows (a
          measured ranking), then greedy over the `cheap_candidates` cheapest-to-remove layers on those rows.

        The greedy path for the study's largest k is computed once; the choice for a smaller k is its prefix,
        and its cost counts only the evaluations up to that step (wall time prorated by evaluations).
        """
        mode = {False: "full", True: "cheap"}.get(cheap, cheap)
        if mode not in ("full", "cheap", "screened"):
            raise ValueError(f"unknown measured mode {cheap!r}")
        cache_key = (key, mode)
        rows = self.validation if mode == "full" else self.cheap_validation
        evaluate = lambda m: self.metric(m, rows)  # noqa: E731
        extra_passes, extra_evaluations, extra_seconds = 0, 0, 0.0
        if mode == "screened":
            msw, _ = self.scores(key, model, "msw")
            screen_key = (key, "screen")
            if screen_key not in self._greedy:
                self._greedy[screen_key] = hf_collapse.select_by_tolerance(
                    model, msw, evaluate, math.inf, max_layers=1, higher_is_better=self.higher_is_better,
                    strategy="measured", progress=False,
                )
            screen = self._greedy[screen_key]
            costs = screen.removal_costs()
            scores = hf_collapse.LayerScores("bypass cost", [costs[i] for i in range(len(costs))], stack=msw.stack)
            extra_evaluations, extra_seconds = screen.evaluations, screen.seconds
            extra_passes = screen.evaluations * len(rows)
            score_seconds = 0.0
        else:
            method = "block_influence" if mode == "cheap" else "msw"  # full: the order only breaks ties
            scores, score_seconds = self.scores(key, model, method)
            if mode == "cheap":
                extra_passes, extra_seconds = len(self.calibration), score_seconds
        if cache_key not in self._greedy:
            self._greedy[cache_key] = hf_collapse.select_by_tolerance(
                model,
                scores,
                evaluate,
                math.inf,
                max_layers=max(self.study.ks),
                higher_is_better=self.higher_is_better,
                strategy="measured",
                num_candidates=None if mode == "full" else self.study.cheap_candidates,
                progress=False,
            )
        selection = self._greedy[cache_key]
        chosen, value = selection.curve[k]
        trials = [t for t in selection.trials if t[0] <= k]
        passes = len(trials) * len(rows) + extra_passes
        seconds = selection.seconds * len(trials) / max(1, selection.evaluations) + extra_seconds
        name = {
            "full": f"greedy bypass, every layer on {len(rows)} validation rows",
            "cheap": f"greedy bypass, {self.study.cheap_candidates} lowest-BI candidates on {len(rows)} validation rows",
            "screened": f"single-layer bypass costs on {len(rows)} validation rows, then greedy over the "
            f"{self.study.cheap_candidates} cheapest",
        }[mode]
        return Selection(
            sorted(chosen), name, passes, len(trials) + extra_evaluations, seconds, value,
            [[s, list(l), m] for s, l, m in trials],
        )

    def validation_metric(self, model, layers: list[int], key: ModelKey | None = None) -> float:
        """The validation metric with `layers` bypassed (no surgery); cached per (`key`, layers) when a key is given."""
        cache_key = (key, tuple(sorted(layers)))
        if key is None or cache_key not in self._validations:
            with hf_collapse.bypass_layers(model, {"": list(layers)} if layers else {}):
                value = self.metric(model, self.validation)
            if key is None:
                return value
            self._validations[cache_key] = value
        return self._validations[cache_key]

    # ------------------------------------------------------------------ repair at the cut

    MIXED_DOMAIN = "offline:rotten_tomatoes"

    def mixed_repair_calibration(self):
        """The repair rows with half of them from a third domain: the first half of `repair_calibration` (training
        blocks of the study's dataset) and as many blocks of Rotten Tomatoes critic snippets, tokenized and packed
        the way the study packs its own text; built by the library's own `hf_collapse.data.repair_rows`, what a
        recipe with `repair_dataset_name: offline:rotten_tomatoes` and `repair_mix: 0.5` fits on. Neither the test
        nor the out-of-domain rows are touched. Causal-LM studies only (the library refuses the field elsewhere).
        `mixed_repair_source` says what they are."""
        if self.study.task != "causal-lm":
            raise ValueError(f"mixed-domain repair rows are built for causal-LM studies; {self.study.name} is {self.study.task}")
        if self._mixed is None:
            recipe = dataclasses.replace(self.recipe, repair_dataset_name=self.MIXED_DOMAIN, repair_mix=0.5)
            self._mixed = repair_rows(recipe, self.processor, self.train, len(self.repair_calibration))
        return self._mixed[0]

    @property
    def mixed_repair_source(self) -> str:
        """What `mixed_repair_calibration` holds, in words (for the repair record)."""
        self.mixed_repair_calibration()
        return self._mixed[1]

    def repair_rows_for(self, mixed: bool):
        """The rows a repair is fitted on and what they are, in words: the study's repair rows, or with `mixed` the
        half-and-half set of `mixed_repair_calibration`."""
        if mixed:
            return self.mixed_repair_calibration(), self.mixed_repair_source
        return self.repair_calibration, f"{len(self.repair_calibration)} training rows of {self.study.dataset}"

    def repaired(self, model, layers: list[int], repair: str, *, mixed: bool = False) -> tuple[torch.nn.Module | None, dict]:
        """A copy of `model` with `layers` removed by hf_collapse.collapse_model and `repair` fitted on the repair
        calibration rows (training data, `Study.repair_rows`; with `mixed`, half of them from a third domain, see
        `mixed_repair_calibration`) and folded, with the repair's record (what it was fitted on, its errors, and the
        rows and seconds of the fit). `(None, {"method", "refused"})` when the library refuses that repair for this
        model or these layers (a family where it does not fold, a span at layer 0): nothing is approximated."""
        rows, source = self.repair_rows_for(mixed)
        collapsed = copy.deepcopy(model)
        start = time.perf_counter()
        try:
            collapsed, report = hf_collapse.collapse_model(
                collapsed, layers=sorted(layers), calibration=rows, repair=repair,
                score_method="block_influence", calibration_source=source,
            )
        except ValueError as error:
            del collapsed
            return None, {"method": repair, "refused": str(error)}
        collapsed.eval()
        record = dict(report.repair, forward_passes=len(rows), seconds=round(time.perf_counter() - start, 3))
        return collapsed, record

    def block_repaired(self, key: ModelKey, model, k: int, repair: str, *,
                       mixed: bool = False) -> tuple[torch.nn.Module, dict, Selection]:
        """Where to cut with the repair in view, the library's own path (`hf_collapse.collapse_model` with
        `strategy="block"`, ReplaceMe's setting of one contiguous run): every run of `k` consecutive layers after
        layer 0 gets `repair` fitted on the repair rows (one calibration pass for all of them), is measured on the
        validation rows with its map applied by hooks, and the best run is removed from a copy of `model` and its map
        folded. Returns the copy, the repair's record (as `repaired` gives it) and the choice as a `Selection` whose
        `trials` hold every run's figure as `[0, layers, metric]`. The fold is not re-checked against the unrepaired
        cut (`repair_check=False`, as the other post-hoc repair arms). With `mixed`, every run's map is fitted on
        `mixed_repair_calibration` (half the rows from a third domain); the runs are still measured on the study's
        own validation rows."""
        scores, _ = self.scores(key, model, "block_influence")  # for the report only; the run is chosen by measuring
        rows, source = self.repair_rows_for(mixed)
        collapsed = copy.deepcopy(model)
        start = time.perf_counter()
        collapsed, report = hf_collapse.collapse_model(
            collapsed, num_layers=k, strategy="block", calibration=rows, scores=scores,
            repair=repair, repair_check=False, choose_on=lambda candidate: self.metric(candidate, self.validation),
            higher_is_better=self.higher_is_better, calibration_source=source,
        )
        seconds = time.perf_counter() - start
        collapsed.eval()
        curve = report.selection_curve
        value = next(metric for layers, metric in curve if layers == report.removed_layers)
        passes = len(rows) + len(curve) * len(self.validation)
        selection = Selection(
            report.removed_layers, f"contiguous block of {k} with the best validation metric under a {repair} repair "
            f"({len(curve)} blocks, fitted on {source}; hf_collapse strategy 'block')",
            forward_passes=passes, evaluations=len(curve), seconds=seconds, validation=value,
            trials=[[0, list(layers), metric] for layers, metric in curve],
        )
        record = dict(report.repair, forward_passes=len(rows), seconds=round(seconds, 3))
        return collapsed, record, selection

    def best_repair(self, model, layers: list[int], key: ModelKey) -> tuple[torch.nn.Module | None, dict]:
        """Every repair fitted for `layers` (see `repaired`), the one with the best validation metric kept: the
        collapsed, repaired copy and a record of the candidates (validation metric or refusal) and their cost.
        `(None, record)` when every repair is refused. The unrepaired cut's validation is recorded beside them
        (`none`), not eligible."""
        sign = 1 if self.higher_is_better else -1
        candidates = [{"method": "none", "validation": self.validation_metric(model, layers, key)}]
        best, best_record, passes, seconds = None, None, len(self.validation), 0.0
        for repair in ("scale", "linear", "transport"):
            collapsed, record = self.repaired(model, layers, repair)
            if collapsed is None:
                candidates.append(record)
                continue
            start = time.perf_counter()
            record["validation"] = self.metric(collapsed, self.validation)
            seconds += record["seconds"] + time.perf_counter() - start
            passes += record["forward_passes"] + len(self.validation)
            candidates.append({"method": repair, "validation": record["validation"]})
            if best is None or sign * record["validation"] > sign * best_record["validation"]:
                best, best_record = collapsed, record
        chosen = dict(best_record or {"method": None}, candidates=candidates, forward_passes=passes, seconds=round(seconds, 3))
        return best, chosen
