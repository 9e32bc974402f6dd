"""Hardening (issue 13): bad input refused in one line with nothing written, faults that leave nothing of ours behind,
numerics of the penalty at the edges, and secrets that never reach disk."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer import LogRecorder, config, lm_dataset, tiny_llama
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from hf_collapse import CollapseTrainer, collapse_model, max_sliced_wasserstein
from hf_collapse.cli import EXIT_FAILED, EXIT_REFUSED, main
from hf_collapse.export import clear_stale, export_collapsed
from hf_collapse.hub import upload_plan
from hf_collapse.models import resolve_model
from hf_collapse.paths import sibling_prefix
from hf_collapse.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself) with the hash of its bytes; {} when absent."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny 4-layer BERT classifier with the real MiniLM tokenizer (position limit 64), and labelled CSV files."""
    root = tmp_path_factory.mktemp("world")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("offline:all-MiniLM-L6-v2").path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        max_position_embeddings=64, num_labels=2,
    ))
    src = root / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    words = ["good film", "bad film", "great", "awful", "fine", "meh", "lovely", "dull", "superb", "boring"] * 2
    labels = ["pos", "neg"] * 10

    def csv(name, rows, header="text,label"):
        path = root / name
        path.write_text(header + "\n" + "\n".join(rows) + "\n")
        return path

    files = {
        "strings": csv("strings.csv", [f'"{w}",{y}' for w, y in zip(words, labels)]),
        "floats": csv("floats.csv", [f'"{w}",{0.5 + i}' for i, w in enumerate(words)]),
        "one_class": csv("one_class.csv", [f'"{w}",pos' for w in words]),
        "unlabelled": csv("unlabelled.csv", [f'"{w}",{y if i != 3 else ""}' for i, (w, y) in enumerate(zip(words, labels))]),
        "empty": csv("empty.csv", []),
        "text": root / "notes.txt",
    }
    files["text"].write_text("some text\n")
    (root / "no_config").mkdir()
    (root / "no_config" / "weights.safetensors").write_bytes(b"x")
    return {"root": root, "src": src, "files": files}


class Raw(str):
    """A recipe value written as-is (YAML syntax), not as a JSON string."""


