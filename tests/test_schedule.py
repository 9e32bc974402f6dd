"""The target schedule on its own (issue 19): its decisions driven with plain numbers, no model and no Trainer."""

import json

import pytest

from hf_collapse import CollapseConfig
from hf_collapse.schedule import Adaptation, TargetChoice, TargetSchedule, TrainingRecord


class FakeLosses:
    """A bypass-loss function: `full` for the (faded) model, `full + cost` with any layer bypassed; records calls."""

    def __init__(self, full=1.0, cost=0.5):
        self.full, self.cost, self.calls = full, cost, []

    def __call__(self, layers, fade):
        self.calls.append((list(layers), fade))
        return self.full + (self.cost if layers else 0.0)


def run(schedule, max_steps, losses, choose=lambda: ([2], 4)):
    """Advance the schedule as the trainer does, once per optimizer step; returns the entries made at each step."""
    made = {}
    for step in range(max_steps):
        if not schedule.prepare(step):
            continue
        if schedule.choice_due(step, max_steps):
            made[step] = schedule.begin(step, choose=choose, bypass_loss=losses)
        elif schedule.adaptation_due(step, max_steps):
            made[step] = schedule.adapt(step, bypass_loss=losses)
    return made


def test_without_a_target_depth_lambda_ramps_from_step_zero_and_nothing_is_chosen():
    schedule = TargetSchedule(2.0, warmup_steps=4, targeted=False)
    assert [schedule.current_weight(step) for step in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert not schedule.choice_due(10, 20) and schedule.fade_alpha(10, 20) == 1.0
    assert run(schedule, 10, FakeLosses()) == {}


def test_the_choice_waits_for_its_step_then_penalises_the_chosen_targets_with_a_ramp():
    schedule = TargetSchedule(3.0, warmup_steps=2, choice_steps=0.25, score="msw")
    assert schedule.current_weight(5) == 0.0 and schedule.acting_targets(5, 8) == []  # nothing before the choice
    losses = FakeLosses()
    made = run(schedule, 8, losses, choose=lambda: ([1, 3], 7))
    (entry,) = made.values()
    assert entry == TargetChoice(step=2, targets=[1, 3], weight=3.0, choice="measured", evaluations=7, seconds=entry.seconds)
    assert losses.calls == []  # λ does not adapt: no reference loss
    assert schedule.targets == [1, 3] and schedule.start == 2
    assert [schedule.current_weight(step) for step in range(2, 6)] == [0.0, 1.5, 3.0, 3.0]  # the ramp from the choice
    assert schedule.acting_targets(2, 8) == [1, 3]


def test_given_targets_are_recorded_as_given_and_a_score_choice_names_its_score():
    given = TargetSchedule(1.0, targets=[2], choice="score", score="block_influence")
    (entry,) = run(given, 3, FakeLosses(), choose=lambda: pytest.fail("given targets are not chosen")).values()
    assert (entry.choice, entry.score, entry.evaluations, entry.targets) == ("given", None, 0, [2])
    assert entry.rule() == "named in the recipe, targeted from step 0" and entry.clause() == entry.rule()
    scored = TargetSchedule(1.0, choice="score", score="block_influence", choice_steps=1)
    (entry,) = run(scored, 3, FakeLosses(), choose=lambda: ([0], 1)).values()
    assert (entry.step, entry.choice, entry.score) == (1, "score", "block_influence")
    assert entry.clause() == "chosen as the lowest block_influence scores at step 1"


def test_the_fade_is_linear_from_the_choice_and_faded_targets_stop_acting_and_adapting():
    schedule = TargetSchedule(1.0, targets=[1], choice_steps=2, fade_steps=0.5, adaptive=True, adapt_steps=1)
    assert schedule.fade_alpha(5, 8) == 1.0 and schedule.fade_window(8) is None  # before the choice
    made = run(schedule, 8, FakeLosses(cost=0.0))
    assert [schedule.fade_alpha(step, 8) for step in range(2, 8)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert schedule.fade_window(8) == (2, 6)
    assert schedule.acting_targets(5, 8) == [1] and schedule.acting_targets(6, 8) == []
    assert sorted(made) == [2, 3, 4, 5]  # no adaptation once faded out


@pytest.mark.parametrize(
    "full,cost,weight,event",
    [
        (1.0, 0.5, 4.0, "doubled"),  # bypassing the targets still costs 50 % > tolerance
        (1.1, 0.4, 1.0, "halved"),  # the loss rose 10 % since the choice (drift wins over cost)
        (1.0, 0.01, 2.0, "kept"),  # 1 % cost, no drift: within the 2 % tolerance
        (1.01, 0.49, 4.0, "doubled"),  # 1 % drift is within tolerance
    ],
)
def test_lambda_is_halved_on_drift_doubled_on_cost_and_kept_otherwise(full, cost, weight, event):
    schedule = TargetSchedule(2.0, targets=[1], choice_steps=1, adaptive=True, adapt_steps=2, adapt_tolerance=0.02)
    losses = FakeLosses(full=1.0)
    run(schedule, 2, losses)
    assert schedule.reference_loss == 1.0 and losses.calls == [([], False)]  # the reference: the full model, no fade
    losses.full, losses.cost, losses.calls = full, cost, []
    made = run(schedule, 4, losses)
    (adaptation,) = made.values()
    assert losses.calls == [([], True), ([1], False)]  # the faded model, then the targets bypassed
    assert isinstance(adaptation, Adaptation) and adaptation.step == 3 and adaptation.event.startswith(event)
    assert adaptation.weight == schedule.weight == weight
    assert adaptation.bypass_cost == pytest.approx(cost / full) and adaptation.loss_drift == pytest.approx(full - 1.0)
    assert schedule.entries[0].evaluations == 1  # the reference loss


def test_doubling_stops_at_the_documented_bound():
    from hf_collapse.config import MSW_WEIGHT_MAX

    schedule = TargetSchedule(0.6 * MSW_WEIGHT_MAX, targets=[1], choice_steps=1, adaptive=True, adapt_steps=2,
                              adapt_tolerance=0.02)
    losses = FakeLosses(full=1.0, cost=0.5)  # bypassing always costs too much: every adaptation wants to double
    made = run(schedule, 12, losses)
    events = [(entry.event.split(":")[0], entry.weight) for entry in made.values() if isinstance(entry, Adaptation)]
    assert events[0] == ("doubled", MSW_WEIGHT_MAX)  # 1.2 x the bound is cut to the bound
    assert events[1:] and all(event == ("kept", MSW_WEIGHT_MAX) for event in events[1:])
    assert schedule.weight == MSW_WEIGHT_MAX


def test_a_zero_lambda_never_adapts_and_each_step_advances_once():
    schedule = TargetSchedule(0.0, targets=[1], adaptive=True, adapt_steps=1)
    assert run(schedule, 5, FakeLosses()).keys() == {0}
    assert schedule.prepare(7) and not schedule.prepare(7)  # micro-batches of one optimizer step


def test_state_dict_round_trips_through_json():
    schedule = TargetSchedule(2.0, choice_steps=1, adaptive=True, adapt_steps=2, score="msw", choice="score")
    run(schedule, 6, FakeLosses(), choose=lambda: ([2, 3], 1))
    state = json.loads(json.dumps(schedule.state_dict()))
    assert state["msw_schedule"][0] == {"step": 1, "event": "targets", "targets": [2, 3], "weight": 2.0, "choice": "score",
                                        "evaluations": 2, "seconds": schedule.entries[0].seconds, "score": "msw"}
    restored = TargetSchedule(2.0, choice_steps=1, adaptive=True, adapt_steps=2, score="msw", choice="score")
    restored.load_state_dict(state)
    assert restored.entries == schedule.entries and restored.state_dict() == schedule.state_dict()
    assert (restored.targets, restored.start, restored.weight, restored.reference_loss, restored.prepared_step) == (
        [2, 3], 1, 8.0, 1.0, 5
    )
    assert restored.current_weight(5) == 8.0 and restored.acting_targets(5, 6) == [2, 3]


def test_from_arguments_reads_the_config_fields():
    args = CollapseConfig(
        output_dir="unused", collapse_num_layers=2, target_choice="score", target_score="block_influence",
        target_choice_steps=0.3, fade_steps=0.4, msw_weight=0.5, msw_warmup_steps=3, msw_adaptive=True, msw_adapt_steps=7,
    )
    schedule = TargetSchedule.from_arguments(args)
    assert (schedule.targeted, schedule.targets, schedule.choice, schedule.score, schedule.weight) == (
        True, None, "score", "block_influence", 0.5
    )
    assert (schedule.choice_steps, schedule.fade_steps, schedule.warmup_steps, schedule.adapt_steps) == (0.3, 0.4, 3, 7)
    assert not schedule.choice_due(2, 10) and schedule.choice_due(3, 10)


def test_the_training_record_gives_the_cards_flat_fields():
    choice = TargetChoice(step=60, targets=[1, 2], weight=0.3, choice="measured", evaluations=5, seconds=1.0)
    record = TrainingRecord(
        steps=200, targets=[1, 2], choice=choice, penalty_schedule=[(60, 0.3), (80, 0.15)], fade_window=(60, 120),
        distillation_weight=1.0, distillation_temperature=2.0, healing_steps=20, healing_lora=False,
    )
    assert record.to_report_fields() == {
        "training_steps": 200, "healing_steps": 20, "healing_lora": False, "target_layers": [1, 2],
        "target_choice": "by measured bypass cost at step 60", "penalty_schedule": [(60, 0.3), (80, 0.15)],
        "fade_window": (60, 120), "distillation_weight": 1.0, "distillation_temperature": 2.0,
    }
    assert TrainingRecord(steps=5).to_report_fields() == {"training_steps": 5}
