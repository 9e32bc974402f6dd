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
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import tiny_llama

pytest.importorskip("deepspeed")  # a dev extra: `make install` installs it

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
