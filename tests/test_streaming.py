"""The streamed collapse (issue 22, part 1): `collapse --layers ... --stream` rewrites a safetensors checkpoint tensor
by tensor and must give exactly what the in-memory collapse exports: the same tensors (names, shapes, dtypes, bytes),
the same config and generation config, the same outputs when generating; what it cannot rewrite exactly goes to the
in-memory path (the report says why), bad sources are refused in one line with nothing written."""

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors
import torch
from test_hardening import one_line, tree
from test_hostile_checkpoints import CASES, planted
from tiny_models import TINY_MODELS
from transformers import AutoModel, AutoTokenizer

from hf_collapse import streaming
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.manifest import ManifestEntry, file_sha256, write_manifest
from hf_collapse.models import resolve_model


def tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                found[name] = (tensor.dtype, tuple(tensor.shape), tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return found


def saved(tmp_path: Path, family: str, *, dtype=torch.float32, tie=None, shard=None, tokenizer=False) -> Path:
    model = TINY_MODELS[family].build()
    if tie is not None:
        model.config.tie_word_embeddings = tie
        model = type(model)(model.config).eval()
    folder = tmp_path / f"src-{family}"
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        AutoTokenizer.from_pretrained(resolve_model("offline:all-MiniLM-L6-v2").path).save_pretrained(folder)
    return folder


def both(src: Path, tmp_path: Path, layers: str, capsys) -> tuple[Path, Path]:
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    assert main(["collapse", str(src), str(streamed), "--layers", layers, "--stream"]) == 0
    assert main(["collapse", str(src), str(in_memory), "--layers", layers]) == 0
    capsys.readouterr()
    return streamed, in_memory


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def assert_same_export(streamed: Path, in_memory: Path) -> None:
    assert tensors(streamed) == tensors(in_memory)
    assert read(streamed, "config.json") == read(in_memory, "config.json")
    assert (streamed / "generation_config.json").is_file() == (in_memory / "generation_config.json").is_file()
    if (in_memory / "generation_config.json").is_file():
        assert read(streamed, "generation_config.json") == read(in_memory, "generation_config.json")
    a, b = read(streamed, "collapse_report.json"), read(in_memory, "collapse_report.json")
    assert a["report"].pop("collapse_path")["path"] == "streaming"
    assert a == b
    manifest = read(streamed, "hf_collapse_manifest.json")
    assert {p.name for p in streamed.iterdir()} - {"hf_collapse_manifest.json"} <= set(json.dumps(manifest).split('"'))
    # the weights' digests were taken while writing them: they must be the bytes on disk
    for name, entry in manifest["files"].items():
        assert (entry["size"], entry["sha256"]) == ((streamed / name).stat().st_size, file_sha256(streamed / name)), name


def test_sharded_bf16_llama_with_tied_embeddings_streams_to_the_in_memory_export(tmp_path, capsys):
    src = saved(tmp_path, "llama", dtype=torch.bfloat16, tie=True, shard="20KB", tokenizer=True)
    before = tree(src)
    streamed, in_memory = both(src, tmp_path, "1,2", capsys)
    assert tree(src) == before
    assert_same_export(streamed, in_memory)
    assert "lm_head.weight" not in tensors(streamed)  # tied: written once, as save_pretrained writes it
    assert {dtype for dtype, _, _ in tensors(streamed).values()} == {torch.bfloat16}
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert len(shards) > 1 and max(p.stat().st_size for p in streamed.glob("*.safetensors")) <= 20_000 + 4096
    index = read(streamed, "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == shards and sorted(index["weight_map"]) == sorted(tensors(streamed))
    assert read(streamed, "tokenizer.json") == read(in_memory, "tokenizer.json")
    report = read(streamed, "collapse_report.json")["report"]["collapse_path"]
    assert report["structure_check"] is True and report["probe_check"].startswith("passed on the whole model")
    from transformers import AutoModelForCausalLM

    prompt = TINY_MODELS["llama"].inputs(batch=1, length=5)["input_ids"]
    outputs = [AutoModelForCausalLM.from_pretrained(f).generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
               for f in (streamed, in_memory)]
    assert torch.equal(*outputs) and outputs[0].shape[1] == 11


def test_chunked_copy_hashes_and_checks_across_chunk_boundaries(tmp_path, capsys, monkeypatch):
    # chunks far smaller than a tensor: the two buffers alternate while the hashing thread still reads the other one
    monkeypatch.setattr(streaming, "_CHUNK", 1000)
    src = saved(tmp_path, "llama", dtype=torch.bfloat16, shard="20KB")
    streamed, in_memory = both(src, tmp_path, "2", capsys)
    assert_same_export(streamed, in_memory)
    nan = tmp_path / "nan"
    shutil.copytree(src, nan)
    shard = sorted(nan.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-2:] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()  # the last value
    shard.write_bytes(bytes(data))
    assert main(["collapse", str(nan), str(tmp_path / "out"), "--layers", "2", "--stream"]) == EXIT_REFUSED
    assert "non-finite weights" in one_line(capsys) and not (tmp_path / "out").exists()


def test_manifest_takes_a_known_digest_only_while_the_size_matches(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"defg")
    fake = ManifestEntry(3, "0" * 64)
    write_manifest(tmp_path, {"a.bin": fake, "b.bin": ManifestEntry(99, "1" * 64)})
    files = read(tmp_path, "hf_collapse_manifest.json")["files"]
    assert files["a.bin"]["sha256"] == "0" * 64  # taken as given: its writer hashed what it wrote
    assert files["b.bin"] == {"size": 4, "sha256": file_sha256(tmp_path / "b.bin")}  # size differs: read again


def test_gemma3_layer_types_follow_the_kept_layers_as_in_memory(tmp_path, capsys):
    src = saved(tmp_path, "gemma3")
    streamed, in_memory = both(src, tmp_path, "1", capsys)
    assert_same_export(streamed, in_memory)
    config = read(streamed, "config.json")
    assert config["num_hidden_layers"] == len(config["layer_types"]) == 3
    assert config["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]


def test_single_file_bert_streams_to_the_in_memory_export(tmp_path, capsys):
    src = saved(tmp_path, "bert")
    streamed, in_memory = both(src, tmp_path, "0,3", capsys)
    assert_same_export(streamed, in_memory)
    assert sorted(p.name for p in streamed.glob("*.safetensors")) == ["model.safetensors"]
    inputs = TINY_MODELS["bert"].inputs()
    with torch.no_grad():
        a, b = (AutoModel.from_pretrained(f)(**inputs).last_hidden_state for f in (streamed, in_memory))
    assert torch.equal(a, b)


def test_a_family_whose_collapse_edits_weights_falls_back_to_the_in_memory_path(tmp_path, capsys):
    src = saved(tmp_path, "gpt2-inverse-scaling")
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    assert main(["collapse", str(src), str(streamed), "--layers", "1", "--stream"]) == 0
    assert "collapsing in memory" in capsys.readouterr().out
    assert main(["collapse", str(src), str(in_memory), "--layers", "1"]) == 0
    assert tensors(streamed) == tensors(in_memory)
    path = read(streamed, "collapse_report.json")["report"]["collapse_path"]
    assert path["path"] == "in-memory" and "scale_attn_by_inverse_layer_idx" in path["reason"]


def test_above_the_probe_limit_only_the_structure_is_checked_and_the_report_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streaming, "PROBE_LIMIT", 1000)
    src = saved(tmp_path, "llama")
    assert main(["collapse", str(src), str(tmp_path / "out"), "--layers", "1", "--stream"]) == 0
    path = read(tmp_path / "out", "collapse_report.json")["report"]["collapse_path"]
    assert path["structure_check"] is True and path["probe_check"].startswith("not run: the weights")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "src"
    TINY_MODELS["llama"].build().save_pretrained(folder)
    return folder


def sharded_source(tmp_path: Path, change) -> Path:
    folder = tmp_path / "src"
    TINY_MODELS["llama"].build().save_pretrained(folder, max_shard_size="20KB")
    change(folder)
    return folder


def drop_last_shard(folder):
    max(folder.glob("model-*.safetensors")).unlink()


def index_names_absent_tensor(folder):
    index = read(folder, "model.safetensors.index.json")
    index["weight_map"]["model.layers.3.mlp.extra.weight"] = min(folder.glob("model-*.safetensors")).name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


SHARDED_CASES = [
    ("missing shard", drop_last_shard, r"names the weights file 'model-\d+-of-\d+.safetensors', which is not in"),
    ("index names an absent tensor", index_names_absent_tensor,
     r"model.safetensors.index.json names model.layers.3.mlp.extra.weight in model-00001-of-\d+.safetensors, which "
     r"does not hold it"),
]


@pytest.mark.parametrize("change, pattern", [c[1:] for c in CASES] + [c[1:] for c in SHARDED_CASES],
                         ids=[c[0] for c in CASES] + [c[0] for c in SHARDED_CASES])
def test_a_broken_source_is_refused_in_one_line_with_nothing_written(source, tmp_path, capsys, change, pattern):
    src = sharded_source(tmp_path, change) if (change, pattern) in [c[1:] for c in SHARDED_CASES] else \
        planted(source, tmp_path, change)
    before = tree(src)
    assert main(["collapse", str(src), str(tmp_path / "out"), "--layers", "1", "--stream"]) == EXIT_REFUSED
    line = one_line(capsys)
    assert line.startswith("hf-collapse collapse: error: ") and re.search(pattern, line), line
    assert tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no staging folder, no lock


def test_a_destination_without_room_is_refused_before_writing(source, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    assert main(["collapse", str(source), str(tmp_path / "out"), "--layers", "1", "--stream"]) == EXIT_REFUSED
    line = one_line(capsys)
    assert re.search(r"has 0.00 GiB free but the collapsed weights need 0.00 GiB: free some space", line), line
    assert list(tmp_path.iterdir()) == []


def test_stream_with_data_is_refused(source, tmp_path, capsys):
    assert main(["collapse", str(source), str(tmp_path / "out"), "--num-layers", "1", "--data", "x.csv",
                 "--stream"]) == EXIT_REFUSED
    assert "--stream rewrites a checkpoint for an explicit --layers list without data" in one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_benchmark_quick_run_compares_the_written_tensors_and_the_layer_types_config(tmp_path):
    from benchmarks import streaming as bench

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nkept as it is\n")
    argv = ["--quick", "--arms", "stream,in-memory", "--output", str(tmp_path / "out"), "--results", str(results_md)]
    assert bench.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    tiny = results["models"]["tiny"]
    assert tiny["removed"] == [5, 6] and tiny["reference"] == "stream"
    assert tiny["source"]["shards"] > 1 and tiny["source"]["dtype_code"] == "BF16"
    for arm in ("stream", "in-memory"):
        data = tiny["arms"][arm]
        assert data["equal_to_reference"] is True and data["config"] == {"num_hidden_layers": 6, "layer_types": 0}
        assert len(data["wall"]) == len(data["rss"]) == 1 and data["rss"][0] > 0
    # tied embeddings written once: 2 + 9 per layer for the 6 kept layers
    assert tiny["arms"]["stream"]["tensors"] == 2 + 9 * 6
    case = results["layer_types"]["stream"]
    assert case["consistent"] is True and case["loads"] == "yes, sliding window per layer: [True, True, False]"
    text = results_md.read_text()
    assert text.startswith("# Results\n\nkept as it is\n") and text.count(bench.SECTION_BEGIN) == 1
    assert "| tiny |" in text and "| in-memory | 1 |" in text
    assert not (tmp_path / "out-work" / "synthetic-tiny").exists()
