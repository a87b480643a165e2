"""A run directory has one owner at a time and holds one configuration.

:func:`run_lock` takes an exclusive lock (``.qbert.lock``, with the owner's PID and host) for
the length of a run, so a second run on the same directory fails at once instead of mixing
checkpoints with the first. :func:`claim_run_dir` refuses to write a configuration over a
directory that holds another one (a finished run, or an interrupted one whose checkpoints belong
to other settings) unless ``overwrite``, which empties it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from qbert.config import ConfigError

LOCK_NAME = ".qbert.lock"


_HELD: set[Path] = set()  # locks this process holds (an entry point may lock before the driver does)


def make_run_dir(out: Path) -> None:
    """Create ``out`` (and parents), or a ConfigError saying why it cannot be a run directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot create the run directory {out}: {blocker} is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qbert-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {out}: not writable ({e.strerror})") from None


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run directory's exclusive lock; ConfigError naming the holder when it is taken.
    Re-entrant within a process: a nested call on a directory this process holds passes through."""
    out = Path(out_dir)
    make_run_dir(out)
    path = (out / LOCK_NAME).resolve()
    if path in _HELD:
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise ConfigError(f"run directory {out} is in use by {holder}: wait for it to finish, or use another "
                              "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on host {socket.gethostname()}".encode())
        _HELD.add(path)
        yield path
    finally:
        _HELD.discard(path)
        os.close(fd)  # releases the lock; the file stays (an unlocked file is no claim)


def claim_run_dir(out_dir: str | os.PathLike, differences: list[str] | None, overwrite: bool) -> None:
    """Make ``out_dir`` ready for a run whose config differs from the one it holds by
    ``differences`` (dotted keys; None: it holds no config, [] : the same config).

    A directory holding another configuration is refused unless ``overwrite``, which removes
    everything in it but the lock (the caller holds it). Call under :func:`run_lock`.
    """
    out = Path(out_dir)
    if not differences:
        return
    if not overwrite:
        shown = ", ".join(differences[:3]) + (f" and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ConfigError(f"run directory {out} holds a run with other settings ({shown}): use another --out, or "
                          "--overwrite to replace it")
    for child in out.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
