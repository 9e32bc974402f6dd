"""The studies: which model, data, schedule and arms, as plain data (so that the output folder can record them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["PROTOCOL_EXEMPT", "STUDIES", "Study", "get_study"]

# Fields that may grow between runs into one output folder: adding an arm, a seed or a k reuses the results
# already there. Every other field is the protocol; a folder made under another protocol is refused.
PROTOCOL_EXEMPT = ("arms", "seeds", "ks")


@dataclass(frozen=True)
class Study:
    """One study: a model, its task data, a training budget and the arms compared at equal compute.

    The budget of every arm is `steps` optimizer steps of `batch_size` examples; healing steps count in it.
    Layers are chosen on the `validation_rows` validation rows (or `cheap_rows` of them for the cheap measured
    selection); every reported number is on the `test_rows` test rows and on the `ood_rows` out-of-domain rows.
    """

    name: str
    model: str  # an offline alias of hf_collapse.models.OFFLINE_MODELS
    task: str  # "text-classification" or "causal-lm"
    dataset: str  # an offline dataset of hf_collapse.data.OFFLINE_DATASETS
    ood: str  # "sentiment_tweets" or "health_tweets" (hf_collapse.assets)
    ks: tuple[int, ...]
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-4
    warmup_steps: int = 20
    max_length: int = 64
    train_rows: int | None = 3200  # rows (classification) or blocks (causal LM)
    validation_rows: int = 600
    test_rows: int | None = None  # None = the whole test split
    ood_rows: int = 2000
    ood_max_length: int = 64
    calibration_rows: int = 256  # training rows the scores are computed on
    repair_rows: int | None = None  # training rows a repair at the cut is fitted on (None: the calibration rows)
    cheap_rows: int = 128  # validation rows of the cheap measured selection
    cheap_candidates: int = 3  # lowest-Block-Influence candidates the cheap selection measures per step
    msw_weight: float = 0.3
    msw_warmup_steps: int = 20
    heal_steps: int = 50  # prune-then-heal: the last heal_steps of the budget train the collapsed model
    random_draws: int = 3
    eval_batch_size: int = 64
    quick: bool = False
    notes: str = ""

    def protocol(self) -> dict:
        """The fields that must match for results to be reused (everything but arms, seeds and ks)."""
        values = dataclasses.asdict(self)
        for name in PROTOCOL_EXEMPT:
            values.pop(name)
        if values["repair_rows"] is None:  # unset, as before the field existed: folders made then still match
            values.pop("repair_rows")
        return values

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MINILM_ARMS = (
    "vanilla",
    "penalty",
    "vanilla_block_influence",
    "vanilla_angular",
    "vanilla_last_k",
    "vanilla_random",
    "vanilla_msw",
    "vanilla_measured",
    "vanilla_measured_cheap",
    "penalty_msw",
    "penalty_measured",
    "penalty_measured_cheap",
    "vanilla_measured_screened",
    "penalty_measured_screened",
    "prune_then_finetune",
    "prune_then_heal",
    "target_fade",
    "target_fade_msw",
    "target_fade_distill",
    "target_msw_heal",
    "score_fade",
    "target_fade_late",
    # issue 20: repair at the cut, healing from the full-depth model, healing next to the cut
    "prune_repair_finetune",
    "score_fade_repair",
    "prune_then_heal_distill",
    "prune_then_heal_adjacent",
    "prune_then_distill",
)
# training-free repairs of every post-hoc rule: a post-norm encoder (MiniLM) folds only the per-channel scale, the
# pre-norm decoder (SmolLM2) all three (hf_collapse.repair.check_foldable)
RULES = ("block_influence", "angular", "msw", "last_k")
MINILM_REPAIR_ARMS = tuple(f"vanilla_{rule}_scale" for rule in RULES)
DECODER_REPAIR_ARMS = tuple(f"vanilla_{rule}_{repair}" for rule in RULES for repair in ("scale", "linear", "transport"))

STUDIES: dict[str, Study] = {
    "minilm": Study(
        name="minilm",
        model="offline:all-MiniLM-L6-v2",
        task="text-classification",
        dataset="offline:rotten_tomatoes",
        ood="sentiment_tweets",
        ks=(1, 2, 3),
        seeds=(0, 1, 2),
        arms=MINILM_ARMS + MINILM_REPAIR_ARMS,
        notes="recipes/quickstart.yaml's schedule: 200 steps x 16 rows (one epoch of 3,200 rows), lr 1e-4, 20 warm-up steps",
    ),
    "smollm2": Study(
        name="smollm2",
        model="offline:SmolLM2-135M-Instruct",
        task="causal-lm",
        dataset="offline:shakespeare",
        ood="health_tweets",
        ks=(4, 8),
        seeds=(0,),
        # full greedy bypass on 30 layers costs 30 + 29 + ... evaluations (212 for k = 8, about 35 min here): the
        # default run has only the cheap ones; the reference for the cheap ones was run once, at k = 4, with
        # `python -m benchmarks.quality smollm2 --arms vanilla_measured --ks 4`
        arms=tuple(a for a in MINILM_ARMS if a not in ("vanilla_measured", "penalty_measured")) + DECODER_REPAIR_ARMS,
        steps=40,
        batch_size=4,
        learning_rate=5e-5,
        warmup_steps=4,
        max_length=128,
        train_rows=None,
        validation_rows=48,
        test_rows=96,
        ood_rows=200,
        calibration_rows=32,
        # the least-squares map has 576 x 576 coefficients per span: 32 rows (4,096 tokens) fitted it with a ridge
        # so strong it left SmolLM2 at 2.1x full depth; a wider calibration set lets cross-validation pick a weaker one
        repair_rows=256,
        cheap_rows=16,
        cheap_candidates=4,
        msw_warmup_steps=4,
        heal_steps=10,
        eval_batch_size=8,
        notes="short CPU schedule: 40 steps x 4 blocks of 128 tokens (20,480 tokens), lr 5e-5, 4 warm-up steps; one seed",
    ),
}

QUICK_OVERRIDES = dict(
    steps=4,
    batch_size=8,
    warmup_steps=1,
    train_rows=64,
    validation_rows=32,
    test_rows=64,
    ood_rows=32,
    calibration_rows=16,
    repair_rows=None,
    cheap_rows=16,
    heal_steps=2,
    msw_warmup_steps=1,
    eval_batch_size=32,
    quick=True,
)


def get_study(name: str, *, quick: bool = False, arms=None, seeds=None, ks=None) -> Study:
    """The named study, optionally shrunk to a smoke run (`quick`) or restricted to some arms, seeds or ks."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)}")
    study = STUDIES[name]
    if quick:
        extra = dict(seeds=(0,), ks=study.ks[:2])
        if study.task == "causal-lm":
            extra.update(max_length=32, test_rows=16, validation_rows=8, ood_rows=8, calibration_rows=4, cheap_rows=4, batch_size=2)
        study = dataclasses.replace(study, **{**QUICK_OVERRIDES, **extra})
    changes = {}
    if arms is not None:
        changes["arms"] = tuple(arms)
    if seeds is not None:
        changes["seeds"] = tuple(int(s) for s in seeds)
    if ks is not None:
        changes["ks"] = tuple(int(k) for k in ks)
    return dataclasses.replace(study, **changes) if changes else study
