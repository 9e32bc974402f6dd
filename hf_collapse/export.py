"""Write a collapsed model to a self-describing folder, atomically (pushing it to the Hub is `hub.py`'s job).

The output folder holds the safetensors weights, `config.json`, `generation_config.json` (generative
models), the tokenizer / processor, the resolved training recipe (`recipe.yaml`), the model card
(`README.md`) and its plot (`layer_scores.png`), and last the list of those files with their hashes
(`hf_collapse_manifest.json`, see `manifest.py`: a push sends exactly them). A model collapsed from a
sentence-transformers checkpoint also gets that checkpoint's `modules.json`, settings and module folders (see `sbert.py`), so
`SentenceTransformer(out)` loads the same pipeline around the shallower transformer. It is built in a hidden sibling folder and renamed
into place, so a failure never leaves a half-written export behind, and an existing export is only
replaced once the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from .assets import write_portable_tokenizer_class
from .card import CARD_FILE, PLOT_FILE, recipe_yaml, write_card
from .layers import find_layer_stacks, unwrap_model
from .manifest import ManifestEntry, refresh_manifest, write_manifest
from .models import check_head_trained
from .paths import (
    OutputLock,
    check_output_folder,
    check_replaceable,
    inside_source,
    sibling_prefix,
)
from .peft_state import has_tuner_layers
from .quantization import is_quantized, refuse_quantized_export
from .report import AUTO_CLASS_BY_PIPELINE_TAG, CollapseReport
from .sbert import read_layout, write_layout

__all__ = ["ExportWriteError", "add_benchmarks", "clear_stale", "export_collapsed", "export_files"]

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
# Inside a staging folder while it is being written: which process writes it, for which export (see clear_stale).
_STAGING_MARKER = ".hf_collapse_staging.json"
# The report the card was rendered from, so that later measurements (lm-eval) can be added and the card rendered again.
REPORT_FILE = "collapse_report.json"
# The pipeline tag of a model by the Auto class it loads with (the first tag of each class in the card's table).
_PIPELINE_TAG_BY_AUTO_CLASS = {auto: tag for tag, auto in reversed(AUTO_CLASS_BY_PIPELINE_TAG.items())}


def export_collapsed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    report: CollapseReport,
    processing_class: object | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Save a collapsed model, its preprocessor, recipe and model card to ``out_dir`` in one atomic step.

    Call it on the main process only. The source checkpoint is never written to: an ``out_dir`` that is,
    contains or lies inside the folder the model was loaded from is refused.

    When the source is a sentence-transformers checkpoint (it has `modules.json`) and the model is its base
    transformer (no task head), the sentence-transformers files are copied into the export and the card is a
    sentence-transformers card (`library_name: sentence-transformers`, `pipeline_tag: sentence-similarity`).
    When the model carries a task head instead, the card says that the pipeline's other modules are not part
    of the export. A model whose newly initialised head was never trained is refused.

    A model whose class is the checkpoint's own code (loaded with `trust_remote_code=True`) is saved with its code
    files (`save_pretrained` copies them; any file its `auto_map` names that is still missing is copied from the
    source folder), and the report's `trust_remote_code` and `remote_code_files` are set from them, so the card says
    that loading the export runs that code.

    Args:
        model (`nn.Module`): the collapsed transformers model (wrappers such as `torch.compile` are looked
            through; merge PEFT adapters first with `merge_and_unload()`).
        out_dir (`str` or `os.PathLike`): the folder to create.
        report ([`CollapseReport`]): what the collapse did; checked against the model's layer and parameter counts.
        processing_class (*optional*): the tokenizer or processor to save with the model.
        repo_id (`str`, *optional*): the Hub repo the folder is meant for; the card's loading snippet uses it.
        overwrite (`bool`, defaults to `False`): replace an existing non-empty ``out_dir`` that holds a previous
            hf-collapse export (its `collapse_report.json`); any other folder is refused. The old folder is kept until
            the new one is complete, then deleted.
        source (`str` or `os.PathLike`, *optional*): the checkpoint the model was loaded from (a folder or Hub
            id), read for sentence-transformers files; defaults to `model.config._name_or_path`.

    Returns:
        `Path`: the absolute path of the export.

    Raises:
        `FileExistsError`: ``out_dir`` exists, is not empty and ``overwrite`` is `False` (or it holds files no export
            wrote).
        [`OutputBusyError`]: another process is writing ``out_dir``.
        `ValueError`: ``out_dir`` is a symlink or a broad target (`/`, home, the working directory or a parent of
            it), the report does not describe this model, the model still carries adapters, ``out_dir``
            overlaps the source checkpoint, or the source is a sentence-transformers model with a module that
            cannot be carried through a collapse (named in the message).
        [`UntrainedHeadError`]: the model has a newly initialised head that was never trained.
        [`ExportWriteError`]: writing failed (a full disk, say); nothing of the export is left and ``out_dir`` is
            as it was.
    """
    inner = unwrap_model(model)
    _check_plain_model(inner)
    check_head_trained(inner, "export it")
    _check_report_matches(inner, report)
    source = source if source is not None else getattr(inner.config, "_name_or_path", "") or None
    layout = read_layout(source) if source else None
    if layout is not None:
        report = _sentence_transformers_report(inner, report, layout)
    out = check_output_folder(out_dir)
    _check_not_source(inner, out)

    def write(staging: Path) -> None:
        _write_folder(staging, out, inner, report, processing_class, layout, repo_id, source)

    _publish(out, overwrite, write)
    return out


