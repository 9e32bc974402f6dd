"""sentence-transformers models: recognise one by its files, and keep its modules through a collapse.

A sentence-transformers checkpoint is a transformers model folder plus a few files that describe the
embedding pipeline around it: `modules.json` (the module list: Transformer → Pooling → Normalize, ...),
`sentence_bert_config.json` (the Transformer module's settings, e.g. `max_seq_length`),
`config_sentence_transformers.json` (prompts, similarity function, versions) and one folder per extra
module (`1_Pooling/`, `2_Dense/`, ...). Removing transformer layers does not touch any of these, as long
as every module is one whose saved state cannot depend on the depth of the transformer; such modules are
copied unchanged. Any other module (a custom one, or one that reads per-layer hidden states) is refused by
name, so an export never drops part of the pipeline silently.

Reading and copying the files needs no sentence-transformers install (only loading the export does).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .paths import check_tree_inside, inside_source

__all__ = ["SentenceTransformersLayout", "read_layout", "write_layout"]

MODULES_FILE = "modules.json"
SETTINGS_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")
# Modules whose saved folder is independent of the transformer's depth: copied as they are.
_DEPTH_FREE_MODULES = frozenset({"Pooling", "Normalize", "Dense", "LayerNorm", "Dropout"})
# Modules of the library that hf-collapse cannot carry through a collapse, and why.
_REFUSED_MODULES = {
    "WeightedLayerPooling": "it weights the hidden states of individual layers, whose number the collapse changes",
    "Router": "it routes inputs between several sub-models, which hf-collapse does not collapse",
    "Asym": "it routes inputs between several sub-models, which hf-collapse does not collapse",
}


@dataclass(frozen=True)
class SentenceTransformersLayout:
    """The sentence-transformers files of a checkpoint.

    Attributes:
        folder (`Path`): the local folder the files are read from.
        modules (`list[dict]`): the entries of `modules.json`, in order.
        max_seq_length (`int`, *optional*): the Transformer module's token limit (`sentence_bert_config.json`).
        normalizes (`bool`): whether the pipeline ends in a Normalize module (unit-norm embeddings).
    """

    folder: Path
    modules: list[dict]
    max_seq_length: int | None
    normalizes: bool

    @property
    def module_names(self) -> list[str]:
        """The class name of each module, in order, e.g. `["Transformer", "Pooling", "Normalize"]`."""
        return [_class_name(entry["type"]) for entry in self.modules]


def _class_name(type_ref: str) -> str:
    return type_ref.rsplit(".", 1)[-1]


def _local_folder(source: str | os.PathLike) -> Path | None:
    """``source`` as a local folder: itself, or the cached snapshot of a Hub repo's sentence-transformers files."""
    path = Path(source)
    if path.is_dir():
        return path
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        return None
    # The JSON files and the module folders only (never the weights): the model itself was loaded already.
    patterns = [MODULES_FILE, *SETTINGS_FILES, "[0-9]*_*/*"]
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns, local_files_only=constants.is_offline_mode()))
    except Exception:  # not a Hub repo we can read (offline and not cached, private, absent)
        return None


