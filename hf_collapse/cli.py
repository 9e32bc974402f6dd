"""The `hf-collapse` command.

    hf-collapse train RECIPE.yaml [--field value ...]     fine-tune with the penalty; collapse and export if asked
    hf-collapse validate RECIPE.yaml [--field value ...]  check a recipe without running it
    hf-collapse score RECIPE.yaml [--field value ...]     per-layer scores of the recipe's model
    hf-collapse collapse SRC OUT --layers 1,2             remove explicit layers, export OUT
    hf-collapse collapse SRC OUT --num-layers K --data D  remove the K layers chosen on data D
                    [--repair linear]                    ... and repair the cut, fitted on D's rows
                    [--repair-data G]                    ... half of them from dataset G's text (causal-lm)
    hf-collapse evaluate RECIPE.yaml [--compare MODEL]    metric, perplexity and latency (before/after)
    hf-collapse push OUT --repo-id NAMESPACE/NAME         upload an export in one commit
    hf-collapse recipes [NAME PATH]                       list the shipped recipes, or copy one to PATH
    hf-collapse gguf-metadata FILE.gguf --from OUT        add the per-layer metadata llama.cpp needs to a GGUF

Multi-process training: `accelerate launch --multi_gpu -m hf_collapse.cli train RECIPE.yaml`, or the same with
`torchrun --nproc_per_node N -m hf_collapse.cli train RECIPE.yaml`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import hf_collapse_entry
from hf_collapse_entry import make_parser

__all__ = ["EXIT_FAILED", "EXIT_REFUSED", "main", "make_parser", "run"]

# Exit codes: 2 = the input was refused before anything was written (a push that sent nothing: no token, offline,
# the Hub unreachable); 1 = a failure after work began (files may have been written: checkpoints to resume from, say;
# or a push reached the Hub); an unexpected exception keeps its traceback (exit 1 too).
EXIT_REFUSED = 2
EXIT_FAILED = 1


class CliError(Exception):
    """An error to report in one line (no traceback)."""


class _Outputs:
    """The folders a command may write, with what they held when it started, so that a failure can tell whether
    anything was written (exit 1) or the input was refused first (exit 2)."""

    paths: list[Path] = []
    before: dict[Path, object] = {}

    @classmethod
    def watch(cls, *paths) -> None:
        for path in paths:
            if path is None:
                continue
            path = Path(path).absolute()
            if path not in cls.before:
                cls.paths.append(path)
                cls.before[path] = _fingerprint(path)

    @classmethod
    def written(cls) -> list[Path]:
        return [path for path in cls.paths if _fingerprint(path) != cls.before[path]]

    @classmethod
    def remove_empty_new(cls) -> list[Path]:
        """Remove the watched folders that this command created and that hold no file (a run that failed early)."""
        import shutil

        removed = []
        for path in cls.paths:
            new = cls.before[path][0] is None
            if new and path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    @classmethod
    def reset(cls) -> None:
        cls.paths, cls.before = [], {}


def _fingerprint(path: Path) -> object:
    """What is in ``path`` (and the hidden staging folders next to it): names, sizes and modification times.

    Links are described, never followed (a dangling one is an entry like any other)."""
    from .paths import sibling_prefix

    if not path.exists() and not path.is_symlink():
        entries = None
    elif path.is_dir() and not path.is_symlink():
        entries = sorted(
            (p.relative_to(path).as_posix(), p.lstat().st_size if p.is_file() else -1, p.lstat().st_mtime_ns)
            for p in path.rglob("*")
        )
    else:
        entries = (path.lstat().st_size, path.lstat().st_mtime_ns)
    prefix = sibling_prefix(path)
    siblings = sorted(
        p.name for p in path.parent.glob(f"{prefix}.*") if p.suffix in (".partial", ".old")
    ) if path.parent.is_dir() else []
    return entries, siblings


def _load(recipe_path: str | None, overrides: list[str], *, check_collapse: bool = True):
    from .paths import check_output_folder
    from .recipe import load_recipe

    recipe, config, resolved = load_recipe(recipe_path, overrides, check_collapse=check_collapse)
    check_output_folder(config.output_dir, "output_dir")  # before watching it: '/' would be walked whole
    if recipe.export_dir:
        check_output_folder(recipe.export_dir, "export_dir")
    _Outputs.watch(config.output_dir, recipe.export_dir)
    return recipe, config, resolved


def _cmd_train(args) -> int:
    from .launch import end_processes, leave
    from .pipeline import run_recipe

    recipe, config, resolved = _load(args.recipe, args.overrides)
    try:
        summary = run_recipe(recipe, config, resolved, train=True)
    except BaseException:
        end_processes()
        raise
    # every rank destroys its own group as soon as it is finished (rank 0 may still collapse and export long after
    # the others), then a rank of a multi-process launch leaves without the interpreter's shutdown (see `leave`)
    distributed = end_processes()
    if summary is not None:
        print("\n" + summary.table())
    if distributed:
        leave(0)
    return 0


def _cmd_validate(args) -> int:
    from .models import OFFLINE_MODELS
    from .pipeline import preflight

    recipe, config, resolved = _load(args.recipe, args.overrides)
    name = recipe.model_name_or_path
    preflight(recipe, config)
    if name.startswith("offline:"):
        if name not in OFFLINE_MODELS:
            raise CliError(f"unknown offline model {name!r}: the offline models are {', '.join(OFFLINE_MODELS)}")
        where = "offline asset"
    elif Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise CliError(f"model folder {name} has no config.json")
        where = "local folder"
    else:
        where = "Hub id (not checked offline)"
    for f in recipe.dataset_files or []:
        if not Path(f).is_file():
            raise CliError(f"dataset file {f} does not exist")
    print(f"{args.recipe}: ok — {len(resolved)} keys; model {name} ({where}); task {recipe.task}; "
          f"data {recipe.dataset_name or ', '.join(recipe.dataset_files or [])}; output {config.output_dir}")
    return 0


def _cmd_score(args) -> int:
    from .data import load_task_data
    from .models import load_model, load_processor, resolve_model
    from .scoring import score_layers
    from .tasks import label_free_batches

    recipe, config, _ = _load(args.recipe, args.overrides)
    resolved = resolve_model(recipe.model_name_or_path)
    processor = load_processor(recipe, resolved)
    data = load_task_data(recipe, processor)
    batches = label_free_batches(
        data.train, data.collator, config.per_device_eval_batch_size, limit=recipe.calibration_samples
    )
    if recipe.layerwise_scoring:
        scores = _score_layerwise(resolved, batches, recipe.collapse_score_method)
    else:
        scores = score_layers(load_model(recipe, resolved, processor, data.label_names), batches, method=recipe.collapse_score_method)
        print("scored in memory (the whole model loaded)")
    print(f"layer  {scores.method}")
    for index in range(len(scores)):
        print(f"{index:>5}  {scores.values[index]:.6g}")
    print("most removable first: " + ", ".join(str(i) for i in scores.ranking()))
    return 0


def _score_layerwise(resolved, batches, method: str):
    """Scores of a local safetensors checkpoint read one layer at a time (`layerwise_scoring`); says which path ran."""
    from .layerwise import score_layers_layerwise

    if not Path(resolved.path).is_dir():
        raise CliError(
            f"layerwise_scoring reads the shards of a local checkpoint folder, and {resolved.path} is not one: "
            "download it first (hf download REPO --local-dir DIR) and give the folder"
        )
    scores = score_layers_layerwise(resolved.path, batches, method=method)
    print("scored layer by layer (one layer's weights in memory at a time)")
    return scores


def _check_collapse_paths(src: str, out: str) -> None:
    """Refuse an OUT that is a symlink, a broad target (`/`, home, the working directory or a parent of it), or that
    is, contains or lies inside a local SRC, and a SRC holding links that lead out of it, before anything is created."""
    from .models import resolve_model
    from .paths import check_output_folder, check_tree_inside, overlap

    check_output_folder(out)
    source = Path(resolve_model(src).path)
    if not source.exists():
        return
    if overlap(source, out):
        raise CliError(
            f"the output folder {out} overlaps the source checkpoint {src}: choose an output folder outside it "
            "(the source is never modified)"
        )
    if source.is_dir():
        check_tree_inside(source)  # tokenizer files, code files, module folders: all copied from here


def _cmd_collapse(args) -> int:
    from .paths import OutputLock, check_replaceable

    _check_collapse_paths(args.src, args.out)
    with OutputLock(args.out):  # a second run to the same OUT is refused at once, before any work
        if args.overwrite:
            check_replaceable(args.out)
        _Outputs.watch(args.out)
        return _collapse(args)


def _collapse(args) -> int:
    overrides = ["--model_name_or_path", args.src, "--export_dir", args.out, "--collapse", "true"]
    if args.stream and (args.layers is None or args.data or args.recipe is not None or args.repair not in (None, "none")
                        or args.repair_data):
        raise CliError("--stream rewrites a checkpoint for an explicit --layers list without data: drop --data, --recipe "
                       "and --repair, or drop --stream")
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise CliError(f"--layers takes comma-separated integers such as 1,2; got {args.layers!r}") from None
        if not args.data and args.recipe is None:
            if args.repair not in (None, "none"):
                raise CliError(f"--repair {args.repair} is fitted on calibration rows: pass --data (a dataset) or --recipe")
            return _collapse_without_data(args, layers)
        overrides += ["--collapse_layers", *map(str, layers)]
    elif args.num_layers is not None:
        overrides += ["--collapse_num_layers", str(args.num_layers)]
    else:
        overrides += ["--collapse_tolerance", str(args.tolerance)]
    if args.data:
        parts = args.data.split(",")
        if all(Path(p).is_file() for p in parts):
            overrides += ["--dataset_files", *parts]
        else:
            overrides += ["--dataset_name", args.data]
    elif args.recipe is None:
        raise CliError("choosing layers needs data to measure the model on: pass --data (a dataset) or --recipe, or name them with --layers")
    if args.task:
        overrides += ["--task", args.task]
    if args.method:
        overrides += ["--collapse_score_method", args.method]
    if args.layerwise:
        overrides += ["--layerwise_scoring", "true"]
    if args.repair:
        overrides += ["--collapse_repair", args.repair]
    if args.repair_data:
        if args.repair in (None, "none") and args.recipe is None:
            raise CliError(f"--repair-data {args.repair_data} gives rows to fit a repair on: add --repair linear (or scale, "
                           "transport), or drop --repair-data")
        overrides += ["--repair_dataset_name", args.repair_data]
    if args.overwrite:
        overrides += ["--overwrite_export", "true"]
    if args.trust_remote_code:
        overrides += ["--trust_remote_code", "true"]
    work = Path(args.out).absolute().with_name(Path(args.out).name + ".work")
    overrides += ["--output_dir", str(work)]
    recipe, config, resolved = _load(args.recipe, [*overrides, *args.overrides])
    from .models import resolve_model, task_head_is_new
    from .pipeline import (  # imported here: the no-data path above does not need it
        preflight,
        run_recipe,
    )

    preflight(recipe, config, train=False)  # before the work folder exists
    _clear_stale_work(work)
    source = resolve_model(recipe.model_name_or_path)
    try:
        if task_head_is_new(source, recipe.task, trust_remote_code=recipe.trust_remote_code):  # e.g. a BertModel checkpoint and a classification task
            return _collapse_as_saved(recipe, config, source)
        summary = run_recipe(recipe, config, resolved, train=False)
    finally:
        _remove_work(work)
    print("\n" + summary.table())
    return 0


def _clear_stale_work(work: Path) -> None:
    """An `OUT.work` folder left by a killed collapse: removed when it holds nothing but empty folders (what this
    command writes there), reported otherwise."""
    if not work.exists():
        return
    if work.is_dir() and not any(p.is_file() for p in work.rglob("*")):
        import shutil

        shutil.rmtree(work)
        print(f"removed {work}, an empty work folder left by an interrupted run", file=sys.stderr)
        return
    raise CliError(
        f"{work} exists and is not an empty work folder of hf-collapse (an interrupted run, or someone else's files): "
        "look inside, then remove it or choose another output folder"
    )


def _remove_work(work: Path) -> None:
    import shutil

    if work.is_dir():
        shutil.rmtree(work, ignore_errors=True)


def _collapse_without_data(args, layers: list[int]) -> int:
    """Remove given layers from a checkpoint as it was saved: no data, no scores, no metric (the card says so)."""
    from .models import load_as_saved, load_saved_processor, resolve_model

    if args.overrides or args.task or args.method or args.layerwise or args.repair_data:
        raise CliError("recipe fields, --task, --method, --layerwise and --repair-data need data: add --data or --recipe, "
                       "or drop them")
    source = resolve_model(args.src)
    trust = args.trust_remote_code
    fields = None
    if args.stream:
        from .streaming import plan_stream

        plan = "the source needs its own code (--trust-remote-code)" if trust else plan_stream(source.path, layers)
        if not isinstance(plan, str):
            return _collapse_streamed(args, source, plan, layers)
        print(f"collapsing in memory: the source cannot be rewritten tensor by tensor: {plan}")
        fields = {"collapse_path": {"path": "in-memory", "reason": plan}}
    model = load_as_saved(source, trust_remote_code=trust).eval()
    return _collapse_and_export(
        model, source, load_saved_processor(source, trust_remote_code=trust), args.out, overwrite=args.overwrite, layers=layers,
        note="nothing measured: no data", report_fields=fields,
    )


def _collapse_streamed(args, source, plan, layers: list[int]) -> int:
    """The streamed collapse of a local safetensors checkpoint (see hf_collapse.streaming); prints what was removed."""
    from .models import load_saved_processor
    from .streaming import collapse_streamed

    out, report = collapse_streamed(source, plan, layers, args.out, processing_class=load_saved_processor(source),
                                    overwrite=args.overwrite)
    (stack,) = report.stacks()
    print(
        f"removed layers (0-based, original numbering): {stack.removed_original}: {stack.layers_before} -> "
        f"{stack.layers_after} layers, {report.num_parameters_before:,} -> {report.num_parameters_after:,} parameters; "
        f"streamed as {plan.model_class.__name__} (nothing measured: no data; output check "
        f"{report.collapse_path['probe_check'].split(':')[0]})"
    )
    print(f"output: {Path(out).resolve()}")
    return 0


def _collapse_as_saved(recipe, config, source) -> int:
    """Collapse a checkpoint that has no head for the recipe's task as the class it was saved as, with no task metric.

    Without training a new head would stay random: its accuracy would mean nothing, and publishing it would give
    users a silently wrong classifier. The layers are scored on the data's text, chosen by name or by score, and the
    export is the checkpoint's own class (with a sentence-transformers pipeline when the source has one).
    """
    from .data import load_task_data, repair_rows, training_split_name
    from .models import load_as_saved, load_processor, saved_architecture
    from .tasks import label_free_batches

    trust = recipe.trust_remote_code
    if config.collapse_layers is None and (recipe.collapse_tolerance is not None or recipe.collapse_strategy != "ranked"):
        raise CliError(
            f"{recipe.model_name_or_path} is saved as {saved_architecture(source, trust_remote_code=trust)}, without a {recipe.task} head: a new "
            "head would be untrained, so the validation metric that a measured or tolerance selection chooses by would "
            "measure random weights. Name the layers (--layers 1,4), choose by score (--num-layers K "
            "--collapse_strategy ranked), or train a head first (hf-collapse train)"
        )
    processor = load_processor(recipe, source)
    data = load_task_data(recipe, processor)
    model = load_as_saved(source, trust_remote_code=trust).eval()
    calibration = label_free_batches(
        data.train, data.collator, config.per_device_eval_batch_size, limit=recipe.calibration_samples
    )
    fit_rows, fit_source = None, training_split_name(recipe)
    if recipe.repair_dataset_name and recipe.collapse_repair != "none":
        fit_rows, fit_source = repair_rows(recipe, processor, data.train, recipe.calibration_samples)
        fit_rows = label_free_batches(fit_rows, data.collator, config.per_device_eval_batch_size)
    return _collapse_and_export(
        model, source, processor, recipe.export_dir, overwrite=recipe.overwrite_export, repo_id=recipe.export_repo_id,
        layers=config.collapse_layers, num_layers=None if config.collapse_layers else config.collapse_num_layers,
        strategy="ranked", score_method=recipe.collapse_score_method,
        calibration=calibration, repair=recipe.collapse_repair, repair_calibration=fit_rows,
        scores=_score_layerwise(source, calibration, recipe.collapse_score_method) if recipe.layerwise_scoring else None,
        calibration_source=fit_source,
        protect_first=config.collapse_protect_first, protect_last=config.collapse_protect_last,
        report_fields=dict(
            datasets=list(data.dataset_ids), pipeline_tag="feature-extraction",
            limitations=[
                *source.limitations,
                f"Exported as {type(model).__name__}, the class the source checkpoint was saved as: it has no task "
                f"head and no task metric was measured (a {recipe.task} head would have been untrained).",
            ],
        ),
        note=f"no task metric: the checkpoint has no {recipe.task} head",
    )


def _collapse_and_export(model, source, processor, out, *, overwrite: bool, note: str, repo_id=None, report_fields=None, **choice) -> int:
    """collapse_model on a checkpoint loaded as saved, then export; prints what was removed."""
    from .export import export_collapsed
    from .post import collapse_model

    fields = {"license": source.license, "limitations": list(source.limitations), **(report_fields or {})}
    model, report = collapse_model(model, base_model=source.base_model, report_fields=fields, **choice)
    out = export_collapsed(model, out, report=report, processing_class=processor, repo_id=repo_id, overwrite=overwrite)
    stacks = report.stacks()
    removed = {s.name: s.removed_original for s in stacks}
    before, after = sum(s.layers_before for s in stacks), sum(s.layers_after for s in stacks)
    print(
        f"removed layers (0-based, original numbering): {removed.get('', removed)}: {before} -> {after} "
        f"layers, {report.num_parameters_before:,} -> {report.num_parameters_after:,} parameters; exported as "
        f"{type(model).__name__} ({note})"
    )
    print(f"output: {Path(out).resolve()}")
    return 0


def _cmd_evaluate(args) -> int:
    from .data import load_task_data
    from .evaluation import compare_latency
    from .models import check_head_trained, load_model, load_processor, resolve_model
    from .pipeline import latency_setup
    from .tasks import first_batch, task_evaluator

    # evaluate removes nothing: the recipe's collapse settings are neither needed nor used, so every recipe works
    recipe, config, _ = _load(args.recipe, args.overrides, check_collapse=False)
    resolved = resolve_model(recipe.model_name_or_path)
    processor = load_processor(recipe, resolved)
    data = load_task_data(recipe, processor)
    names = [recipe.model_name_or_path] + ([args.compare] if args.compare else [])
    models = [load_model(recipe, resolve_model(n), processor, data.label_names).eval() for n in names]
    for model in models:  # a head created at load time measures nothing but its random initialisation
        check_head_trained(model, f"evaluate {model.config._name_or_path}")
    metric_name, _, evaluate = task_evaluator(recipe.task, data.eval, data.collator, config.per_device_eval_batch_size)
    for name, model in zip(names, models):
        print(f"{name}: {metric_name} = {evaluate(model):.4f}")
    if recipe.latency_repeats:
        batch = first_batch(data, config.per_device_eval_batch_size, models[0].device)
        result = compare_latency(models[0], models[-1], batch, repeats=recipe.latency_repeats)
        line = f"latency: {result.a.median_ms:.1f} ms"
        if args.compare:
            line += f" vs {result.b.median_ms:.1f} ms (speed-up {result.speedup:.2f}x)"
        print(f"{line} — {latency_setup(result, batch, models[0])}")
    if args.lm_eval_tasks or recipe.lm_eval_tasks:
        _lm_eval(args, recipe, [resolve_model(n).path for n in names])
    return 0


def _lm_eval(args, recipe, paths: list[str]) -> None:
    """lm-eval tasks on the model (and the --compare model); results into the --compare export's card. The
    --lm-eval-* flags override the recipe's lm_eval_* fields."""
    from .export import REPORT_FILE, add_benchmarks
    from .lmeval import LmEvalError, compare_lm_eval, run_lm_eval, sample_limit

    if args.lm_eval_tasks:
        tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    else:
        tasks = list(recipe.lm_eval_tasks)

    def option(flag, field):
        value = getattr(args, flag)
        return value if value is not None else getattr(recipe, field)

    options = dict(
        include_path=option("lm_eval_include", "lm_eval_include"), num_fewshot=option("lm_eval_fewshot", "lm_eval_fewshot"),
        limit=sample_limit(option("lm_eval_limit", "lm_eval_limit")), batch_size=recipe.lm_eval_batch_size,
        trust_remote_code=recipe.trust_remote_code,
    )
    try:
        if len(paths) == 1:
            for task, metrics in run_lm_eval(paths[0], tasks, **options)["results"].items():
                for metric, value in metrics.items():
                    print(f"lm-eval {task} {metric}: {value:.4f}")
            return
        results = compare_lm_eval(paths[0], paths[1], tasks, **options)
    except LmEvalError as error:
        raise CliError(str(error)) from None
    for r in results:
        print(f"lm-eval {r.task} {r.metric}: {r.before:.4f} -> {r.after:.4f}" if r.before is not None
              else f"lm-eval {r.task} {r.metric}: {r.after:.4f}")
    if (Path(paths[1]) / REPORT_FILE).is_file():
        print(f"card updated: {add_benchmarks(paths[1], results)}")


