"""Hostile folders (issue 24): paths a checkpoint names and links it holds stay inside SRC, --overwrite replaces only a
previous export, one writer per OUT, broad or linked output folders are refused. Each refusal: exit 2, one line on
stderr naming the problem, the source and every folder beside OUT byte-identical."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.models import resolve_model
from hf_collapse.paths import OutputLock, check_tree_inside, inside_source, sibling_prefix
from hf_collapse.sbert import read_layout

ROOT = Path(__file__).resolve().parents[1]
MINILM = Path(resolve_model("offline:all-MiniLM-L6-v2").path)


def snapshot(path: Path) -> dict:
    """Every entry under ``path``: a file's hash, a link's target (never followed), 'dir'."""
    def one(p: Path) -> str:
        if p.is_symlink():
            return "-> " + os.readlink(p)
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"

    if not path.exists() and not path.is_symlink():
        return {}
    entries = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(folder) / name
            entries[p.relative_to(path).as_posix()] = one(p)
    return entries


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A 3-layer BERT saved as a sentence-transformers folder with the real MiniLM tokenizer and module files."""
    folder = tmp_path_factory.mktemp("tiny") / "src"
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copyfile(MINILM / name, folder / name)
    shutil.copytree(MINILM / "1_Pooling", folder / "1_Pooling")
    return folder


@pytest.fixture
def place(tiny_st, tmp_path):
    """A fresh copy of the source, a secret folder beside it, and an `exports/` parent for OUT."""
    src = tmp_path / "src"
    shutil.copytree(tiny_st, src)
    secret = tmp_path / "secrets"
    secret.mkdir()
    (secret / "token.txt").write_text("HF_TOKEN=hf_do_not_leak")
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports" / "neighbour.txt").write_text("beside OUT")
    return src, secret, tmp_path / "exports"


def refused(capsys, argv, *words, code=EXIT_REFUSED) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("hf-collapse ")]
    assert len(lines) == 1 and "error:" in lines[0], err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def collapse_refused(capsys, place, out, edit, *words, extra=()):
    """Plant ``edit`` in the source, run `collapse`, and check that nothing anywhere changed."""
    src, secret, exports = place
    edit(src, secret)
    before = snapshot(src.parent)
    line = refused(capsys, ["collapse", str(src), str(out), "--layers", "1", *extra], *words)
    assert snapshot(src.parent) == before
    return line


def set_modules(src: Path, path) -> None:
    modules = json.loads((src / "modules.json").read_text())
    modules[1]["path"] = path
    (src / "modules.json").write_text(json.dumps(modules))


@pytest.mark.parametrize(
    ("path", "words"),
    [("../ESCAPE", ["'../ESCAPE'", "not inside the checkpoint folder"]),
     ("1_Pooling/../../secrets", ["not inside the checkpoint folder"]),
     ("/etc", ["'/etc'", "not inside the checkpoint folder"])],
)
def test_a_module_path_out_of_the_source_is_refused(capsys, place, path, words):
    src, secret, exports = place
    if path == "../ESCAPE":
        shutil.copytree(src / "1_Pooling", src.parent / "ESCAPE")
    collapse_refused(capsys, place, exports / "out", lambda s, _: set_modules(s, path), "modules.json", *words)
    assert not (exports / "out").exists() and not (exports / "ESCAPE").exists()
    with pytest.raises(ValueError, match="not inside the checkpoint folder"):
        read_layout(src)  # the library refuses it as the CLI does


def test_a_module_folder_linked_out_of_the_source_is_refused(capsys, place):
    src, secret, exports = place

    def link_module(s, secret):
        shutil.rmtree(s / "1_Pooling")
        (s / "1_Pooling").symlink_to(secret, target_is_directory=True)

    collapse_refused(capsys, place, exports / "out", link_module, "1_Pooling", "symlink", str(secret))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        read_layout(src)
    assert sorted(p.name for p in exports.iterdir()) == ["neighbour.txt"]