def read_layout(source: str | os.PathLike) -> SentenceTransformersLayout | None:
    """The sentence-transformers layout of a checkpoint, or `None` if it is a plain transformers checkpoint.

    Args:
        source (`str` or `os.PathLike`): the checkpoint folder, or a Hub id (its cached files are read;
            offline, a Hub id whose sentence-transformers files are not cached reads as a plain checkpoint).

    Raises:
        `ValueError`: the checkpoint is a sentence-transformers model with a module hf-collapse cannot carry
            through a collapse (the message names it), or its Transformer is not the folder's root model.
    """
    folder = _local_folder(source)
    if folder is None or not (folder / MODULES_FILE).is_file():
        return None
    modules = _read_modules(folder, source)
    for entry in modules:
        type_ref, name = entry.get("type", ""), _class_name(entry.get("type", ""))
        where = f"{source} is a sentence-transformers model whose module {entry.get('name')!r} ({type_ref})"
        if not type_ref.startswith("sentence_transformers."):
            raise ValueError(
                f"{where} is custom code that hf-collapse does not understand, so it cannot tell whether that module "
                "still fits the model once layers are removed: collapse the transformer alone (load it with AutoModel, "
                "drop modules.json) or export without that module, and check the result yourself"
            )
        if name in _REFUSED_MODULES:
            raise ValueError(f"{where} cannot be kept through a collapse: {_REFUSED_MODULES[name]}")
        if name == "Transformer":
            if entry.get("path", "") != "":
                raise ValueError(
                    f"{where} keeps the transformer in the subfolder {entry['path']!r}: hf-collapse collapses the model "
                    "at the folder's root; load that subfolder with AutoModel and collapse it on its own"
                )
        elif name not in _DEPTH_FREE_MODULES:
            raise ValueError(
                f"{where} is not one hf-collapse knows to be independent of the transformer's depth (it keeps "
                f"{', '.join(sorted(_DEPTH_FREE_MODULES))} and the Transformer): export the transformer alone"
            )
    if [_class_name(e["type"]) for e in modules].count("Transformer") != 1:
        raise ValueError(f"{source}: modules.json must list exactly one Transformer module for hf-collapse to collapse it")
    settings = inside_source(folder, SETTINGS_FILES[0], "the sentence-transformers settings file")
    inside_source(folder, SETTINGS_FILES[1], "the sentence-transformers settings file")
    max_seq_length = json.loads(settings.read_text(encoding="utf-8")).get("max_seq_length") if settings.is_file() else None
    normalizes = _class_name(modules[-1]["type"]) == "Normalize"
    return SentenceTransformersLayout(folder, modules, max_seq_length, normalizes)


def _read_modules(folder: Path, source) -> list[dict]:
    """The entries of `modules.json`, checked: a list of objects whose `path` (a folder to copy) stays inside the
    checkpoint folder, links included, and holds no link that leads out of it."""
    file = inside_source(folder, MODULES_FILE, "the sentence-transformers module list")
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}): fix or remove it") from None
    if not isinstance(modules, list) or not all(isinstance(e, dict) and isinstance(e.get("type", ""), str) for e in modules):
        raise ValueError(
            f"{file} must be a list of modules (objects with 'name', 'path' and 'type'), as sentence-transformers "
            f"writes it; it holds a {type(modules).__name__}: fix or remove it"
        )
    for entry in modules:
        path = entry.get("path", "")
        if not isinstance(path, str):
            raise ValueError(f"{file}: module {entry.get('name')!r} has a path that is not a string: {path!r}")
        if path:
            module = inside_source(folder, path, f"{MODULES_FILE} module {entry.get('name')!r}")
            if module.is_dir():
                check_tree_inside(module, folder)
    return modules


def write_layout(layout: SentenceTransformersLayout, folder: str | os.PathLike) -> list[str]:
    """Copy the sentence-transformers files of ``layout`` into ``folder`` (a saved transformers model).

    `modules.json`, the settings files and every module folder are copied byte for byte; the Transformer
    module is the model saved in ``folder`` itself. Returns the copied paths, relative to ``folder``.
    """
    folder = Path(folder)
    copied = []
    for name in (MODULES_FILE, *SETTINGS_FILES):
        if (layout.folder / name).is_file():
            shutil.copyfile(layout.folder / name, folder / name)
            copied.append(name)
    for entry in layout.modules:
        path = entry.get("path", "")
        if path and (layout.folder / path).is_dir():  # a module without state (Normalize) may have no folder
            shutil.copytree(layout.folder / path, folder / path)
            copied += sorted(p.relative_to(folder).as_posix() for p in (folder / path).rglob("*") if p.is_file())
    return copied
