"""Recipes: flat YAML whose keys are exactly the fields of `RecipeArguments` and `CollapseConfig`.

YAML values become argparse *defaults* and command-line flags override them, so every value goes
through the same argparse type conversion (PyYAML reads `1e-5` as a string; argparse makes it a float).
Unknown keys are an error that names the key.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .choice import SELECTION_STRATEGIES, LayerChoice, check_candidates, check_tolerance
from .config import CollapseConfig, shown
from .data import OFFLINE_DATASETS, TASKS
from .errors import RecipeError
from .launch import precision_overrides
from .repair import REPAIRS, check_repair
from .scoring import SCORING_METHODS

__all__ = [
    "RecipeArguments", "RecipeError", "check_choice", "layer_choice", "load_recipe", "make_parser", "resolved_recipe",
]

BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
BNB_4BIT_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RecipeArguments:
    r"""
    What to train, on which data, and how to choose and remove layers. Together with the fields of
    [`CollapseConfig`] these are the keys of a recipe.

    Parameters:
        model_name_or_path (`str`): Hub id, local folder, or an offline asset
            (`offline:all-MiniLM-L6-v2`, `offline:SmolLM2-135M-Instruct`).
        task (`str`, defaults to `"text-classification"`): `text-classification`, `causal-lm` or `image-classification`.
        dataset_name (`str`, *optional*): Hub dataset id, or `offline:rotten_tomatoes` / `offline:shakespeare`.
        dataset_config (`str`, *optional*): the Hub dataset's configuration name.
        dataset_files (`list[str]`, *optional*): local csv/json/jsonl/parquet/txt files instead of a dataset name.
        train_split, eval_split (`str`): split names; a missing eval split is carved from train (`eval_fraction`).
        text_column, label_column, image_column (`str`): the columns the task reads.
        max_length (`int`, defaults to 128): token limit (classification) or block size (causal LM).
        max_train_samples, max_eval_samples (`int`, *optional*): cap the splits (rows; blocks for a causal LM).
        use_peft (`bool`): train LoRA adapters (merged before the collapse) instead of all weights.
        load_in_4bit, load_in_8bit (`bool`): QLoRA: load the linear layers in 4 bits (or 8, LLM.int8) with
            bitsandbytes (`pip install 'hf-collapse[qlora]'`) and train LoRA adapters on them (needs `use_peft`,
            task `causal-lm`). After training the adapters are merged into a dequantised copy of the weights
            ([`merge_dequantized`]); the collapse, the export and the card are of that copy.
        bnb_4bit_quant_type (`str`, defaults to `"nf4"`), bnb_4bit_compute_dtype (`str`, defaults to `"auto"`),
            bnb_4bit_use_double_quant (`bool`): the 4-bit data type (`nf4`, `fp4`), the dtype the 4-bit layers compute
            in (`auto`: float32 on CPU, bfloat16 on GPUs that support it, else float16) and whether the scales are
            quantised too.
        collapse (`bool`, defaults to `True`): score, choose and remove layers after training, then export.
        collapse_tolerance (`float`, *optional*): remove layers while the validation metric drops by at most this
            much. With `collapse: true`, exactly one of it and the [`CollapseConfig`] fields `collapse_layers`
            (an explicit list) and `collapse_num_layers` (a target depth) is set.
        collapse_strategy (`str`, defaults to `"measured"`): with a budget or a tolerance, `ranked` removes
            layers in score order; `measured` tries the lowest-scoring candidates and removes the one whose
            removal hurts the validation metric least; `block` (with `collapse_num_layers`) measures every run of
            that many consecutive layers, with `collapse_repair` fitted and applied, and removes the best run.
        collapse_repair (`str`, defaults to `"none"`): after the layers are chosen, fit a map for each removed span on
            the calibration rows and fold it into the weights before the cut (`scale`, `linear`, `transport`; see
            [`fit_repair`]). Refused after a fade (`fade_steps`): the network already trained without those layers (to
            repair at the choice and fine-tune after it, see `target_repair` in [`MSWArguments`]).
        collapse_repair_check (`bool`, defaults to `True`): fold the repair only if the validation rows that chose the
            layers score the repaired cut no worse than the unrepaired one (else it is recorded as not folded);
            `false` folds it regardless.
        repair_dataset_name (`str`, *optional*), repair_dataset_config (`str`, *optional*), repair_dataset_split
            (`str`, defaults to `"train"`), repair_mix (`float`, defaults to 0.5): causal-lm: fit the repair
            (`collapse_repair` on `calibration_samples` rows, `target_repair` on `target_repair_samples`) on rows of
            which `repair_mix` are blocks of this second dataset's text (its `text_column`, packed as the recipe's
            own) and the rest the first training rows. A map fitted on the fine-tuning domain alone costs a lot
            outside it; general text in the fit gives part of that back (`benchmarks/RESULTS.md`). The card names both.
        export_dir (`str`, *optional*): where the collapsed model goes; defaults to `<output_dir>/collapsed`.
        trust_remote_code (`bool`, defaults to `False`): load a checkpoint whose architecture is its own Python code
            (an `auto_map` in its config), which runs that code. Without it such a checkpoint is refused before
            anything is loaded. The export ships the code files and its card says that it needs `trust_remote_code`.
    """

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Hub id, local folder, or offline:all-MiniLM-L6-v2 / offline:SmolLM2-135M-Instruct."},
    )
    task: str = field(default="text-classification", metadata={"help": "The task.", "choices": list(TASKS)})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or offline:rotten_tomatoes / offline:shakespeare."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of the Hub dataset."})
    dataset_files: list[str] | None = field(
        default=None, metadata={"help": "Local data files (csv, json, jsonl, parquet or txt) instead of dataset_name."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train and calibrate on."})
    eval_split: str = field(
        default="validation", metadata={"help": "Split to evaluate on; carved from train when the dataset lacks it."}
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of train held out when eval_split does not exist (0-1)."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of any split made from the data."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    max_length: int = field(
        default=128, metadata={"help": "Token limit per example (classification) or block size (causal LM)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (causal-lm: blocks of max_length tokens)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many evaluation rows (causal-lm: blocks of max_length tokens)."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many test rows (causal-lm: blocks), where the data has a test split."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters; they are merged before the collapse."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names that get adapters (default: all linear layers)."}
    )
    # QLoRA: LoRA adapters trained on 4-/8-bit bitsandbytes weights; the collapse runs on the dequantised merge.
    load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the linear layers in 4 bits (QLoRA; needs use_peft and bitsandbytes)."}
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Load the linear layers in 8 bits (LLM.int8; needs use_peft and bitsandbytes)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type.", "choices": list(BNB_4BIT_QUANT_TYPES)}
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the 4-bit layers compute in; auto: float32 on CPU, bfloat16 on GPUs that have it.",
            "choices": list(BNB_4BIT_COMPUTE_DTYPES),
        },
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "Quantise the 4-bit layers' scales too (about 0.4 bit per weight less)."}
    )
    collapse: bool = field(default=True, metadata={"help": "Score, choose and remove layers after training, then export."})
    collapse_score_method: str = field(
        default="msw", metadata={"help": "Layer score.", "choices": list(SCORING_METHODS)}
    )
    collapse_tolerance: float | None = field(
        default=None,
        metadata={"help": "Remove layers while the validation metric drops by at most this much (metric units)."},
    )
    collapse_strategy: str = field(
        default="measured",
        metadata={"help": "ranked: score order; measured: least harmful candidate first; block: the best run of "
                          "collapse_num_layers consecutive layers, repaired when collapse_repair is set.",
                  "choices": list(SELECTION_STRATEGIES)},
    )
    collapse_candidates: int | None = field(
        default=None, metadata={"help": "With measured selection, try only this many lowest-scoring layers per step."}
    )
    collapse_repair: str = field(
        default="none",
        metadata={"help": "Repair the cut, fitted on the calibration rows and folded into the weights: none, scale, "
                  "linear or transport.", "choices": list(REPAIRS)},
    )
    collapse_repair_check: bool = field(
        default=True,
        metadata={"help": "Fold the repair only if the validation rows that chose the layers score it no worse than "
                  "the unrepaired cut; false folds it regardless."},
    )
    calibration_samples: int = field(default=256, metadata={"help": "Training rows used to score the layers (and fit a repair)."})
    repair_dataset_name: str | None = field(
        default=None,
        metadata={"help": "causal-lm: a second dataset (Hub id or offline:...) whose text makes up repair_mix of the rows "
                  "a repair (collapse_repair, target_repair) is fitted on; the rest are the first training rows."},
    )
    repair_dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of repair_dataset_name."})
    repair_dataset_split: str = field(default="train", metadata={"help": "The split of repair_dataset_name to read."})
    repair_mix: float = field(
        default=0.5, metadata={"help": "The share (above 0, at most 1) of the repair rows taken from repair_dataset_name."}
    )
    layerwise_scoring: bool = field(
        default=False,
        metadata={"help": "Score the saved checkpoint's layers one at a time from its safetensors shards (one layer's "
                  "weights in memory): hf-collapse score, and collapse choosing by score without training."},
    )
    latency_repeats: int = field(
        default=10, metadata={"help": "Interleaved timed forward passes per model for the latency figures; 0 skips."}
    )
    sentence_loss: str = field(
        default="BatchAllTripletLoss",
        metadata={"help": "sentence-embedding: the sentence-transformers loss class trained on (text, label) rows."},
    )
    lm_eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "causal-lm: lm-evaluation-harness tasks run on the full-depth and the collapsed model; "
                  "the figures go into the card (needs the lm-eval extra)."},
    )
    lm_eval_include: str | None = field(
        default=None, metadata={"help": "Folder of extra lm-eval task YAML files (e.g. local data for offline runs)."}
    )
    lm_eval_limit: float | None = field(
        default=None, metadata={"help": "Documents per lm-eval task: a count (>= 1) or a fraction (< 1); default all."}
    )
    lm_eval_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples per lm-eval task (default: the task's)."})
    lm_eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the lm-eval runs."})
    export_dir: str | None = field(
        default=None, metadata={"help": "Folder of the collapsed model (default: <output_dir>/collapsed)."}
    )
    export_repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo the export is meant for (used in the card's loading snippet)."}
    )
    overwrite_export: bool = field(default=False, metadata={"help": "Replace export_dir when it holds a previous hf-collapse export."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint that needs its own Python code (an auto_map in its config), running that "
                  "code; only for code you have read. The export ships the code and its card says so."},
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise RecipeError("model_name_or_path is required: a Hub id, a local folder or an offline:... asset")
        if self.task not in TASKS:
            raise RecipeError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.dataset_name and self.dataset_name.startswith("offline:") and self.dataset_name not in OFFLINE_DATASETS:
            raise RecipeError(
                f"unknown offline dataset {self.dataset_name!r}: the offline datasets are {', '.join(OFFLINE_DATASETS)}"
            )
        if not 0 < self.eval_fraction < 1:
            raise RecipeError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.max_length < 2:
            raise RecipeError(f"max_length must be at least 2 tokens, got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"{name} must be at least 1 (or left unset), got {value}")
        for name in ("latency_repeats",):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.calibration_samples < 1:
            raise RecipeError(f"calibration_samples must be at least 1, got {self.calibration_samples}")
        self._check_repair_dataset()
        try:
            check_candidates(self.collapse_candidates)
            check_tolerance(self.collapse_tolerance)
            check_repair(self.collapse_repair)
        except ValueError as error:
            raise RecipeError(str(error)) from None
        if self.lm_eval_tasks:
            if self.task != "causal-lm":
                raise RecipeError(
                    f"lm_eval_tasks run language-model tasks, but the recipe's task is {self.task}: use them with "
                    "task: causal-lm, or remove lm_eval_tasks"
                )
            if self.lm_eval_limit is not None and not self.lm_eval_limit > 0:
                raise RecipeError(f"lm_eval_limit must be above 0 (a count, or a fraction below 1), got {self.lm_eval_limit}")
            if self.lm_eval_fewshot is not None and self.lm_eval_fewshot < 0:
                raise RecipeError(f"lm_eval_fewshot must be 0 or more, got {self.lm_eval_fewshot}")
            if self.lm_eval_batch_size < 1:
                raise RecipeError(f"lm_eval_batch_size must be at least 1, got {self.lm_eval_batch_size}")
        self._check_quantization()

    def _check_repair_dataset(self) -> None:
        if not 0 < self.repair_mix <= 1:
            raise RecipeError(f"repair_mix is the share of the repair rows taken from repair_dataset_name: above 0 and at "
                              f"most 1, got {self.repair_mix}")
        if not self.repair_dataset_name:
            unused = [name for name, value, default in (("repair_dataset_config", self.repair_dataset_config, None),
                                                        ("repair_dataset_split", self.repair_dataset_split, "train"),
                                                        ("repair_mix", self.repair_mix, 0.5)) if value != default]
            if unused:
                raise RecipeError(f"{unused[0]} says how repair_dataset_name is read, and repair_dataset_name is not set: "
                                  f"set repair_dataset_name, or remove {unused[0]}")
            return
        if self.task != "causal-lm":
            raise RecipeError(
                f"repair_dataset_name mixes blocks of a second dataset's text into the repair rows of a causal-lm recipe, "
                f"and this recipe's task is {self.task}: remove repair_dataset_name (the repair is then fitted on the "
                "first training rows)"
            )
        if self.repair_dataset_name.startswith("offline:") and self.repair_dataset_name not in OFFLINE_DATASETS:
            raise RecipeError(f"unknown offline dataset {self.repair_dataset_name!r} in repair_dataset_name: the offline "
                              f"datasets are {', '.join(OFFLINE_DATASETS)}")

    @property
    def quantized(self) -> bool:
        """Whether the model is loaded in 4 or 8 bits (QLoRA)."""
        return self.load_in_4bit or self.load_in_8bit

    def _check_quantization(self) -> None:
        four_bit_options = [
            name for name, value, default in (
                ("bnb_4bit_quant_type", self.bnb_4bit_quant_type, "nf4"),
                ("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, "auto"),
                ("bnb_4bit_use_double_quant", self.bnb_4bit_use_double_quant, False),
            ) if value != default
        ]
        if four_bit_options and not self.load_in_4bit:
            raise RecipeError(f"{', '.join(four_bit_options)} only apply with load_in_4bit: true; set it or drop them")
        for name, value, choices in (
            ("bnb_4bit_quant_type", self.bnb_4bit_quant_type, BNB_4BIT_QUANT_TYPES),
            ("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, BNB_4BIT_COMPUTE_DTYPES),
        ):
            if value not in choices:
                raise RecipeError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if not self.quantized:
            return
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError("load_in_4bit and load_in_8bit are both set: choose one")
        bits = "load_in_4bit" if self.load_in_4bit else "load_in_8bit"
        if not self.use_peft:
            raise RecipeError(
                f"{bits} needs use_peft: true: quantised weights cannot be fine-tuned themselves; LoRA adapters "
                "train on top of them (QLoRA) and are merged into a dequantised copy before the collapse"
            )
        if self.task != "causal-lm":
            raise RecipeError(
                f"{bits} is supported for task causal-lm only (a new classification head would be quantised too); "
                "use LoRA without quantisation for this task"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RecipeError(f"{bits} needs bitsandbytes, which is not installed: pip install 'hf-collapse[qlora]'")


# A recipe is a few dozen values; a document that expands (through YAML aliases) to more nodes than this is refused
# before it is built, so that an alias bomb costs neither memory nor time.
YAML_MAX_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no Python objects) that refuses a key given twice in one mapping;
    plain PyYAML keeps the last value silently."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hashable = key in seen
            except TypeError:
                hashable = False
            if hashable:
                raise RecipeError(
                    f"the recipe sets {shown(key)} twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one"
                )
            try:
                seen[key] = key_node.start_mark.line
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many nodes ``root`` holds once every alias is expanded, counted on the node graph (each distinct node once,
    so the count costs as little as the file); stops as soon as it passes ``limit``. Refuses a node that contains
    itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise RecipeError("the recipe holds a YAML alias that refers to itself: write the values out")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def read_yaml(path: Path):
    """The YAML document in ``path``, read safely, with duplicate keys and documents that expand (through aliases) to
    more than `YAML_MAX_NODES` values refused (RecipeError)."""
    try:
        loader = _StrictLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, YAML_MAX_NODES) > YAML_MAX_NODES:
                raise RecipeError(
                    f"recipe file {path} expands to more than {YAML_MAX_NODES:,} values through YAML aliases (&anchor / "
                    "*alias): a recipe is a flat mapping of a few fields; write the values out"
                )
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe file {path} is not valid YAML: {shown(str(error).splitlines()[0], 200)}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {path} is not UTF-8 text: save it as UTF-8 YAML") from None
    except RecursionError:
        raise RecipeError(f"recipe file {path} nests its values too deeply: a recipe is a flat mapping of fields") from None


def make_parser() -> HfArgumentParser:
    """The argument parser of a recipe: `RecipeArguments` and `CollapseConfig` fields as `--flags`."""
    parser = HfArgumentParser((RecipeArguments, CollapseConfig))

    def error(message: str):
        raise RecipeError(message)

    parser.error = error  # one sentence, not a usage wall
    return parser


def _as_default(action, value: Any) -> Any:
    """A YAML value as argparse would have read it from the command line (so types are checked alike). A field that
    takes a list also takes one plain value (`collapse_layers: 1`, `dataset_files: data.csv`) as a one-item list."""
    if value is None:
        return None
    takes_list = action.nargs in ("+", "*")
    if isinstance(value, dict) and not takes_list:
        return json.dumps(value)
    if isinstance(value, list) or takes_list:
        if not takes_list:
            raise RecipeError(f"{action.dest} takes one value, not a list: {shown(value)}")
        items = value if isinstance(value, list) else [value]
        convert = action.type or str
        try:
            if any(isinstance(v, (list, dict)) for v in items):
                raise TypeError
            return [convert(str(v)) for v in items]
        except (TypeError, ValueError):
            kind = getattr(convert, "__name__", "value")
            raise RecipeError(f"{action.dest}: cannot read {shown(value)} as a list of {kind}") from None
    return str(value)


# TrainingArguments fields that transformers renamed within 5.x: a recipe may use either name, and gets the
# one the installed version has (the new one when both exist, so no deprecation warning).
_RENAMED = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _current_names(values: dict, actions: dict) -> dict:
    """`values` with each renamed field under the name that the installed transformers knows."""
    new_to_old = {new: old for old, new in _RENAMED.items()}
    renamed = {}
    for key, value in values.items():
        if key in _RENAMED and _RENAMED[key] in actions:
            key = _RENAMED[key]
        elif key in new_to_old and key not in actions and new_to_old[key] in actions:
            key = new_to_old[key]
        if key in renamed:
            raise RecipeError(f"the recipe sets {key!r} twice (under its old and its new name); keep one")
        renamed[key] = value
    return renamed


def load_recipe(
    path: str | Path | None, overrides: list[str] | None = None, *, check_collapse: bool = True
) -> tuple[RecipeArguments, CollapseConfig, dict]:
    """Parse a recipe file plus command-line overrides.

    With `check_collapse=False` (for `hf-collapse evaluate`, which removes nothing) the collapse settings are not
    required to name a layer choice; every other field is checked as usual.

    Returns:
        `(recipe, config, resolved)`: the two dataclasses and the resolved recipe (the keys given in the file
        or on the command line, with their final values), to be saved with the output.

    Raises:
        [`RecipeError`]: missing file, not a mapping, an unknown key (named, with the closest known key),
            a value of the wrong type, or a combination the fields reject.
    """
    parser = make_parser()
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise RecipeError(f"recipe file {path} must be a mapping of field: value, got {type(values).__name__}")
        values = _current_names(values, actions)
        for key in values:
            if key not in actions:
                close = difflib.get_close_matches(str(key), list(actions), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RecipeError(f"unknown key {shown(key)} in {path}{hint}")
        defaults = {key: _as_default(actions[key], value) for key, value in values.items()}
        parser.set_defaults(**defaults)
        for key in values:
            actions[key].required = False
    overrides = list(overrides or [])
    # under a DeepSpeed launch, a recipe silent on bf16/fp16 takes the accelerate config's mixed precision
    overrides += precision_overrides(set(values) | {arg[2:].split("=")[0].replace("-", "_") for arg in overrides})
    try:
        recipe, config, rest = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except RecipeError:
        raise
    except ValueError as error:  # a field's own range check
        raise RecipeError(str(error)) from None
    if rest:
        flag = rest[0].split("=")[0]
        close = difflib.get_close_matches(flag.lstrip("-").replace("-", "_"), list(actions), n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise RecipeError(f"unknown option {flag}{hint}")
    if check_collapse:
        check_choice(recipe, config)
    given = set(values) | {arg[2:].split("=")[0].replace("-", "_") for arg in overrides if arg.startswith("--")}
    return recipe, config, resolved_recipe(recipe, config, given)


def check_choice(recipe: RecipeArguments, config: CollapseConfig) -> None:
    """With `collapse: true`, a valid [`LayerChoice`] (see [`layer_choice`]); healing and targets need a collapse."""
    if recipe.repair_dataset_name and recipe.collapse_repair == "none" and config.target_repair == "none":
        raise RecipeError(f"repair_dataset_name: {recipe.repair_dataset_name} gives rows to fit a repair on, and the recipe "
                          "asks for none: set collapse_repair or target_repair (scale, linear, transport), or remove it")
    if not recipe.collapse:
        if recipe.collapse_repair != "none":
            raise RecipeError(f"collapse_repair: {recipe.collapse_repair} repairs the cut left by removed layers, so it "
                              "needs collapse: true")
        if config.heal_steps or config.has_target:
            what = "heal_steps" if config.heal_steps else "a target depth (collapse_layers / collapse_num_layers)"
            raise RecipeError(f"{what} needs collapse: true (the layers are removed after training)")
        return
    check_healing(recipe, config)
    if recipe.collapse_repair != "none" and config.has_target and config.fade_steps:
        raise RecipeError(
            f"collapse_repair: {recipe.collapse_repair} after a fade has nothing to repair: the rest of the network "
            "trained without the faded layers, and a map fitted to their own output puts back what it learned to do "
            "without (MiniLM, 2 layers: test accuracy 0.772 -> 0.578, one class for every row). To repair the cut "
            f"at the choice and fine-tune after it (prune, repair, fine-tune), use target_repair: {recipe.collapse_repair} "
            "with fade_steps: 1 and collapse_repair: none; or fade_steps: 0 to repair a cut made after training"
        )
    layer_choice(recipe, config)


def check_healing(recipe: RecipeArguments, config: CollapseConfig) -> None:
    """Healing settings that cannot act, refused when the recipe is read (not after training)."""
    if not config.heal_steps:
        for name in ("heal_scope", "distill_hidden_weight"):
            if getattr(config, name):
                raise RecipeError(f"{name} says how healing trains, and heal_steps is 0: set heal_steps, or remove {name}")
        return
    if config.heal_scope == "lora" and not recipe.use_peft:
        raise RecipeError("heal_scope: lora trains LoRA adapters, and this recipe has none: set use_peft: true, or "
                          "heal_scope: full or adjacent")
    if config.distill_hidden_weight and config.has_target and config.fade_steps and not config.distill_weight:
        raise RecipeError(
            "distill_hidden_weight after a fade distils from the copy of the model taken at the target choice, which "
            "is kept only with distill_weight > 0: set distill_weight (for example 1), or fade_steps: 0"
        )


def layer_choice(recipe: RecipeArguments, config: CollapseConfig, *, layers=None) -> LayerChoice:
    """The recipe's [`LayerChoice`]: its `collapse_*` fields (`collapse_layers`, `collapse_num_layers` and
    `collapse_protect_*` live on [`CollapseConfig`]), or the given `layers` (the targets training removed) with the
    recipe's protection.

    Raises:
        [`RecipeError`]: what [`LayerChoice`] refuses, in its words.
    """
    try:
        if layers is not None:
            return LayerChoice(
                layers=layers, protect_first=config.collapse_protect_first, protect_last=config.collapse_protect_last
            )
        return LayerChoice(
            layers=config.collapse_layers, num_layers=config.collapse_num_layers, tolerance=recipe.collapse_tolerance,
            protect_first=config.collapse_protect_first, protect_last=config.collapse_protect_last,
            candidates=recipe.collapse_candidates, strategy=recipe.collapse_strategy,
        )
    except ValueError as error:
        raise RecipeError(str(error)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_recipe(recipe: RecipeArguments, config: CollapseConfig, keys: set[str]) -> dict:
    """The given keys with their final values, in field order (recipe fields first)."""
    resolved = {}
    for source in (recipe, config):
        for f in fields(source):
            if f.name in keys and f.init:
                resolved[f.name] = _plain(getattr(source, f.name))
    return resolved
