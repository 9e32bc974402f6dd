"""The engines users scale with: FSDP / DDP / compile / PEFT wrappers, and models dispatched with a device map.

On this CPU-only machine a "dispatched" model is one whose modules carry accelerate's device hooks
(`dispatch_model(..., force_hooks=True)`, the hooks `device_map=` loading installs), and offloading goes to disk.
"""

from __future__ import annotations

import os
import socket

import peft
import pytest
import torch
import torch.distributed as dist
from accelerate import dispatch_model
from test_surgery import assert_same, logits, snapshot
from tiny_models import TINY_MODELS
from torch.distributed.fsdp import FullyShardedDataParallel

from hf_collapse.layers import bypass_layers, find_layer_stacks, unwrap_model
from hf_collapse.scoring import score_layers
from hf_collapse.surgery import collapse_layers

TINY = TINY_MODELS["llama"]
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    **{f"model.layers.{i}": "cpu" for i in range(4)},
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, enough to build FSDP and DDP wrappers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_model_sees_through_fsdp_ddp_compile_and_peft(process_group):
    model = TINY.build()
    fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    assert unwrap_model(fsdp) is model
    assert unwrap_model(torch.compile(fsdp)) is model
    assert len(find_layer_stacks(fsdp)[0]) == 4
    plain = TINY.build()
    assert unwrap_model(torch.nn.parallel.DistributedDataParallel(plain)) is plain
    wrapped = peft.get_peft_model(TINY.build(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap_model(torch.compile(wrapped)) is wrapped.get_base_model()
    assert unwrap_model(plain) is plain


def dispatched():
    return dispatch_model(TINY.build(), device_map=dict(DEVICE_MAP), main_device="cpu", force_hooks=True)


def test_scoring_bypass_and_surgery_on_a_dispatched_model(tmp_path):
    inputs = TINY.inputs()
    plain = TINY.build()
    model = dispatched()
    assert hasattr(model.model.layers[2], "_hf_hook")  # the hooks device_map loading installs
    assert model.hf_device_map == DEVICE_MAP
    expected = score_layers(plain, [inputs], method="block_influence", progress=False)
    got = score_layers(model, [inputs], method="block_influence", progress=False)
    assert got.values == pytest.approx(expected.values, rel=1e-5) and len(got.values) == 4
    with bypass_layers(plain, [1]):
        reference = logits(plain, inputs)
    with bypass_layers(model, [1]):
        torch.testing.assert_close(logits(model, inputs), reference)

    record = collapse_layers(model, [1])
    assert record.outputs_verified
    torch.testing.assert_close(logits(model, inputs), reference)
    # the map follows the kept layers: old layer 2 is now layer 1, and so on; layer 1 is gone
    assert model.hf_device_map == {k: v for k, v in DEVICE_MAP.items() if k != "model.layers.3"}
    model.save_pretrained(tmp_path)
    reloaded, info = TINY.auto_class.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert {k: v for k, v in info.items() if v} == {}
    torch.testing.assert_close(logits(reloaded.eval(), inputs), reference)


def test_a_disk_offloaded_model_is_refused_untouched(tmp_path):
    device_map = dict(DEVICE_MAP, **{"model.layers.1": "disk", "model.layers.2": "disk"})
    model = dispatch_model(TINY.build(), device_map=device_map, offload_dir=str(tmp_path))
    model.hf_device_map = device_map
    before = [(n, p.device.type) for n, p in model.named_parameters()]
    layers = list(model.model.layers)
    with pytest.raises(ValueError, match=r"are offloaded .*Load the model without offloading"):
        collapse_layers(model, [0])
    assert [(n, p.device.type) for n, p in model.named_parameters()] == before
    assert list(model.model.layers) == layers and model.hf_device_map == device_map


def test_fsdp_wrapped_model_collapses_through_the_wrapper(process_group):
    model = TINY.build()
    inputs = TINY.inputs()
    with bypass_layers(model, [2]):
        reference = logits(model, inputs)
    fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        collapse_layers(fsdp, [9])
    assert_same(before, model)
    collapse_layers(fsdp, [2])
    assert len(model.model.layers) == 3
    torch.testing.assert_close(logits(model, inputs), reference)
