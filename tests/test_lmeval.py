"""lm-evaluation-harness before/after through `hf-collapse evaluate`, offline, with a local perplexity task (issue #12,
item 4). The model is a tiny Llama with the real SmolLM2 tokenizer (lm-eval's `hf` backend loads it from its folder)."""

import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_collapse.assets import shakespeare_works, smollm2_path
from hf_collapse.card import render_card
from hf_collapse.report import BenchmarkResult, CollapseReport
from hf_collapse.cli import main

TASK_YAML = """\
task: heldout_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _cli(*args):
    """The command in this process (lm-eval and transformers are imported once for the whole file)."""
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    base = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    works = shakespeare_works()
    names = sorted(works)
    train = root / "train.txt"
    train.write_text(works[names[0]][:20000])
    heldout = root / "heldout.jsonl"  # another work: text nobody chose layers on
    lines = [line.strip() for line in works[names[5]].splitlines() if len(line.strip()) > 40][:6]
    heldout.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "heldout_ppl.yaml").write_text(TASK_YAML.format(data=heldout))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {base}\ntask: causal-lm\ndataset_files: [{train}]\nmax_length: 32\n"
                      f"max_train_samples: 8\nmax_eval_samples: 4\noutput_dir: {root / 'run'}\nlatency_repeats: 0\n")
    out = root / "collapsed"
    result = _cli("collapse", base, out, "--layers", "1", "--data", train, "--task", "causal-lm", "--max_length", "32",
                  "--max_train_samples", "8", "--max_eval_samples", "4", "--calibration_samples", "4",
                  "--latency_repeats", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "base": base, "out": out, "tasks": tasks, "recipe": recipe}


@pytest.mark.slow
def test_evaluate_runs_a_local_lm_eval_task_on_both_models_and_puts_it_in_the_card(setup):
    out = setup["out"]
    weights_before = (out / "model.safetensors").read_bytes()
    result = _cli("evaluate", setup["recipe"], "--compare", out, "--lm-eval-tasks", "heldout_ppl",
                  "--lm-eval-include", setup["tasks"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "card updated" in result.stdout
    report = json.loads((out / "collapse_report.json").read_text())["report"]
    figures = {b["metric"]: b for b in report["benchmarks"]}
    assert set(figures) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for b in figures.values():
        assert b["task"] == "heldout_ppl" and b["split"] == "test" and b["dataset"] is None  # local data: no Hub id
        assert b["num_fewshot"] == 0 and b["harness"].startswith("lm-evaluation-harness 0.4")
        assert math.isfinite(b["before"]) and math.isfinite(b["after"]) and b["before"] != b["after"]
    # the harness's own relation between its figures holds for both models (values parsed from the right keys)
    for when in ("before", "after"):
        assert figures["bits_per_byte"][when] == pytest.approx(math.log2(figures["byte_perplexity"][when]), rel=1e-6)
        assert figures["word_perplexity"][when] > figures["byte_perplexity"][when] > 1
    card = ModelCard.load(out / "README.md")
    row = f"| heldout_ppl | word_perplexity | test | 0 | {figures['word_perplexity']['before']:.4g} | "
    assert row in card.text
    assert f"{figures['word_perplexity']['after']:.4g} |" in card.text
    # local data is no Hub dataset: the figures stay in the body, the model-index keeps only Hub-backed results
    assert not any(r.dataset_type == "json" for r in card.data.eval_results or [])
    assert (out / "model.safetensors").read_bytes() == weights_before


@pytest.mark.slow
@pytest.mark.parametrize(("task", "message"), [
    ("no_such_task", "lm-eval has no task 'no_such_task'"),
    ("hellaswag", "offline mode is on"),
])
def test_bad_lm_eval_tasks_give_one_line(setup, task, message):
    result = _cli("evaluate", setup["recipe"], "--lm-eval-tasks", task, "--lm-eval-limit", "2")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf-collapse evaluate: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_hub_backed_benchmarks_enter_model_index_with_this_models_value_only():
    report = CollapseReport(
        base_model="HuggingFaceTB/SmolLM2-135M", removed_layers=[3], layers_before=6, num_parameters_before=100,
        num_parameters_after=90, scores=[1.0] * 6, score_method="block_influence", pipeline_tag="text-generation",
        benchmarks=[
            BenchmarkResult("hellaswag", "acc_norm", 0.43, 0.39, split="validation", dataset="Rowan/hellaswag",
                            num_fewshot=0, harness="lm-evaluation-harness 0.4.13"),
            BenchmarkResult("local_ppl", "word_perplexity", 30.0, 35.0, split="test"),
        ],
    )
    card = ModelCard(render_card(report))
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_split, result.metric_type, result.metric_value) == (
        "Rowan/hellaswag", "validation", "acc_norm", 0.39)
    assert result.dataset_args == {"num_few_shot": 0}
    assert "| hellaswag | acc_norm | validation | 0 | 0.43 | 0.39 | lm-evaluation-harness 0.4.13 |" in card.text
    assert "| local_ppl | word_perplexity | test | — | 30 | 35 |" in card.text
    assert "No evaluation was recorded" not in card.text


def _train_recipe(setup, name: str, extra: str) -> "Path":
    root = setup["root"]
    recipe = root / f"{name}.yaml"
    recipe.write_text(setup["recipe"].read_text().replace(f"output_dir: {root / 'run'}", f"output_dir: {root / name}")
                      + "max_steps: 2\nper_device_train_batch_size: 2\n"
                      + ("" if "collapse: false" in extra else "collapse_layers: [1]\nmsw_adaptive: false\n")
                      + "save_strategy: 'no'\nreport_to: none\n" + extra)
    return recipe


@pytest.mark.slow
def test_recipe_runner_puts_lm_eval_before_and_after_into_the_card(setup):
    """`lm_eval_tasks` in a recipe: the harness measures the full-depth model and the collapsed one in memory; the
    figures equal what `lm_eval --model hf` gets from the folders (lr 0 keeps the full-depth weights = the base)."""
    from hf_collapse.lmeval import run_lm_eval

    recipe = _train_recipe(setup, "run-lmeval", f"learning_rate: 0.0\nlm_eval_tasks: [heldout_ppl]\n"
                                                 f"lm_eval_include: {setup['tasks']}\n")
    result = _cli("train", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lm-eval heldout_ppl word_perplexity" in result.stdout  # the closing table
    out = setup["root"] / "run-lmeval" / "collapsed"
    report = json.loads((out / "collapse_report.json").read_text())["report"]
    assert report["removed_layers"] == [1]
    figures = {b["metric"]: b for b in report["benchmarks"]}
    assert set(figures) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    from_folders = {
        when: run_lm_eval(path, ["heldout_ppl"], include_path=setup["tasks"], device="cpu")["results"]["heldout_ppl"]
        for when, path in (("before", setup["base"]), ("after", out))
    }
    for metric, bench in figures.items():
        assert bench["split"] == "test" and bench["harness"].startswith("lm-evaluation-harness")
        assert bench["before"] == pytest.approx(from_folders["before"][metric], rel=1e-4)
        assert bench["after"] == pytest.approx(from_folders["after"][metric], rel=1e-4)
        assert bench["before"] != bench["after"]  # two models measured (a random tiny model: close figures)
    card = (out / "README.md").read_text()
    assert f"| heldout_ppl | word_perplexity | test | 0 | {figures['word_perplexity']['before']:.4g} | " in card
    # the tokenizer the harness used was a copy: the exported one is the source's
    assert (out / "tokenizer.json").read_bytes() == (setup["base"] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(("extra", "message"), [
    ("lm_eval_tasks: [no_such_task]\n", "lm-eval has no task 'no_such_task'"),
    ("lm_eval_tasks: [hellaswag]\n", "offline mode is on"),  # its data is on the Hub: refused before training
    ("lm_eval_tasks: [heldout_ppl]\ncollapse: false\n", "lm_eval_tasks compare the full-depth and the collapsed model"),
    ("lm_eval_tasks: [heldout_ppl]\nlm_eval_limit: 0\n", "lm_eval_limit must be above 0"),
])
def test_recipe_lm_eval_refusals_come_before_training(setup, extra, message):
    name = f"refused-{abs(hash(extra)) % 10**6}"
    recipe = _train_recipe(setup, name, extra + f"lm_eval_include: {setup['tasks']}\n")
    result = _cli("train", recipe)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (setup["root"] / name).exists()  # nothing written: refused before training


def test_lm_eval_tasks_need_a_causal_lm_recipe():
    from hf_collapse.recipe import RecipeArguments, RecipeError

    with pytest.raises(RecipeError, match="use them with task: causal-lm"):
        RecipeArguments(model_name_or_path="offline:all-MiniLM-L6-v2", lm_eval_tasks=["hellaswag"])
