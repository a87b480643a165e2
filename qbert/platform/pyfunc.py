"""A run as an MLflow pyfunc model: top-K recommendations for a batch of histories.

    qbert export --run runs/instruments --out models/instruments     # or export_pyfunc(...)
    mlflow models serve -m models/instruments -h 127.0.0.1 -p 5001 --env-manager local
    curl -X POST http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["user_id", "items"], "data": [["u1", ["B0002E1G5C"]]]},
              "params": {"k": 10}}'

Input: a DataFrame with ``user_id`` (any key) and ``items`` (the history as original item IDs,
oldest first). Output: one row per (user, rank) with ``user_id, rank, item_id, score, sid``, as
``qbert recommend``. The model directory holds the run's model, config and semantic-ID tables
(including items ``qbert ids assign`` added), not its dataset: the catalogue's original IDs come
from the semantic-ID table. The serving environment needs the qbert package.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc



class QBertRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from qbert.recommend import Recommender

        self.recommender = Recommender.from_run(context.artifacts["run"], "cpu", with_dataset=False)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        params = params or {}
        frame = model_input
        histories = {str(u): [str(i) for i in items] for u, items in zip(frame["user_id"], frame["items"])}
        table = self.recommender.recommend(histories=histories, k=int(params.get("k", 10)),
                                           exclude_history=bool(params.get("exclude_history", False)))
        return table.to_pandas()


def _stage_content(run: Path, staged: Path) -> None:
    """The catalogue's content vectors next to the exported model when its ranking reads them
    (``model.content_dim``, ``model.new_item_content``, ``model.new_item_neighbours``, ``new_items: mixture``),
    so serving needs no dataset."""
    from qbert.pipeline.data import CONTENT_FILE, write_item_content
    from qbert.pipeline.runs import load_run_model

    if (staged / CONTENT_FILE).is_file():
        return
    model, _ = load_run_model(run, "cpu")  # attaches them from the dataset when the run has none stored
    if model.uses_content:
        write_item_content(staged / CONTENT_FILE, model.catalogue_content.numpy())


def export_pyfunc(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as an MLflow pyfunc model of the finished run ``run_dir``."""
    from mlflow.models import ModelSignature

    from qbert.recommend import RUN_FILES
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    run, out = Path(run_dir), Path(out_dir)
    if not (run / "model.pt").is_file():
        raise FileNotFoundError(f"no fine-tuned model in {run} (model.pt missing): run `qbert pipeline` first")
    if out.exists():
        from qbert.config import ConfigError

        raise ConfigError(f"'{out}' exists: choose a new directory for the model")
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec(Array("string"), "items")]),
        params=ParamSchema([ParamSpec("k", "long", 10), ParamSpec("exclude_history", "boolean", False)]))
    with tempfile.TemporaryDirectory(prefix="qbert-export-") as tmp:
        staged = Path(tmp) / "run"
        staged.mkdir()
        for name in RUN_FILES:
            if (run / name).is_file():
                shutil.copyfile(run / name, staged / name)
        _stage_content(run, staged)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        mlflow.pyfunc.save_model(str(partial), python_model=QBertRecommender(), artifacts={"run": str(staged)},
                                 signature=signature)
        partial.rename(out)
    return out
