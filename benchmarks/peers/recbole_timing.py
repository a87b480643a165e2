"""Times RecBole's own model on our split files: N training batches and one full-ranking
evaluation pass. Runs under RecBole's virtualenv (never a qbert dependency); called by
``benchmarks/speed.py``, which passes the settings as one JSON argument and reads one JSON line.

    RB_PYTHON benchmarks/peers/recbole_timing.py '{"model": "BERT4Rec", "data_path": ..., "dataset":
        "Instruments", "threads": 2, "train_batches": 20, "eval_users": 2048, "config": {...}}'

Training time per epoch is extrapolated from the timed batches: RecBole pads every batch to
the full length, so a batch costs the same wherever it falls in the epoch.
"""
import functools
import json
import sys
import time

import numpy as np
import torch

if not hasattr(np, "float"):
    np.float = float  # recbole 1.2.1 still uses the removed alias
torch.load = functools.partial(torch.load, weights_only=False)

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402


def main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(int(args["threads"]))
    cfg = {
        "data_path": args["data_path"], "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "alias_of_item_id": ["item_id_list"],
        "MAX_ITEM_LIST_LENGTH": 50, "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"mode": "full", "order": "TO"}, "metrics": ["Hit", "NDCG"], "topk": [1, 5, 10],
        "valid_metric": "NDCG@10", "device": "cpu", "use_gpu": False, "show_progress": False, "seed": 2020,
        "reproducibility": True, "train_batch_size": 256, "eval_batch_size": 512, "log_wandb": False,
        **args.get("config", {}),
    }
    config = Config(model=args["model"], dataset=args["dataset"], config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    rows = len(train_data._dataset)
    n = int(args["train_batches"])
    model.train()
    times = []
    for i, inter in enumerate(train_data):
        if i > n:  # batch 0 warms up
            break
        t = time.perf_counter()
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(inter)
        loss.backward()
        trainer.optimizer.step()
        if i:
            times.append(time.perf_counter() - t)
    per_batch = float(np.median(times))
    batch = int(config["train_batch_size"])
    model.eval()
    trainer.tot_item_num = valid_data._dataset.item_num  # what trainer.evaluate sets first
    users, t_eval = 0, 0.0
    with torch.no_grad():
        for batched in valid_data:
            t = time.perf_counter()
            _, scores, _, _ = trainer._full_sort_batch_eval(batched)
            torch.topk(scores, 10, dim=-1)  # what RecBole's collector keeps for its metrics
            t_eval += time.perf_counter() - t
            users += len(batched[0])
            if users >= int(args["eval_users"]):
                break
    print(json.dumps({"rows": rows, "batch": batch, "train_batch_s": per_batch,
                      "train_epoch_s": per_batch * (rows / batch), "eval_ms_per_user": t_eval / users * 1e3,
                      "eval_users": users, "timed_batches": len(times),
                      "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