def recipe_text(world, out, **fields):
    base = dict(
        model_name_or_path=str(world["src"]), dataset_files=[str(world["files"]["strings"])],
        output_dir=str(out / "run"), export_dir=str(out / "export"), max_steps=1, use_cpu=True, report_to="none",
        save_strategy="no", collapse_num_layers=1, target_choice="post_hoc", collapse_strategy="ranked",
        latency_repeats=0, max_length=32, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        eval_fraction=0.3, calibration_samples=4,
    )
    base.update(fields)
    return "".join(f"{k}: {v if isinstance(v, Raw) else json.dumps(v)}\n" for k, v in base.items() if v is not None)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    # a progress bar may end without a newline just before the message
    lines = [line[line.index("hf-collapse "):] for line in err.splitlines() if "hf-collapse " in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# (name, recipe fields or raw text, extra CLI arguments, the message's pattern)
RECIPE_CASES = [
    ("unknown key", {"learnig_rate": 1}, [], r"unknown key 'learnig_rate'.*did you mean 'learning_rate'"),
    ("duplicate key", "model_name_or_path: m\nmax_steps: 1\nmax_steps: 2\n", [], r"sets 'max_steps' twice \(lines 2 and 3\); keep one"),
    ("not yaml", "model_name_or_path: [unclosed\n", [], r"is not valid YAML"),
    ("python tag", "model_name_or_path: !!python/object/apply:os.system [echo pwned]\n", [], r"not valid YAML.*constructor"),
    ("infinite weight", {"msw_weight": Raw(".inf")}, [], r"msw_weight must be a number >= 0 \(and finite\)"),
    ("negative weight", {"msw_weight": -1}, [], r"msw_weight must be a number >= 0"),
    ("not a number", {"max_steps": "ten"}, [], r"invalid int value: 'ten'"),
    ("bad task", {"task": "translation"}, [], r"task must be one of"),
    ("two choices", {"collapse_layers": [1]}, [], r"set exactly one of collapse_layers, collapse_num_layers"),
    ("unknown flag", {}, ["--msw_wieght", "1"], r"unknown option --msw_wieght"),
    ("missing model path", {"model_name_or_path": "/nonexistent/model"}, [], r"/nonexistent/model: that path does not exist"),
    ("folder without config", {"model_name_or_path": "{root}/no_config"}, [], r"has no config.json"),
    ("unknown offline model", {"model_name_or_path": "offline:gpt-17"}, [], r"unknown offline model 'offline:gpt-17'"),
    ("budget above depth", {"collapse_num_layers": 4}, [], r"collapse_num_layers 4 would remove all of the model's 4 layers.*at most 3"),
    ("layer that does not exist", {"collapse_num_layers": None, "collapse_layers": [7]}, [], r"collapse_layers \[7\] do not exist: the model has 4 layers"),
    ("budget above unprotected", {"collapse_num_layers": 3, "collapse_protect_first": 2}, [], r"only 2 of the model's 4 layers are not protected"),
    ("max_length above positions", {"max_length": 512}, [], r"max_length 512 is above the model's position limit of 64"),
    ("missing text column", {"text_column": "review"}, [], r"no column 'review' \(text_column\)"),
    ("missing label column", {"label_column": "stars"}, [], r"no column 'stars' \(label_column\)"),
    ("missing data file", {"dataset_files": ["{root}/absent.csv"]}, [], r"dataset file .*absent.csv does not exist"),
    ("mixed data files", {"dataset_files": ["{root}/strings.csv", "{root}/notes.txt"]}, [], r"must all be of one kind"),
    ("regression labels", {"dataset_files": ["{root}/floats.csv"]}, [], r"non-integer numbers .*class labels"),
    ("one class", {"dataset_files": ["{root}/one_class.csv"]}, [], r"single class \(pos\).*at least two"),
    ("unlabelled row", {"dataset_files": ["{root}/unlabelled.csv"]}, [], r"has no value in the label column 'label'"),
    ("no such split", {"train_split": "training"}, [], r"has no split 'training' \(train_split\)"),
    ("no data named", {"dataset_files": None}, [], r"names no data"),
    ("resume without checkpoint", {"resume_from_checkpoint": "true"}, [], r"no complete checkpoint-N folder"),
    ("resume from nowhere", {"resume_from_checkpoint": "/nonexistent/checkpoint-3"}, [], r"cannot resume from /nonexistent/checkpoint-3: it is not a folder"),
    ("export inside source", {"export_dir": "{src}/collapsed"}, [], r"export_dir .* overlaps the source checkpoint"),
    ("output inside source", {"output_dir": "{src}/run"}, [], r"output_dir .* overlaps the source checkpoint"),
    ("push without repo", {"push_to_hub": True}, [], r"push_to_hub is set but hub_model_id is not"),
]


@pytest.mark.parametrize("name,fields,extra,pattern", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_input_is_refused_in_one_line_and_writes_nothing(world, tmp_path, capsys, name, fields, extra, pattern):
    out = tmp_path / "out"
    if isinstance(fields, str):
        text = fields
    else:
        fields = {k: (v if isinstance(v, Raw) else v.format(root=world["root"], src=world["src"]) if isinstance(v, str) else
                      [x.format(root=world["root"]) for x in v] if isinstance(v, list) and v and isinstance(v[0], str) else v)
                  for k, v in fields.items()}
        text = recipe_text(world, out, **fields)
        if fields.get("dataset_files", 0) is None:
            text = text.replace("dataset_files", "# dataset_files")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    before_src, before_tmp = tree(world["src"]), tree(tmp_path)
    code = main(["train", str(path), *extra])
    line = one_line(capsys)
    assert code == EXIT_REFUSED, line
    assert line.startswith("hf-collapse train: error: ")
    import re

    assert re.search(pattern, line), line
    assert tree(world["src"]) == before_src
    assert tree(tmp_path) == before_tmp  # no output_dir, no export, no staging, no work folder


def test_a_non_empty_export_is_refused_before_training_and_kept(world, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "mine.txt").write_text("keep me")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(world, out))
    before = tree(tmp_path)
    assert main(["train", str(path)]) == EXIT_REFUSED
    line = one_line(capsys)
    assert "already exists and is not empty" in line and "overwrite_export: true" in line
    assert tree(tmp_path) == before and not (out / "run").exists()


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["{src}", "{src}/sub", "--layers", "1"], r"overlaps the source checkpoint"),
        (["{src}", "{src}/sub", "--num-layers", "1", "--data", "{root}/strings.csv"], r"overlaps the source checkpoint"),
        (["{src}", "{tmp}/c", "--layers", "a,b"], r"--layers takes comma-separated integers"),
        (["{src}", "{tmp}/c", "--layers", "9"], r"layer 9|9"),
        (["{src}", "{tmp}/c", "--num-layers", "1"], r"choosing layers needs data"),
        (["{src}", "{tmp}/c", "--num-layers", "4", "--data", "{root}/strings.csv"], r"would remove all of the model's 4 layers"),
        (["/nonexistent/src", "{tmp}/c", "--layers", "1", "--data", "{root}/strings.csv"], r"that path does not exist"),
    ],
    ids=["out inside src", "out inside src with data", "layers not integers", "layer beyond depth", "no data",
         "budget above depth", "missing source"],
)
def test_bad_collapse_input_leaves_source_and_destination_untouched(world, tmp_path, capsys, argv, pattern):
    import re

    argv = [a.format(src=world["src"], root=world["root"], tmp=tmp_path) for a in argv]
    before_src, before_tmp = tree(world["src"]), tree(tmp_path)
    assert main(["collapse", *argv]) == EXIT_REFUSED
    line = one_line(capsys)
    assert re.search(pattern, line), line
    assert tree(world["src"]) == before_src  # byte-identical: no SRC/sub, no SRC/sub.work
    assert tree(tmp_path) == before_tmp


