"""Telling the user what is happening: a tqdm bar on a terminal, plain
periodic lines otherwise (cron, Airflow, --log-format json), and the closing
summary. Lines carry their numbers as counters, which the JSON log form
puts at the top level."""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


from .. import logfmt

log = logging.getLogger("pipeline")

LOG_INTERVAL_S = 30.0  # plain progress lines when there is no terminal to draw a bar on


@dataclass
class RunCounters:
    """What this run did (the manifest holds the totals over all runs)."""

    rows_embedded: int = 0
    rows_rejected: Counter[str] = field(default_factory=Counter)
    rows_done: int = 0
    rows_from: Counter[str] = field(default_factory=Counter)  # embedded without a request now: deduped, from_cache, journal
    tokens: int = 0  # paid for: sent to a provider and answered
    tokens_reported: int = 0  # of them, as the providers' usage reported (else counted with cl100k)


class Progress:
    def __init__(self, total_rows: int | None, enabled: bool | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._last_log = self._started
        self._total = total_rows
        self.rows = 0
        self.tokens = 0
        # A bar only for a person at a terminal: stdout redirected (cron,
        # Airflow, `> log`) or JSON logs mean a program reads stderr.
        draw_bar = sys.stderr.isatty() and sys.stdout.isatty() and not logfmt.is_json()
        self._plain = enabled is not False and not draw_bar
        self._bar = None
        if enabled is not False and draw_bar:
            from tqdm import tqdm  # only for a bar: --no-progress and pipes never load it

            self._bar = tqdm(total=total_rows, unit="row", unit_scale=True, dynamic_ncols=True, file=sys.stderr)

    def advance(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{_human(self.tokens)} tokens", refresh=False)
        elif self._plain and self._clock() - self._last_log >= LOG_INTERVAL_S:
            self._last_log = self._clock()
            log.info(self.line(), extra={"event": "progress", "counters": self.counters()})

    def counters(self) -> dict[str, Any]:
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.rows / elapsed
        eta = max(self._total - self.rows, 0) / rate if self._total and rate > 0 else None
        return {"rows": self.rows, "total_rows": self._total, "tokens": self.tokens, "rows_per_s": round(rate, 1),
                "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 1)}

    def line(self) -> str:
        c = self.counters()
        done = f"{self.rows:,}" + (f"/{self._total:,} rows ({100 * self.rows / max(self._total, 1):.0f}%)" if self._total else " rows")
        eta = f", ETA {_duration(c['eta_s'])}" if c["eta_s"] is not None else ""
        return f"progress: {done}, {_human(self.tokens)} tokens, {c['rows_per_s']:,.0f} rows/s{eta}"

    def elapsed_s(self) -> float:
        return self._clock() - self._started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def log_summary(summary: dict[str, Any]) -> None:
    """The closing summary as log records, each line with its counters."""
    for message, event, counters in summary_records(summary):
        log.info(message, extra={"event": event, "counters": counters})


def summary_records(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The closing summary, for people: (line, event, counters) for each line."""
    run = summary["run"]
    total = summary["job"]
    rejected = rejects_text(run["rows_rejected"])
    run_counters = {"name": summary["name"], **{k: v for k, v in run.items() if k != "providers"}}
    records = [
        (f"{summary['status']}: {run['rows_embedded']:,} rows embedded, rejected: {rejected}; "
         f"{run['tokens']:,} tokens, {run['requests']:,} requests, {run['retries']:,} retries "
         f"in {_duration(run['elapsed_s'])} ({run['rows_per_s']:,.0f} rows/s)", "summary", run_counters),
        (f"vectors: {run['rows_from_providers']:,} rows from providers"
         + (f" ({run['rows_from_journal']:,} paid for by an earlier run, kept in its journal)" if run.get("rows_from_journal") else "")
         + f", {run['rows_deduped']:,} from in-run dedupe, {run['rows_from_cache']:,} from the cache", "summary.sources",
         {k: run.get(k, 0) for k in ("rows_from_providers", "rows_from_journal", "rows_deduped", "rows_from_cache")}),
        (f"job {summary['name']}: {total['rows_done']:,}"
         + (f"/{total['total_rows']:,}" if total.get("total_rows") is not None else "")
         + f" rows done in {total['units_done']:,} parts -> {summary['output']}", "summary.job",
         {"name": summary["name"], **total}),
    ]
    for name, p in summary["providers"].items():
        state = p["state"] + (f" ({p['reason']})" if p.get("reason") else "")
        records.append((
            f"  {name}: {state}; {p['requests']:,} requests, {p['inputs']:,} inputs, {p['tokens']:,} tokens, "
            f"{p['retries']:,} retries, {p['rate_limited']:,} rate-limited",
            "summary.provider", {"provider": name, **p},
        ))
    return records


def rejects_text(counts: Mapping[str, int]) -> str:
    """Rejected rows by reason, for people: "3 empty, 1 too_long" or "none"."""
    return ", ".join(f"{n:,} {why}" for why, n in sorted(counts.items())) or "none"


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000.0
    return f"{n:.1f}T"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
