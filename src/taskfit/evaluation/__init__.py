"""Metrics and their uncertainty."""

from taskfit.evaluation.metrics import METRICS, bootstrap_ci, compute_metrics

__all__ = ["METRICS", "bootstrap_ci", "compute_metrics"]