def _cmd_push(args) -> int:
    from .hub import push_folder

    result = push_folder(args.out, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
                         exclude_unknown=args.exclude_unknown)
    if result.excluded:
        print(f"left out {len(result.excluded)} files the export did not write (--exclude-unknown): "
              + ", ".join(result.excluded))
    if args.dry_run:
        print(f"dry run: would upload {len(result.files)} files to {args.repo_id}" + (f"@{args.revision}" if args.revision else ""))
        for name, size in result.files:
            print(f"  {name}  ({size:,} bytes)")
    else:
        print(f"pushed {len(result.files)} files to {args.repo_id} in one commit: {result.commit_url}")
    return 0


def _recipes_root() -> Path:
    """The shipped recipes: `hf_collapse/recipes/` in a wheel, `recipes/` at the root of a source checkout."""
    import importlib.resources

    try:
        root = Path(str(importlib.resources.files("hf_collapse.recipes")))
    except ModuleNotFoundError:  # a source checkout: the editable finder may not map the data-only package
        root = Path(__file__).resolve().parent.parent / "recipes"
    if not any(root.glob("*.yaml")):
        raise CliError(f"no recipes found in {root}: reinstall hf-collapse (the wheel ships them as hf_collapse/recipes/)")
    return root


def _cmd_recipes(args) -> int:
    import shutil

    root = _recipes_root()
    names = sorted(p.stem for p in root.glob("*.yaml"))
    if args.name is None:
        print("\n".join(names))
        return 0
    name = args.name.removesuffix(".yaml")
    if name not in names:
        raise CliError(f"no recipe named {args.name!r}: the recipes are {', '.join(names)}")
    if args.path is None:
        raise CliError(f"say where to copy {name}: hf-collapse recipes {name} PATH")
    target = Path(args.path)
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists():
        raise CliError(f"{target} already exists: choose another path (nothing was copied)")
    shutil.copyfile(root / f"{name}.yaml", target)
    print(f"copied {name} to {target}")
    return 0


