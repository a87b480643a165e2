"""``ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/sweep.py --config SWEEP --out DIR``

Ray Tune sweep on the job's cluster (same flags as ``qbert sweep``); ``--out`` may be s3://, the
sweep directory is then staged locally and uploaded at the end.
"""

import sys
import tempfile
from pathlib import Path

from _common import _REPO  # noqa: F401  (puts the working dir's qbert first on sys.path)

from qbert.cli import main as qbert_main


def main(argv: list[str]) -> int:
    import ray

    from qbert.platform import storage

    if "--out" not in argv or {"-h", "--help"} & set(argv):
        return qbert_main(["sweep", *argv])  # argparse prints usage / the missing-flag error
    if not ray.is_initialized():
        ray.init()
    i = argv.index("--out")
    out = argv[i + 1]
    if not storage.is_s3(out):
        return qbert_main(["sweep", *argv])
    storage.check_reachable(out)
    local = Path(tempfile.mkdtemp(prefix="qbert-sweep-"))
    rc = qbert_main(["sweep", *argv[:i], "--out", str(local), *argv[i + 2:]])
    if rc == 0:
        storage.upload_dir(local, out)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
