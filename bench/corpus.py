"""A realistic corpus for the benchmarks, generated (nothing large is committed).

Documents are runs of real prose cut to lengths drawn from the distribution
users embed (cl100k tokens: median ~65, mean ~215, p90 ~490, p99 ~2,400, about
a dozen rows in 20,000 over 8,192), in several languages, with some blank rows:

- English (about 96%): CPython's own documentation, the language reference
  bundled as `pydoc_data.topics` and the docstrings of the standard library's
  modules (read with `ast`, nothing imported), about 1.8 MB of prose, code
  examples included;
- Chinese (2%) and Japanese, German, French, Spanish, Russian and Arabic
  (0.3-0.5% each): the hand-written paragraphs of `sample_data/multilingual.txt`;
- blank rows (0.3%): null, "" and whitespace.

Each language's prose is one long text (its paragraphs in a few seeded
orders, so the longest documents fit), tokenized once; a document is the run
of tokens from a sentence start to its drawn length, ended at a word
boundary. Every document is distinct (a repeat is drawn again), so in-run
dedupe finds nothing to skip, as with the unique documents of a real corpus.
Deterministic for a seed and an interpreter (the prose comes from its stdlib).

    python bench/corpus.py OUT_DIR ROWS [--seed N] [--files N]   # writes (once) and prints the measured distribution
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import math
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.inputs.texts import encoding  # noqa: E402  (the client's own cl100k)

VERSION = 1  # bump when the generator changes: a cached corpus of another version is rebuilt
MEDIAN_TOKENS = 65
SIGMA = 1.58  # lognormal spread: as measured, mean ~215, p90 ~490, p99 ~2,400, ~0.07% over 8,192
MIN_TOKENS = 3
MAX_TOKENS = 30_000  # the longest documents: a few pages of a manual
LANGUAGES = {"en": 0.9670, "zh": 0.0200, "ja": 0.0050, "de": 0.0020, "fr": 0.0020, "es": 0.0020,
             "ru": 0.0010, "ar": 0.0010}
BLANK_SHARE = 0.003
BLANKS = (None, "", " ", "\n", "\t \n")
SKIP_STDLIB = ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "ensurepip", "tests")
SENTENCE_START = re.compile(r"(?<=[.!?]\s)|(?<=[。！？])|(?<=\n\n)")
TOKEN_LIMIT = 8192  # the usual max_input_tokens: the corpus reports how many rows pass it


@dataclass(frozen=True)
class Prose:
    """One language's prose, tokenized: a document is text[offsets[a]:offsets[b]]."""

    text: str
    offsets: np.ndarray  # int64, per token: its first character
    starts: np.ndarray  # token indices that start a sentence
    word_starts: np.ndarray  # bool per token: begins with whitespace (a place to end a document)


def english_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in SKIP_STDLIB or "tests" in rel:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    texts.append(doc)
    return texts


def multilingual_paragraphs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    text = (REPO / "sample_data" / "multilingual.txt").read_text(encoding="utf-8")
    for block in text.split("\n@@ ")[1:]:
        head, _, body = block.partition("\n")
        out.setdefault(head.split("|", 1)[0].strip(), []).append(body.strip())
    return out


@lru_cache(maxsize=None)
def prose(lang: str) -> Prose:
    paragraphs = english_paragraphs() if lang == "en" else multilingual_paragraphs()[lang]
    rng = np.random.default_rng(len(paragraphs))
    once = len("\n\n".join(paragraphs)) or 1
    # Enough seeded orders of the paragraphs that the longest document fits
    # (a token is at most a few characters).
    orders = max(2, math.ceil(MAX_TOKENS * 4 / once) + 1)
    text = "\n\n".join(paragraphs[i] for _ in range(orders) for i in rng.permutation(len(paragraphs)))
    enc = encoding()
    tokens = enc.encode_ordinary(text)
    decoded, offsets = enc.decode_with_offsets(tokens)
    assert decoded == text
    offs = np.asarray(offsets + [len(text)], dtype=np.int64)
    sentence_chars = np.asarray([m.start() for m in SENTENCE_START.finditer(text)], dtype=np.int64)
    idx = np.searchsorted(offs, sentence_chars)
    starts = np.unique(idx[(idx < len(tokens)) & (offs[np.minimum(idx, len(tokens))] == sentence_chars)])
    word_starts = np.asarray([text[o:o + 1].isspace() for o in offs[:-1]] + [True], dtype=bool)
    return Prose(text=text, offsets=offs, starts=starts, word_starts=word_starts)


