"""What a push uploads is exactly the export (issue 24): the files `export_collapsed` listed in its manifest, unchanged.

A real export of a collapsed tiny Llama is copied for each test and something hostile is planted in the copy; the
push runs through the `hf-collapse` command against the loopback Hub of test_export.py. A refused push exits 2 with
one line on stderr naming the planted file, the Hub received no request at all, and the folder (and the file outside
it that a link points at) is byte-identical.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from test_export import FAKE_TOKEN, LoopbackHub
from test_trainer import tiny_llama

from hf_collapse import collapse_model, export_collapsed
from hf_collapse.cli import EXIT_REFUSED, main
from hf_collapse.export import add_benchmarks
from hf_collapse.hub import push_folder, upload_plan
from hf_collapse.manifest import MANIFEST_FILE, read_manifest, write_manifest
from hf_collapse.report import BenchmarkResult

REPO_ID = "me/slim"
SECRET = "HF_TOKEN=hf_plantedSecret0123456789abcdefXYZ\n"


def tree(path: Path) -> dict:
    """Every entry under ``path``, links as their target (never followed), files by the hash of their bytes."""
    out = {}
    for p in sorted(path.rglob("*")):  # rglob does not descend into linked folders
        name = p.relative_to(path).as_posix()
        if p.is_symlink():
            out[name] = "-> " + os.readlink(p)
        elif p.is_file() and p.stat().st_size > 64 << 20:  # the sparse 3 GB stray: size and time are enough
            out[name] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[name] = "dir"
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, report = collapse_model(tiny_llama(layers=3), layers=[1])
    return export_collapsed(model, tmp_path_factory.mktemp("export") / "model", report=report)


@pytest.fixture
def out(exported, tmp_path):
    """A fresh copy of the export, and a file and a folder outside it (stand-ins for /etc/passwd and ~/secrets)."""
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return copy


@pytest.fixture
def hub(monkeypatch):
    """The loopback Hub as the endpoint of the command, requests allowed, a fake token."""
    server = LoopbackHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    yield server
    server.shutdown()
    server.server_close()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-collapse push: error: ")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return lines[0]


def _pickle_bytes() -> bytes:
    return pickle.dumps({"weight": [1.0, 2.0]}, protocol=4)


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, buffer)
    return buffer.getvalue()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # tensor data, not the header: the file stays a valid safetensors file of the same size
    path.write_bytes(bytes(data))


# each: (what is planted, the name the one line must hold)
PLANTS = {
    "dotenv with a token": (lambda o: (o / ".env").write_text(SECRET), ".env"),
    "git config": (lambda o: ((o / ".git").mkdir(), (o / ".git" / "config").write_text("[core]\n")), ".git"),
    "nested dot-file": (lambda o: ((o / "extra").mkdir(), (o / "extra" / ".netrc").write_text("x")), "extra/.netrc"),
    "link to a file outside": (lambda o: (o / "passwd").symlink_to(o.parent / "passwd"), "passwd"),
    "linked folder": (lambda o: (o / "keys").symlink_to(o.parent / "secrets", target_is_directory=True), "keys"),
    "link replacing an exported file": (
        lambda o: ((o / "config.json").unlink(), (o / "config.json").symlink_to(o.parent / "passwd")), "config.json"),
    "large stray file": (lambda o: os.truncate(_touch(o / "dump.dat"), 3 << 30), "dump.dat"),
    "stray text file": (lambda o: (o / "notes.txt").write_text("notes"), "notes.txt"),
    "weights.pickle": (lambda o: (o / "weights.pickle").write_bytes(_pickle_bytes()), "weights.pickle"),
    "model.PT": (lambda o: (o / "model.PT").write_bytes(_torch_zip()), "model.PT"),
    "state.Joblib": (lambda o: (o / "state.Joblib").write_bytes(b"x"), "state.Joblib"),
    "pickle named .safetensors": (lambda o: (o / "model.safetensors").write_bytes(_pickle_bytes()), "model.safetensors"),
    "pickle under another name": (lambda o: (o / "vocab.txt").write_bytes(_pickle_bytes()), "vocab.txt"),
    "torch.save zip under another name": (lambda o: (o / "extra.dat").write_bytes(_torch_zip()), "extra.dat"),
    "fifo": (lambda o: os.mkfifo(o / "pipe"), "pipe"),
    "exported file grown": (lambda o: (o / "config.json").write_text((o / "config.json").read_text() + " "), "config.json"),
    "exported file changed, same size": (lambda o: _flip_last_byte(o / "model.safetensors"), "model.safetensors"),
    "exported file removed": (lambda o: (o / "collapse_report.json").unlink(), "collapse_report.json"),
    "no manifest (an older export)": (lambda o: (o / MANIFEST_FILE).unlink(), MANIFEST_FILE),
    "manifest not ours": (lambda o: (o / MANIFEST_FILE).write_text("[]"), MANIFEST_FILE),
}


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case", list(PLANTS))
def test_a_hostile_folder_is_refused_by_name_and_nothing_is_sent(out, hub, capsys, case):
    plant, name = PLANTS[case]
    plant(out)
    before, outside = tree(out), tree(out.parent / "secrets")
    passwd = (out.parent / "passwd").read_bytes()
    assert main(["push", str(out), "--repo-id", REPO_ID]) == EXIT_REFUSED
    line = error_line(capsys)
    assert name in line, line
    assert hub.requests == [] and hub.commits == []  # the Hub heard nothing, not even create_repo
    assert tree(out) == before and tree(out.parent / "secrets") == outside
    assert (out.parent / "passwd").read_bytes() == passwd
    # the dry run refuses the same way, with the same line
    assert main(["push", str(out), "--repo-id", REPO_ID, "--dry-run"]) == EXIT_REFUSED
    assert error_line(capsys) == line
    assert SECRET not in line


def test_dot_files_links_and_pickles_are_refused_even_with_exclude_unknown(out, hub, capsys):
    (out / ".env").write_text(SECRET)
    assert main(["push", str(out), "--repo-id", REPO_ID, "--exclude-unknown"]) == EXIT_REFUSED
    assert ".env" in error_line(capsys)
    (out / ".env").unlink()
    (out / "passwd").symlink_to(out.parent / "passwd")
    assert main(["push", str(out), "--repo-id", REPO_ID, "--exclude-unknown"]) == EXIT_REFUSED
    assert "symbolic links (passwd)" in error_line(capsys)
    (out / "passwd").unlink()
    (out / "weights.PKL").write_bytes(b"x")
    assert main(["push", str(out), "--repo-id", REPO_ID, "--exclude-unknown"]) == EXIT_REFUSED
    assert "pickled files (weights.PKL)" in error_line(capsys)
    assert hub.requests == []


def _listed(stdout: str) -> list[tuple[str, int]]:
    """The `name  (N bytes)` lines of a dry run."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("  ") and line.endswith(" bytes)"):
            name, size = line.strip().rsplit("  (", 1)
            rows.append((name, int(size.removesuffix(" bytes)").replace(",", ""))))
    return rows


