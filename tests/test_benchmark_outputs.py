"""Where each benchmark keeps its results when the command line names no folder: a full run's records in
benchmarks/records (in git, so a new checkout keeps hours of measurements), a --quick run's in outputs/ (ignored),
and the large working files of either never in git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import deployment, layerwise_scoring, penalty_default, streaming
from benchmarks.outputs import default_output
from benchmarks.scratch import __main__ as scratch

REPO = Path(__file__).resolve().parents[1]


def test_full_runs_record_in_the_repository_and_smoke_runs_in_outputs():
    assert default_output("penalty_default", False) == Path("benchmarks/records/penalty_default")
    assert default_output("penalty_default", True) == Path("outputs/benchmarks/penalty_default-quick")


class _Asked(Exception):
    pass


@pytest.mark.parametrize(
    ("module", "argv", "name"),
    [
        (penalty_default, [], "penalty_default"),
        (layerwise_scoring, [], "layerwise_scoring"),
        (deployment, ["--quick", "--no-runtimes"], "deployment"),
        (streaming, [], "streaming"),
        (scratch, ["vision"], "scratch-vision"),
    ],
)
def test_each_benchmark_without_output_asks_for_its_default_folder(monkeypatch, module, argv, name):
    asked = []

    def spy(which, quick):
        asked.append((which, quick))
        raise _Asked

    monkeypatch.setattr(module, "default_output", spy)
    for extra in ([], ["--quick"]):
        with pytest.raises(_Asked):
            module.main(argv if "--quick" in argv else [*argv, *extra])
    assert asked == [(name, "--quick" in argv), (name, True)]


def test_records_keep_results_and_ignore_models_and_partial_writes():
    paths = ["benchmarks/records/penalty_default/results.json", "benchmarks/records/scratch-vision/vanilla/seed0.json",
             "benchmarks/records/penalty_default/results.tmp", "benchmarks/records/deployment/work/gemma3-full/model.safetensors",
             "benchmarks/records/minilm/cache/vanilla-seed0/model.safetensors", "outputs/benchmarks/deployment-quick/results.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == paths[2:]


def test_deployment_exports_its_models_outside_the_records(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(deployment, "run", lambda args: seen.update(work=args.work, output=args.output) or {})
    monkeypatch.setattr(deployment, "section", lambda results: "")
    monkeypatch.setattr(deployment, "publish_section", lambda *a, **kw: None)
    monkeypatch.chdir(tmp_path)
    assert deployment.main(["--quick", "--no-runtimes"]) == 0
    assert seen == {"work": Path("outputs/benchmarks/deployment-work-quick"), "output": Path("outputs/benchmarks/deployment-quick")}
    assert deployment.main(["--quick", "--no-runtimes", "--output", str(tmp_path / "o")]) == 0
    assert seen == {"work": tmp_path / "o" / "work", "output": tmp_path / "o"}


@pytest.mark.parametrize(("argv", "work", "output"), [
    (["--quick"], "outputs/benchmarks/streaming-work-quick", "outputs/benchmarks/streaming-quick"),
    ([], "outputs/benchmarks/streaming-work", "benchmarks/records/streaming"),
    (["--quick", "--output", "o"], "o-work", "o"),
])
def test_streaming_keeps_its_models_beside_a_named_output_else_under_outputs(monkeypatch, tmp_path, argv, work, output):
    def stop(*args, **kwargs):
        raise _Asked

    monkeypatch.setattr(streaming, "find_mergekit", stop)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Asked):
        streaming.main(argv)
    made = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert work in made and output in made
