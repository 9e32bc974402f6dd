"""Checks on the folders hf-collapse reads from and writes to, so that nothing outside them is read or touched.

A checkpoint is untrusted input: a path it names (a sentence-transformers module, an `auto_map` code file) or a
symlink it holds may point anywhere, and whatever the export copies from it could then be pushed to the Hub. Every
such path is resolved (symlinks included) and must stay inside the checkpoint folder. An output folder is checked
before anything is written: a broad target (`/`, the home folder, the working directory or one of its parents) or a
symlink is refused, `--overwrite` replaces only an empty folder or a previous hf-collapse export, and one writer at
a time holds it (a lock file beside it, see [`OutputLock`]).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

__all__ = [
    "OutputBusyError", "OutputLock", "check_output_folder", "check_replaceable", "check_tree_inside", "inside",
    "inside_source", "overlap", "sibling_prefix",
]

# A folder holding this file was written by export_collapsed: --overwrite may replace it.
EXPORT_MARK = "collapse_report.json"


class OutputBusyError(RuntimeError):
    """Another process is writing the same output folder."""


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``, with every symlink resolved, is ``root`` or lies inside it (``root`` resolved too)."""
    target, base = Path(path).resolve(), Path(root).resolve()
    return target == base or base in target.parents


def overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one of two paths (symlinks resolved) is, or lies inside, the other."""
    return inside(a, b) or inside(b, a)


def _source_root(folder: Path) -> Path:
    """The folder links may point into: a Hub cache snapshot's files are links to its repo's `blobs/`."""
    return folder.parent.parent if folder.parent.name == "snapshots" else folder


def inside_source(folder: str | os.PathLike, relative: str, what: str) -> Path:
    """``folder / relative``, checked to be a relative path that stays inside ``folder`` once resolved.

    Raises:
        `ValueError`: ``relative`` is absolute, climbs out with `..`, or leads (through a symlink) outside ``folder``.
    """
    folder = Path(folder)
    if not isinstance(relative, str) or os.path.isabs(relative) or os.path.normpath(relative).split(os.sep)[0] == "..":
        raise ValueError(
            f"{what} names the path {relative!r}, which is not inside the checkpoint folder {folder}: a checkpoint's "
            "files must stay in its folder; fix the path (relative, no '..')"
        )
    path = folder / relative
    if not inside(path, _source_root(folder)):
        raise ValueError(
            f"{what} {relative!r} in {folder} is a symlink to {path.resolve()}, outside the checkpoint folder: "
            "copy the file into the folder instead of linking to it"
        )
    return path


def check_tree_inside(root: str | os.PathLike, within: str | os.PathLike | None = None) -> None:
    """Refuse a folder that holds a symlink (at any depth) pointing outside it (or outside ``within``, the checkpoint
    folder that ``root`` is part of).

    Raises:
        `ValueError`: naming the first such link and where it points.
    """
    root = Path(root)
    base = _source_root(Path(within) if within is not None else root)
    for folder, dirs, files in os.walk(root):  # never follows links to folders: each is checked, not entered
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink() and not inside(path, base):
                raise ValueError(
                    f"{path} is a symlink to {path.resolve()}, outside the checkpoint folder {base}: hf-collapse "
                    "copies nothing from outside the source; replace the link by the file itself or remove it"
                )


def _broad(folder: Path) -> str | None:
    """Why ``folder`` (absolute, resolved) is too broad to be an output folder, or `None`."""
    cwd = Path.cwd().resolve()
    if folder == Path(folder.anchor):
        return "the root of the file system"
    if folder == Path.home().resolve():
        return "your home folder"
    if folder == cwd:
        return "the current working directory"
    if folder in cwd.parents:
        return "a parent of the current working directory"
    return None


def check_output_folder(out: str | os.PathLike, what: str = "the output folder") -> Path:
    """Refuse an output folder that is a symlink or a broad target; returns its absolute path.

    Raises:
        `ValueError`: ``out`` is a symlink (even a dangling one), `/`, the home folder, the working directory or one
            of its parents.
    """
    path = Path(out).expanduser().absolute()
    if path.is_symlink():
        raise ValueError(
            f"{what} {out} is a symlink (to {os.readlink(path)}): give the real folder's path, or another folder"
        )
    reason = _broad(path.resolve())
    if reason is not None:
        raise ValueError(
            f"{what} {out} is {reason}: hf-collapse writes into a folder of its own; give a new subfolder such as "
            f"{path / 'collapsed'}"
        )
    return path


def check_replaceable(out: str | os.PathLike) -> None:
    """Refuse to replace ``out`` unless it is empty or holds a previous hf-collapse export (its `collapse_report.json`).

    Raises:
        `FileExistsError`: ``out`` is not a folder, or holds files that no hf-collapse export wrote.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose another output path")
    if any(out.iterdir()) and not (out / EXPORT_MARK).is_file():
        raise FileExistsError(
            f"{out} holds files that are not an hf-collapse export (no {EXPORT_MARK}), so overwrite will not replace "
            "it: choose another output folder, or move those files away first"
        )


def sibling_prefix(out: str | os.PathLike) -> str:
    """The name prefix of the hidden files hf-collapse keeps beside ``out`` (staging folder, lock): short whatever
    the length of ``out``'s name, so that a name up to the file system's limit still works."""
    out = Path(out).absolute()
    return f".hfc-{hashlib.sha256(out.name.encode('utf-8', 'surrogateescape')).hexdigest()[:12]}"


_HELD: dict[Path, list] = {}  # lock file -> [open file descriptor, depth]: a process may nest its own lock


class OutputLock:
    """Hold ``out`` for one writer: a lock file beside it (`fcntl.flock`, never waiting), removed on release.

    A process killed while holding it leaves the file behind, unlocked (the kernel drops the lock): the next run
    takes it and removes it.

    A second process that asks for the same folder gets [`OutputBusyError`] at once; the same process may take the
    lock again (the export inside a CLI command that holds it already).
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).absolute()
        self.path = self.out.parent / f"{sibling_prefix(self.out)}.lock"

    def __enter__(self) -> "OutputLock":
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        self.created = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                self._remove_created()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputBusyError(
                    f"another hf-collapse run is writing {self.out} right now (it holds {self.path.name}): wait for it "
                    "to finish, or choose another output folder"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _HELD[self.path] = [fd, 1]
                return self
            os.close(fd)

    def __exit__(self, *exc) -> None:
        held = _HELD[self.path]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            try:
                os.unlink(self.path)
            finally:
                os.close(held[0])
            self._remove_created()

    def _open(self) -> int:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            self._remove_created()
            raise PermissionError(
                f"cannot write the export next to {self.out}: {error.strerror or error}; choose a folder you can "
                "write to"
            ) from error

    def _remove_created(self) -> None:
        """Remove the parent folders this lock created that are still empty (a run refused before writing)."""
        for folder in self.created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                return
