"""Output directories of the commands (``eval --out``, ``bench --out``): checked to be usable directories
before any slow work, and removed again when a call that created them fails and leaves them empty."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["check_writable_dir", "missing_dirs", "removed_if_left_empty"]


def check_writable_dir(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Create ``path`` (and its parents) and write + delete a probe file in it.

    Raises:
        ValueError: ``path`` is a file, lies under a file, or cannot be created or written (names ``flag``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = "is a file" if path.is_file() else (exc.strerror or str(exc))
        raise ValueError(f"{flag} {path} is not a writable directory ({what}): choose another {flag}") from None


def missing_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    out = []
    p = Path(path).absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


@contextmanager
def removed_if_left_empty(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """On an exception inside the block, remove the directories of ``path`` that did not exist on entry
    (so this call created them) and are still empty, deepest first; then re-raise."""
    created = missing_dirs(path) if path is not None else []
    try:
        yield
    except BaseException:
        for d in created:
            if not d.is_dir():
                continue
            try:
                d.rmdir()  # only succeeds on an empty directory
            except OSError:
                break
        raise
