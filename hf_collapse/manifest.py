"""The manifest of an export: every file [`export_collapsed`] wrote, with its size and SHA-256.

It is written last into the export (`hf_collapse_manifest.json`) and read by [`push_folder`], which uploads exactly
the files it lists, and only while they still match it: a file added to the folder later (a `.env`, a stray
checkpoint) is not part of the export, and a file changed after the export is not what the card describes.
Hashing costs one more read of the weights, 1 to 3 s per GB on one CPU core (writing them takes longer; a push
hashes every file again anyway, for the upload): sizes alone would let a same-size change through.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST_FILE", "ManifestEntry", "file_sha256", "read_manifest", "refresh_manifest", "write_manifest"]

MANIFEST_FILE = "hf_collapse_manifest.json"
_FORMAT = 1
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ManifestEntry:
    """One exported file: its size in bytes and the hex SHA-256 of its bytes."""

    size: int
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _regular_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (relative POSIX paths, sorted); symbolic links are neither followed nor
    listed, and the manifest itself is left out."""
    names = []
    for root, _, files in os.walk(folder):  # does not descend into linked folders
        for name in files:
            path = Path(root) / name
            if stat.S_ISREG(path.lstat().st_mode):
                names.append(path.relative_to(folder).as_posix())
    return sorted(name for name in names if name != MANIFEST_FILE)


def _write(folder: Path, entries: dict[str, ManifestEntry]) -> Path:
    path = folder / MANIFEST_FILE
    files = {name: {"size": entry.size, "sha256": entry.sha256} for name, entry in sorted(entries.items())}
    payload = {"format": _FORMAT, "files": files}
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return path


def write_manifest(folder: str | os.PathLike, known: Mapping[str, ManifestEntry] | None = None) -> Path:
    """Record every regular file of ``folder`` in its manifest; call it once every other file is written.

    ``known`` holds the entries of files whose writer hashed the bytes as it wrote them (the streamed collapse): those
    are taken as they are, provided the file still has the recorded size; every other file is read and hashed.
    Returns the manifest's path.
    """
    folder = Path(folder)
    known = known or {}
    entries = {}
    for name in _regular_files(folder):
        path = folder / name
        size = path.lstat().st_size
        entry = known.get(name)
        entries[name] = entry if entry is not None and entry.size == size else ManifestEntry(size, file_sha256(path))
    return _write(folder, entries)


def refresh_manifest(folder: str | os.PathLike, names: list[str]) -> None:
    """Record again the files ``names`` of an export that were rewritten on purpose (the card, after benchmarks were
    added); the other entries are kept as they are, so nothing added to the folder in the meantime is taken in.
    A folder without a manifest (exported by an older version) is left without one."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        return
    entries = read_manifest(folder)
    for name in names:
        path = folder / name
        if path.is_file() and not path.is_symlink():
            entries[name] = ManifestEntry(path.lstat().st_size, file_sha256(path))
    _write(folder, entries)


def read_manifest(folder: str | os.PathLike) -> dict[str, ManifestEntry]:
    """The files ``folder``'s manifest lists, by relative path.

    Raises:
        `FileNotFoundError`: the folder has no manifest.
        `ValueError`: the manifest is not one [`write_manifest`] writes (the message says what is wrong).
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_FILE}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), dict):
            raise ValueError("not a JSON object with a 'files' object")
        if payload.get("format") != _FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {_FORMAT}")
        entries = {}
        for name, entry in payload["files"].items():
            size, sha256 = entry["size"], entry["sha256"]
            if not isinstance(size, int) or not isinstance(sha256, str) or len(sha256) != 64:
                raise ValueError(f"the entry for {name!r} is not a size and a SHA-256")
            entries[name] = ManifestEntry(size, sha256)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a manifest written by export_collapsed ({error}): export the model again"
        ) from None
    return entries
