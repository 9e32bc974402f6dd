"""A checkpoint whose architecture is its own Python code (issue 13): refused unless `trust_remote_code` is asked for,
then collapsed like any model, exported with its code, and said so in the card and the report."""

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_collapse.report import CollapseReport
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.layers import bypass_layers

ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ["configuration_tiny.py", "modeling_tiny.py"]
TEXTS = ["To be, or not to be, that is the question", "Whether 'tis nobler in the mind to suffer"]

CONFIGURATION = '''
from pathlib import Path

from transformers import LlamaConfig

Path({marker!r}).open("a").write("configuration_tiny ran\\n")  # evidence that this file was executed


class TinyConfig(LlamaConfig):
    model_type = "hfc-tiny-remote"
'''
MODELING = '''
from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


def tree(path: Path) -> dict:
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def tokenizer():
    from hf_collapse.assets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def make_checkpoint(folder: Path, tokenizer, marker: Path) -> Path:
    """A 4-layer Llama saved as a custom-code checkpoint: `auto_map` points at the folder's own two files."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "configuration_tiny.py").write_text(textwrap.dedent(CONFIGURATION.format(marker=str(marker))))
    (folder / "modeling_tiny.py").write_text(textwrap.dedent(MODELING))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hfc-tiny-remote", architectures=["TinyForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line[line.index("hf-collapse "):] for line in err.splitlines() if "hf-collapse " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def text_file(tmp_path):
    from hf_collapse.assets import shakespeare_works

    path = tmp_path / "hamlet.txt"
    path.write_text(shakespeare_works()["hamlet"][:6000])
    return path


@pytest.mark.parametrize("how", ["layers, no data", "chosen on data", "validate"])
def test_a_checkpoint_with_its_own_code_is_refused_without_the_flag(tmp_path, tokenizer, text_file, capsys, how):
    marker = tmp_path / "code-ran.txt"
    src = make_checkpoint(tmp_path / f"remote-refused-{how.split(',')[0].replace(' ', '-')}", tokenizer, marker)
    out = tmp_path / "out"
    before = tree(tmp_path)
    if how == "validate":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"model_name_or_path: {src}\ntask: causal-lm\ndataset_files: [{text_file}]\n"
                          f"collapse_num_layers: 1\noutput_dir: {out}\n")
        before = tree(tmp_path)
        argv = ["validate", str(recipe)]
    elif how == "layers, no data":
        argv = ["collapse", str(src), str(out), "--layers", "1"]
    else:
        argv = ["collapse", str(src), str(out), "--num-layers", "1", "--data", str(text_file), "--task", "causal-lm"]
    assert main(argv) == EXIT_REFUSED
    line = one_line(capsys)
    assert f"{src} needs its own Python code to load (trust_remote_code)" in line
    assert "set trust_remote_code: true" in line and "--trust-remote-code" in line and "you have read" in line
    assert not marker.exists()  # the checkpoint's code never ran
    assert tree(tmp_path) == before  # nothing written: no OUT, no OUT.work, the source byte-identical


@pytest.fixture
def collapsed(tmp_path, tokenizer, capsys):
    """`hf-collapse collapse SRC OUT --layers 1 --trust-remote-code`, and the source's logits with layer 1 bypassed."""
    marker = tmp_path / "code-ran.txt"
    src = make_checkpoint(tmp_path / "remote-collapsed", tokenizer, marker)
    source_files = tree(src)
    out = tmp_path / "out"
    assert main(["collapse", str(src), str(out), "--layers", "1", "--trust-remote-code"]) == 0, capsys.readouterr().err
    assert tree(src) == source_files
    original = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True).eval()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), bypass_layers(original, [1]):
        bypassed = original(**inputs).logits
    return {"src": src, "out": out, "marker": marker, "inputs": inputs, "bypassed": bypassed}


def test_with_the_flag_the_export_ships_its_code_and_loads_with_the_same_logits(collapsed):
    out = collapsed["out"]
    assert collapsed["marker"].exists()  # asked for, the code ran
    for name in CODE_FILES:  # save_pretrained copied the checkpoint's code, unchanged
        assert (out / name).read_bytes() == (collapsed["src"] / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hfc-tiny-remote" and config["num_hidden_layers"] == 3
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tiny.TinyForCausalLM"
    assert config["collapsed_layers"] == [1]

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyForCausalLM" and len(model.model.layers) == 3
    with torch.no_grad():
        logits = model(**collapsed["inputs"]).logits
    torch.testing.assert_close(logits, collapsed["bypassed"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):  # and without the flag it is not loaded
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_the_card_and_the_report_say_the_model_needs_its_code(collapsed):
    out = collapsed["out"]
    stored = json.loads((out / "collapse_report.json").read_text())["report"]
    assert stored["trust_remote_code"] is True and stored["remote_code_files"] == CODE_FILES
    card = (out / "README.md").read_text()
    assert "**This model needs `trust_remote_code=True` to load**" in card
    assert "(`configuration_tiny.py`, `modeling_tiny.py`)" in card
    assert re.search(r'AutoModelForCausalLM\.from_pretrained\("[^"]+", trust_remote_code=True\)', card)
    assert "pipeline_tag: text-generation" in card  # from the Auto class its code registers
    assert "nothing custom is needed to load it" not in card
    assert "Loading runs the code files that ship with the model" in card


def test_lm_eval_results_are_added_to_a_remote_code_export_without_running_code_implicitly(collapsed):
    from hf_collapse.report import BenchmarkResult
    from hf_collapse.export import add_benchmarks

    card = add_benchmarks(collapsed["out"], [BenchmarkResult("hellaswag", "acc_norm", 0.3, 0.29)])
    text = card.read_text()
    assert "| hellaswag | acc_norm |" in text and "trust_remote_code=True" in text


def test_collapsing_on_data_with_the_flag_goes_through_the_recipe_loaders(tmp_path, tokenizer, text_file, capsys):
    src = make_checkpoint(tmp_path / "remote-on-data", tokenizer, tmp_path / "code-ran.txt")
    out = tmp_path / "out"
    code = main(["collapse", str(src), str(out), "--num-layers", "1", "--data", str(text_file), "--task", "causal-lm",
                 "--trust-remote-code", "--collapse_strategy", "ranked", "--latency_repeats", "0", "--max_length", "32",
                 "--calibration_samples", "4", "--max_eval_samples", "8", "--use_cpu", "true"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert json.loads((out / "collapse_report.json").read_text())["report"]["trust_remote_code"] is True
    assert sorted(p.name for p in out.glob("*.py")) == CODE_FILES
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyForCausalLM" and model.config.num_hidden_layers == 3


def test_a_report_without_the_fields_still_loads_and_code_files_need_the_flag():
    old = dict(base_model="some/model", removed_layers=[1], layers_before=4, num_parameters_before=100,
               num_parameters_after=80, scores=None, score_method=None)
    report = CollapseReport.from_dict(old)  # a collapse_report.json written before the fields existed
    assert report.trust_remote_code is False and report.remote_code_files == []
    assert CollapseReport.from_dict(report.to_dict()) == report
    with pytest.raises(ValueError, match="remote_code_files is set but trust_remote_code is not"):
        CollapseReport(**old, remote_code_files=["modeling_x.py"])


def test_nothing_in_the_package_sets_trust_remote_code_by_itself():
    """No from_pretrained call of the package passes trust_remote_code=True (or None, which lets transformers ask on
    the terminal); the loaders that take it pass the caller's flag."""
    import ast

    passed = []
    for path in sorted((ROOT / "hf_collapse").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        passed.append((path.name, ast.unparse(keyword.value)))
    assert passed and not [p for p in passed if p[1] in ("True", "None")], passed
    assert {name for name, _ in passed} >= {"models.py", "pipeline.py", "export.py"}


def test_a_module_that_auto_map_names_but_save_pretrained_skips_is_copied_from_the_source(tmp_path, tokenizer, capsys):
    src = make_checkpoint(tmp_path / "remote-extra", tokenizer, tmp_path / "code-ran.txt")
    (src / "modeling_extra.py").write_text("from .modeling_tiny import TinyForCausalLM as TinyLMHeadModel\n")
    config = json.loads((src / "config.json").read_text())
    config["auto_map"]["AutoModelWithLMHead"] = "modeling_extra.TinyLMHeadModel"  # never loaded, so never saved
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["collapse", str(src), str(out), "--layers", "2", "--trust-remote-code"]) == 0, capsys.readouterr().err
    assert (out / "modeling_extra.py").read_bytes() == (src / "modeling_extra.py").read_bytes()
    stored = json.loads((out / "collapse_report.json").read_text())["report"]
    assert stored["remote_code_files"] == ["configuration_tiny.py", "modeling_extra.py", "modeling_tiny.py"]

    (src / "modeling_extra.py").unlink()  # named in auto_map, nowhere to be found: the export would not load
    assert main(["collapse", str(src), str(tmp_path / "out2"), "--layers", "2", "--trust-remote-code"]) == EXIT_REFUSED
    assert "names the code module 'modeling_extra'" in one_line(capsys)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2.*"))
