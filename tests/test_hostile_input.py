"""Hostile input (issue 24): numbers out of range, YAML of the wrong shape or built to explode, a λ that overflows the
loss, a local model path that does not exist — each refused in one line (exit 2) before anything is loaded or written;
`evaluate` on every shipped recipe; `--help` without torch."""

import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from test_hardening import Raw, one_line, recipe_text, tree, world  # noqa: F401 (world is a fixture)
from test_trainer import config, lm_dataset, tiny_llama

import hf_collapse.models
from hf_collapse import CollapseTrainer
from hf_collapse.cli import EXIT_REFUSED, MESSAGE_MAX, main
from hf_collapse.config import MSW_WEIGHT_MAX
from hf_collapse.recipe import YAML_MAX_NODES, RecipeError, load_recipe, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def refused(world, tmp_path, capsys, verb: str, text: str, *extra: str) -> str:
    """Run VERB on a recipe holding ``text``: exit 2, one line, the source and the folder untouched; the line."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    before_src, before_tmp = tree(world["src"]), tree(tmp_path)
    code = main([verb, str(path), *extra])
    line = one_line(capsys)
    assert code == EXIT_REFUSED, line
    assert line.startswith(f"hf-collapse {verb}: error: "), line
    assert tree(world["src"]) == before_src
    assert tree(tmp_path) == before_tmp  # no output_dir, no export, no staging
    return line


# ---- numbers ----

NUMBER_CASES = [
    ({"max_steps": 0}, r"max_steps must be at least 1 \(or -1 to train for num_train_epochs\), got 0"),
    ({"max_steps": -1, "num_train_epochs": 0}, r"max_steps is -1 \(train by epochs\) but num_train_epochs is 0"),
    ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be at least 1, got 0"),
    ({"per_device_eval_batch_size": 0}, r"per_device_eval_batch_size must be at least 1, got 0"),
    ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be at least 1, got 0"),
    ({"learning_rate": Raw(".nan")}, r"learning_rate must be a finite number >= 0, got nan"),
    ({"learning_rate": Raw(".inf")}, r"learning_rate must be a finite number >= 0, got inf"),
    ({"learning_rate": -1e-4}, r"learning_rate must be a finite number >= 0, got -0.0001"),
    ({"num_train_epochs": Raw(".nan"), "max_steps": -1}, r"num_train_epochs must be a finite number >= 0, got nan"),
    ({"msw_weight": Raw("1e300")}, r"msw_weight must be at most 10000, got 1e\+300"),
    ({"msw_weight": MSW_WEIGHT_MAX * 2}, r"msw_weight must be at most 10000, got 20000"),
    ({"msw_weight": Raw(".nan")}, r"msw_weight must be a number >= 0 \(and finite\), got nan"),
]


@pytest.mark.parametrize("verb", ["validate", "train"])
@pytest.mark.parametrize("fields,pattern", NUMBER_CASES, ids=[next(iter(c[0])) + str(i) for i, c in enumerate(NUMBER_CASES)])
def test_a_number_out_of_range_is_refused_before_anything_loads(world, tmp_path, capsys, monkeypatch, verb, fields, pattern):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a recipe that should have been refused")

    monkeypatch.setattr(hf_collapse.models, "load_model", no_model)
    line = refused(world, tmp_path, capsys, verb, recipe_text(world, tmp_path / "out", **fields))
    assert re.search(pattern, line), line


def test_the_largest_weight_is_accepted(world, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(world, tmp_path / "out", msw_weight=MSW_WEIGHT_MAX))
    assert load_recipe(path)[1].msw_weight == MSW_WEIGHT_MAX


def test_the_guard_checks_weight_times_penalty_and_no_weight_changes(tmp_path):
    """λ past the bound (set after the config checked it, as a callback or a subclass could) makes λ × penalty
    overflow float32 although the penalty itself is finite: the step stops before the optimizer, weights unchanged."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = config(tmp_path, max_steps=2)
    args.msw_weight = 1e300
    trainer = CollapseTrainer(model=model, args=args, train_dataset=lm_dataset())
    with pytest.raises(FloatingPointError, match=r"λ × MSW penalty is 1e\+300 × [0-9.e+-]+ at step 0.*changed no weight"):
        trainer.train()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0)


# ---- shapes of YAML ----


def test_a_scalar_where_a_list_is_expected_is_a_one_item_list(world, tmp_path):
    csv = world["files"]["strings"]
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(
        world, tmp_path / "out", dataset_files=Raw(str(csv)), collapse_num_layers=None, collapse_layers=Raw("1"),
        target_choice="post_hoc", msw_layers=Raw("2"), use_peft=True, lora_target_modules=Raw("query"),
    ))
    recipe, config_, resolved = load_recipe(path)
    assert recipe.dataset_files == [str(csv)]
    assert config_.collapse_layers == [1]
    assert config_.msw_layers == [2]
    assert recipe.lora_target_modules == ["query"]
    assert resolved["lora_target_modules"] == ["query"]


