"""What a user gets from the package and the Hub path: recipes shipped in the wheel, `hf-collapse recipes`, and
`push_to_hub` in a recipe uploading the collapsed export (not the full-depth Trainer output)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from hf_collapse.cli import main
from hf_collapse.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_wheel_ships_every_recipe_and_the_card_template(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("hf_collapse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"hf_collapse/recipes/{p.name}" for p in RECIPES} <= names
    assert "hf_collapse/model_cards/lacoot.md.j2" in names
    for path in RECIPES:  # byte-identical copies
        assert zipfile.ZipFile(wheel).read(f"hf_collapse/recipes/{path.name}") == path.read_bytes()


def test_recipes_verb_lists_one_name_a_line(capsys):
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.splitlines() == [p.stem for p in RECIPES]


def test_recipes_verb_copies_one_that_then_parses(tmp_path, capsys):
    assert main(["recipes", "quickstart", str(tmp_path / "mine.yaml")]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == (ROOT / "recipes" / "quickstart.yaml").read_bytes()
    recipe, _, _ = load_recipe(tmp_path / "mine.yaml")
    assert recipe.model_name_or_path == "offline:all-MiniLM-L6-v2"
    # into a folder, with the .yaml suffix given
    assert main(["recipes", "smollm2-135m_lora.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "smollm2-135m_lora.yaml").is_file()


def test_recipes_verb_refuses_unknown_names_and_existing_files(tmp_path, capsys):
    assert main(["recipes", "no-such-recipe", str(tmp_path / "x.yaml")]) == 2
    assert "no recipe named 'no-such-recipe'" in capsys.readouterr().err
    target = tmp_path / "taken.yaml"
    target.write_text("mine")
    assert main(["recipes", "quickstart", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_text() == "mine"
    assert main(["recipes", "quickstart"]) == 2
    assert "PATH" in capsys.readouterr().err