@pytest.mark.parametrize("content,pattern", [
    ({"config.json": "{}", "README.md": "card"}, r"has no .safetensors weights"),
    ({"config.json": "{}", "README.md": "card", "model.safetensors": "x", "pytorch_model.bin": "x"}, r"pickled files \(pytorch_model.bin\)"),
    ({"model.safetensors": "x"}, r"has no config.json or README.md"),
], ids=["no weights", "pickled weights", "no card"])
def test_push_refuses_a_folder_that_is_not_a_safe_export(tmp_path, capsys, content, pattern):
    import re

    for name, text in content.items():
        (tmp_path / name).write_text(text)
    before = tree(tmp_path)
    assert main(["push", str(tmp_path), "--repo-id", "me/x", "--dry-run"]) == EXIT_REFUSED
    assert re.search(pattern, one_line(capsys))
    assert tree(tmp_path) == before


def test_validate_refuses_a_model_path_that_does_not_exist(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(f"model_name_or_path: {tmp_path}/gone\ndataset_name: offline:rotten_tomatoes\ncollapse: false\noutput_dir: {tmp_path}/o\n")
    assert main(["validate", str(path)]) == EXIT_REFUSED
    assert "that path does not exist" in one_line(capsys)


def test_remote_code_is_never_run_unless_asked(tmp_path, capsys):
    src = tmp_path / "custom"
    src.mkdir()
    marker = tmp_path / "ran"
    (src / "config.json").write_text(json.dumps({"model_type": "hfc-custom", "auto_map": {"AutoConfig": "code.Cfg"}}))
    (src / "code.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"model_name_or_path: {src}\ndataset_name: offline:rotten_tomatoes\ncollapse: false\noutput_dir: {tmp_path}/o\n")
    assert main(["train", str(path)]) == EXIT_REFUSED
    line = one_line(capsys)
    assert "needs its own Python code to load (trust_remote_code)" in line and "never runs code" in line
    assert "set trust_remote_code: true" in line  # and says how to allow it
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_api_bad_input_is_refused_by_name(world, tmp_path):
    text = tmp_path / "dup.yaml"
    text.write_text("model_name_or_path: m\ncollapse: false\nlearning_rate: 1\nlearning_rate: 2\n")
    with pytest.raises(RecipeError, match="'learning_rate' twice"):
        load_recipe(text)
    model = tiny_llama(layers=3)
    with pytest.raises(ValueError, match="exactly one of layers, num_layers and tolerance"):
        collapse_model(model, layers=[1], num_layers=1)
    assert len(model.model.layers) == 3


# ----------------------------------------------------------------------------------------------------
# faults


def test_a_failure_after_work_began_exits_one_with_one_line(world, tmp_path, capsys, monkeypatch):
    import hf_collapse.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "max_sliced_wasserstein", lambda x, y, **kw: (x.sum() * float("nan")))
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(world, tmp_path / "out"))
    assert main(["train", str(path)]) == EXIT_FAILED
    line = one_line(capsys)
    assert "the MSW penalty of layer_0 is nan" in line and "work had begun; nothing was left" in line
    assert not (tmp_path / "out" / "run").exists()  # the empty output folder it had created is gone


