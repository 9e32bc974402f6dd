"""CollapseTrainer under DeepSpeed ZeRO-2 and ZeRO-3: two processes on CPU (gloo) through `accelerate launch` with
the shipped configs in recipes/accelerate/ (made for this machine: `use_cpu: true`, `num_processes: 2`; nothing
else changed).

(1) The penalty's SGD step under each stage equals one plain process's: the logged `msw/layer_*` values and the
weights afterwards. (2) The recipe path: ZeRO-2 trains, collapses and exports in one go; ZeRO-3 refuses
`collapse: true` before training with the two-step command, and trains with `collapse: false` to a whole checkpoint
that `hf-collapse collapse` takes. The shipped configs' `mixed_precision: bf16` is taken by a recipe silent on
bf16/fp16 and refused, with the fix named, by one that contradicts it.

DeepSpeed JIT-compiles its `deepspeed_shm_comm` op once per environment (`make install` does it; the fixture below
does it when it has not been done, 80-130 s, and finds it built otherwise).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from test_trainer import tiny_llama
from tiny_models import write_lm_recipe, write_lm_source

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
CONFIGS = ROOT / "recipes" / "accelerate"
BIN = str(Path(sys.executable).parent)
ENV = {
    **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
    # where build_deepspeed_op.py (run by `make install`) builds the op; the venv's ninja first, as at the build
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(stage: int, tmp_path: Path, *command: str, **changes) -> subprocess.CompletedProcess:
    """`accelerate launch` with the shipped ZeRO config of `stage`, made for this machine: two CPU processes (the
    config's `use_cpu`; the `--cpu` flag would launch one plain process instead of DeepSpeed) plus `changes`."""
    shipped = yaml.safe_load((CONFIGS / f"deepspeed_zero{stage}.yaml").read_text())
    config = tmp_path / f"zero{stage}_cpu.yaml"
    config.write_text(yaml.safe_dump({**shipped, "use_cpu": True, "num_processes": 2, **changes}))
    # one two-process launch at a time across pytest-xdist workers: two on 2 cores would starve each other's gloo
    with FileLock(Path(tempfile.gettempdir()) / "hf-collapse-deepspeed-launch.lock"):
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
        return subprocess.run([*launcher, *command], env=ENV, capture_output=True, text=True, timeout=400, cwd=ROOT)


@pytest.fixture(scope="session")
def shm_op():
    """DeepSpeed's CPU communication op, built once (torch's file lock makes a second builder wait)."""
    result = subprocess.run([sys.executable, str(SCRIPTS / "build_deepspeed_op.py")], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one plain process, a batch of 4 = the two ranks' batches of 2 together."""
    out = tmp_path_factory.mktemp("single")
    result = subprocess.run([sys.executable, str(SCRIPTS / "deepspeed_step.py"), str(out), "4"], env=ENV,
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _first_logged(out: Path) -> dict:
    return [log for log in json.loads((out / "logs.json").read_text()) if "loss" in log][0]


@pytest.mark.parametrize("stage", [2, 3])
def test_penalty_step_under_zero_equals_one_process(stage, shm_op, single, tmp_path):
    # in fp32: bf16 rounding would hide what is compared
    result = _launch(stage, tmp_path, str(SCRIPTS / "deepspeed_step.py"), str(tmp_path / "ds"), "2", mixed_precision="no")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ds" / f"local_{r}.json").read_text()) for r in range(2)]
    for rank in ranks:  # DeepSpeed's own engine, at the stage asked for, ran the penalty on both ranks
        assert (rank["world_size"], rank["engine"], rank["stage"]) == (2, "DeepSpeedEngine", stage)
        assert rank["local"][0]["msw/penalty"] > 0

    logged, reference = _first_logged(tmp_path / "ds"), _first_logged(single)
    keys = [key for key in reference if key.startswith("msw/")]
    assert {"msw/layer_0", "msw/layer_2", "msw/penalty"} <= set(keys)
    for key in keys:
        assert logged[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
        assert logged[key] == pytest.approx((ranks[0]["local"][0][key] + ranks[1]["local"][0][key]) / 2, rel=1e-6)
    gathered = torch.load(tmp_path / "ds" / "params.pt")
    expected = torch.load(single / "params.pt")
    initial = tiny_llama().state_dict()
    assert set(gathered) == set(expected)
    for name in expected:  # whole tensors (ZeRO-3 gathered them), equal to the one-process step
        torch.testing.assert_close(gathered[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 1e-3  # the step moved them


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 3-layer Llama with the SmolLM2 tokenizer, and a text file to train on."""
    return write_lm_source(tmp_path_factory.mktemp("world"), num_hidden_layers=3, max_position_embeddings=128)


def _recipe(world: Path, tmp_path: Path, extra: str = "", *, name: str = "recipe",
            collapse: str = "collapse_num_layers: 1\ncollapse_strategy: ranked\ncalibration_samples: 4\n") -> Path:
    fields = "msw_weight: 1.0\nlatency_repeats: 1\n" + collapse + extra
    return write_lm_recipe(tmp_path / f"{name}.yaml", world, tmp_path, fields, max_steps=2, train_batch=2)


def _errors(result) -> list[str]:
    # every rank reports the refusal; through the launcher their lines can reach stderr glued together
    text = result.stderr.replace("hf-collapse train: error:", "\nhf-collapse train: error:")
    return sorted({line for line in text.splitlines() if line.startswith("hf-collapse train: error:")})


def test_zero2_recipe_trains_collapses_and_exports_in_one_go(shm_op, world, tmp_path):
    # the recipe says nothing of bf16: it takes the shipped config's mixed_precision: bf16
    result = _launch(2, tmp_path, "-m", "hf_collapse.cli", "train", str(_recipe(world, tmp_path)))
    assert result.returncode == 0, result.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert model.config.num_hidden_layers == len(model.model.layers) == 2 and len(config["collapsed_layers"]) == 1
    assert json.loads((tmp_path / "out" / "collapse_report.json").read_text())["collapsed_layers"] == config["collapsed_layers"]
    # the exported recipe records the precision taken from the launch
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["bf16"] is True
    assert "perplexity" in result.stdout


def test_zero3_refuses_collapse_in_one_go_then_trains_whole_checkpoint_to_collapse(shm_op, world, tmp_path):
    from transformers import AutoModelForCausalLM

    from test_hardening import tree

    recipe, run, out = _recipe(world, tmp_path), tmp_path / "run", tmp_path / "out"
    source = tree(world / "src")
    refused = _launch(3, tmp_path, "-m", "hf_collapse.cli", "train", str(recipe))
    assert refused.returncode != 0
    assert _errors(refused) == [
        "hf-collapse train: error: collapse: true needs the whole weights in one process to score and remove layers, "
        "but DeepSpeed ZeRO-3 shards them: train with collapse: false and without collapse_layers / "
        f"collapse_num_layers / heal_steps to save the whole fine-tuned model in {run}, then run: "
        f"hf-collapse collapse {run} SLIM --num-layers 1 --data D"
    ], refused.stderr[-3000:]
    assert not run.exists() and not out.exists() and tree(world / "src") == source

    # the two steps the refusal names: train without a collapse, then collapse the saved checkpoint
    two_step = _recipe(world, tmp_path, name="train_only", collapse="collapse: false\n")
    trained = _launch(3, tmp_path, "-m", "hf_collapse.cli", "train", str(two_step))
    assert trained.returncode == 0, trained.stderr[-4000:]
    # saved whole (zero3_save_16bit_model in the shipped config): every tensor at its full shape, none missing
    full = AutoModelForCausalLM.from_pretrained(world / "src")
    model, info = AutoModelForCausalLM.from_pretrained(run, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    moved = 0.0
    for name, tensor in full.state_dict().items():
        assert model.state_dict()[name].shape == tensor.shape, name
        moved = max(moved, (model.state_dict()[name].float() - tensor).abs().max().item())
    assert moved > 1e-4  # trained, not the source written back

    result = subprocess.run([sys.executable, "-m", "hf_collapse.cli", "collapse", str(run), str(tmp_path / "slim"),
                             "--layers", "1"], env=ENV, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    slim = AutoModelForCausalLM.from_pretrained(tmp_path / "slim")
    assert len(slim.model.layers) == 2
    torch.testing.assert_close(slim.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)


# The launcher's environment as `accelerate launch` sets it for each rank, for refusals checked before DeepSpeed starts
DEEPSPEED_BF16 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                  "ACCELERATE_MIXED_PRECISION": "bf16"}


@pytest.mark.parametrize(("given", "environ", "expected"), [
    (set(), DEEPSPEED_BF16, ["--bf16", "true"]),
    (set(), {**DEEPSPEED_BF16, "ACCELERATE_MIXED_PRECISION": "fp16"}, ["--fp16", "true"]),
    ({"bf16"}, DEEPSPEED_BF16, []),  # the recipe's own word stands (and is checked by launch_problem)
    ({"fp16"}, DEEPSPEED_BF16, []),
    (set(), {**DEEPSPEED_BF16, "ACCELERATE_MIXED_PRECISION": "no"}, []),
    (set(), {"ACCELERATE_MIXED_PRECISION": "bf16"}, []),  # not DeepSpeed: the Trainer takes the launcher's as it is
])
def test_a_recipe_silent_on_precision_takes_the_deepspeed_launchs(given, environ, expected):
    from hf_collapse.launch import precision_overrides

    assert precision_overrides(given, environ) == expected


@pytest.mark.parametrize(("fields", "environ", "collapse", "message"), [
    ("bf16: false\n", DEEPSPEED_BF16, "collapse: false\n",
     "the accelerate config sets mixed_precision: bf16 but the recipe sets bf16: false, which DeepSpeed refuses: "
     "set bf16: true in the recipe (or drop its bf16 line), or mixed_precision: 'no' in the accelerate config"),
    ("", {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"}, "collapse_layers: [0, 2]\n",
     "collapse: true needs the whole weights in one process to score and remove layers, but FSDP shards them: "
     "train with collapse: false and without collapse_layers / collapse_num_layers / heal_steps to save the whole "
     "fine-tuned model in {run}, then run: hf-collapse collapse {run} SLIM --layers 0,2"),
], ids=["bf16-contradicted", "fsdp-collapse"])
def test_a_launch_that_cannot_run_the_recipe_is_refused_before_anything_is_written(world, tmp_path, fields, environ,
                                                                                    collapse, message):
    from test_hardening import tree

    recipe, run = _recipe(world, tmp_path, fields, collapse=collapse), tmp_path / "run"
    source = tree(world / "src")
    result = subprocess.run([sys.executable, "-m", "hf_collapse.cli", "train", str(recipe)], env={**ENV, **environ},
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _errors(result) == [f"hf-collapse train: error: {message.format(run=run)}"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not run.exists() and not (tmp_path / "out").exists() and tree(world / "src") == source
