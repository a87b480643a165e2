"""The configs shipped inside the package (``qbert/configs/``; the repository's ``configs/`` links
to them), so an installed package and the container image have them without the repository.

A bundled config is named by its path under ``qbert/configs/`` without ``.yaml``:
``instruments``, ``instruments-tuned``, ``sweeps/ablations``. Every ``--config`` of the command line
takes a file path or, when no such file exists, a bundled name (``qbert pipeline --config
instruments-tuned``), as ``tune run`` does in torchtune. Data paths inside a config are relative
to the working directory (``../shared/datasets/...`` from a clone's root).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from qbert.config import ConfigError


def bundled_dir() -> Path:
    return Path(str(resources.files("qbert") / "configs"))


def bundled_names() -> list[str]:
    """Every bundled config's name, sorted (pipeline configs first, then sweeps)."""
    root = bundled_dir()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")]
    return sorted(names, key=lambda n: (n.count("/"), n))


def _name_of(name: str) -> str:
    name = name.removeprefix("configs/")
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def bundled_path(name: str) -> Path:
    """The file of a bundled config (``name`` with or without ``configs/`` and ``.yaml``)."""
    key = _name_of(name)
    if key not in bundled_names():
        raise ConfigError(f"no bundled config named '{name}' (bundled: {', '.join(bundled_names())}; "
                          "see `qbert configs list`)")
    return bundled_dir() / f"{key}.yaml"


def resolve_config(arg: str | Path) -> Path:
    """A ``--config`` argument: the file when it exists, else the bundled config of that name."""
    path = Path(arg)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config '{arg}' is not a file")
    if _name_of(str(arg)) in bundled_names():
        return bundled_path(str(arg))
    raise ConfigError(f"config file '{arg}' not found, and no bundled config has that name "
                      f"(bundled: {', '.join(bundled_names())})")


def description(name: str) -> str:
    """The first sentence of a bundled config's leading comment (what it is); '' when it has none."""
    lines = []
    for line in bundled_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(x for x in lines if x)
    end = re.search(r"(?<!Figs)(?<!Fig)(?<!Sec)(?<!e\.g)\.\s|:\s", text + " ")
    return text[: end.start()] if end else text
