"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: config, data, paths or run dir. Printed as one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, mistyped or holds an impossible value."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


class DataError(UserError):
    """A data file is missing, empty, or holds a row that cannot be used."""


class StageFailed(Exception):
    """A stage process exited non-zero; `cause` is the stage's own one-line error, when it printed one."""

    def __init__(self, stage: str, returncode: int, log_hint: str = "", cause: str | None = None):
        self.stage = stage
        self.returncode = returncode
        self.cause = cause
        what = f": {cause}" if cause else f" (exit code {returncode})"
        super().__init__(f"stage '{stage}' failed{what}{log_hint}")
