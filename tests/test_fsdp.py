"""The MSW penalty under FSDP with two processes on CPU (gloo).

Two facts, each tested: (1) the penalty under real FSDP2 sharding (`fully_shard`, every parameter a DTensor
shard) gives the same step as one unsharded process, with the penalty in it; (2) `accelerate launch` with the
shipped FSDP config made for CPU (`use_cpu: true`) does *not* shard: accelerate 1.x builds FSDP only for GPU-like
devices and runs the job as plain multi-CPU DDP, without a warning. Test (2) fails the day accelerate shards on CPU.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "scripts"
FSDP_CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]


def _reference(out: Path, weight: float) -> dict[str, torch.Tensor]:
    """One unsharded process, in this process."""
    spec = importlib.util.spec_from_file_location("fsdp2_penalty_step", SCRIPTS / "fsdp2_penalty_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(out), weight)
    return torch.load(out / "params.pt")


def test_penalty_step_under_fsdp2_sharding_equals_one_process(tmp_path):
    weight = 50.0  # large enough that the penalty's share of the step shows in the comparison below
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
          f"--master_port={_free_port()}", str(SCRIPTS / "fsdp2_penalty_step.py"), str(tmp_path / "fsdp"), str(weight)])
    ranks = [json.loads((tmp_path / "fsdp" / f"rank_{r}.json").read_text()) for r in range(2)]
    for rank in ranks:  # both ranks ran a sharded step with the penalty
        assert rank["world_size"] == 2 and rank["sharded"] == rank["params"] > 0
        assert rank["metrics"]["msw/penalty"] > 0 and {"msw/layer_0", "msw/layer_2"} <= set(rank["metrics"])
    assert ranks[0]["metrics"]["msw/penalty"] == pytest.approx(ranks[1]["metrics"]["msw/penalty"], rel=1e-6)

    sharded = torch.load(tmp_path / "fsdp" / "params.pt")
    expected = _reference(tmp_path / "one", weight)
    without_penalty = _reference(tmp_path / "none", 0.0)
    assert json.loads((tmp_path / "one" / "rank_0.json").read_text())["metrics"]["msw/penalty"] == pytest.approx(
        ranks[0]["metrics"]["msw/penalty"], rel=1e-5
    )
    for name in expected:
        torch.testing.assert_close(sharded[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    moved = max((expected[n] - without_penalty[n]).abs().max().item() for n in expected)
    assert moved > 1e-3  # the penalty's gradient is part of the step that matched


def test_accelerate_launch_with_the_fsdp_config_on_cpu_falls_back_to_ddp(tmp_path):
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    config.update(use_cpu=True, num_processes=2, mixed_precision="no")
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(config))
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "cpu.yaml"),
          "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
          str(SCRIPTS / "fsdp_step.py"), str(tmp_path / "run")])
    ranks = [json.loads((tmp_path / "run" / f"rank_{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        # trained on both ranks with the penalty, but as DDP: no FSDP plugin, no sharded modules
        assert rank["world_size"] == 2 and rank["local"][0]["msw/penalty"] > 0
        assert (rank["distributed_type"], rank["fsdp"], rank["wrapper"]) == ("MULTI_CPU", False, "DistributedDataParallel")
    logged = [log for log in json.loads((tmp_path / "run" / "logs.json").read_text()) if "loss" in log][0]
    assert logged["msw/penalty"] == pytest.approx(ranks[0]["local"][0]["msw/penalty"], rel=1e-6)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_accelerate_config_loads_and_says_how_to_launch_it(path):
    from accelerate.commands.config.config_args import ClusterConfig

    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file recipes/accelerate/{path.name} -m hf_collapse.cli train")
    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own reader: unknown keys raise
    kind = config.distributed_type.value
    assert kind in ("FSDP", "DEEPSPEED") and config.num_processes > 1 and not config.use_cpu
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