def _cmd_gguf_metadata(args) -> int:
    from .gguf_meta import write_layer_metadata

    result = write_layer_metadata(args.file, args.export, args.output, in_place=args.in_place)
    if result.path is None:
        print(f"{args.file} already holds the per-layer metadata llama.cpp needs for {args.export}; nothing written")
        return 0
    for key, value in result.written.items():
        shown = value if isinstance(value, float) else f"[{', '.join('sliding' if f else 'full' for f in value)}]"
        print(f"{key} = {shown}")
    if result.rescaled:
        names, factor = sorted(result.rescaled), next(iter(result.rescaled.values()))
        print(f"multiplied {len(names)} query tensors ({names[0]}, ...) by {factor:.6g}: llama.cpp's query scale "
              "times that is the model's query_pre_attn_scalar")
    print(f"wrote {result.path}")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "validate": _cmd_validate,
    "score": _cmd_score,
    "collapse": _cmd_collapse,
    "evaluate": _cmd_evaluate,
    "push": _cmd_push,
    "recipes": _cmd_recipes,
    "gguf-metadata": _cmd_gguf_metadata,
}


class _DropHubRetryNoise(logging.Filter):
    """huggingface_hub logs two lines per retry of a failed request (ten before it gives up); the command reports
    the outcome in one line of its own, so the retries themselves are not shown."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return " thrown while requesting " not in message and not message.startswith("Retrying in ")


class _DropOfflineKernelNoise(logging.Filter):
    """transformers >= 5.25 installs `kernels`; with it, importing bitsandbytes (peft does, for any command) on a CPU
    with AVX512-BF16 asks the Hub for an optional 4-bit matmul kernel and, offline, logs two lines before it falls
    back to its own. Nothing is lost offline, so those two lines are not shown; online failures still are."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Skipping publisher trust check for ")
            or (message.startswith("Failed to load CPU gemm_4bit_forward") and "offline mode" in message)
        )


