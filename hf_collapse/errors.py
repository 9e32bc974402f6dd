"""The errors the command line turns into one line on stderr, in a module that imports nothing heavy: the CLI names
them in its `except` clause before it knows which verb runs, and a light verb must not pay for the Trainer stack."""

from __future__ import annotations

__all__ = ["PushError", "PushNotStartedError", "RecipeError"]


class RecipeError(ValueError):
    """A recipe or command line that cannot be used; the message says what to change."""


class PushError(RuntimeError):
    """The upload to the Hub failed; the local folder is unchanged and the same call can be repeated."""


class PushNotStartedError(PushError):
    """The push stopped before anything was sent to the Hub: offline mode, no token, or the Hub cannot be reached."""
