"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 1."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a wrong request: the message says what, where and how to fix it."""


class InputFileError(UserError):
    """A file that cannot be ingested: unreadable, wrong format, missing column, strict-mode reject."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message

    def __reduce__(self) -> tuple[type[InputFileError], tuple[object, str]]:
        """Pickled as (path, message), so that it crosses processes (a Ray task's error) whole."""
        return type(self), (self.path, self.message)
