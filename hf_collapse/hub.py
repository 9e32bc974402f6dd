"""Push an exported folder to a Hub model repo as one commit, and take the push away from a training run.

Nothing here writes the folder (see [`export_collapsed`]): it is checked ([`upload_plan`]), the Hub is checked to
answer at all ([`check_hub_reachable`]), and every file goes up in one commit ([`push_folder`]).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id

from .card import CARD_FILE
from .errors import PushError, PushNotStartedError
from .manifest import MANIFEST_FILE, file_sha256, read_manifest

__all__ = [
    "PICKLE_SUFFIXES", "HubPush", "PushError", "PushNotStartedError", "PushResult", "check_hub_reachable",
    "push_folder", "take_hub_push", "upload_plan",
]


# The reachability check before a push (see check_hub_reachable): how long one try waits to connect and for the first
# answer, how many tries a failed connection gets, and the pause between them. huggingface_hub itself waits without a
# limit for an answer and retries some calls five times with backoff (1+2+4+8+8 s): an unreachable Hub must not cost that.
_PROBE_TIMEOUT_S = 5.0
_PROBE_TRIES = 2
_PROBE_PAUSE_S = 1.0
# Answers that say the Hub is not there behind a proxy or load balancer: they count as a failed try.
_GATEWAY_FAILURES = {502: "bad gateway", 503: "service unavailable", 504: "gateway timeout"}


def check_hub_reachable(endpoint: str | None = None, *, timeout: float = _PROBE_TIMEOUT_S, tries: int = _PROBE_TRIES) -> str:
    """Check that the Hub answers at all, in a few seconds, before a push sends anything.

    One `HEAD` request to the endpoint's root, without a token, through `huggingface_hub`'s own HTTP client (so its
    proxy and certificate settings apply). Any HTTP answer counts as reachable, except 502, 503 and 504 (a proxy or
    gateway with no Hub behind it): the push's own calls then run with `huggingface_hub`'s usual retries. A failed
    try (refused, unknown host, or one of those answers) is repeated after a pause, up to ``tries`` times in all; a
    try that times out (no connection or no answer within ``timeout`` seconds) is not repeated, it has already waited.

    Args:
        endpoint (`str`, *optional*): the Hub URL; default the `huggingface_hub` setting (`HF_ENDPOINT`).
        timeout (`float`, defaults to 5): seconds to wait for the connection, and then for the answer.
        tries (`int`, defaults to 2): tries in all, for a failed connection or a gateway's 502/503/504.

    Returns:
        `str`: the endpoint that answered.

    Raises:
        [`PushNotStartedError`]: the endpoint did not answer; the message names it and says what to check.
    """
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    reason = ""
    for attempt in range(1, tries + 1):
        timed_out = False
        try:
            status = get_session().head(endpoint + "/", timeout=timeout).status_code
        except Exception as error:  # the client's own types differ between huggingface_hub versions (httpx, httpx2)
            timed_out = "timeout" in type(error).__name__.lower()
            reason = f"no answer within {timeout:g} s" if timed_out else " ".join(str(error).split()) or type(error).__name__
        else:
            if status not in _GATEWAY_FAILURES:
                return endpoint
            reason = f"it answered HTTP {status}, {_GATEWAY_FAILURES[status]}"
        if timed_out or attempt == tries:
            break
        time.sleep(_PROBE_PAUSE_S)
    tried = f"{attempt} tr{'y' if attempt == 1 else 'ies'}"
    raise PushNotStartedError(
        f"cannot reach the Hub at {endpoint} ({reason}; {tried}): check HF_ENDPOINT and your network connection, or "
        "try again later"
    )


@dataclass(frozen=True)
class PushResult:
    """What [`push_folder`] uploaded (or, for a dry run, would upload).

    Attributes:
        repo_id (`str`): the target repo.
        revision (`str`): the target branch.
        files (`list[tuple[str, int]]`): `(path in the repo, size in bytes)` of every file, sorted by path.
        commit_url (`str` or `None`): the URL of the commit; `None` for a dry run.
        excluded (`list[str]`): files of the folder the export did not write, left out (``exclude_unknown=True``).
    """

    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    commit_url: str | None = None
    excluded: list[str] = field(default_factory=list)


# Suffixes of files that are (or may hold) pickles, which can run code when loaded; compared case-insensitively.
# `.npy`/`.npz` hold pickled objects whenever numpy writes an object array; an export never needs any of them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib", ".ckpt", ".npy", ".npz")
_VCS_FOLDERS = {".git", ".hg", ".svn", ".bzr"}
# safetensors' own bound on its JSON header
_MAX_SAFETENSORS_HEADER = 100_000_000


def upload_plan(folder: str | os.PathLike, *, exclude_unknown: bool = False) -> list[tuple[str, int]]:
    """The files [`push_folder`] uploads from ``folder``: `(path in the repo, size in bytes)`, sorted by path.

    Exactly the files of the export's manifest (written by [`export_collapsed`]) and the manifest itself, each a
    regular file whose size and SHA-256 still match it. Refused, by name, before anything is sent: a symbolic link
    anywhere in the folder (never followed), a dot-file or dot-folder (`.env`, `.git`, `.hg`, `.svn`, ...), anything
    that is not a regular file, a pickle by suffix (`PICKLE_SUFFIXES`, any case) or by content (the pickle protocol
    header, a zip holding a `.pkl` as `torch.save` writes, a `.safetensors` file that is not one), a folder without a
    manifest (exported by an older version: export it again), a listed file that is missing or changed, and a file
    the manifest does not list (with ``exclude_unknown=True`` such files are left out instead).

    Raises:
        `FileNotFoundError`: ``folder`` is not a folder.
        `ValueError`: the folder holds something that must not be uploaded, or is not an export (named).
    """
    return _plan(Path(folder), exclude_unknown)[0]


def _plan(folder: Path, exclude_unknown: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """The upload plan and the unknown files it leaves out (see [`upload_plan`])."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: export the model first with export_collapsed")
    files = _walk(folder)
    missing = [name for name in ("config.json", CARD_FILE) if name not in files]
    if missing:
        raise ValueError(
            f"{folder} has no {' or '.join(missing)}, so it is not a model export: create it with export_collapsed"
        )
    if not any(name.endswith(".safetensors") for name in files):
        raise ValueError(f"{folder} has no .safetensors weights, so it is not a model export: create it with export_collapsed")
    pickled = sorted(name for name in files if name.lower().endswith(PICKLE_SUFFIXES))
    if pickled:
        raise ValueError(
            f"{folder} holds pickled files ({_names(pickled)}), which can run code when loaded: push safetensors only "
            "(remove them, or export again with export_collapsed)"
        )
    for name in sorted(files):
        why = _pickled_content(folder / name, files[name])
        if why:
            raise ValueError(
                f"{folder / name} {why}, which can run code when loaded: push safetensors only (remove it, or export "
                "again with export_collapsed)"
            )
    return _check_manifest(folder, files, exclude_unknown)


