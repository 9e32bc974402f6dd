"""The layer choice: one value object checked in one place, whoever asks (recipe, CLI, Python API, trainer), and
the one greedy bypass routine."""

import math

import pytest
import yaml

from hf_collapse import CollapseTrainer, collapse_model
from hf_collapse.choice import LayerChoice, greedy_bypass, removable_layers
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.recipe import RecipeError, load_recipe
from test_trainer import config, lm_dataset, tiny_llama

DEPTH = 4

# (the choice as LayerChoice / collapse_model keywords, as recipe fields, the one message all entry points give)
BAD_CHOICES = [
    (dict(num_layers=4), dict(collapse_num_layers=4), r"collapse_num_layers 4 would remove all of the model's 4 layers"),
    (dict(num_layers=3, protect_first=2), dict(collapse_num_layers=3, collapse_protect_first=2),
     r"collapse_num_layers 3, but only 2 of the model's 4 layers are not protected"),
    (dict(layers=[0], protect_first=1), dict(collapse_layers=[0], collapse_protect_first=1),
     r"collapse_layers \[0\] are protected \(collapse_protect_first=1, collapse_protect_last=0\)"),
    (dict(layers=[7]), dict(collapse_layers=[7]), r"collapse_layers \[7\] do not exist: the model has 4 layers"),
    (dict(layers=[0, 1, 2, 3]), dict(collapse_layers=[0, 1, 2, 3]), r"removing all 4 layers would leave none"),
    (dict(num_layers=1, protect_first=2, protect_last=2), dict(collapse_num_layers=1, collapse_protect_first=2,
     collapse_protect_last=2), r"collapse_protect_first=2 and collapse_protect_last=2 protect all 4 layers"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("choice") / "src"
    tiny_llama(layers=DEPTH).save_pretrained(folder)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a few words of text for the data".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


def _recipe(tmp_path, source, fields) -> str:
    path = tmp_path / "recipe.yaml"
    text = tmp_path / "train.txt"
    text.write_text("a few words of text for the data\n" * 20)
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(source), "task": "causal-lm", "dataset_files": [str(text)], "max_length": 8,
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "collapse_strategy": "ranked", **fields,
    }))
    return str(path)


@pytest.mark.parametrize("keywords,fields,message", BAD_CHOICES)
def test_a_bad_choice_is_refused_with_one_message_everywhere(tmp_path, source, capsys, keywords, fields, message):
    # Python API: nothing changes in the model
    model = tiny_llama(layers=DEPTH)
    with pytest.raises(ValueError, match=message):
        collapse_model(model, **keywords)
    assert len(model.model.layers) == DEPTH
    # the same value object, on its own
    with pytest.raises(ValueError, match=message):
        LayerChoice(**keywords).check_depth(DEPTH)
    # a recipe: `validate` refuses it before anything is loaded or written
    assert main(["validate", _recipe(tmp_path, source, fields)]) == EXIT_REFUSED
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # the collapse verb, with the choice on its command line (where it has a flag) or in the recipe
    flags = {"num_layers": "--num-layers", "layers": "--layers"}
    (kind,) = [k for k in ("num_layers", "layers") if k in keywords]
    value = keywords[kind]
    argv = ["collapse", str(source), str(tmp_path / "out"), flags[kind],
            str(value) if kind == "num_layers" else ",".join(map(str, value)),
            "--data", str(tmp_path / "train.txt"), "--task", "causal-lm", "--max_length", "8",
            "--collapse_strategy", "ranked"]
    argv += [f"--{k}={v}" for k, v in fields.items() if k.startswith("collapse_protect")]
    assert main(argv) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keywords,fields,message", [c for c in BAD_CHOICES if "layers" in c[0] or "num_layers" in c[0]])
