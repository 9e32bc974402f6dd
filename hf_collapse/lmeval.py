"""lm-evaluation-harness tasks on the model before and after collapse (the optional extra `hf-collapse[lm-eval]`).

Both models are evaluated by EleutherAI's harness exactly as a user would (`--model hf`, the model folder as
`pretrained`), so the figures in the card are the ones anyone can reproduce with `lm_eval`. The recipe runner
passes the models in memory (the harness's `HFLM` around the same `PreTrainedModel` and a copy of its tokenizer):
the full-depth model is then measured without writing a second checkpoint. The standard tasks
(`hellaswag`, `arc_easy`, `arc_challenge`, `mmlu`, ...) read their data from the Hub; offline, a local task file
works (`include_path`: a folder of task YAML files whose `dataset_kwargs.data_files` point to local files).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
from pathlib import Path

import torch

from .report import BenchmarkResult

__all__ = ["LmEvalError", "benchmark_results", "check_lm_eval_tasks", "compare_lm_eval", "run_lm_eval", "sample_limit"]


class LmEvalError(RuntimeError):
    """A task that cannot run (unknown name, data out of reach); the message is one line that says what to do."""


def _task_manager(include_path: str | os.PathLike | None):
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise LmEvalError("lm-evaluation-harness is not installed: pip install 'hf-collapse[lm-eval]'") from None
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def _check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known and not Path(task).is_file()]
    if unknown:
        raise LmEvalError(
            f"lm-eval has no task {', '.join(map(repr, unknown))}: list the names with `lm_eval ls tasks`, or pass a "
            "folder of task YAML files with --lm-eval-include"
        )


def sample_limit(value: float | None) -> int | float | None:
    """The harness's `limit`: a whole number of at least 1 is a count of documents, below 1 a fraction."""
    return int(value) if value is not None and value >= 1 else value


def check_lm_eval_tasks(tasks: list[str], include_path: str | os.PathLike | None = None, *, load: bool = False) -> None:
    """Refuse, before any work, tasks the harness does not know (or a harness that is not installed); with `load`,
    also build the tasks, which reads their data (so data out of reach, e.g. a Hub dataset offline, fails here).

    Raises:
        [`LmEvalError`]: one line naming the unknown tasks and where to find the known ones, or why the data failed.
    """
    manager = _task_manager(include_path)
    _check_tasks(manager, list(tasks))
    if load:
        try:
            manager.load_task_or_group(list(tasks))
        except (ConnectionError, OSError, ValueError, KeyError) as error:
            raise LmEvalError(_failure(tasks, "their data", error)) from error


def _failure(tasks: list[str], what: str, error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (offline mode is on: standard tasks read their data from the Hub; use a local task file)" if offline else ""
    return f"lm-eval could not run {', '.join(tasks)} on {what}: {first}{hint}"


def _metric_values(task_results: dict) -> dict[str, float]:
    """`{metric: value}` from the harness's `"metric,filter"` keys (standard errors and labels left out)."""
    values = {}
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        values[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
    return values


def run_lm_eval(
    model,
    tasks: list[str],
    *,
    tokenizer=None,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Run lm-evaluation-harness tasks on one model with its `hf` backend.

    Args:
        model (`str`, `os.PathLike` or `PreTrainedModel`): a model folder or Hub id (loaded by the harness, as
            `lm_eval --model hf --model_args pretrained=...` would), or a model in memory (then `tokenizer` is
            required; the harness gets a copy of it, so the caller's tokenizer is never changed).

    Returns:
        `dict`: `{"results": {task: {metric: value}}, "splits": {task: split}, "datasets": {task: Hub id or None},
        "dataset_configs": {task: name or None}, "num_fewshot": {task: n}}`.

    Raises:
        [`LmEvalError`]: the harness is not installed, a task does not exist, or its data cannot be loaded (e.g.
            a Hub dataset while `HF_DATASETS_OFFLINE` is set).
    """
    manager = _task_manager(include_path)
    _check_tasks(manager, list(tasks))
    import lm_eval  # an optional extra, installed when the tasks above were found

    if device is None:  # the harness itself defaults to "cuda", even on a machine without one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, torch.nn.Module):
        from lm_eval.models.huggingface import HFLM

        if tokenizer is None:
            raise ValueError("run_lm_eval on a model in memory needs its tokenizer: pass tokenizer=")
        backend = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        model_args, name = None, f"the {type(model).__name__} in memory"
    else:
        backend, name = "hf", str(model)
        model_args = {"pretrained": str(model), "trust_remote_code": bool(trust_remote_code)}

    try:
        output = lm_eval.simple_evaluate(
            model=backend, model_args=model_args, tasks=list(tasks), task_manager=manager,
            num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, log_samples=False,
        )
    except (ConnectionError, OSError, ValueError, KeyError) as error:
        raise LmEvalError(_failure(tasks, name, error)) from error
    configs = output.get("configs", {})
    splits, datasets, dataset_configs = {}, {}, {}
    for task, config in configs.items():
        splits[task] = config.get("test_split") or config.get("validation_split")
        path = config.get("dataset_path")
        local = path in {"json", "csv", "parquet", "text", "arrow"} or (path is not None and Path(path).exists())
        datasets[task] = None if path is None or local else path
        dataset_configs[task] = config.get("dataset_name")
    return {
        "results": {task: _metric_values(values) for task, values in output["results"].items()},
        "splits": splits,
        "datasets": datasets,
        "dataset_configs": dataset_configs,
        "num_fewshot": dict(output.get("n-shot", {})),
    }


def compare_lm_eval(before, after, tasks: list[str], **kwargs) -> list[BenchmarkResult]:
    """Run the same lm-eval tasks on the base model (``before``) and the collapsed one (``after``).

    Keyword arguments are those of [`run_lm_eval`]; the models are folders, Hub ids or models in memory. Returns
    [`benchmark_results`] of the two runs.
    """
    return benchmark_results(run_lm_eval(before, tasks, **kwargs), run_lm_eval(after, tasks, **kwargs))


def benchmark_results(first: dict, second: dict) -> list[BenchmarkResult]:
    """One [`BenchmarkResult`] per task and metric of two [`run_lm_eval`] outputs (before, after), ready for
    `CollapseReport.benchmarks`; the dataset id is kept only where the task reads a Hub dataset."""
    try:
        harness = f"lm-evaluation-harness {importlib.metadata.version('lm_eval')}"
    except importlib.metadata.PackageNotFoundError:
        harness = "lm-evaluation-harness"
    results = []
    for task, metrics in second["results"].items():
        for metric, value in metrics.items():
            results.append(
                BenchmarkResult(
                    task=task, metric=metric, before=first["results"].get(task, {}).get(metric), after=value,
                    split=second["splits"].get(task), dataset=second["datasets"].get(task),
                    dataset_config=second["dataset_configs"].get(task), num_fewshot=second["num_fewshot"].get(task),
                    harness=harness,
                )
            )
    return results