def _walk(folder: Path) -> dict[str, int]:
    """Every regular file under ``folder`` (relative path: size), no link followed; a symbolic link, a dot-file or
    dot-folder and anything that is not a regular file or a folder are refused by name."""
    files, links, hidden, special = {}, [], [], []
    pending = [("", folder)]
    while pending:
        prefix, directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = prefix + entry.name
                if entry.is_symlink():
                    links.append(name)
                elif entry.name.startswith("."):
                    hidden.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((name + "/", Path(entry.path)))
                elif entry.is_file(follow_symlinks=False):
                    files[name] = entry.stat(follow_symlinks=False).st_size
                else:
                    special.append(name)
    if links:
        raise ValueError(
            f"{folder} holds symbolic links ({_names(links)}), which push never follows (a link can point at any file "
            "on this machine): remove them, or export again with export_collapsed"
        )
    if hidden:
        vcs = sorted({Path(name).name for name in hidden} & _VCS_FOLDERS)
        kind = f"version-control folders ({', '.join(vcs)}) and " if vcs else ""
        raise ValueError(
            f"{folder} holds hidden files or folders ({_names(hidden)}): {kind}dot-files such as .env are never "
            "uploaded (they often hold secrets): move them out of the folder"
        )
    if special:
        raise ValueError(f"{folder} holds something that is neither a regular file nor a folder ({_names(special)}): "
                         "remove it")
    return files