def test_the_trainer_refuses_a_bad_target_with_the_same_message(tmp_path, keywords, fields, message):
    args = config(tmp_path, max_steps=4, target_choice_steps=1, msw_adaptive=False, **fields)
    data = lm_dataset(8)
    with pytest.raises(ValueError, match=message):
        CollapseTrainer(model=tiny_llama(layers=DEPTH), args=args, train_dataset=data, eval_dataset=data)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(num_layers=0), "collapse_num_layers must be at least 1"),
        (dict(tolerance=-0.1), "collapse_tolerance must be a number >= 0"),
        (dict(tolerance=math.nan), "collapse_tolerance must be a number >= 0"),
        (dict(num_layers=1, candidates=0), "collapse_candidates must be at least 1"),
        (dict(num_layers=1, strategy="greedy"), "collapse_strategy must be one of ranked, measured"),
        (dict(num_layers=1, strategy="ranked", candidates=2), "collapse_candidates only applies to strategy='measured'"),
        (dict(tolerance=0.1, strategy="block"), "collapse_strategy 'block' removes one run of collapse_num_layers"),
        (dict(num_layers=2, strategy="block", candidates=2), "collapse_candidates only applies to strategy='measured'"),
        (dict(layers=[1, 1]), r"collapse_layers names a layer twice"),
        (dict(layers=[-1]), "cannot be negative"),
        (dict(layers=[1.5]), "is not an integer"),
        (dict(layers=[1], num_layers=1), "give exactly one of layers, num_layers and tolerance"),
        (dict(), "give exactly one of layers, num_layers and tolerance"),
    ],
)
def test_each_setting_is_checked_by_the_choice(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        LayerChoice(**fields)
    recipe_fields = {f"collapse_{k}": v for k, v in fields.items()}
    if not fields or math.nan in fields.values() or fields.get("layers") == [1.5]:
        return  # YAML and argparse refuse these (or no choice at all) in their own words
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "output_dir": str(tmp_path), **recipe_fields}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_removable_layers_is_the_one_protection_budget():
    assert removable_layers(6, 1, 2) == [1, 2, 3]
    assert LayerChoice(num_layers=2, protect_first=1, protect_last=2).check_depth(6) == [1, 2, 3]
    with pytest.raises(ValueError, match="collapse_protect_last must be 0 or more"):
        removable_layers(6, 0, -1)


def _costs(table):
    """A measurement that sums per-layer costs (a lower-is-better loss), and counts its calls."""
    calls = []

    def measure(layers):
        calls.append(tuple(layers))
        return 1.0 + sum(table[i] for i in layers)

    return measure, calls


def test_greedy_bypass_keeps_the_cheapest_layer_each_step_and_stops_at_the_tolerance():
    measure, calls = _costs({0: 0.5, 1: 0.01, 2: 0.2, 3: 0.02})
    result = greedy_bypass(measure, [0, 1, 2, 3], 3, higher_is_better=False, tolerance=0.1)
    assert result.layers == (1, 3)  # 0.01, then 0.02 (total 0.03 <= 0.1); adding 2 would cost 0.23
    assert result.curve[0] == ((), 1.0) and result.curve[-1][0] == (1, 3, 2)
    assert result.evaluations == len(calls) == 1 + 4 + 3 + 2


def test_greedy_bypass_reranks_by_single_layer_costs_when_asked():
    # the trainer's target choice: every layer alone first, then only the `pool` cheapest of those per round
    measure, calls = _costs({0: 0.3, 1: 0.01, 2: 0.2, 3: 0.02})
    result = greedy_bypass(measure, [0, 1, 2, 3], 2, pool=1, rerank=True, higher_is_better=False, baseline=False)
    assert result.layers == (1, 3)
    assert calls == [(0,), (1,), (2,), (3,), (1, 3)]
    # without reranking, the pool is taken in the given order: layer 0 is the only candidate of round two
    measure, calls = _costs({0: 0.3, 1: 0.01, 2: 0.2, 3: 0.02})
    assert greedy_bypass(measure, [0, 1, 2, 3], 2, pool=1, higher_is_better=False, baseline=False).layers == (0, 1)


def test_greedy_bypass_refuses_a_non_finite_measurement():
    with pytest.raises(ValueError, match=r"returned nan with layers \[\] bypassed"):
        greedy_bypass(lambda layers: math.nan, [0, 1], 1)


def test_contiguous_blocks_are_the_runs_of_removable_layers():
    from hf_collapse.choice import contiguous_blocks

    assert contiguous_blocks([1, 2, 3, 4], 2) == [[1, 2], [2, 3], [3, 4]]
    assert contiguous_blocks([0, 1, 3, 4, 5], 3) == [[3, 4, 5]]  # 0-1 is too short, 1-3 skips 2
    assert contiguous_blocks([1, 2], 3) == []
