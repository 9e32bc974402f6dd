"""CollapseTrainer under real multi-process data parallelism (torchrun, gloo backend, CPU)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_step.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(out: Path, nproc: int, batch: int) -> None:
    # loopback only: the rendezvous and gloo must not look for another interface
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    command = [*(launcher if nproc > 1 else [sys.executable]), str(SCRIPT), str(out), str(batch)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_process_step_equals_one_process_step(tmp_path):
    # [a, b, a, b] with a sequential sampler: each rank's micro-batch of 2 holds the same tokens as the
    # single process's batch of 4, so the penalty per optimizer step must be the same.
    _run(tmp_path / "ddp", nproc=2, batch=2)
    _run(tmp_path / "single", nproc=1, batch=4)
    assert json.loads((tmp_path / "ddp" / "world.json").read_text()) == 2
    ddp = torch.load(tmp_path / "ddp" / "params.pt")
    single = torch.load(tmp_path / "single" / "params.pt")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)

    logged = [log for log in json.loads((tmp_path / "ddp" / "logs.json").read_text()) if "loss" in log][0]
    local = [json.loads((tmp_path / "ddp" / f"local_{r}.json").read_text())[0] for r in range(2)]
    for key in ("msw/layer_0", "msw/layer_2", "msw/penalty"):
        assert logged[key] == pytest.approx((local[0][key] + local[1][key]) / 2, rel=1e-6)