def test_a_link_inside_a_module_folder_leading_out_is_refused(place):
    src, secret, _ = place
    (src / "1_Pooling" / "extra.txt").symlink_to(secret / "token.txt")
    with pytest.raises(ValueError, match="extra.txt is a symlink to .*outside the checkpoint folder"):
        read_layout(src)


@pytest.mark.parametrize("content", [{"0": {"type": "x"}}, "modules", [["Transformer"]]])
def test_a_modules_json_that_is_not_a_list_of_modules_is_one_line(capsys, place, content):
    src, _, exports = place
    collapse_refused(capsys, place, exports / "out", lambda s, _: (s / "modules.json").write_text(json.dumps(content)),
                     "modules.json must be a list of modules")
    assert not (exports / "out").exists()


def test_a_tokenizer_file_linked_out_of_the_source_is_refused(capsys, place):
    def link_vocab(s, secret):
        (secret / "tokenizer.json").write_bytes((s / "tokenizer.json").read_bytes())
        (s / "tokenizer.json").unlink()
        (s / "tokenizer.json").symlink_to(secret / "tokenizer.json")

    collapse_refused(capsys, place, place[2] / "out", link_vocab, "tokenizer.json is a symlink", "outside the checkpoint")


def test_a_link_that_stays_inside_the_source_is_fine(capsys, place):
    src, _, exports = place
    (src / "1_Pooling" / "alias.json").symlink_to(src / "1_Pooling" / "config.json")
    check_tree_inside(src)
    assert main(["collapse", str(src), str(exports / "out"), "--layers", "1"]) == 0
    assert (exports / "out" / "1_Pooling" / "alias.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    assert not (exports / "out" / "1_Pooling" / "alias.json").is_symlink()  # copied as a file, never as a link


@pytest.mark.parametrize("file", ["//evil.py", "/tmp/evil.py", "a/../../evil.py"])  # '//evil.py' is auto_map's '..evil'
def test_a_code_module_path_out_of_the_folder_is_refused(tmp_path, file):
    with pytest.raises(ValueError, match="not inside the checkpoint folder"):
        inside_source(tmp_path, file, "auto_map")


def test_overwrite_of_the_working_directory_is_refused(capsys, place, monkeypatch):
    src, _, exports = place
    project = exports.parent / "project"
    project.mkdir()
    (project / "main.py").write_text("print('my work')")
    monkeypatch.chdir(project)
    before = snapshot(project)
    collapse_refused(capsys, place, Path("."), lambda *_: None, "current working directory", extra=["--overwrite"])
    assert snapshot(project) == before
    line = refused(capsys, ["collapse", str(src), "..", "--layers", "1", "--overwrite"], "a parent of the current")
    assert "give a new subfolder" in line and snapshot(project) == before


@pytest.mark.parametrize("target", ["/", "~"])
def test_broad_targets_are_refused(capsys, place, target):
    collapse_refused(capsys, place, Path(target), lambda *_: None, "hf-collapse writes into a folder of its own",
                     extra=["--overwrite"])


def test_overwrite_replaces_only_a_previous_export(capsys, place):
    src, _, exports = place
    out = exports / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(exports)
    collapse_refused(capsys, place, out, lambda *_: None, "not an hf-collapse export", "collapse_report.json",
                     extra=["--overwrite"])
    assert snapshot(exports) == before
    (out / "thesis.tex").unlink()
    assert main(["collapse", str(src), str(out), "--layers", "1"]) == 0  # empty: fine
    assert main(["collapse", str(src), str(out), "--layers", "2", "--overwrite"]) == 0  # a previous export: replaced
    report = json.loads((out / "collapse_report.json").read_text())["report"]
    assert report["removed_layers"] == [2]
    assert sorted(p.name for p in exports.iterdir()) == ["neighbour.txt", "out"]


def test_out_as_a_symlink_is_refused_up_front(capsys, place):
    src, _, exports = place
    real = exports / "real"
    real.mkdir()
    (exports / "out").symlink_to(real, target_is_directory=True)
    (exports / "dangling").symlink_to(exports / "nowhere")
    before = snapshot(exports)
    for out in ("out", "dangling"):
        collapse_refused(capsys, place, exports / out, lambda *_: None, "is a symlink", extra=["--overwrite"])
    assert snapshot(exports) == before


def test_a_dangling_link_inside_out_is_one_line(capsys, place):
    src, _, exports = place
    out = exports / "out"
    out.mkdir()
    (out / "gone").symlink_to(exports / "nowhere")
    before = snapshot(exports)
    collapse_refused(capsys, place, out, lambda *_: None, "already exists and is not empty")
    collapse_refused(capsys, place, out, lambda *_: None, "not an hf-collapse export", extra=["--overwrite"])
    assert snapshot(exports) == before


def recipe(tmp_path: Path, src: Path, **fields) -> Path:
    text = dict(model_name_or_path=str(src), dataset_files=[str(tmp_path / "d.csv")], task="text-classification",
                output_dir=str(tmp_path / "run"), max_steps=1, use_cpu=True, report_to="none", collapse_num_layers=1,
                target_choice="post_hoc", collapse_strategy="ranked", save_strategy="no")
    text.update(fields)
    (tmp_path / "d.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    path = tmp_path / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in text.items()))
    return path


def test_output_dir_root_is_refused_without_walking_it(capsys, place, monkeypatch):
    src, _, exports = place
    walked = []
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: walked.append(self) or iter(()))
    refused(capsys, ["train", str(recipe(exports.parent, src)), "--output_dir", "/"], "output_dir / is the root")
    assert walked == []


@pytest.mark.parametrize("where", ["same", "parent"])
def test_export_dir_holding_output_dir_is_refused_by_validate_and_train(capsys, place, where):
    src, _, exports = place
    run = exports / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")
    export = run if where == "same" else exports
    path = recipe(exports.parent, src, output_dir=str(run), export_dir=str(export), overwrite_export=True)
    before = snapshot(exports)
    for verb in ("validate", "train"):
        refused(capsys, [verb, str(path)], "is or holds output_dir", "checkpoints")
    assert snapshot(exports) == before


def test_a_dangling_link_in_output_dir_is_one_line(capsys, place):
    src, _, exports = place
    run = exports / "run"
    run.mkdir()
    (run / "gone").symlink_to(exports / "nowhere")
    path = recipe(exports.parent, src, output_dir=str(run), model_name_or_path=str(exports / "no-such-model"))
    refused(capsys, ["validate", str(path)], "that path does not exist")


def test_a_second_writer_is_refused_while_a_process_holds_out(capsys, place):
    src, _, exports = place
    out = exports / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hf_collapse.paths import OutputLock\n"
         "with OutputLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        collapse_refused(capsys, place, out, lambda *_: None, "another hf-collapse run is writing", str(out))
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not out.exists()
    assert main(["collapse", str(src), str(out), "--layers", "1"]) == 0  # the lock went with its holder
    assert sorted(p.name for p in exports.iterdir()) == ["neighbour.txt", "out"]  # no lock file left


def test_the_lock_refuses_another_open_file_and_nests_in_one_process(tmp_path):
    out = tmp_path / "out"
    with OutputLock(out) as lock:
        with OutputLock(out):  # the CLI holds it, the export takes it again
            pass
        fd = os.open(lock.path, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert list(tmp_path.iterdir()) == []  # the lock file is removed on release


def test_a_245_character_out_name_works(capsys, place):
    src, _, exports = place
    out = exports / ("m" * 245)
    assert len(sibling_prefix(out)) < 20
    assert main(["collapse", str(src), str(out), "--layers", "1"]) == 0
    assert (out / "collapse_report.json").is_file()
    assert main(["collapse", str(src), str(out), "--layers", "1", "--overwrite"]) == 0


def test_export_folders_honour_the_umask(place):
    src, _, exports = place
    old = os.umask(0o022)
    try:
        assert main(["collapse", str(src), str(exports / "out"), "--layers", "1"]) == 0
    finally:
        os.umask(old)
    assert (exports / "out").stat().st_mode & 0o777 == 0o755
    assert (exports / "out" / "config.json").stat().st_mode & 0o777 == 0o644
