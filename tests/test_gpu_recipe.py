"""benchmarks/gpu_recipe.py without a GPU: it refuses clearly; its arguments, the recipe overrides it passes and
its RESULTS.md section (which must leave the rest of the file alone) are checked on CPU."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_recipe", ROOT / "benchmarks" / "gpu_recipe.py")
gpu_recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_recipe)

RESULT = {
    "gpu": "NVIDIA H200",
    "torch": "2.13.0",
    "cuda": "12.8",
    "model": "SmolLM2-135M-Instruct (dequantised Q4_1 copy, offline asset)",
    "dtype": "bfloat16",
    "seconds": 300.0,
    "steps": {
        "batch": [16, 128],
        "median_step_s": {"plain": 0.040, "collapse": 0.046},
        "step_time_ratio": 1.15,
        "peak_memory_bytes": {"plain": 3 * 2**30, "collapse": int(3.3 * 2**30)},
        "peak_memory_ratio": 1.1,
    },
    "recipe_run": {
        "recipe": "recipes/smollm2-135m_causal-lm.yaml", "train_steps": 200, "seconds": 120.0, "layers_before": 30,
        "layers_after": 26, "removed": [5, 9, 17, 22], "metric": "perplexity", "metric_before": 21.5,
        "metric_after": 24.25,
    },
    "inference": {
        "prefill": {"full_median_ms": 8.0, "collapsed_median_ms": 7.0, "speedup": 8.0 / 7.0},
        "decode": {"full_median_ms": 12.0, "collapsed_median_ms": 10.0, "speedup": 1.2},
        "energy": {
            "full": {"joules_per_1000_tokens": 40.0, "source": "NVML (GPU 0)"},
            "collapsed": {"joules_per_1000_tokens": 34.0, "source": "NVML (GPU 0)"},
            "ratio": 0.85,
        },
    },
}


def test_it_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU \(torch.cuda.is_available\(\) is False here\)"):
        gpu_recipe.main(["--out", str(tmp_path / "out"), "--results", str(tmp_path / "RESULTS.md")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "RESULTS.md").exists()


def test_arguments_and_their_checks():
    args = gpu_recipe.make_parser().parse_args([])
    assert (args.train_steps, args.timing_steps, args.batch_size) == (200, 30, 16)
    assert args.recipe == ROOT / "recipes" / "smollm2-135m_causal-lm.yaml" and args.recipe.is_file()
    with pytest.raises(SystemExit):
        gpu_recipe.make_parser().parse_args(["--timing-steps", "0"])


def test_the_recipe_overrides_it_passes_are_accepted():
    from hf_collapse.recipe import load_recipe

    recipe, config, _ = load_recipe(
        gpu_recipe.RECIPE, ["--max_steps", "7", "--export_dir", "x/slim", "--use_cpu", "true"]
    )
    assert (config.max_steps, recipe.export_dir, recipe.model_name_or_path) == (7, "x/slim", "offline:SmolLM2-135M-Instruct")
    fields = gpu_recipe._recipe_msw_fields()
    assert fields["msw_weight"] == 0.03 and fields["msw_normalization"] == "input_rms" and "msw_warmup_steps" not in fields


def test_section_states_each_figure_with_the_gpu_name():
    section = gpu_recipe.results_section(RESULT)
    assert section.startswith(gpu_recipe.SECTION_BEGIN) and section.rstrip().endswith(gpu_recipe.SECTION_END)
    assert "## GPU run: SmolLM2 recipe on NVIDIA H200" in section
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    assert "| 40.0 ms | 46.0 ms | 1.150 |" in rows["median train step (16×128 tokens, interleaved)"]
    assert "| 3.00 GiB | 3.30 GiB | 1.100 |" in rows["peak GPU memory in those steps"]
    assert "1.14× faster" in rows["prefill (8×128 prompt)"] and "1.20× faster" in rows["decode, per token (8 rows)"]
    assert "| 40 J / 1,000 tokens | 34 J / 1,000 tokens | 0.850 |" in rows["generation energy (NVML (GPU 0))"]
    assert "30 → 26 layers (removed [5, 9, 17, 22], 0-based)" in section and "21.50 → 24.25" in section

    unmeasured = copy.deepcopy(RESULT)
    unmeasured["inference"]["energy"] = {"reason": "NVML energy counter unavailable on GPU 0"}
    assert "| generation energy | not measured: NVML energy counter unavailable on GPU 0 |" in (
        gpu_recipe.results_section(unmeasured)
    )


def test_the_section_is_replaced_in_place_and_the_rest_of_results_md_kept(tmp_path):
    results = tmp_path / "RESULTS.md"
    before = "# Results\n\n## Quality study\n\n| arm | accuracy |\n|---|---|\n| vanilla | 0.80 |\n"
    results.write_text(before)
    (tmp_path / "result.json").write_text(json.dumps(RESULT))
    gpu_recipe.main(["--report-only", str(tmp_path / "result.json"), "--results", str(results)])
    first = results.read_text()
    assert first.startswith(before) and first.count(gpu_recipe.SECTION_BEGIN) == 1

    results.write_text(first + "\n## Another study\n\ntext after\n")
    changed = copy.deepcopy(RESULT)
    changed["gpu"] = "NVIDIA A100-SXM4-80GB"
    gpu_recipe.update_results(results, gpu_recipe.results_section(changed))
    text = results.read_text()
    assert text.startswith(before) and text.endswith("\n## Another study\n\ntext after\n")
    assert "on NVIDIA A100-SXM4-80GB" in text and "on NVIDIA H200" not in text
    assert text.count(gpu_recipe.SECTION_BEGIN) == text.count(gpu_recipe.SECTION_END) == 1

    results.write_text(before + gpu_recipe.SECTION_BEGIN + "\n")  # a broken section: refused, file untouched
    with pytest.raises(ValueError, match="one gpu-recipe marker without the other"):
        gpu_recipe.update_results(results, gpu_recipe.results_section(RESULT))
    assert results.read_text() == before + gpu_recipe.SECTION_BEGIN + "\n"
