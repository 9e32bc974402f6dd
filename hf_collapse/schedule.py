"""The target schedule of target-depth training, and the typed record of what a training run applied.

[`TargetSchedule`] holds the state and makes the decisions of the schedule: when the targets are chosen, λ on them
(warm-up ramp included) and how it adapts to their measured bypass cost and to the task loss's drift, and how much
of their residual update the fade keeps. It measures nothing itself: the trainer passes in a chooser and a
bypass-loss function, so the schedule runs on plain numbers too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .config import MSW_WEIGHT_MAX, MSWArguments, steps_of

__all__ = ["Adaptation", "ScheduleEntry", "TargetChoice", "TargetSchedule", "TrainingRecord", "entry_from_dict"]

# bypass_loss(layers, fade): the task loss on evaluation rows with `layers` bypassed (and the current fade, if asked)
BypassLoss = Callable[[list[int], bool], float]
# choose(): the targets and the number of evaluations it took to choose them
Chooser = Callable[[], tuple[list[int], int]]


@dataclass
class TargetChoice:
    """The schedule entry of the step where targeting started.

    Attributes:
        step (`int`): the optimizer step of the choice.
        targets (`list[int]`): the 0-based layers targeted.
        weight (`float`): λ on the targets from this step.
        choice (`str`): `"given"`, `"measured"`, `"score"` or `"block"`.
        evaluations (`int`): passes over the choice rows it took (the reference loss of the adaptation included).
        seconds (`float`): the wall time of the choice.
        score (`str`, *optional*): the layer score of a `"score"` choice.
        candidates (`list`, *optional*): a `"block"` choice's `[run, loss]` for every run it measured.
    """

    event: ClassVar[str] = "targets"

    step: int
    targets: list[int]
    weight: float
    choice: str
    evaluations: int
    seconds: float
    score: str | None = None
    candidates: list | None = None  # a "block" choice: [run, choice-row loss] of every run it measured

    def rule(self) -> str:
        """How and when the targets were chosen, in words."""
        if self.choice == "given":
            return f"named in the recipe, targeted from step {self.step}"
        when = "at step 0, on the pretrained model" if self.step == 0 else f"at step {self.step}"
        if self.choice == "measured":
            return f"by measured bypass cost {when}"
        if self.choice == "block":
            return f"as the run of consecutive layers with the least measured bypass cost {when}"
        return f"as the lowest {self.score} scores {when}"

    def clause(self) -> str:
        """[`rule`] as a clause about the targets: "chosen ..." unless they were given."""
        return self.rule() if self.choice == "given" else f"chosen {self.rule()}"

    def to_dict(self) -> dict:
        entry = {"step": self.step, "event": self.event, **asdict(self)}
        for optional in ("score", "candidates"):
            if entry[optional] is None:
                del entry[optional]
        return entry


@dataclass
class Adaptation:
    """The schedule entry of one adaptation of λ.

    Attributes:
        step (`int`): the optimizer step.
        event (`str`): `"kept"`, or `"halved: ..."` / `"doubled: ..."` with the reason.
        weight (`float`): λ from this step.
        bypass_cost (`float`): the relative loss increase of bypassing the targets.
        loss_drift (`float`): the relative change of the (faded) model's loss since the choice.
    """

    step: int
    event: str
    weight: float
    bypass_cost: float
    loss_drift: float

    def to_dict(self) -> dict:
        return asdict(self)


ScheduleEntry = TargetChoice | Adaptation


def entry_from_dict(entry: dict) -> ScheduleEntry:
    """The typed entry of a dict written by `to_dict` (as checkpoints store the schedule)."""
    values = {k: v for k, v in entry.items() if k != "event"}
    return TargetChoice(**values) if entry["event"] == TargetChoice.event else Adaptation(**entry)


class TargetSchedule:
    r"""The state and decisions of a training run's penalty schedule.

    Without a target depth λ is `weight` from step 0 (after the warm-up ramp). With one, nothing is penalised
    until the choice step; then the targets are chosen (unless given), λ applies to them alone and, if adaptive,
    is halved when the task loss drifts up from its value at the choice or doubled while bypassing the targets
    still costs more than the tolerance; their residual update fades linearly to zero over `fade_steps`.

    Args:
        weight (`float`): λ (the first λ on the targets, with a target depth).
        warmup_steps (`int`): steps of the linear ramp of λ (from the start, or from the target choice).
        targeted (`bool`): whether training has a target depth.
        targets (`list[int]`, *optional*): the given targets; default: chosen at the choice step.
        choice (`str`): how the targets are chosen when not given (`"measured"` or `"score"`).
        score (`str`, *optional*): the score of a `"score"` choice.
        choice_steps (`float`): the choice step, as a count (>= 1) or a fraction of the training steps.
        fade_steps (`float`): the length of the fade, likewise (0: no fade).
        cut_at_choice (`bool`): the targets are replaced by a repair at the choice (`target_repair`): their residual
            update is gone from the choice step itself, not faded over `fade_steps`.
        adaptive (`bool`): whether λ adapts, every `adapt_steps` steps after the choice.
        adapt_steps (`int`), adapt_tolerance (`float`): see [`MSWArguments`].
    """

    def __init__(
        self,
        weight: float,
        *,
        warmup_steps: int = 0,
        targeted: bool = True,
        targets: list[int] | None = None,
        choice: str = "measured",
        score: str | None = None,
        choice_steps: float = 0.0,
        fade_steps: float = 0.0,
        cut_at_choice: bool = False,
        adaptive: bool = False,
        adapt_steps: int = 20,
        adapt_tolerance: float = 0.02,
    ):
        self.base_weight, self.warmup_steps, self.targeted = weight, warmup_steps, targeted
        self.given = targets is not None
        self.choice, self.score, self.choice_steps, self.fade_steps = choice, score, choice_steps, fade_steps
        self.adaptive, self.adapt_steps, self.adapt_tolerance = adaptive, adapt_steps, adapt_tolerance
        self.cut_at_choice = cut_at_choice
        self.targets: list[int] | None = list(targets) if targets is not None else None
        self.weight = weight  # λ on the targets now
        self.start: int | None = None  # the step targeting started
        self.reference_loss: float | None = None  # the task loss at the choice, for the drift
        self.prepared_step = -1  # the last optimizer step the schedule was advanced for
        self.repair: dict | None = None  # the record of a repair fitted and folded at the choice (`target_repair`)
        self.entries: list[ScheduleEntry] = []

    @classmethod
    def from_arguments(cls, args: MSWArguments) -> TargetSchedule:
        """The schedule that `args` (the `msw_*`, `collapse_*`, `target_*` and `fade_steps` fields) ask for."""
        return cls(
            args.msw_weight, warmup_steps=args.msw_warmup_steps, targeted=args.has_target,
            targets=list(args.collapse_layers) if args.collapse_layers else None, choice=args.target_choice,
            score=args.target_score, choice_steps=args.target_choice_steps, fade_steps=args.fade_steps,
            cut_at_choice=args.target_repair != "none", adaptive=args.msw_adaptive, adapt_steps=args.msw_adapt_steps,
            adapt_tolerance=args.msw_adapt_tolerance,
        )

    @property
    def targeting(self) -> bool:
        """Whether the target phase has begun (targets known and penalised)."""
        return self.start is not None

    # ------------------------------------------------------------------------------------------ decisions

    def current_weight(self, step: int) -> float:
        """λ at optimizer step `step` (warm-up ramp included; 0 before targeting starts)."""
        if self.targeted:
            if not self.targeting:
                return 0.0
            weight, step = self.weight, step - self.start
        else:
            weight = self.base_weight
        return weight if self.warmup_steps == 0 else weight * min(1.0, step / self.warmup_steps)

    def fade_alpha(self, step: int, max_steps: int) -> float:
        """How much of the targets' residual update is kept at `step`: 1 before the fade, 0 once it is over."""
        if not (self.targeting and self.fade_steps):
            return 1.0
        if self.cut_at_choice:
            return 0.0
        return max(0.0, 1.0 - (step - self.start) / steps_of(self.fade_steps, max_steps))

    def fade_window(self, max_steps: int) -> tuple[int, int] | None:
        """The (first, last) step of the fade; None without a fade or before targeting."""
        if not (self.targeting and self.fade_steps):
            return None
        if self.cut_at_choice:
            return self.start, self.start
        return self.start, self.start + steps_of(self.fade_steps, max_steps)

    def acting_targets(self, step: int, max_steps: int) -> list[int]:
        """The targets that are penalised at `step`: none before the choice or once they are faded out."""
        if not self.targeting or self.fade_alpha(step, max_steps) == 0.0:
            return []
        return list(self.targets)

    def prepare(self, step: int) -> bool:
        """Whether `step` is a new optimizer step (the schedule advances once per step, not per micro-batch)."""
        if step == self.prepared_step:
            return False
        self.prepared_step = step
        return True

    def choice_due(self, step: int, max_steps: int) -> bool:
        """Whether targeting starts at `step`."""
        return self.targeted and not self.targeting and step >= steps_of(self.choice_steps, max_steps)

    def adaptation_due(self, step: int, max_steps: int) -> bool:
        """Whether λ adapts at `step`: every `adapt_steps` after the choice, while the targets still act."""
        if not (self.targeting and self.adaptive and self.weight > 0):
            return False
        since = step - self.start
        # once faded out, the targets no longer act and λ has nothing to adapt to
        return since > 0 and since % self.adapt_steps == 0 and self.fade_alpha(step, max_steps) > 0

    # ------------------------------------------------------------------------------------------ actions

    def begin(self, step: int, choose: Chooser, bypass_loss: BypassLoss) -> TargetChoice:
        """Start targeting at `step`: choose the targets (unless given), take the reference loss if λ adapts."""
        evaluations, started = 0, time.perf_counter()
        if self.targets is None:
            self.targets, evaluations = choose()
        seconds = time.perf_counter() - started
        self.start = step
        if self.adaptive:
            self.reference_loss = bypass_loss([], False)
            evaluations += 1
        choice = "given" if self.given else self.choice
        entry = TargetChoice(
            step=step, targets=list(self.targets), weight=self.weight, choice=choice, evaluations=evaluations,
            seconds=round(seconds, 3), score=self.score if choice == "score" else None,
        )
        self.entries.append(entry)
        return entry

    def adapt(self, step: int, bypass_loss: BypassLoss) -> Adaptation:
        """Halve λ if the (faded) model's loss drifted up past the tolerance, else double it if bypassing the
        targets still costs more than the tolerance."""
        full = bypass_loss([], True)
        bypassed = bypass_loss(self.targets, False)
        cost = (bypassed - full) / max(abs(full), 1e-12)
        drift = (full - self.reference_loss) / max(abs(self.reference_loss), 1e-12)
        event = "kept"
        if drift > self.adapt_tolerance:
            self.weight /= 2
            event = "halved: the task loss rose"
        elif cost > self.adapt_tolerance and self.weight < MSW_WEIGHT_MAX:
            self.weight = min(2 * self.weight, MSW_WEIGHT_MAX)
            event = "doubled: bypassing the targets still costs too much"
        entry = Adaptation(step=step, event=event, weight=self.weight, bypass_cost=cost, loss_drift=drift)
        self.entries.append(entry)
        return entry

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """The schedule's state as JSON-ready values (the keys checkpoints have always used)."""
        return {
            "collapse_targets": self.targets,
            "target_start": self.start,
            "target_weight": self.weight,
            "reference_loss": self.reference_loss,
            "msw_schedule": [entry.to_dict() for entry in self.entries],
            "prepared_step": self.prepared_step,
            "repair": self.repair,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what [`state_dict`] returned."""
        self.targets = state["collapse_targets"]
        self.start = state["target_start"]
        self.weight = state["target_weight"]
        self.reference_loss = state["reference_loss"]
        self.entries = [entry_from_dict(entry) for entry in state["msw_schedule"]]
        self.prepared_step = state["prepared_step"]
        self.repair = state.get("repair")  # checkpoints written before target_repair have none


@dataclass
class TrainingRecord:
    """What a training run applied, as the model card records it.

    Attributes:
        steps (`int`): optimizer steps of training.
        targets (`list[int]`, *optional*): the targeted layers (None without a target phase).
        choice ([`TargetChoice`], *optional*): how and when they were chosen.
        penalty_schedule (`list[tuple[int, float]]`): (step, λ) from the choice and each adaptation.
        fade_window (`tuple[int, int]`, *optional*): the first and last step of the fade.
        repair (`dict`, *optional*): the repair fitted at the choice (`target_repair`): the record
            `collapse_report.json` keeps as its `repair`, with the `step` it was folded at.
        distillation_weight (`float`, *optional*), distillation_temperature (`float`, *optional*): the
            distillation term, when there was one.
        healing_steps (`int`), healing_lora (`bool`, *optional*): healing after the collapse, filled in by
            whoever heals; with `healing_scope`, `distillation_hidden_weight` and the teacher's forward passes
            during healing (`teacher_forward_passes`, `teacher_forward_rows`).
    """

    steps: int
    targets: list[int] | None = None
    choice: TargetChoice | None = None
    penalty_schedule: list[tuple[int, float]] = field(default_factory=list)
    fade_window: tuple[int, int] | None = None
    repair: dict | None = None
    distillation_weight: float | None = None
    distillation_temperature: float | None = None
    healing_steps: int = 0
    healing_lora: bool | None = None
    healing_scope: str | None = None
    distillation_hidden_weight: float | None = None
    teacher_forward_passes: int | None = None
    teacher_forward_rows: int | None = None

    def to_report_fields(self) -> dict:
        """The card's flat training fields (only those that apply)."""
        fields = {"training_steps": self.steps}
        if self.healing_steps:
            fields.update(healing_steps=self.healing_steps, healing_lora=self.healing_lora)
            for name in ("healing_scope", "distillation_hidden_weight", "teacher_forward_passes", "teacher_forward_rows"):
                if getattr(self, name) is not None:
                    fields[name] = getattr(self, name)
        if self.choice is None:
            return fields
        fields.update(
            target_layers=list(self.targets), target_choice=self.choice.rule(), penalty_schedule=list(self.penalty_schedule)
        )
        if self.fade_window is not None:
            fields["fade_window"] = self.fade_window
        if self.distillation_weight:
            fields.update(distillation_weight=self.distillation_weight, distillation_temperature=self.distillation_temperature)
        return fields
