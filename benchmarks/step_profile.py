"""Profile one stage-3 fine-tuning step on Amazon Instruments: seconds per step and an epoch
estimate from every 8th batch of the length-bucketed epoch (after an untimed pass over other
batches, so shapes new to the timed ones are paid as in a real epoch), then the
torch profiler's table of the most expensive operators. What decided each speed change of
``docs/method.md`` ("Speed"): run it before and after a change, on the same machine, with the same
threads.

    python benchmarks/step_profile.py [--threads 1] [--hidden 256] [--precision bf16] [--profile]

Semantic IDs are the shipped LLaMA code tuples (``benchmarks/speed.py`` does the same), so no
stage 1-2 run is needed. Prints one JSON line (and the table with ``--profile``).
"""

from __future__ import annotations

# OpenMP's default (spinning) wait policy unless the caller sets OMP_WAIT_POLICY (see speed.py)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.speed import DEFAULT_DATA, MAX_LEN, instruments_codes  # noqa: E402
from qbert.data.readers import read_source  # noqa: E402
from qbert.data.split import LeaveOneOutSplit  # noqa: E402
from qbert.seqrec import masks  # noqa: E402
from qbert.seqrec.stage import FinetuneConfig, SeqRecConfig, build_model, masked_batches, masked_step, training_rows  # noqa: E402
from qbert.train.optim import autocast, build_optimizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--repeat-bias", action="store_true", help="model.repeat_bias (the best config's)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: {args.data} not found (needs ../shared/datasets)")
        return 0
    torch.set_num_threads(args.threads)
    ds = read_source(str(args.data), with_codes=True)
    split = LeaveOneOutSplit(ds, MAX_LEN)
    torch.manual_seed(0)
    model = build_model(SeqRecConfig(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                     repeat_bias=args.repeat_bias),
                        instruments_codes(ds), 256, MAX_LEN)
    ft = FinetuneConfig(mask_ratio=0.15)
    mask_fn = lambda valid, g: masks.finetune_mask(valid, ft.mask_ratio, ft.last_prob, g)  # noqa: E731
    batches = list(masked_batches(training_rows(split, MAX_LEN, True), ft.batch_size, mask_fn, 0,
                                  torch.device("cpu"))(0))
    sample = batches[:: args.every]
    opt = build_optimizer(model, 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def run(bs) -> float:
        t = time.perf_counter()
        for b in bs:
            with autocast("cpu", args.precision):
                loss, _ = masked_step(model, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
        return time.perf_counter() - t

    run(batches[1 :: args.every])  # untimed: kernel set-up on other batches of the epoch
    per_step = run(sample) / len(sample)
    print(json.dumps({"threads": args.threads, "hidden": args.hidden, "precision": args.precision,
                      "repeat_bias": args.repeat_bias,
                      "s_per_step": per_step, "epoch_s_est": per_step * len(batches), "steps_per_epoch": len(batches),
                      "timed_steps": len(sample)}))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(sample[:15])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
