"""Pure: one vector space per output.

Relays sometimes serve another model under the requested name. Every
provider embeds the same probe texts at start; its vectors must match the
reference (the probes recorded in the manifest by the run that started the
output, or else the first provider's) in length and in direction.
"""
from __future__ import annotations

import base64

import numpy as np

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue grew 12% on strong cloud demand.",
    "数据管道把文本变成向量。",
)
# The same model answers the same text with cosine ~1 (float noise, relays'
# float formatting); another model's vectors are unrelated (cosine near 0).
MIN_PROBE_COSINE = 0.99


def mismatch(reference: np.ndarray, vectors: np.ndarray) -> str | None:
    """Why `vectors` are not from the reference's vector space, or None."""
    if vectors.shape != reference.shape:
        return f"probe vectors have length {vectors.shape[-1]}, this output's have {reference.shape[-1]}"
    ref = reference.astype(np.float64)
    got = vectors.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cosines = np.divide((ref * got).sum(axis=1), norms, out=np.zeros(len(ref)), where=norms > 0)
    worst = float(cosines.min())
    if not worst >= MIN_PROBE_COSINE:
        return f"serves a different model: probe cosine {worst:.3f} against this output's vectors (needs {MIN_PROBE_COSINE})"
    return None


def encode(vectors: np.ndarray) -> list[str]:
    """Probe vectors for the manifest: base64 of little-endian float32, one per text."""
    return [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]


def decode(encoded: list[str]) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(s), dtype="<f4") for s in encoded]).astype(np.float32)
