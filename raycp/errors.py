"""User-facing errors: each renders as one line naming the input and the fix."""

from __future__ import annotations


class RaycpError(Exception):
    """Base of every error raycp reports to a user as a single line (CLI exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.message.split())
        if self.fix:
            text += f" (fix: {' '.join(self.fix.split())})"
        return text


class ConfigError(RaycpError):
    """A config file or CLI override is invalid."""


class InputError(RaycpError):
    """An input file or table is missing, malformed or inconsistent."""


class StorageError(RaycpError):
    """An fsspec URL cannot be read or written."""

    exit_code = 4


class RuntimeSetupError(RaycpError):
    """Ray could not be reached or started."""

    exit_code = 4
