"""`qbert` command line: one module per command group, each with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from qbert.config import ConfigError
from qbert.data.errors import DataError

# Each module defines register(subparsers) adding its command(s) with set_defaults(func=...).
COMMAND_MODULES = (
    "qbert.cli.data_cmd",  # qbert data prepare|stats
    "qbert.cli.baseline_cmd",  # qbert baseline, qbert evaluate
    "qbert.cli.pipeline_cmd",  # qbert pipeline / fuse / quantize / pretrain / finetune
    "qbert.cli.features_cmd",  # qbert features extract
    "qbert.cli.sweep_cmd",  # qbert sweep
    "qbert.cli.recommend_cmd",  # qbert recommend
    "qbert.cli.configs_cmd",  # qbert configs list|show|copy
    "qbert.cli.ids_cmd",  # qbert ids show
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (torch threads, k, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbert", description="Q-BERT4Rec: semantic-ID multimodal sequential recommendation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command group not built yet in this checkout
            if e.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from qbert.platform.retry import RemoteUnavailableError

    try:
        rc = args.func(args)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout went away (`qbert configs list | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except RemoteUnavailableError as e:  # S3 / MLflow stayed unreachable (as the Ray job scripts: exit 3)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except FloatingPointError as e:  # a diverging loss: the training settings, not a bug
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"error: an input file is not UTF-8 text ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    except (IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError) as e:
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except Exception as e:  # pyarrow's errors (a corrupt parquet file a reader did not name), by type name
        if type(e).__module__.startswith("pyarrow"):
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