def _pickled_content(path: Path, size: int) -> str:
    """Why the bytes of ``path`` are (or may hold) a pickle; empty when they are not."""
    with open(path, "rb") as file:
        head = file.read(8)
        if path.name.lower().endswith(".safetensors"):
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = file.read(length) if 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER) else b""
            try:
                valid = isinstance(json.loads(header), dict)
            except ValueError:
                valid = False
            if not valid:
                return "is named .safetensors but is not a safetensors file" + (
                    " (its bytes are a pickle)" if _pickle_header(head) else "")
        elif _pickle_header(head):
            return "is a pickle (its bytes start with the pickle protocol header)"
    try:
        with zipfile.ZipFile(path) as archive:
            inner = [name for name in archive.namelist() if name.lower().endswith(PICKLE_SUFFIXES)]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return ""
    return f"is a zip archive holding a pickle ({_names(inner)}), as torch.save writes" if inner else ""


def _pickle_header(head: bytes) -> bool:
    """The pickle protocol 2-5 header: the PROTO opcode and the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_manifest(folder: Path, files: dict[str, int], exclude_unknown: bool) -> tuple[list[tuple[str, int]], list[str]]:
    """The files of the manifest, checked against the folder, and the unknown files left out."""
    again = "export the model again with export_collapsed (hf-collapse collapse or train)"
    try:
        listed = read_manifest(folder)
    except FileNotFoundError:
        raise ValueError(
            f"{folder} has no {MANIFEST_FILE} (the list of the files the export wrote; older versions of hf-collapse "
            f"did not write one), so push cannot tell the export from files added since: {again}"
        ) from None
    absent = sorted(set(listed) - set(files))
    if absent:
        raise ValueError(f"{folder} lacks files its {MANIFEST_FILE} lists ({_names(absent)}): {again}")
    unknown = sorted(set(files) - set(listed) - {MANIFEST_FILE})
    if unknown and not exclude_unknown:
        raise ValueError(
            f"{folder} holds files the export did not write ({_names(unknown)}): move them out of the folder, or leave "
            "them out of the upload with --exclude-unknown (push_folder(..., exclude_unknown=True))"
        )
    changed = [name for name in sorted(listed) if files[name] != listed[name].size]
    changed = changed or [name for name in sorted(listed) if file_sha256(folder / name) != listed[name].sha256]
    if changed:
        raise ValueError(
            f"{folder} holds files changed after the export ({_names(changed)}: size or SHA-256 differs from "
            f"{MANIFEST_FILE}): restore them, or {again}"
        )
    return sorted((name, files[name]) for name in [*listed, MANIFEST_FILE]), unknown


def _names(names: list[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    exclude_unknown: bool = False,
) -> PushResult:
    """Upload an exported folder to a Hub model repo as exactly one commit.

    Creates the repo if needed (``private`` only applies then) and the branch ``revision`` if it is
    missing, then commits the files of the export at once, so the repo never shows a partial export.
    Only the files [`export_collapsed`] wrote are sent, unchanged since: see [`upload_plan`] for what is refused.
    Nothing in ``folder`` is changed; after a failure the same call can simply be repeated.

    Args:
        folder (`str` or `os.PathLike`): an [`export_collapsed`] output folder.
        repo_id (`str`): `"namespace/name"` (or `"name"` for the token owner's namespace).
        private (`bool`, defaults to `False`): create the repo as private.
        revision (`str`, *optional*): branch to commit to; default `main`.
        dry_run (`bool`, defaults to `False`): only list the files that would be uploaded; contacts nothing.
        token (`str`, *optional*): a write token; by default the standard resolution of `huggingface_hub`
            (`HF_TOKEN`, then the token saved by `hf auth login`). It is only sent in request headers.
        endpoint (`str`, *optional*): Hub URL; default the `huggingface_hub` setting (`HF_ENDPOINT`).
        exclude_unknown (`bool`, defaults to `False`): leave out files the export did not write (listed in
            [`PushResult`]`.excluded`) instead of refusing the folder.

    Returns:
        [`PushResult`]: the files, the files left out, and the commit URL unless ``dry_run``.

    Raises:
        [`PushNotStartedError`]: offline mode, no token, or the Hub does not answer (see [`check_hub_reachable`]);
            nothing was sent.
        `PushError`: the Hub refused or failed a step (the message names it).
        `ValueError`: the folder holds something that must not be uploaded (see [`upload_plan`]); nothing was sent.
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    files, excluded = _plan(folder, exclude_unknown)
    branch = revision or constants.DEFAULT_REVISION
    if dry_run:
        return PushResult(repo_id, branch, files, excluded=excluded)

    options = (" --private" if private else "") + (f" --revision {revision}" if revision else "")
    options += " --exclude-unknown" if exclude_unknown else ""
    again = f"then run: hf-collapse push {folder} --repo-id {repo_id}{options}"
    if constants.is_offline_mode():
        raise PushNotStartedError(
            f"cannot push while HF_HUB_OFFLINE is set: unset it (and check network access to the Hub); {again}"
        )
    if token is None and get_token() is None:
        raise PushNotStartedError(
            f"no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access; {again}"
        )
    try:
        endpoint = check_hub_reachable(endpoint)
    except PushNotStartedError as error:
        raise PushNotStartedError(f"{error}. Nothing was uploaded and {folder} is unchanged; {again}") from None

    api = HfApi(endpoint=endpoint, token=token)
    with _step("create the repo", repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if branch != constants.DEFAULT_REVISION:
        with _step(f"create the branch {branch!r}", repo_id):
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
    # create_commit rather than upload_folder: with hf_xet installed, upload_folder may split a folder
    # into several commits, and a half-uploaded export must never be visible on the Hub.
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name, _ in files]
    with _step("commit the files", repo_id):
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=f"Upload {folder.name} (hf-collapse export)",
            revision=branch,
            repo_type="model",
        )
    return PushResult(repo_id, branch, files, commit_url=str(commit.commit_url), excluded=excluded)


