"""Where a benchmark keeps what it measured.

A full run's records (per-run JSON, the results a RESULTS.md section is written from) go to
`benchmarks/records/<name>`, which is in git: a new checkout keeps what hours of CPU measured, and a study resumes
across sessions. Smoke runs (`--quick`) go to `outputs/benchmarks/<name>-quick`, which is ignored. Large
by-products (shared fine-tunes, exported models, partial writes) are ignored inside the records folder too; see
`benchmarks/records/.gitignore`.
"""

from __future__ import annotations

from pathlib import Path

RECORDS = Path("benchmarks/records")
SMOKE = Path("outputs/benchmarks")


def default_output(name: str, quick: bool) -> Path:
    """The result folder of benchmark `name` when the command line names none."""
    return SMOKE / f"{name}-quick" if quick else RECORDS / name


def default_work(name: str, quick: bool) -> Path:
    """The folder for benchmark `name`'s models and other large working files (ignored, never recorded)."""
    return SMOKE / f"{name}-work{'-quick' if quick else ''}"
