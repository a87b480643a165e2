"""``qbert configs list|show|copy``: the configs bundled with the package (``qbert/bundled.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qbert.bundled import bundled_names, bundled_path, description
from qbert.config import ConfigError
from qbert.utils.io import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list, show or copy the bundled configs",
                       description="The configs shipped with qbert. Any --config takes a file path or one of "
                                   "these names (e.g. `qbert pipeline --config instruments-tuned --out runs/x`).")
    cmds = p.add_subparsers(dest="configs_command", metavar="ACTION")
    cmds.required = True
    ls = cmds.add_parser("list", help="names and one-line descriptions")
    ls.set_defaults(func=list_cmd)
    show = cmds.add_parser("show", help="print a bundled config")
    show.add_argument("name", metavar="NAME")
    show.set_defaults(func=show_cmd)
    cp = cmds.add_parser("copy", help="copy a bundled config to a file to edit")
    cp.add_argument("name", metavar="NAME")
    cp.add_argument("path", metavar="PATH", help="file to write (or a directory to write NAME.yaml into)")
    cp.add_argument("--force", action="store_true", help="replace PATH when it exists")
    cp.set_defaults(func=copy_cmd)


def list_cmd(args: argparse.Namespace) -> int:
    names = bundled_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {description(name)}")
    return 0


def show_cmd(args: argparse.Namespace) -> int:
    sys.stdout.write(bundled_path(args.name).read_text(encoding="utf-8"))
    return 0


def copy_cmd(args: argparse.Namespace) -> int:
    src = bundled_path(args.name)
    dst = Path(args.path)
    if dst.is_dir():
        dst = dst / src.name
    if dst.exists() and not args.force:
        raise ConfigError(f"'{dst}' exists (use --force to replace it)")
    if not dst.parent.is_dir():
        raise ConfigError(f"cannot write '{dst}': directory '{dst.parent}' does not exist")
    atomic_write_text(dst, src.read_text(encoding="utf-8"))
    print(f"wrote {dst}")
    return 0
