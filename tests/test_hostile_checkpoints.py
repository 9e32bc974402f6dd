"""Hostile checkpoints (issue 24): sources that disagree with themselves or are broken are refused in one line with
nothing written; a re-collapse is recorded in one numbering; a full disk ends in one line with nothing left behind."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_hardening import one_line, tree
from tiny_models import TINY_MODELS
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_collapse import collapse_model
from hf_collapse.cli import EXIT_FAILED, EXIT_REFUSED, main
from hf_collapse.export import export_collapsed
from hf_collapse.models import resolve_model
from hf_collapse.surgery.verify import _output_differences

TINY = TINY_MODELS["llama"]


def six_layers(seed: int = 0):
    config = TINY.config()
    config.num_hidden_layers = 6
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny 4-layer Llama saved with a tokenizer."""
    folder = tmp_path_factory.mktemp("hostile") / "src"
    TINY.build().save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("offline:all-MiniLM-L6-v2").path).save_pretrained(folder)
    return folder


def planted(source: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(source, folder)
    change(folder)
    return folder


def edit_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def weights(data):
    def change(folder):
        file = folder / "model.safetensors"
        file.write_bytes(data(file.read_bytes()))
    return change


def non_finite(name, value):
    def change(folder):
        file = folder / "model.safetensors"
        tensors = safetensors.torch.load_file(file)
        tensors[name][0, 0] = value
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    return change


CASES = [
    ("fewer layers declared", edit_config(num_hidden_layers=3),
     r"holds weights of layer 3 of model.layers but its config declares LlamaConfig.num_hidden_layers=3 layers.*dropped"),
    ("more layers declared", edit_config(num_hidden_layers=6),
     r"has no weights for layer 4 of model.layers but its config declares LlamaConfig.num_hidden_layers=6 .*randomly"),
    ("NaN weight", non_finite("model.layers.2.mlp.up_proj.weight", float("nan")),
     r"non-finite weights \(NaN or infinity\) in model.layers.2.mlp.up_proj.weight"),
    ("infinite weight", non_finite("model.embed_tokens.weight", float("inf")),
     r"non-finite weights \(NaN or infinity\) in model.embed_tokens.weight"),
    ("empty weights", weights(lambda b: b""), r"model.safetensors is 0 bytes long"),
    ("truncated weights", weights(lambda b: b[:-100]), r"model.safetensors is truncated: its header describes"),
    ("random bytes", weights(lambda b: bytes(range(256)) * 40), r"model.safetensors does not start with a safetensors header"),
    ("garbled header", weights(lambda b: b[:8] + b"\xff" * 16 + b[24:]), r"model.safetensors has an unreadable safetensors header"),
    ("modules.json is a dict", lambda f: (f / "modules.json").write_text('{"0": {"path": "", "type": "x"}}'),
     r"modules.json must be a list of modules .* it holds a dict"),
]


@pytest.mark.parametrize("change, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_self_contradicting_source_is_refused(source, tmp_path, capsys, change, pattern):
    import re

    src = planted(source, tmp_path, change)
    before = tree(src)
    out = tmp_path / "out"
    assert main(["collapse", str(src), str(out), "--layers", "1"]) == EXIT_REFUSED
    line = one_line(capsys)
    assert line.startswith("hf-collapse collapse: error: ") and re.search(pattern, line), line
    assert tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT, no staging, no work folder


@pytest.mark.parametrize("target", ["weights", "tokenizer"])
def test_a_full_disk_while_writing_ends_in_one_line_with_nothing_left(source, tmp_path, capsys, monkeypatch, target):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "weights":
        import transformers.modeling_utils

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    else:
        from transformers import PreTrainedTokenizerBase

        monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    before = tree(source)
    out = tmp_path / "out"
    assert main(["collapse", str(source), str(out), "--layers", "1"]) == EXIT_FAILED
    line = one_line(capsys)
    assert "writing the export" in line and "nothing of it was kept" in line and "No space left on device" in line
    assert list(tmp_path.iterdir()) == []  # OUT absent, its staging folder removed
    assert tree(source) == before


def test_a_full_disk_while_writing_a_checkpoint_ends_in_one_line(tmp_path, capsys, monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_checkpoint", full)
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [f'"{w}",{y}' for w, y in zip(["good", "bad", "fine", "dull"] * 4, ["pos", "neg"] * 8)]
    (folder / "train.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    src = tmp_path / "src"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("offline:all-MiniLM-L6-v2").path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        max_position_embeddings=64, num_labels=2,
    )).save_pretrained(src)
    tokenizer.save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model_name_or_path: {src}\ntask: text-classification\ndataset_files: [{folder / 'train.csv'}]\n"
        f"output_dir: {tmp_path / 'run'}\nexport_dir: {tmp_path / 'export'}\nmax_steps: 2\nsave_steps: 1\n"
        "per_device_train_batch_size: 4\nmax_length: 32\ncollapse_num_layers: 1\nreport_to: none\n"
    )
    assert main(["train", str(recipe)]) == EXIT_FAILED
    line = one_line(capsys)
    assert "No space left on device" in line and "work had begun" in line
    assert not (tmp_path / "export").exists()


def test_recollapse_is_recorded_in_the_original_numbering_everywhere(tmp_path, capsys):
    src, once, twice = tmp_path / "src", tmp_path / "once", tmp_path / "twice"
    six_layers().save_pretrained(src)
    assert main(["collapse", str(src), str(tmp_path / "step1"), "--layers", "1"]) == 0
    capsys.readouterr()
    assert main(["collapse", str(tmp_path / "step1"), str(twice), "--layers", "2"]) == 0  # layer 3 of the original
    printed = capsys.readouterr().out
    assert main(["collapse", str(src), str(once), "--layers", "1,3"]) == 0
    assert "removed layers (0-based, original numbering): [3]: 5 -> 4 layers" in printed
    for folder in (once, twice):
        assert json.loads((folder / "config.json").read_text())["collapsed_layers"] == [1, 3]
        assert json.loads((folder / "collapse_report.json").read_text())["collapsed_layers"] == [1, 3]
    card = (twice / "README.md").read_text()
    assert "Removed layers (0-based, numbered as in the original model): **3**." in card
    assert "it had already lost layers 1 of the original model" in card
    assert "In the source checkpoint's own numbering this collapse removed layers 2." in card
    inputs = TINY.inputs()
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(once)(**inputs).logits
        b = AutoModelForCausalLM.from_pretrained(twice)(**inputs).logits
    assert torch.equal(a, b)


def test_export_refuses_another_models_report_and_no_report(tmp_path):
    collapsed, report = collapse_model(six_layers(), layers=[1, 3])
    never = six_layers(seed=1)
    never.config.num_hidden_layers = 4
    stranger = AutoModelForCausalLM.from_config(never.config).eval()  # 4 layers, never collapsed
    with pytest.raises(ValueError, match=r"the report says layers \[1, 3\] were removed but this model was never collapsed"):
        export_collapsed(stranger, tmp_path / "out", report=report)
    with pytest.raises(ValueError, match=r"export_collapsed needs the CollapseReport .* got NoneType"):
        export_collapsed(collapsed, tmp_path / "out", report=None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["reference", "collapsed", "both"])
def test_verification_counts_nan_as_a_difference(where):
    reference = {"logits": torch.ones(2, 3)}
    got = {"logits": torch.ones(2, 3)}
    for side in ([reference, got] if where == "both" else [reference if where == "reference" else got]):
        side["logits"][0, 1] = float("nan")
    differences = _output_differences(reference, got, torch.float32)
    assert len(differences) == 1 and "output 'logits' differs" in differences[0]
    assert _output_differences({"logits": torch.ones(2, 3)}, {"logits": torch.ones(2, 3)}, torch.float32) == []