def export_files(
    out_dir: str | os.PathLike,
    write_model: Callable[[Path], CollapseReport],
    *,
    config,
    processing_class: object | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
    known_digests: Mapping[str, ManifestEntry] | None = None,
) -> Path:
    """Write an export whose weights and config another writer makes (the streamed collapse), atomically as
    [`export_collapsed`] does, with the same tokenizer, card, `collapse_report.json` and manifest.

    Args:
        out_dir: the folder to create (the same checks and `overwrite` rule as [`export_collapsed`]).
        write_model: writes the weights and `config.json` into the folder it is given (the hidden staging folder) and
            returns the report to write with them.
        config: the collapsed config (its `collapsed_layers` and `original_num_hidden_layers`, for the report file).
        processing_class, repo_id, overwrite: as for [`export_collapsed`].
        known_digests: the size and SHA-256 of files `write_model` hashed as it wrote them (by the time it returns),
            which the manifest takes instead of reading those files again.

    Raises:
        As [`export_collapsed`]; whatever `write_model` raises, with nothing of the export left behind.
    """
    out = check_output_folder(out_dir)

    def write(staging: Path) -> None:
        (staging / _STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "out": str(out)}), encoding="utf-8")
        report = write_model(staging)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        report = report.updated(trust_remote_code=False, remote_code_files=[])
        _finish_folder(staging, report, config, processing_class, repo_id, known_digests)

    _publish(out, overwrite, write)
    return out


def _publish(out: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a new staging folder next to ``out`` and rename it into place, holding ``out``'s lock; a
    failure leaves nothing of the export behind."""
    with OutputLock(out):  # one writer per folder: a second run is refused, never silently replaced
        clear_stale(out)  # before the checks below: a restored old export counts as existing
        _check_target(out, overwrite)
        staging = _staging_folder(out)
        try:
            write(staging)
            _check_target(out, overwrite)  # again: a folder created meanwhile by someone else is not replaced
            _move_into_place(staging, out)
        except FileExistsError:  # OUT appeared meanwhile: refused as above
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as error:  # a full disk, a quota, a vanished folder: nothing of the export is left
            shutil.rmtree(staging, ignore_errors=True)
            failure = ExportWriteError(f"writing the export {out} failed, nothing of it was kept: {error}")
            failure.errno = error.errno
            raise failure from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another output path")
    if overwrite:
        check_replaceable(out)
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} already exists and is not empty: choose another folder or pass overwrite=True to replace it"
        )


class ExportWriteError(OSError):
    """Writing an export failed after it had begun (its staging folder is removed, ``out`` is left as it was)."""

    work_began = True


def _staging_folder(out: Path) -> Path:
    """A new hidden folder next to ``out`` to write the export in (a short name, whatever the length of ``out``'s;
    created with the umask's permissions, as the export folder will have them)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            staging = out.parent / f"{sibling_prefix(out)}.{uuid.uuid4().hex[:8]}.partial"
            try:
                os.mkdir(staging)
                break
            except FileExistsError:
                continue
    except OSError as error:
        raise PermissionError(
            f"cannot write the export next to {out}: {error.strerror or error}; choose a folder you can write to"
        ) from error
    return staging


def _write_folder(
    staging: Path, out: Path, model: nn.Module, report: CollapseReport, processing_class, layout, repo_id, source
) -> None:
    """Write every file of the export to ``out`` into ``staging`` and check them, inside a marker that says which
    process writes it, for which export (see [`clear_stale`])."""
    (staging / _STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "out": str(out)}), encoding="utf-8")
    model.save_pretrained(staging, safe_serialization=True)
    if processing_class is not None:
        processing_class.save_pretrained(staging)
        write_portable_tokenizer_class(staging)
    report = _remote_code_report(model, processing_class, report, staging, source)
    if layout is not None and report.sentence_transformers_modules is not None:
        write_layout(layout, staging)
    _finish_folder(staging, report, model.config, processing_class, repo_id)


