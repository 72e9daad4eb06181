"""Airflow: EmbeddingJobOperator (a job, or one shard of it, as a task; deferrable
while Batch API batches run) and BatchTrigger (what the triggerer polls meanwhile).

Importable only where Airflow 3 is installed; nothing else in the package
imports it, so the pipeline itself never needs Airflow.
"""
from __future__ import annotations

from .operator import EmbeddingJobOperator
from .trigger import BatchTrigger

__all__ = ["BatchTrigger", "EmbeddingJobOperator"]