# logger name -> the filter that trims its noise; installed by `run` before any verb imports the package
_QUIETED = {
    "huggingface_hub.utils._http": _DropHubRetryNoise,
    "kernels._internals.hf_hub": _DropOfflineKernelNoise,
    "bitsandbytes.backends.cpu.ops": _DropOfflineKernelNoise,
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (see `hf_collapse_entry`, which the `hf-collapse` script calls) and run the verb."""
    return hf_collapse_entry.main(argv)


def run(args: argparse.Namespace) -> int:
    """Run a parsed verb: one line on stderr and exit 2 (refused) or 1 (after work began) for what it refuses."""
    for name, kind in _QUIETED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    import pickle

    from .errors import PushError, PushNotStartedError, RecipeError
    from .paths import OutputBusyError

    _Outputs.reset()
    try:
        return _COMMANDS[args.verb](args)
    except (
        CliError, RecipeError, OSError, ValueError, ModuleNotFoundError, FloatingPointError, pickle.UnpicklingError,
        PushError, OutputBusyError,
    ) as error:
        written = _Outputs.written()
        message = _one_line(error)
        if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, FileExistsError)):
            message += " (check that the folder exists, is writable and has free space)"
        if written:
            removed = _Outputs.remove_empty_new()
            kept = [p for p in written if p not in removed]
            message += " [work had begun" + (f"; kept: {', '.join(map(str, kept))}" if kept else "; nothing was left") + "]"
        # one write of the whole line, so that the ranks of a multi-process launch do not interleave inside it
        sys.stderr.write(f"hf-collapse {args.verb}: error: {message}\n")
        sys.stderr.flush()
        # a push that got past its checks may have created the repo or branch on the Hub: work had begun there
        began = written or (isinstance(error, PushError) and not isinstance(error, PushNotStartedError))
        began = began or getattr(error, "work_began", False)  # e.g. an export that failed while being written
        return EXIT_FAILED if began else EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"hf-collapse {args.verb}: interrupted", file=sys.stderr)
        return 130


MESSAGE_MAX = 1000  # characters of an error's text that the one line keeps


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error)[: 4 * MESSAGE_MAX].split()) or type(error).__name__
    return text if len(text) <= MESSAGE_MAX else text[: MESSAGE_MAX - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
