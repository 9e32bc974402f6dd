"""benchmarks/deployment.py: the machinery of the llama.cpp / ONNX Runtime study. CI has neither runtime, so the quick
run here makes the exports, the transformers side and the plan (`--no-runtimes`), and the section is rendered from
given figures; the figures themselves come from the full run (`benchmarks/RESULTS.md`)."""

from __future__ import annotations

import json

import pytest
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
    text = results_md.read_text()
    assert text.startswith("# tables\n") and text.count(deployment.SECTION_BEGIN) == 1
    assert "QUICK smoke run" in text


def test_section_tables_carry_the_figures():
    speed = {"tokens_per_s": {"full": {"prompt": 100.0, "generation": 20.0}, "collapsed": {"prompt": 140.0, "generation": 25.0}},
             "speedup": {"prompt": 1.4, "generation": 1.25}, "ideal": {"prompt": 1.36, "generation": 1.27},
             "of_ideal": {"prompt": 1.4 / 1.36, "generation": 1.25 / 1.27}}
    results = {
        "quick": False, "removed": {"smollm2": [20, 21]}, "versions": {"gguf": "0.19.0"},
        "parity": {"smollm2 collapsed": {"max_abs_logit_diff": 1e-4, "argmax_agree": 40, "positions": 41, "greedy_equal": True}},
        "speed": {"Q4_0": speed},
        "onnx": {"tokens": 64, "full_max_abs_diff": 3e-6, "collapsed_max_abs_diff": 2e-6,
                 "median_ms": {"full": 20.0, "collapsed": 13.3}, "speedup": 1.5, "ideal": 1.5},
    }
    text = deployment.section(results)
    assert "| smollm2 collapsed | 1.0e-04 | 40/41 | yes |" in text
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