def _finish_folder(staging: Path, report: CollapseReport, config, processing_class, repo_id, known_digests=None) -> None:
    """The files every export has besides the model: recipe, card, report, and last the manifest."""
    if report.recipe is not None:
        (staging / RECIPE_FILE).write_text(recipe_yaml(report.recipe), encoding="utf-8")
    write_card(report, staging, repo_id=repo_id, processing_class=processing_class)
    (staging / REPORT_FILE).write_text(
        json.dumps({"repo_id": repo_id, "collapsed_layers": _all_removed(config, report), "report": report.to_dict()}, indent=1),
        encoding="utf-8",
    )
    _check_safetensors_only(staging)
    (staging / _STAGING_MARKER).unlink()
    write_manifest(staging, known_digests)  # last: what a push may send (see hub.upload_plan)


def add_benchmarks(folder: str | os.PathLike, benchmarks: list) -> Path:
    """Add benchmark results (e.g. from [`compare_lm_eval`]) to an export and render its card again.

    Results for a task and metric already in the report replace the old ones. The card (`README.md`), its plot and
    `collapse_report.json` are rewritten; the weights are not touched. Returns the card's path.
    """
    folder = Path(folder)
    saved = folder / REPORT_FILE
    if not saved.is_file():
        raise FileNotFoundError(
            f"{folder} has no {REPORT_FILE}: add results to a folder written by export_collapsed (hf-collapse train or "
            "collapse), whose card can be rendered again"
        )
    stored = json.loads(saved.read_text(encoding="utf-8"))
    report = CollapseReport.from_dict(stored["report"])
    new = {(b.task, b.metric) for b in benchmarks}
    report = report.updated(benchmarks=[b for b in report.benchmarks if (b.task, b.metric) not in new] + list(benchmarks))
    processing_class = None
    if (folder / "tokenizer_config.json").is_file():
        processing_class = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # never run code implicitly
    card = write_card(report, folder, repo_id=stored.get("repo_id"), processing_class=processing_class)
    stored.update(report=report.to_dict())
    saved.write_text(json.dumps(stored, indent=1), encoding="utf-8")
    refresh_manifest(folder, [CARD_FILE, PLOT_FILE, REPORT_FILE])
    return card


def _sentence_transformers_report(model: nn.Module, report: CollapseReport, layout) -> CollapseReport:
    """The report of an export from a sentence-transformers checkpoint: its pipeline when the model is the bare
    transformer, else a limitation saying what the export leaves out."""
    if model.base_model is model:  # the transformer itself, as the Transformer module loads it
        if report.pipeline_tag not in (None, "feature-extraction", "sentence-similarity"):
            raise ValueError(
                f"the report's pipeline_tag is {report.pipeline_tag!r} but the model is a bare {type(model).__name__} "
                "exported with its sentence-transformers pipeline: use 'sentence-similarity' (or leave it unset)"
            )
        return report.updated(
            pipeline_tag="sentence-similarity", sentence_transformers_modules=layout.module_names,
            max_seq_length=layout.max_seq_length,
        )
    note = (
        f"The source is a sentence-transformers model ({' → '.join(layout.module_names)}); this export is a "
        f"{type(model).__name__} with a trained task head, loaded with transformers. Its sentence-transformers "
        "modules (and their settings) are not part of it."
    )
    return report.updated(limitations=[*report.limitations, note])


