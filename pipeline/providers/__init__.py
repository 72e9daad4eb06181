"""Providers: something that turns a list of texts into a float32 matrix.

`openai.py` is the only module that speaks HTTP; `local.py` runs a model in
this process.
"""
from __future__ import annotations

from ..config.job import JobConfig, ProviderConfig
from .base import EmbedResult, Provider


def build_provider(cfg: ProviderConfig, job: JobConfig) -> Provider:
    if cfg.type == "local":
        from .local import LocalProvider

        return LocalProvider(cfg, job.embedding.dimensions)
    from .openai import OpenAIProvider

    # openai_batch too: its synchronous /embeddings serves the probe (batch/strategy.py drives the Batch API)
    return OpenAIProvider(cfg, job.embedding.dimensions)


__all__ = ["EmbedResult", "Provider", "build_provider"]
