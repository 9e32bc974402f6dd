"""Sections of `benchmarks/RESULTS.md` that a script other than the quality report owns.

Each lies between a begin and an end marker (HTML comments); its script replaces only that part of the file, and
`python -m benchmarks.quality report`, which rewrites the file, carries every marked section over unchanged.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["OWNED_SECTIONS", "RESULTS_MD", "carry_sections", "publish_section", "replace_section"]

RESULTS_MD = Path("benchmarks/RESULTS.md")  # relative: the scripts run from the repository root

# (begin, end) marker pairs, in the order the sections appear at the end of RESULTS.md
OWNED_SECTIONS = (
    ("<!-- gpu-recipe:begin (benchmarks/gpu_recipe.py writes this section) -->", "<!-- gpu-recipe:end -->"),
    ("<!-- penalty-default:begin (benchmarks/penalty_default.py writes this section) -->", "<!-- penalty-default:end -->"),
    ("<!-- scratch-decoder:begin (python -m benchmarks.scratch decoder writes this section) -->", "<!-- scratch-decoder:end -->"),
    ("<!-- scratch-vision:begin (python -m benchmarks.scratch vision writes this section) -->", "<!-- scratch-vision:end -->"),
    ("<!-- layerwise-scoring:begin (benchmarks/layerwise_scoring.py writes this section) -->", "<!-- layerwise-scoring:end -->"),
    ("<!-- deployment:begin (benchmarks/deployment.py writes this section) -->", "<!-- deployment:end -->"),
    ("<!-- streaming:begin (benchmarks/streaming.py writes this section) -->", "<!-- streaming:end -->"),
    ("<!-- smollm2-repair:begin (python -m benchmarks.quality smollm2 --output benchmarks/records/smollm2-repair writes "
     "its RESULTS.md; this section carries its tables) -->", "<!-- smollm2-repair:end -->"),
    ("<!-- minilm-repair:begin (python -m benchmarks.quality minilm --output benchmarks/records/minilm-repair writes "
     "its RESULTS.md; this section carries its tables) -->", "<!-- minilm-repair:end -->"),
    ("<!-- minilm-budget:begin (python -m benchmarks.quality budget writes this section) -->", "<!-- minilm-budget:end -->"),
)


def _span(text: str, begin: str, end: str, path) -> tuple[int, int] | None:
    start, stop = text.find(begin), text.find(end)
    if (start == -1) != (stop == -1) or stop < start:
        name = begin.removeprefix("<!-- ").split(":")[0]
        raise ValueError(f"{path} has one {name} marker without the other: restore or delete both, then rerun")
    return None if start == -1 else (start, stop + len(end))


def replace_section(path: str | Path, begin: str, end: str, section: str) -> Path:
    """Replace the section between the markers in `path` (or append it); nothing else in the file changes."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    span = _span(text, begin, end, path)
    if span is None:
        text = text + ("\n" if text and not text.endswith("\n") else "") + ("\n" if text else "") + section
    else:
        text = text[: span[0]] + section.rstrip("\n") + text[span[1] :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def publish_section(text: str, output_folder: str | Path | None, results_md: str | Path | None, quick: bool, begin: str,
                    end: str, *, echo: bool = True) -> Path | None:
    """The common end of a benchmark script that owns a section: `text` written to `output_folder/section.md`
    (unless `output_folder` is None) and printed (unless `echo` is false), then put between `begin` and `end` in
    `results_md`, or in `RESULTS_MD` when that is None and the run is not `quick`. Returns the file written, or None
    (a quick run without `results_md` leaves every RESULTS.md alone)."""
    if output_folder is not None:
        (Path(output_folder) / "section.md").write_text(text)
    if echo:
        print(text)
    target = results_md or (None if quick else RESULTS_MD)
    if target is None:
        return None
    return replace_section(target, begin, end, text)


def carry_sections(old: str, new: str, path="RESULTS.md") -> str:
    """`new` with every owned section of `old` appended unchanged."""
    for begin, end in OWNED_SECTIONS:
        span = _span(old, begin, end, path)
        if span is not None:
            new = new.rstrip("\n") + "\n\n" + old[span[0] : span[1]] + "\n"
    return new
