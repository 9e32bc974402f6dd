"""lm-evaluation-harness tasks on the model before and after collapse (the optional extra `hf-collapse[lm-eval]`).

Both models are evaluated by EleutherAI's harness exactly as a user would (`--model hf`, the model folder as
`pretrained`), so the figures in the card are the ones anyone can reproduce with `lm_eval`. The standard tasks
(`hellaswag`, `arc_easy`, `arc_challenge`, `mmlu`, ...) read their data from the Hub; offline, a local task file
works (`include_path`: a folder of task YAML files whose `dataset_kwargs.data_files` point to local files).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .card import BenchmarkResult

__all__ = ["LmEvalError", "compare_lm_eval", "run_lm_eval"]


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
    model: str | os.PathLike,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
) -> dict:
    """Run lm-evaluation-harness tasks on one model folder (or Hub id) with its `hf` backend.

    Returns:
        `dict`: `{"results": {task: {metric: value}}, "splits": {task: split}, "datasets": {task: Hub id or None},
        "dataset_configs": {task: name or None}, "num_fewshot": {task: n}}`.

    Raises:
        [`LmEvalError`]: the harness is not installed, a task does not exist, or its data cannot be loaded (e.g.
            a Hub dataset while `HF_DATASETS_OFFLINE` is set).
    """
    manager = _task_manager(include_path)
    _check_tasks(manager, list(tasks))
    import lm_eval
    import torch

    if device is None:  # the harness itself defaults to "cuda", even on a machine without one
        device = "cuda" if torch.cuda.is_available() else "cpu"

    try:
        output = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model)}, tasks=list(tasks), task_manager=manager,
            num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, log_samples=False,
        )
    except (ConnectionError, OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: standard tasks read their data from the Hub; use a local task file)" if offline else ""
        raise LmEvalError(f"lm-eval could not run {', '.join(tasks)} on {model}: {first}{hint}") from error
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


def compare_lm_eval(
    before: str | os.PathLike, after: str | os.PathLike, tasks: list[str], **kwargs
) -> list[BenchmarkResult]:
    """Run the same lm-eval tasks on the base model (``before``) and the collapsed one (``after``).

    Keyword arguments are those of [`run_lm_eval`]. Returns one [`BenchmarkResult`] per task and metric, ready
    for `CollapseReport.benchmarks`; the dataset id is kept only where the task reads a Hub dataset.
    """
    first = run_lm_eval(before, tasks, **kwargs)
    second = run_lm_eval(after, tasks, **kwargs)
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
