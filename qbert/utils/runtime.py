"""Device choice, seeding and run provenance (git commit, machine)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. Anything else is passed to torch."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the source tree (``unknown`` outside git); ``+dirty`` if uncommitted changes."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("QBERT_GIT_COMMIT", "unknown")


def machine_info() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def benchmark_meta(script: str, argv: list[str] | None, repo: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """What a benchmark writes beside its numbers: the command that reproduces them, the git
    commit, the machine and the UTC date (plus ``extra``, e.g. the seed and torch threads).

    ``argv`` is the argument list given to the script's ``main`` (None: the process's own).
    """
    args = sys.argv[1:] if argv is None else argv
    return {"command": "python " + " ".join(shlex.quote(a) for a in [script, *args]),
            "git_commit": git_commit(repo), "machine": machine_info(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **extra}