def test_validate_accepts_a_single_data_file_written_as_a_scalar(world, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(world, tmp_path / "out", dataset_files=Raw(str(world["files"]["strings"]))))
    assert main(["validate", str(path)]) == 0
    assert f"data {world['files']['strings']};" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


SHAPE_CASES = [
    ("collapse_layers: one\n", r"collapse_layers: cannot read 'one' as a list of int"),
    ("collapse_layers: {a: 1}\n", r"collapse_layers: cannot read \{'a': 1\} as a list of int"),
    ("collapse_layers: [[1, 2]]\n", r"collapse_layers: cannot read \[\[1, 2\]\] as a list of int"),
    ("max_steps: [1, 2]\n", r"max_steps takes one value, not a list: \[1, 2\]"),
]


@pytest.mark.parametrize("verb", ["validate", "train"])
@pytest.mark.parametrize("extra,pattern", SHAPE_CASES, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(SHAPE_CASES)])
def test_a_value_of_the_wrong_shape_is_one_line(world, tmp_path, capsys, verb, extra, pattern):
    text = recipe_text(world, tmp_path / "out", collapse_num_layers=None, max_steps=None) + extra
    line = refused(world, tmp_path, capsys, verb, text)
    assert re.search(pattern, line), line


def alias_bomb() -> str:
    """Nine levels of nine aliases each: 9**9 (387 million) strings once expanded, in a few hundred bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_by_its_node_count_using_little_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 500
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match=rf"expands to more than {YAML_MAX_NODES:,} values through YAML aliases"):
            read_yaml(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak  # the graph is counted, never expanded


@pytest.mark.parametrize("verb", ["validate", "train"])
def test_an_alias_bomb_is_one_line_from_the_cli(world, tmp_path, capsys, verb):
    line = refused(world, tmp_path, capsys, verb, alias_bomb())
    assert "expands to more than" in line and len(line) < 300


def test_an_alias_that_contains_itself_is_refused(world, tmp_path, capsys):
    line = refused(world, tmp_path, capsys, "validate", "model_name_or_path: &x [*x]\n")
    assert "YAML alias that refers to itself" in line


def test_a_modest_use_of_aliases_is_still_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("a: &x [1, 2, 3]\nb: *x\n")
    assert read_yaml(path) == {"a": [1, 2, 3], "b": [1, 2, 3]}


def test_a_huge_value_is_quoted_short(world, tmp_path, capsys):
    line = refused(world, tmp_path, capsys, "validate", "max_steps: " + "9x" * 50_000 + "\n")
    assert "invalid int value: '9x9x" in line and line.endswith("...")
    assert len(line) == len("hf-collapse validate: error: ") + MESSAGE_MAX


def test_a_long_unknown_key_is_quoted_short(world, tmp_path, capsys):
    line = refused(world, tmp_path, capsys, "validate", "x" * 1000 + ": 1\n")
    assert re.search(r"unknown key 'x{70,}\.\.\. in ", line) and len(line) < 300, line


# ---- usability ----

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


class Reached(Exception):
    """Raised where evaluate would resolve the model: everything before it accepted the recipe."""


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_evaluate_accepts_every_shipped_recipe(path, monkeypatch):
    def reached(name):
        raise Reached(name)

    monkeypatch.setattr(hf_collapse.models, "resolve_model", reached)
    with pytest.raises(Reached):
        main(["evaluate", str(path), "--use_cpu", "true"])  # GPU recipes ask for bf16, which a CPU refuses


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["collapse", "--help"], ["evaluate", "--help"]])
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\nfrom hf_collapse_entry import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
        "    print('exit', e.code)\nprint('heavy', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    ) % (argv,)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "usage: hf-collapse" in result.stdout
    assert result.stdout.splitlines()[-2:] == ["exit 0", "heavy []"], result.stdout


def test_the_console_script_is_the_light_entry_point():
    """`hf-collapse` (the installed script) runs hf_collapse_entry.main: its --help imports no torch (the test above),
    and a verb still reaches the package (a refused input gives the package's one line)."""
    script = Path(sys.executable).parent / "hf-collapse"
    assert "from hf_collapse_entry import main" in script.read_text()
    result = subprocess.run([str(script), "collapse", "/nonexistent/src", "/tmp/never-out", "--layers", "1"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "that path does not exist" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("src", ["./nope", "{tmp}/nope", "../nope/model"])
def test_a_missing_local_source_is_a_missing_path(tmp_path, capsys, monkeypatch, src):
    monkeypatch.chdir(tmp_path)
    src = src.format(tmp=tmp_path)
    code = main(["collapse", src, str(tmp_path / "out"), "--layers", "1"])
    line = one_line(capsys)
    assert code == EXIT_REFUSED, line
    assert f"{src}: that path does not exist" in line
    assert "repo" not in line.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_evaluate_and_score_report_a_missing_local_model_as_a_path(world, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(world, tmp_path / "out", model_name_or_path=str(tmp_path / "gone")))
    for verb in ("evaluate", "score"):
        assert main([verb, str(path)]) == EXIT_REFUSED
        assert f"{tmp_path / 'gone'}: that path does not exist" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