def test_a_destination_under_a_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a folder")
    before = tree(tmp_path)
    code = main(["collapse", str(world["src"]), str(tmp_path / "file.txt" / "out"), "--layers", "1"])
    line = one_line(capsys)
    assert code == EXIT_REFUSED and "cannot write the export next to" in line and "choose a folder" in line
    assert tree(tmp_path) == before


def test_a_read_only_destination_is_one_line(world, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: the kernel's refusal is played by os.mkdir instead
            real_mkdir = os.mkdir

            def refuse_inside_locked(path, *args, **kwargs):
                if Path(path).parent == locked:
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", refuse_inside_locked)
        code = main(["collapse", str(world["src"]), str(locked / "out"), "--layers", "1"])
        line = one_line(capsys)
        assert code == EXIT_REFUSED and "cannot write the export next to" in line and "Permission denied" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


KILLED_EXPORT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_trainer import tiny_llama
    from hf_collapse import collapse_model
    from hf_collapse.export import export_collapsed

    model, report = collapse_model(tiny_llama(layers=3), layers=[1])
    save = type(model).save_pretrained

    def save_then_die(self, folder, **kwargs):
        save(self, folder, **kwargs)  # the weights are written; the card and the rename never happen
        os.kill(os.getpid(), signal.SIGKILL)

    type(model).save_pretrained = save_then_die
    export_collapsed(model, sys.argv[1], report=report)
    """
)


def test_an_export_killed_mid_write_leaves_nothing_visible_and_is_cleaned_by_the_next(tmp_path):
    script = tmp_path / "kill_export.py"
    script.write_text(KILLED_EXPORT.format(tests=str(ROOT / "tests")))
    out = tmp_path / "exports" / "model"
    result = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    # the staging folder, and the lock file (left by the kill, unlocked: the next run takes it and removes it)
    (partial,) = [p for p in out.parent.iterdir() if not p.name.endswith(".lock")]
    assert partial.name.startswith(sibling_prefix(out) + ".") and partial.name.endswith(".partial") and not out.exists()
    assert (partial / "model.safetensors").is_file()
    model, report = collapse_model(tiny_llama(layers=3), layers=[1])
    export_collapsed(model, out, report=report)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # the stale staging folder is gone
    assert (out / "README.md").is_file() and not list(out.glob(".hf_collapse*"))


def test_an_interrupted_replacement_restores_the_old_export(tmp_path):
    out = tmp_path / "model"
    retired = tmp_path / f"{sibling_prefix(out)}.0123abcd.old"
    retired.mkdir()
    (retired / "config.json").write_text("{}")
    live = tmp_path / f"{sibling_prefix(out)}.zzzzzzzz.partial"  # another process is writing this one: left alone
    live.mkdir()
    (live / ".hf_collapse_staging.json").write_text(json.dumps({"pid": os.getppid(), "out": str(out)}))
    other = tmp_path / f"{sibling_prefix(tmp_path / 'model2')}.abcdefgh.partial"  # another export's: not ours to judge
    other.mkdir()
    done = clear_stale(out)
    assert (out / "config.json").is_file() and not retired.exists() and live.exists() and other.exists()
    assert len(done) == 1 and "restored model" in done[0]


def test_a_stale_work_folder_is_cleared_and_the_work_folder_never_stays(world, tmp_path, capsys):
    out = tmp_path / "c"
    (tmp_path / "c.work" / "runs").mkdir(parents=True)  # what a killed collapse leaves
    code = main(["collapse", str(world["src"]), str(out), "--num-layers", "1", "--data", str(world["files"]["strings"]),
                 "--collapse_strategy", "ranked", "--latency_repeats", "0", "--eval_fraction", "0.3",
                 "--calibration_samples", "4", "--use_cpu", "true", "--max_length", "32"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


# ----------------------------------------------------------------------------------------------------
# an unreachable Hub: a few seconds and one line, nothing sent, nothing local changed


def closed_port() -> int:
    """A loopback port that refuses connections (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_hub():
    """A loopback server that accepts connections and never answers; counts the connections it got."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    state = {"connections": [], "url": f"http://127.0.0.1:{server.getsockname()[1]}"}

    def accept():
        while True:
            try:
                state["connections"].append(server.accept()[0])  # kept open, never read or written
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield state
    server.close()
    for connection in state["connections"]:
        connection.close()


@pytest.fixture
def an_export(tmp_path):
    model, report = collapse_model(tiny_llama(layers=3), layers=[1])
    return export_collapsed(model, tmp_path / "export", report=report)


@pytest.fixture
def online(monkeypatch):
    """Hub requests allowed, with a fake token (only loopback endpoints are contacted)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fakeTokenForAnUnreachableHub0123")


def test_a_push_to_a_refused_endpoint_fails_in_one_line_from_hf_endpoint(an_export):
    import time

    before = tree(an_export.parent)
    url = f"http://127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=url, HF_TOKEN="hf_fakeTokenForAnUnreachableHub0123", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hf_collapse.cli", "push", str(an_export), "--repo-id", "me/slim"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf-collapse ")]
    assert result.returncode == EXIT_REFUSED, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr
    (line,) = lines
    assert f"cannot reach the Hub at {url} (" in line and "Connection refused" in line
    assert "; 2 tries)" in line  # the bounded budget: two tries, not huggingface_hub's 1+5 with backoff
    assert "check HF_ENDPOINT and your network connection, or try again later" in line
    assert f"hf-collapse push {an_export} --repo-id me/slim" in line
    assert tree(an_export.parent) == before
    assert elapsed < 60  # interpreter start and imports included; the push itself takes about a second


def test_a_push_to_an_endpoint_that_never_answers_gives_up_after_one_timeout(an_export, silent_hub, online, capsys,
                                                                             monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", silent_hub["url"])  # what HF_ENDPOINT sets at import
    before = tree(an_export.parent)
    assert main(["push", str(an_export), "--repo-id", "me/slim", "--revision", "v2"]) == EXIT_REFUSED
    line = one_line(capsys)
    assert f"cannot reach the Hub at {silent_hub['url']} (no answer within 5 s; 1 try)" in line
    assert "--repo-id me/slim --revision v2" in line
    assert len(silent_hub["connections"]) == 1  # one connection, no retry once the timeout was spent
    assert tree(an_export.parent) == before


@pytest.mark.parametrize("status", [404, 503])
def test_the_reachability_check_takes_any_answer_but_a_gateways_and_sends_no_token(online, status):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    from hf_collapse.hub import PushNotStartedError, check_hub_reachable

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.send_response(status)  # 404: a mirror without a front page still answers; 503: a proxy with no Hub
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if status == 404:
            assert check_hub_reachable(url + "/") == url
            assert seen == [("HEAD", "/", None)]
        else:
            with pytest.raises(PushNotStartedError, match=r"\(it answered HTTP 503, service unavailable; 2 tries\)"):
                check_hub_reachable(url)
            assert seen == [("HEAD", "/", None)] * 2
    finally:
        server.shutdown()
        server.server_close()


def test_train_with_push_to_an_unreachable_hub_keeps_the_export_and_exits_one(world, tmp_path, capsys, monkeypatch, online):
    import huggingface_hub

    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(world, out, push_to_hub=True, hub_model_id="me/slim"))
    assert main(["train", str(recipe)]) == EXIT_FAILED
    line = one_line(capsys)
    assert f"cannot reach the Hub at {url} (" in line and "check HF_ENDPOINT" in line
    assert f"hf-collapse push {out / 'export'} --repo-id me/slim" in line and "work had begun; kept:" in line
    assert upload_plan(out / "export")  # the export is complete and ready to push later
    assert json.loads((out / "export" / "config.json").read_text())["num_hidden_layers"] == 3


# ----------------------------------------------------------------------------------------------------
# numerics


def _cloud(n, d=16, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("case", ["long", "fp16", "bf16", "constant", "zeros", "one token", "huge"])
def test_the_distance_is_finite_at_the_edges(case):
    x, y = _cloud(64), _cloud(64, seed=1) * 2
    reference = None
    if case == "long":
        x, y = _cloud(200_000), _cloud(200_000, seed=1) * 2
    elif case in ("fp16", "bf16"):
        dtype = torch.float16 if case == "fp16" else torch.bfloat16
        theta = torch.nn.functional.normalize(torch.ones(16), dim=0)
        reference = max_sliced_wasserstein(x, y, projections=theta[:, None])
        x, y = x.to(dtype), y.to(dtype)
    elif case == "constant":
        x, y = torch.full((64, 16), 3.0), torch.full((64, 16), 3.0)
    elif case == "zeros":
        x, y = torch.zeros(64, 16), torch.zeros(64, 16)
    elif case == "one token":
        x, y = x[:1], y[:1]
        theta = torch.nn.functional.normalize(torch.ones(16), dim=0)
        reference = ((x - y) @ theta).abs()[0]
    elif case == "huge":  # squares of these overflow float32: the distance must not
        reference = max_sliced_wasserstein(x, y, search=_fixed())
        x, y = x * 1e30, y * 1e30
    x.requires_grad_(True)
    y.requires_grad_(True)
    search = "refine" if reference is None or case == "huge" else None
    if case in ("fp16", "bf16", "one token"):
        value = max_sliced_wasserstein(x, y, projections=theta[:, None])
    elif case == "huge":
        value = max_sliced_wasserstein(x, y, search=_fixed())
    else:
        value = max_sliced_wasserstein(x, y, search=search)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    if case in ("constant", "zeros"):
        assert value.item() == 0.0 and x.grad.abs().max() == 0
    if case == "huge":
        assert value.item() == pytest.approx(reference.item() * 1e30, rel=1e-5)
    elif reference is not None:
        assert value.item() == pytest.approx(reference.item(), rel=2e-2)


def _fixed():
    theta = torch.nn.functional.normalize(torch.arange(1.0, 17.0), dim=0)

    def search(x, y, key=None):
        return theta

    return search


def test_a_batch_with_no_real_token_does_not_stop_training(tmp_path):
    data = lm_dataset(8)
    masks = [[1] * 12] * 4 + [[0] * 12] * 4  # the second batch is all padding
    data = data.remove_columns("attention_mask").add_column("attention_mask", masks)
    recorder = LogRecorder()

    class InOrder(CollapseTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=tiny_llama(), args=config(tmp_path, max_steps=2), train_dataset=data, callbacks=[recorder])
    trainer.train()
    logs = [log for log in recorder.logs if "loss" in log]
    assert trainer.state.global_step == 2 and len(logs) == 2
    assert "msw/empty_batches" not in logs[0] and logs[0]["msw/penalty"] > 0
    assert logs[1]["msw/empty_batches"] == 1.0 and "msw/layer_0" not in logs[1]


def test_the_penalty_is_finite_in_bf16_training(tmp_path):
    recorder = LogRecorder()
    model = tiny_llama().to(torch.bfloat16)
    trainer = CollapseTrainer(model=model, args=config(tmp_path, max_steps=2, msw_weight=1.0), train_dataset=lm_dataset(8),
                              callbacks=[recorder])
    trainer.train()
    logs = [log for log in recorder.logs if "loss" in log]
    assert all(torch.isfinite(torch.tensor(log["msw/penalty"])) and log["msw/penalty"] > 0 for log in logs)


# ----------------------------------------------------------------------------------------------------
# secrets


def test_a_planted_token_reaches_no_file_log_or_card(world, tmp_path, capsys, monkeypatch):
    env_token, field_token = "hf_ENVplanted0123456789abcdefXYZ", "hf_FIELDplanted0123456789abcdefXYZ"
    monkeypatch.setenv("HF_TOKEN", env_token)
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(world, out, hub_token=field_token, save_strategy="steps", save_steps=1,
                                  logging_steps=1))
    code = main(["train", str(recipe)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and (out / "export" / "README.md").is_file()
    assert any(p.name == "recipe.yaml" for p in files)
    for token in (env_token, field_token):
        assert [p for p in files if token.encode() in p.read_bytes()] == []
        assert token not in captured.out and token not in captured.err
    # weights only as safetensors in the export
    export = {p.name for p in (out / "export").iterdir()}
    assert "model.safetensors" in export and not [n for n in export if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert upload_plan(out / "export")
