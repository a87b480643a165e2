"""``ray job submit -- python ray_jobs/extract_features.py --config features.yaml``: stage 0 on a cluster.

``ray.init()`` without an address joins the cluster the job was submitted to (RAY_ADDRESS is
set by the job supervisor); run outside a job it starts a local Ray. Same flags as
``qbert features extract``. Exit code 2 with ``error: ...`` on bad config or unusable input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# ``python ray_jobs/x.py`` puts ray_jobs/ (not the repo) on sys.path: make the working dir's qbert win.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from qbert.config import ConfigError  # noqa: E402
from qbert.data.errors import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from qbert.cli.features_cmd import add_extract_arguments, config_from_args

    parser = argparse.ArgumentParser(description="Extract item features with Ray Data (stage 0).")
    add_extract_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        import ray

        from qbert.platform.feature_pipeline import extract_features

        if not ray.is_initialized():
            ray.init()
        result = extract_features(cfg, init_ray=False)
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    if args.report:
        from qbert.utils.io import atomic_write_json

        atomic_write_json(args.report, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