@dataclass(frozen=True)
class HubPush:
    """Where a training run's `push_to_hub` goes, taken from its `TrainingArguments` (see [`take_hub_push`])."""

    repo_id: str
    private: bool = False
    revision: str | None = None
    token: str | None = None

    def push(self, folder: str | os.PathLike) -> PushResult:
        """Upload the export ``folder`` with [`push_folder`], as one commit."""
        return push_folder(folder, self.repo_id, private=self.private, revision=self.revision, token=self.token)


def take_hub_push(args) -> HubPush | None:
    """Take the Hub push away from the Trainer, so that the collapsed export is pushed instead of the full model.

    With `push_to_hub=True`, `Trainer` creates the repo when it is built and uploads the full-depth model at every
    save. A collapse run wants one commit of the collapsed export with its card at the end, so this reads the
    push settings (`hub_model_id`, `hub_private_repo`, `hub_revision`, `hub_token`), sets `args.push_to_hub` to
    `False` before the Trainer is built, and returns them; call [`HubPush.push`] on the export folder.

    Returns:
        [`HubPush`] or `None`: `None` when `args.push_to_hub` is not set.

    Raises:
        `ValueError`: `push_to_hub` is set without a valid `hub_model_id`.
    """
    if not getattr(args, "push_to_hub", False):
        return None
    repo_id = getattr(args, "hub_model_id", None)
    if not repo_id:
        raise ValueError("push_to_hub is set but hub_model_id is not: name the repo to push the collapsed model to, "
                         "e.g. hub_model_id: your-name/minilm-collapsed")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"hub_model_id {repo_id!r} is not a valid repo id: {error}") from None
    push = HubPush(repo_id, bool(args.hub_private_repo), getattr(args, "hub_revision", None), args.hub_token)
    args.push_to_hub = False
    return push


@contextlib.contextmanager
def _step(what: str, repo_id: str) -> Iterator[None]:
    """Turn any failure inside the block into a [`PushError`] that names the step and how to recover."""
    try:
        yield
    except Exception as error:
        raise PushError(
            f"pushing to {repo_id} failed while trying to {what}: {error}. The local folder is unchanged; "
            "fix the cause and run the same push again, it uploads everything in one commit."
        ) from error