def test_the_dry_run_lists_exactly_what_a_real_push_sends(out, hub, capsys):
    assert main(["push", str(out), "--repo-id", REPO_ID, "--dry-run"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert hub.requests == []
    expected = sorted([*read_manifest(out), MANIFEST_FILE])
    assert [name for name, _ in listed] == expected
    assert "model.safetensors" in expected and "config.json" in expected and "README.md" in expected

    assert main(["push", str(out), "--repo-id", REPO_ID]) == 0
    assert capsys.readouterr().out.startswith(f"pushed {len(listed)} files to {REPO_ID} in one commit: ")
    (commit,) = hub.commits
    assert sorted((name, len(content)) for name, content in commit["files"].items()) == listed
    assert all(content == (out / name).read_bytes() for name, content in commit["files"].items())


def test_exclude_unknown_leaves_stray_files_out_and_says_so(out, hub, capsys):
    os.truncate(_touch(out / "dump.dat"), 3 << 30)  # a 3 GB stray file (sparse: nothing is read from it but its head)
    (out / "run").mkdir()
    (out / "run" / "notes.txt").write_text("notes")
    assert main(["push", str(out), "--repo-id", REPO_ID, "--dry-run", "--exclude-unknown"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0] == ("left out 2 files the export did not write (--exclude-unknown): "
                                      "dump.dat, run/notes.txt")
    listed = _listed(stdout)
    assert [name for name, _ in listed] == sorted([*read_manifest(out), MANIFEST_FILE])

    assert main(["push", str(out), "--repo-id", REPO_ID, "--exclude-unknown"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("left out 2 files the export did not write (--exclude-unknown): dump.dat, run/notes.txt\n")
    (commit,) = hub.commits
    assert sorted((name, len(content)) for name, content in commit["files"].items()) == listed
    result = push_folder(out, REPO_ID, dry_run=True, exclude_unknown=True)
    assert result.excluded == ["dump.dat", "run/notes.txt"] and result.files == listed


def test_the_manifest_is_written_last_and_lists_every_other_file(exported):
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [name for name in files if name != MANIFEST_FILE]
    for name, entry in manifest["files"].items():
        data = (exported / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    newest = max((exported / name).stat().st_mtime_ns for name in manifest["files"])
    assert (exported / MANIFEST_FILE).stat().st_mtime_ns >= newest


def test_adding_benchmarks_records_the_new_card_but_nothing_planted(out):
    (out / "notes.txt").write_text("planted before the benchmarks")
    before = read_manifest(out)
    add_benchmarks(out, [BenchmarkResult("hellaswag", "acc_norm", 0.30, 0.29)])
    after = read_manifest(out)
    assert "notes.txt" not in after and after["README.md"] != before["README.md"]
    assert after["README.md"].sha256 == hashlib.sha256((out / "README.md").read_bytes()).hexdigest()
    assert {k: v for k, v in after.items() if k not in ("README.md", "collapse_report.json")} == {
        k: v for k, v in before.items() if k not in ("README.md", "collapse_report.json")}
    with pytest.raises(ValueError, match=r"did not write \(notes.txt\)"):
        upload_plan(out)
    (out / "notes.txt").unlink()
    assert ("README.md", (out / "README.md").stat().st_size) in upload_plan(out)


def test_a_safetensors_header_that_starts_like_a_pickle_is_not_refused(out):
    # a header of 640 bytes begins with the bytes 0x80 0x02, the pickle protocol 2 header
    for pad in range(700):
        save_file({"w": torch.ones(2)}, out / "model.safetensors", metadata={"pad": "x" * pad})
        if (out / "model.safetensors").read_bytes()[:2] == b"\x80\x02":
            break
    else:
        pytest.fail("no padding gave a header of 640 bytes")
    write_manifest(out)
    assert ("model.safetensors", (out / "model.safetensors").stat().st_size) in upload_plan(out)
