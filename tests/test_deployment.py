"""benchmarks/deployment.py: the machinery of the llama.cpp / ONNX Runtime study. CI has neither runtime, so the quick
run here makes the exports, the transformers side and the plan (`--no-runtimes`), and the section is rendered from
given figures; the figures themselves come from the full run (`benchmarks/RESULTS.md`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from benchmarks import deployment
from benchmarks.inference_speed import flops_per_token


def test_quick_run_makes_the_exports_the_plan_and_the_section(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# tables\n")
    out = tmp_path / "out"
    assert deployment.main(["--quick", "--no-runtimes", "--output", str(out), "--results", str(results_md)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["removed"] == {"gemma3": [2], "minilm": [2, 3]}
    fit = results["llama_cpp_fit"]
    # the tiny Gemma-3 (5 sliding + 1 global) loses layer 2: llama.cpp's period 6 no longer describes it
    assert (fit["gemma3 full"]["needs_metadata"], fit["gemma3 collapsed"]["needs_metadata"]) == (False, True)
    assert fit["gemma3 collapsed"]["architecture"] == "gemma3"
    work = out / "work"
    full = transformers.AutoModelForCausalLM.from_pretrained(work / "gemma3-full")
    collapsed = transformers.AutoModelForCausalLM.from_pretrained(work / "gemma3-collapsed")
    assert collapsed.config.layer_types == ["sliding_attention"] * 4 + ["full_attention"]
    assert json.loads((work / "gemma3-collapsed" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    n = len(deployment.prompt_ids(transformers.AutoTokenizer.from_pretrained(work / "gemma3-full")))
    head = flops_per_token(full) - flops_per_token(full, output_head=False)
    prefill = [n * flops_per_token(m, context_length=(n + 1) / 2, output_head=False) + head for m in (full, collapsed)]
    assert results["gemma3_ideal"]["prompt"] == pytest.approx(prefill[0] / prefill[1])
    assert 1 < results["gemma3_ideal"]["generation"] < 6 / 5
    assert "parity" not in results and "onnx" not in results
    assert sorted(results["gemma3_gelu"]) == ["gemma3 collapsed", "gemma3 full"]
    for kind, row in results["gemma3_gelu"].items():
        # ggml's fp16 GELU table alone moves the tiny Gemma-3's logits past 1e-3; float32 rounding stays far below
        assert row["table_vs_exact"] > 1e-3 and row["exact_f32_vs_f64"] < 1e-4, kind
        assert 1 < row["logit_std"] < 3 and "llama_vs_table" not in row, kind
    text = results_md.read_text()
    assert text.startswith("# tables\n") and text.count(deployment.SECTION_BEGIN) == 1
    assert "QUICK smoke run" in text


def test_ggml_gelu_rounds_input_and_output_to_fp16():
    gelu = deployment.GgmlGelu()
    x = torch.tensor([1.0, 1.0001, -3.0, -10.0, -12.0, 10.0, 12.5, 0.0])
    y = gelu(x)
    assert y[0].item() == 0.84130859375  # the tanh GELU at 1 (0.841192...) stored as the nearest fp16
    assert abs(torch.nn.functional.gelu(x[:1], approximate="tanh").item() - 0.84130859375) > 1e-4
    assert y[1] == y[0]  # 1.0001 reads the table at fp16(1.0001) = 1
    assert y[2].item() == float(np.float16(torch.nn.functional.gelu(x[2:3], approximate="tanh").item()))
    assert y[3:].tolist() == [0.0, 0.0, 10.0, 12.5, 0.0]  # no table beyond ±10
    xs = torch.linspace(-9.9, 9.9, 20001)
    exact = torch.nn.functional.gelu(xs, approximate="tanh")
    # one fp16 step in (at most the slope, about 1.13) plus half a step out: relative 2^-11 each
    assert ((gelu(xs) - exact).abs() <= 2 ** -10 * (1.2 * xs.abs() + exact.abs()) + 1e-7).all()
    assert (gelu(xs) - exact).abs().max() > 1e-3  # near 10 an fp16 step is 2^-7


def test_section_tables_carry_the_figures():
    speed = {"tokens_per_s": {"full": {"prompt": 100.0, "generation": 20.0}, "collapsed": {"prompt": 140.0, "generation": 25.0}},
             "speedup": {"prompt": 1.4, "generation": 1.25}, "ideal": {"prompt": 1.36, "generation": 1.27},
             "of_ideal": {"prompt": 1.4 / 1.36, "generation": 1.25 / 1.27}}
    results = {
        "quick": False, "removed": {"smollm2": [20, 21]}, "versions": {"gguf": "0.19.0"},
        "parity": {"smollm2 collapsed": {"max_abs_logit_diff": 1e-4, "argmax_agree": 40, "positions": 41, "greedy_equal": True},
                   "gemma3-27b-shape full": {"max_abs_logit_diff": 9.6e-3, "argmax_agree": 41, "positions": 41,
                                             "greedy_equal": True},
                   "gemma3-27b-shape collapsed": {"max_abs_logit_diff": 5.13, "argmax_agree": 16, "positions": 41,
                                                  "greedy_equal": False},
                   "gemma3-27b-shape collapsed + gguf-metadata": {"max_abs_logit_diff": 1.13e-2, "argmax_agree": 41,
                                                                  "positions": 41, "greedy_equal": True}},
        "llama_cpp_fit": {"gemma3-27b-shape collapsed": {"unsupported": [], "query_scale": [16.0, 32.0]}},
        "speed": {"Q4_0": speed},
        "onnx": {"tokens": 64, "full_max_abs_diff": 3e-6, "collapsed_max_abs_diff": 2e-6,
                 "median_ms": {"full": 20.0, "collapsed": 13.3}, "speedup": 1.5, "ideal": 1.5},
        "gemma3_gelu": {
            kind: {"logit_std": 1.6, "logit_absmax": 9.0, "exact_f32_vs_f64": 6e-6, "table_vs_exact": 3.6e-3 * f,
                   "table_f32_vs_f64": 1.2e-3, "llama_vs_exact": 3.5e-3 * f, "llama_vs_table": 6.9e-4 * f}
            for kind, f in (("gemma3 full", 1.0), ("gemma3 collapsed", 0.8), ("gemma3-27b-shape full", 2.8))
        },
    }
    text = deployment.section(results)
    gelu = text.split("Where the Gemma-3 gap comes from")[1].split("\n")[0]
    for figure in ("3.6e-03", "2.9e-03", "3.5e-03", "2.8e-03", "6.9e-04", "5.5e-04", "6.0e-06", "2.2e-03"):
        assert figure in gelu, figure
    assert "| smollm2 collapsed | 1.0e-04 | 40/41 | yes |" in text
    assert "| gemma3-27b-shape collapsed | 5.13 | 16/41 | no |" in text
    assert "runs with 1/sqrt(head_dim) (5.13 off)" in text
    assert "multiplies each layer's query norm by sqrt(32 / 16)" in text
    assert "1.1e-02 off, argmax 41/41, greedy generation equal (the full 62-layer file: 9.6e-03)" in text
    assert "file's gap (9.8e-03)" in text and "is 1.9e-03 from llama.cpp" in text
    assert "| Q4_0 | prompt | 100.0 | 140.0 | ×1.40 | ×1.36 | 1.03 |" in text
    assert "| Q4_0 | generation | 20.0 | 25.0 | ×1.25 | ×1.27 | 0.98 |" in text
    assert "×1.50 against an ideal ×1.50 (1.00 of ideal)" in text
    assert text.startswith(deployment.SECTION_BEGIN) and text.rstrip().endswith(deployment.SECTION_END)


def test_the_full_study_refuses_to_start_without_the_converter(tmp_path, capsys):
    assert deployment.main(["--llama-cpp-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert deployment.main(["--no-runtimes"]) == 2


def test_speed_up_is_the_median_of_ratios_within_rounds():
    # round 2 ran under load for both models: per-round ratios ignore it, where a ratio of medians would not
    rates = {"full": {"prompt": [100.0, 50.0, 100.0], "generation": [20.0, 10.0, 20.0]},
             "collapsed": {"prompt": [140.0, 70.0, 136.0], "generation": [25.0, 12.5, 26.0]}}
    medians, speedup = deployment.paired(rates)
    assert medians["full"] == {"prompt": 100.0, "generation": 20.0}
    assert speedup == {"prompt": pytest.approx(1.4), "generation": pytest.approx(1.25)}