def document(p: Prose, rng: np.random.Generator, tokens: int) -> str:
    """About `tokens` tokens of `p` from a sentence start, ended before a word."""
    usable = p.starts[p.starts < len(p.offsets) - 1 - tokens]
    a = int(usable[rng.integers(len(usable))]) if len(usable) else 0
    b = min(a + tokens, len(p.offsets) - 1)
    nxt = np.flatnonzero(p.word_starts[b:b + 8])
    if len(nxt):
        b += int(nxt[0])
    return p.text[p.offsets[a]:p.offsets[b]].strip()


def lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    draws = rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, size=n)
    return np.clip(np.rint(draws), MIN_TOKENS, MAX_TOKENS).astype(np.int64)


def documents(n: int, seed: int) -> tuple[list[str | None], list[str]]:
    """`n` rows (text or blank) and each row's language."""
    rng = np.random.default_rng(seed)
    langs = list(LANGUAGES)
    picks = rng.choice(len(langs), size=n, p=np.asarray(list(LANGUAGES.values())) / sum(LANGUAGES.values()))
    blank = rng.random(n) < BLANK_SHARE
    sizes = lengths(rng, n)
    seen: set[bytes] = set()
    texts: list[str | None] = []
    row_langs: list[str] = []
    for i in range(n):
        lang = langs[picks[i]]
        if blank[i]:
            texts.append(BLANKS[int(rng.integers(len(BLANKS)))])
            row_langs.append("blank")
            continue
        for _ in range(100):
            text = document(prose(lang), rng, int(sizes[i]))
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if text and digest not in seen:
                break
        seen.add(digest)
        texts.append(text)
        row_langs.append(lang)
    return texts, row_langs


def make_corpus(path: Path, rows: int, *, files: int | None = None, seed: int = 13) -> Path:
    """`rows` realistic documents in Parquet files (column `body`) under `path`; made once, reused."""
    files = files or max(1, min(20, rows // 10_000))
    stamp = f"corpus v{VERSION} {rows} {files} {seed}"
    done = path / "_READY"
    if done.exists() and done.read_text() == stamp:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.parquet"):
        old.unlink()
    texts, langs = documents(rows, seed)
    per_file = -(-rows // files)
    for f in range(files):
        lo, hi = f * per_file, min(rows, (f + 1) * per_file)
        if lo < hi:
            table = pa.table({"body": pa.array(texts[lo:hi], pa.string())})
            pq.write_table(table, path / f"in-{f:03d}.parquet", compression="zstd")
    (path / "_langs.txt").write_text("\n".join(langs))
    done.write_text(stamp)
    return path


def read_texts(path: Path) -> list[str | None]:
    return [t for p in sorted(path.glob("*.parquet")) for t in pq.read_table(p, columns=["body"]).column("body").to_pylist()]


def describe(path: Path) -> dict[str, float]:
    """The corpus as measured: cl100k tokens per non-blank row, shares of languages and blanks."""
    texts = read_texts(path)
    langs = (path / "_langs.txt").read_text().split("\n")
    enc = encoding()
    counts = np.asarray([len(enc.encode_ordinary(t)) for t in texts if t and t.strip()], dtype=np.int64)
    n = len(texts)
    return {
        "rows": n,
        "median": float(np.median(counts)),
        "mean": float(counts.mean()),
        "p90": float(np.percentile(counts, 90)),
        "p99": float(np.percentile(counts, 99)),
        "max": int(counts.max()),
        "over_limit": int((counts > TOKEN_LIMIT).sum()),
        "bytes_mean": float(np.mean([len(t.encode("utf-8")) for t in texts if t])),
        "blank": sum(1 for t in texts if not (t and t.strip())) / n,
        "zh": langs.count("zh") / n,
        "other_languages": sum(1 for lang in langs if lang not in ("en", "zh", "blank")) / n,
    }


def describe_line(d: dict[str, float]) -> str:
    return (f"tokens median {d['median']:,.0f}, mean {d['mean']:,.0f}, p90 {d['p90']:,.0f}, p99 {d['p99']:,.0f}, "
            f"{d['over_limit']} > {TOKEN_LIMIT:,}; zh {d['zh']:.1%}, other {d['other_languages']:.1%}, "
            f"blank {d['blank']:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("rows", type=int)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--files", type=int, default=None)
    args = parser.parse_args()
    make_corpus(args.out, args.rows, files=args.files, seed=args.seed)
    described = args.out / "_described.txt"  # tokenizing 200,000 documents takes a while: once
    stamp = (args.out / "_READY").read_text()
    if not described.exists() or not described.read_text().startswith(stamp + "\n"):
        described.write_text(stamp + "\n" + describe_line(describe(args.out)))
    print(described.read_text().split("\n", 1)[1])


if __name__ == "__main__":
    main()
