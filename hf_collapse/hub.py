"""Push an exported folder to a Hub model repo as one commit, and take the push away from a training run.

Nothing here writes the folder (see [`export_collapsed`]): it is checked ([`upload_plan`]), the Hub is checked to
answer at all ([`check_hub_reachable`]), and every file goes up in one commit ([`push_folder`]).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id

from .card import CARD_FILE

__all__ = [
    "HubPush", "PushError", "PushNotStartedError", "PushResult", "check_hub_reachable", "push_folder", "take_hub_push",
    "upload_plan",
]


class PushError(RuntimeError):
    """The upload to the Hub failed; the local folder is unchanged and the same call can be repeated."""


class PushNotStartedError(PushError):
    """The push stopped before anything was sent to the Hub: offline mode, no token, or the Hub cannot be reached."""


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
    """

    repo_id: str
    revision: str
    files: list[tuple[str, int]]
    commit_url: str | None = None


def upload_plan(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The files [`push_folder`] uploads from ``folder``: `(path in the repo, size in bytes)`, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: export the model first with export_collapsed")
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size) for path in folder.rglob("*") if path.is_file()
    )
    names = {name for name, _ in files}
    missing = [name for name in ("config.json", CARD_FILE) if name not in names]
    if missing:
        raise ValueError(
            f"{folder} has no {' or '.join(missing)}, so it is not a model export: create it with export_collapsed"
        )
    if not any(name.endswith(".safetensors") for name in names):
        raise ValueError(f"{folder} has no .safetensors weights, so it is not a model export: create it with export_collapsed")
    pickled = sorted(name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")))
    if pickled:
        raise ValueError(
            f"{folder} holds pickled files ({', '.join(pickled)}), which can run code when loaded: push safetensors only "
            "(remove them, or export again with export_collapsed)"
        )
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload an exported folder to a Hub model repo as exactly one commit.

    Creates the repo if needed (``private`` only applies then) and the branch ``revision`` if it is
    missing, then commits every file of ``folder`` at once, so the repo never shows a partial export.
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

    Returns:
        [`PushResult`]: the files, and the commit URL unless ``dry_run``.

    Raises:
        [`PushNotStartedError`]: offline mode, no token, or the Hub does not answer (see [`check_hub_reachable`]);
            nothing was sent.
        `PushError`: the Hub refused or failed a step (the message names it).
    """
    validate_repo_id(repo_id)
    folder = Path(folder)
    files = upload_plan(folder)
    branch = revision or constants.DEFAULT_REVISION
    if dry_run:
        return PushResult(repo_id, branch, files)

    options = (" --private" if private else "") + (f" --revision {revision}" if revision else "")
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
    return PushResult(repo_id, branch, files, commit_url=str(commit.commit_url))


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
