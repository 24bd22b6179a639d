"""Optional MLflow logging (`tracking: mlflow`): params, metrics and artifacts of every cell.

The default store is a local folder, `<out>/mlruns` (MLflow's file store, which MLflow 3
keeps in maintenance mode behind MLFLOW_ALLOW_FILE_STORE; we opt in for that default
only). `tracking_uri` points elsewhere, e.g. `sqlite:///mlflow.db` or a server.
We use `MlflowClient` directly, so no process-wide MLflow state is changed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskfit.errors import TaskfitError


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TaskfitError(
            "tracking: mlflow needs the mlflow package. Install it with: pip install mlflow-skinny "
            "(or pip install 'taskfit[mlflow]'), or remove `tracking`."
        ) from None


class MlflowTracker:
    def __init__(self, experiment: str, out_dir: Path, uri: str | None):
        require_mlflow()
        from mlflow.tracking import MlflowClient

        if uri is None:
            uri = (out_dir.resolve() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def log_cell(self, cell_dir: Path, manifest: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self.experiment_id, run_name=f"{manifest['label']} seed {manifest['seed']}")
        now = int(time.time() * 1000)
        params = _flat(
            {
                "run": manifest["run"],
                "seed": manifest["seed"],
                "model": manifest["model"].get("name"),
                "dtype": manifest["model"].get("dtype"),
                "config": manifest["config"],
            }
        )
        metrics = {k: v for k, v in manifest["metrics"].items() if isinstance(v, int | float)}
        metrics.update(wall_time_s=manifest["wall_time_s"], peak_rss_mb=manifest["peak_memory_mb"]["cpu_rss"])
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        )
        for name in ("manifest.json", "predictions.jsonl"):
            self.client.log_artifact(run.info.run_id, str(cell_dir / name))
        self.client.set_terminated(run.info.run_id)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out