def _remote_code_report(model: nn.Module, processing_class, report: CollapseReport, staging: Path, source) -> CollapseReport:
    """The report with `trust_remote_code` and `remote_code_files` as the saved folder needs them.

    transformers' `save_pretrained` copies the code of a class loaded from a checkpoint's own code (one it registered
    for an Auto class) and names it in `auto_map`; a module of this folder that `auto_map` names and that is still
    missing is copied from the source folder (an entry `namespace/repo--module.Class` loads from that repo). An export
    that would not load (a named module nowhere to be found) is refused.
    """
    shipped = [obj for obj in (model, getattr(model, "config", None), processing_class)
               if getattr(obj, "_auto_class", None) is not None]
    if not shipped:
        return report.updated(trust_remote_code=False, remote_code_files=[])
    modules = set()
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        path = staging / name
        if not path.is_file():
            continue
        for target in (json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}).values():
            for ref in target if isinstance(target, (list, tuple)) else [target]:
                if isinstance(ref, str) and "--" not in ref:  # "namespace/repo--module.Class" loads from that repo
                    modules.add(ref.rsplit(".", 1)[0])
    source_dir = Path(source) if source and Path(str(source)).is_dir() else None
    for module in sorted(modules):
        file = f"{module.replace('.', '/')}.py"
        inside_source(staging, file, f"the export's auto_map module {module!r}")  # e.g. '..x' would name '//x.py'
        if not (staging / file).is_file() and source_dir is not None and (source_dir / file).is_file():
            inside_source(source_dir, file, "the code file")
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dir / file, staging / file)
        if not (staging / file).is_file():
            raise ValueError(
                f"the export's auto_map names the code module {module!r} but {file} is neither saved with the model nor "
                "in the source folder, so the export would not load: put the checkpoint's code files in its folder"
            )
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.py"))
    # the card's loading snippet must use an Auto class the code registers (AutoModel may not be one of them)
    tag = report.pipeline_tag or _PIPELINE_TAG_BY_AUTO_CLASS.get(getattr(model, "_auto_class", None))
    return report.updated(trust_remote_code=True, remote_code_files=files, pipeline_tag=tag)


def _check_plain_model(model: nn.Module) -> None:
    if has_tuner_layers(model):
        merge = (
            "`model = merge_dequantized(peft_model)` (on 4-/8-bit weights, merge_and_unload() would quantise the sum "
            "again)" if is_quantized(model) else "`model = model.merge_and_unload()`"
        )
        raise ValueError(
            "the model still carries PEFT adapter layers, so save_pretrained would write adapter keys that plain "
            f"from_pretrained cannot load: merge them first with {merge}"
        )
    refuse_quantized_export(model)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} has no save_pretrained: export a transformers PreTrainedModel")


