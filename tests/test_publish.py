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


# ----------------------------------------------------------------------------------------------------------
# push_to_hub in a recipe: the collapsed export, one commit, at the end of `train`


@pytest.mark.slow
def test_push_to_hub_in_a_recipe_uploads_the_collapsed_export_not_the_trainer_output(tmp_path, monkeypatch):
    import transformers

    from hf_collapse import hub as hub_module
    from hf_collapse.hub import upload_plan
    from hf_collapse.pipeline import run_recipe

    trainer_pushes = []
    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", lambda self, *a, **k: trainer_pushes.append("init_hf_repo"))
    monkeypatch.setattr(transformers.Trainer, "push_to_hub", lambda self, *a, **k: trainer_pushes.append("push_to_hub"))
    monkeypatch.setattr(transformers.Trainer, "_push_from_checkpoint", lambda self, *a, **k: trainer_pushes.append("ckpt"))
    uploads = []

    def fake_push_folder(folder, repo_id, **kwargs):
        folder = Path(folder)
        uploads.append({
            "repo_id": repo_id, "kwargs": kwargs, "plan": upload_plan(folder),
            "config": yaml.safe_load((folder / "config.json").read_text()), "card": (folder / "README.md").read_text(),
        })
        return hub_module.PushResult(repo_id, kwargs.get("revision") or "main", upload_plan(folder), "https://hub/c/1")

    monkeypatch.setattr(hub_module, "push_folder", fake_push_folder)
    out = tmp_path / "model"
    recipe, config, resolved = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        "--output_dir", str(tmp_path / "run"), "--export_dir", str(out), "--max_steps", "1",
        "--max_train_samples", "8", "--max_eval_samples", "8", "--calibration_samples", "8", "--latency_repeats", "0",
        "--collapse_num_layers", "1", "--collapse_candidates", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--push_to_hub", "true", "--hub_model_id", "someone/minilm-collapsed", "--hub_private_repo", "true",
        "--logging_steps", "1", "--warmup_steps", "0",  # with warmup, one step has learning rate 0: the head stays new
        "--target_choice_steps", "0",  # one step: the target is chosen before it
    ])
    run_recipe(recipe, config, resolved, train=True, log=lambda _: None)

    assert trainer_pushes == []  # the Trainer never created the repo nor uploaded the full-depth model
    assert len(uploads) == 1
    (upload,) = uploads
    assert upload["repo_id"] == "someone/minilm-collapsed" and upload["kwargs"]["private"] is True
    assert upload["plan"] == upload_plan(out)  # exactly the export folder
    assert upload["config"]["num_hidden_layers"] == 5 and len(upload["config"]["collapsed_layers"]) == 1
    assert "hf-collapse" in upload["card"] and "depth-pruned derivative" in upload["card"]
    assert 'from_pretrained("someone/minilm-collapsed")' in upload["card"]  # the card's snippet names the pushed repo
    # the Trainer's own (full-depth) checkpoint stays local
    assert list((tmp_path / "run").glob("checkpoint-*"))


def test_push_to_hub_needs_a_repo_id():
    from hf_collapse.hub import take_hub_push

    class Args:
        push_to_hub, hub_model_id, hub_private_repo, hub_revision, hub_token = True, None, None, None, None

    with pytest.raises(ValueError, match="hub_model_id"):
        take_hub_push(Args())
    Args.hub_model_id = "me/slim"
    args = Args()
    push = take_hub_push(args)
    assert push.repo_id == "me/slim" and not push.private and args.push_to_hub is False
    assert take_hub_push(args) is None
