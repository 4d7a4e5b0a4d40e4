"""Atomic writes: a reader sees the whole file (or directory) or nothing, never half of it."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NAME_MAX = 255  # bytes in one path component on Linux's file systems


def _temp_prefix(name: str, tag: str = "", suffix: str = "") -> str:
    """``.NAME.TAG`` for a temp file beside NAME, shortened when NAME is near the file system's
    name limit (a legal 250-byte name must not fail on its longer temp name)."""
    prefix = f".{name}.{tag}"
    room = NAME_MAX - 8 - len(os.fsencode(suffix))  # mkstemp adds 8 characters
    if len(os.fsencode(prefix)) <= room:
        return prefix
    short = os.fsencode(name)[:max(16, room - len(os.fsencode(tag)) - 3)].decode("utf-8", "ignore")
    return f".{short}~.{tag}"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` fills a temp file beside ``path``, which then replaces ``path``.

    The temp name keeps ``path``'s suffix (np.save and PIL look at it) and the final file
    gets the permissions a plain open() would give (mkstemp alone makes it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_all([(Path(path), data)])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_all([(Path(path), text.encode())])


def temp_dir_beside(final: str | os.PathLike) -> Path:
    """A hidden temp directory next to ``final`` (same filesystem, so a rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the renamed directory is meant to be read
    return tmp


def replace_dir(tmp: Path, final: str | os.PathLike) -> None:
    """Move ``tmp`` to ``final``; an old ``final`` is set aside first and removed only after."""
    final = Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def probe_writable(path: str | os.PathLike) -> None:
    """Raise OSError now if a file cannot be created beside ``path`` (read-only or pseudo file
    systems, permissions — os.access says yes to root on a read-only mount), so a run fails
    before its work, not after it."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(p.name, "probe."), dir=p.parent)
    os.close(fd)
    os.unlink(tmp)


def atomic_write_all(items: list[tuple[Path, bytes]]) -> None:
    """Write several files as one unit: every temp file is filled first (where a full disk or
    an I/O error shows), and only then are they renamed into place, so a failure leaves the
    old files (or none) and no temp file behind. A symlink is written through, not replaced."""
    staged: list[tuple[str, Path]] = []
    path = None
    try:
        for path, data in items:
            path = Path(os.path.realpath(path))
            suffix = path.suffix if len(path.suffix) <= 16 else ""
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name, "", suffix), suffix=suffix, dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as e:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e  # name the output, not the temp file
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise


class Interrupted(SystemExit):
    """SIGTERM/SIGHUP, raised in the main thread so that every ``finally`` runs (temp files
    removed, locks released); exits 128 + the signal number. ``message`` says what was left."""

    def __init__(self, signum: int, what: str):
        super().__init__(128 + signum)
        self.signum = signum
        self.message = f"{what} stopped by {signal.Signals(signum).name}: {{}}".format


@contextlib.contextmanager
def signals_unwind(make: type[Interrupted]):
    """SIGTERM and SIGHUP raise ``make(signum)`` while the block runs, so they clean up as SIGINT
    (KeyboardInterrupt) does; the previous handlers are restored after. Only in the main thread
    (the only one Python delivers signals to). A signal the process ignores (nohup, a
    supervisor) stays ignored. A second signal while the first unwinds is dropped, so the
    cleanup itself is not cut short. Python runs the handler between bytecodes: during a long
    C call (the exporter, TensorRT's builder) it takes effect when that call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise make(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN:
            continue
        old[sig] = prev
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