def _check_report_matches(model: nn.Module, report: CollapseReport) -> None:
    if not isinstance(report, CollapseReport):
        raise ValueError(
            f"export_collapsed needs the CollapseReport of the collapse that made this model, got {type(report).__name__}: "
            "pass the report that collapse_model or collapse_layers returned (report=...)"
        )
    have = {stack.name: len(stack) for stack in find_layer_stacks(model)}
    want = {stack.name: stack.layers_after for stack in report.stacks()}
    if have.keys() != want.keys():
        raise ValueError(
            f"the report describes layer stacks {sorted(want)} but the model has {sorted(have)}: "
            "build the report for this model"
        )
    for name, count in want.items():
        if have[name] != count:
            where = f"the {name} stack" if name else "the model"
            raise ValueError(
                f"the report says {where} has {count} layers after the collapse but it has {have[name]}: "
                "export the collapsed model (after collapse_layers), with the report of that collapse"
            )
    # collapse_layers records what it removed in the original numbering: the card must say the same.
    recorded = getattr(model.config, "collapsed_layers", None)
    if recorded is None and any(stack.removed for stack in report.stacks()):
        raise ValueError(
            f"the report says layers {_show(_in_original_numbering(model.config, report))} were removed but this model "
            "was never collapsed (its config has no collapsed_layers): export the model that collapse_layers returned, "
            "with the report of that collapse"
        )
    if recorded is not None:
        recorded = {k: sorted(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {"": sorted(recorded)}
        reported = _in_original_numbering(model.config, report)
        if recorded != reported:
            raise ValueError(
                f"the report says layers {_show(reported)} were removed but the model's config records "
                f"{_show(recorded)} (config.collapsed_layers): build the report from the collapse that made this model"
            )
    parameters = model.num_parameters()
    if parameters != report.num_parameters_after:
        raise ValueError(
            f"the report says the collapsed model has {report.num_parameters_after:,} parameters but it has "
            f"{parameters:,}: count them on the model being exported (model.num_parameters(), shared weights once)"
        )


def _in_original_numbering(config, report: CollapseReport) -> dict[str, list[int]]:
    """The report's removed layers plus any earlier ones, in the original model's numbering."""
    earlier = report.earlier_removed
    if earlier is None:
        return {stack.name: stack.removed for stack in report.stacks()}
    earlier = {k: sorted(v) for k, v in earlier.items()} if isinstance(earlier, dict) else {"": sorted(earlier)}
    originals = getattr(config, "original_num_hidden_layers", None)
    originals = originals if isinstance(originals, dict) else {"": originals}
    result = {}
    for stack in report.stacks():
        before = earlier.get(stack.name, [])
        total = originals.get(stack.name) or stack.layers_before + len(before)
        survivors = [i for i in range(total) if i not in set(before)]
        result[stack.name] = sorted(before + [survivors[i] for i in stack.removed if i < len(survivors)])
    return result


def _all_removed(config, report: CollapseReport) -> list[int] | dict[str, list[int]]:
    """Every layer removed so far, in the original numbering, shaped as `config.collapsed_layers` is."""
    per_stack = _in_original_numbering(config, report)
    return per_stack[""] if list(per_stack) == [""] else per_stack


def _show(per_stack: dict[str, list[int]]) -> str:
    return str(per_stack[""]) if list(per_stack) == [""] else str(per_stack)


def _check_not_source(model: nn.Module, out: Path) -> None:
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source or not Path(source).is_dir():
        return
    source_dir, target = Path(source).resolve(), out.resolve()
    if target == source_dir or source_dir in target.parents or target in source_dir.parents:
        raise ValueError(
            f"the output folder {out} overlaps the checkpoint the model was loaded from ({source_dir}): "
            "export to a separate folder so the source stays untouched"
        )


def _check_safetensors_only(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickled:
        raise ValueError(
            f"the export would contain pickled weights ({', '.join(pickled)}), which can run code when loaded; "
            "hf-collapse exports safetensors only: save the model's weights as safetensors"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"save_pretrained wrote no safetensors weights into {folder}: export a transformers model")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: str | os.PathLike) -> list[str]:
    """Clean up what an interrupted [`export_collapsed`] to ``out`` left next to it; returns what was done.

    - a hidden staging folder (`.hfc-HASH.xxxxxxxx.partial`, HASH from OUT's name, see `paths.sibling_prefix`) whose writer is no longer running is deleted (a live
      writer's is left alone);
    - a retired copy of an old export (`.hfc-HASH.xxxxxxxx.old`, from a kill between the two renames of a replacement)
      is deleted when ``out`` exists, and renamed back to ``out`` when it does not (the old export is restored).
    Each action is logged as a warning.
    """
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    done = []
    pattern = re.compile(rf"^{re.escape(sibling_prefix(out))}\.[A-Za-z0-9_]{{8}}\.(partial|old)$")
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        if match.group(1) == "partial":
            marker = path / _STAGING_MARKER
            try:
                owner = json.loads(marker.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = {}
            if owner.get("out") not in (None, str(out)):
                continue
            if owner.get("pid") not in (None, os.getpid()) and _alive(int(owner["pid"])):
                continue  # another process is writing this export right now
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, a half-written export left by an interrupted run")
        elif out.exists():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, an old export that an interrupted replacement had set aside")
        else:
            os.rename(path, out)
            done.append(f"restored {out.name} from {path.name}: an interrupted replacement had set it aside")
    for line in done:
        logger.warning(f"{out.parent}: {line}")
    return done


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` folder to ``out``, replacing an existing ``out`` only at the end."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = out.parent / f"{sibling_prefix(out)}.{uuid.uuid4().hex[:8]}.old"
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    shutil.rmtree(retired)
