"""Command line: parse, set this process's settings, call one function, map errors to exit statuses."""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from typing import Sequence

from ..checkpoint.layout import parse_shard
from ..errors import EXIT_OK, EXIT_WORK_LEFT, PipelineError
from ..logfmt import LOG_FORMATS, configure, error_line
from .process import apply_process_settings

EPILOG = ("exit status: 0 every row accounted for (_SUCCESS written), 1 work left (rerun continues), 2 fix the job or "
          "inputs,\n  99 (run --no-wait) nothing wrong, Batch API batches still running: run again later")


# Each command's modules are imported by its handler, after main() has applied
# the process settings: numpy's BLAS takes its thread count as it loads.


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    apply_process_settings()  # this process is the CLI's own: see process.py
    configure(args.log_format, args.debug)
    try:
        return int(args.func(args))
    except PipelineError as err:
        return _fail(str(err), err.exit_code)
    except OSError as err:  # the disk or the file system said no, outside a run's own handling
        where = f" ({err.filename})" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}; rerun to continue", EXIT_WORK_LEFT)
    except KeyboardInterrupt:
        return _fail("interrupted; rerun to continue", EXIT_WORK_LEFT)
    except Exception as err:  # a bug: one line, unless --debug asks for the traceback
        if args.debug:
            raise
        return _fail(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", EXIT_WORK_LEFT)


def _fail(message: str, exit_code: int) -> int:
    print(error_line(message, exit_code), file=sys.stderr, flush=True)
    return exit_code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Embed a text column of Parquet/CSV files into vectors, resumably.",
        epilog="example: python -m pipeline run jobs/sample.yaml\n" + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="debug logging; show tracebacks of internal errors")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="stderr as text (default) or one JSON object per line (for schedulers)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, example: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, aliases=list(aliases), help=help_text, description=help_text, epilog=f"example: python -m pipeline {example}\n{EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("job", metavar="JOB.yaml", help="the job file")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    run = command("run", "Embed the job's inputs; continues where an earlier run stopped.", "run jobs/sample.yaml --limit 100")
    run.add_argument("--shard", type=_shard, metavar="K/N", help="take the K-th of N deterministic shares (0 <= K < N)")
    run.add_argument("--limit", type=_positive, metavar="ROWS", help="embed only the first ROWS rows (a smoke test; no _SUCCESS)")
    run.add_argument("--restart", action="store_true", help="discard earlier progress in the output and start over")
    run.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar or lines")
    run.add_argument("--no-wait", dest="wait", action="store_false",
                     help="Batch API jobs: submit what fits the queue, collect finished batches, write what is "
                          "answered, then return (exit 99 while batches still run); other jobs run as usual")
    run.add_argument("--grace-seconds", type=_seconds, metavar="S", default=None,
                     help="after SIGTERM/Ctrl-C, how long in-flight work may finish before it is abandoned (default 20)")
    run.set_defaults(func=_run)
    validate = command("validate", "Check the job file, its inputs, columns and env vars; no API call.", "validate jobs/sample.yaml")
    validate.set_defaults(func=_validate)
    estimate = command("estimate", "Count rows, distinct texts, cache hits, tokens, requests and cost; no API call.",
                       "estimate jobs/sample.yaml", aliases=("plan",))
    estimate.add_argument("--json", action="store_true", help="print the estimate as JSON")
    estimate.set_defaults(func=_estimate)
    status = command("status", "Show progress read from the output's manifest; no API call.", "status jobs/sample.yaml")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--check", action="store_true",
                        help="exit 0 only if the job is complete (_SUCCESS), else 1: a completion check for schedulers")
    status.set_defaults(func=_status)
    return parser


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _run(args: argparse.Namespace) -> int:
    from ..commands.run import RunOptions, run
    from ..config.job import load_job

    job = load_job(args.job)
    options = RunOptions(shard=args.shard, limit=args.limit, restart=args.restart, progress=args.progress,
                         wait=args.wait)
    if args.grace_seconds is not None:
        options = replace(options, grace_s=args.grace_seconds)
    return run(job, options)


def _validate(args: argparse.Namespace) -> int:
    from ..commands.validate import validate_job

    for line in validate_job(args.job):
        print(line)
    return EXIT_OK


def _estimate(args: argparse.Namespace) -> int:
    from ..commands.estimate import estimate_job, estimate_lines

    report = estimate_job(args.job)
    print(json.dumps(report, indent=1) if args.json else "\n".join(estimate_lines(report)))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from ..commands.status import job_status, status_lines

    report = job_status(args.job)
    print(json.dumps(report, indent=1) if args.json else "\n".join(status_lines(report)), flush=True)
    if args.check and report["state"] != "complete":
        return _fail(f"job {report['job']} is not complete ({report['state']}); rerun it to continue", EXIT_WORK_LEFT)
    return EXIT_OK


