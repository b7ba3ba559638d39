"""`postcopy workload`: the reference guest (run, incoming, touch)."""
from __future__ import annotations

import sys

import click

from ..errors import UsageError, with_stats
from ..units import parse_size, plural
from ._common import common_options, emit_json


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if size % 4096 or size < 2 * 4096:
        raise UsageError(f"memory size {text} must be a multiple of 4096 bytes and at least 2 pages")
    return size


def _finish(report: dict | None, as_json: bool, *, human=None) -> None:
    """Print the report (JSON with --json; ``human``'s line on stderr otherwise, or JSON when
    there is none); fail (exit 1, one line on stderr) when it says the memory is wrong.

    With --json and a failure, the report goes with the error: the CLI prints one document."""
    if report is None:
        return
    from ..guest.programs import WorkloadError

    error = None
    if report.get("check", "ok") != "ok":
        error = WorkloadError(f"memory check failed at page {report['first_bad_page']}")
    elif report.get("mismatches"):
        error = WorkloadError(f"{plural(report['mismatches'], 'page')} not as expected, "
                              f"first page {report['first_mismatch']}")
    if error is not None and as_json:
        raise with_stats(error, report)
    if as_json or human is None:
        emit_json(report)
    else:
        print(human(report), file=sys.stderr, flush=True)
    if error is not None:
        raise error


def _touched(r: dict) -> str:
    return (f"postcopy: touched {r['pages']} pages in {r['seconds']:.3f} s, {r['mismatches']} mismatches; "
            f"latency p50 {r['p50_us']} us, p99 {r['p99_us']} us")


_attach = click.option("--attach", "path", required=True, metavar="PATH",
                       help="Unix socket to hand the memory over on (migrate --attach / serve-dest --uffd-socket).")
_connect = click.option("--connect-timeout", type=click.FloatRange(min=0), default=5.0, show_default=True,
                        help="Seconds to keep retrying while PATH does not exist yet.")
_mem = click.option("--mem", "mem", required=True, metavar="SIZE", help="RAM size (e.g. 64M, 1G).")
_step = click.option("--step", type=click.IntRange(min=1), default=4096, show_default=True,
                     help="Bytes between the bytes the loop increments.")
_report = click.option("--report-after", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                       help="Run this long, then pause, check the memory, print one JSON line and exit.")


@click.group("workload")
def workload() -> None:
    """The reference guest: a native loop dirtying memory like QEMU's migration-test guest."""


@workload.command("run")
@_mem
@_attach
@_step
@_report
@_connect
@click.option("--warmup-passes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Passes over the memory before handing it over (all of it populated and dirty first).")
@common_options
def run(mem: str, path: str, step: int, report_after: float | None, connect_timeout: float, warmup_passes: int,
        as_json: bool) -> None:
    """Start fresh and hand the memory over to `postcopy migrate --attach` (write-protect tracking)."""
    from ..guest import programs as guest

    _finish(guest.run_source(_size(mem), path, step=step, report_after=report_after,
                              connect_timeout=connect_timeout, warmup_passes=warmup_passes), as_json)


@workload.command("incoming")
@_mem
@_attach
@_step
@_report
@click.option("--report-after-complete", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Report SECONDS after the migration is complete (instead of --report-after), with the "
                   "progress from RUN to complete and in those SECONDS.")
@_connect
@common_options
def incoming(mem: str, path: str, step: int, report_after: float | None, report_after_complete: float | None,
             connect_timeout: float, as_json: bool) -> None:
    """Hand empty memory to `postcopy serve-dest --uffd-socket`, wait for RUN, continue the loop."""
    from ..guest import programs as guest

    _finish(guest.run_incoming(_size(mem), path, step=step, report_after=report_after,
                                connect_timeout=connect_timeout, report_after_complete=report_after_complete),
            as_json)


@workload.command("touch")
@click.option("--size", "size", required=True, metavar="SIZE", help="RAM size (e.g. 64M, 1G).")
@_attach
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="Compare every page with this file (pages past its end with zeros).")
@click.option("--order", "--pattern", "order", type=click.Choice(["sequential", "random", "function"]),
              default="sequential", show_default=True,
              help="Every page in address order, every page in a random order, or a serverless function's "
                   "working set: about 15% of the pages in clustered runs, in a fixed order.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random order, or of the function pattern's jitter.")
@click.option("--jitter", type=click.FloatRange(0, 1), default=0.1, show_default=True,
              help="--order function: how much one run differs from the base pattern (0: not at all).")
@click.option("--wait-run", is_flag=True, help="Wait for the RUN event before touching.")
@_connect
@common_options
def touch(size: str, path: str, image: str | None, order: str, seed: int, jitter: float, wait_run: bool,
          connect_timeout: float, as_json: bool) -> None:
    """Hand empty memory over, touch every page, report latencies; exit 0 only if every page matched.

    --order function touches only the pattern's working set (timed), then, once the migration is
    complete, compares every page with --image. Prints a one-line summary on stderr; with --json,
    the report on stdout (pages, mismatches, first-mismatch, seconds, p50-us, p99-us, max-us,
    histogram-us; with --order function also verified-pages)."""
    from ..guest import programs as guest

    _finish(guest.run_touch(_size(size), path, image=image, order=order, seed=seed, wait_run=wait_run,
                             connect_timeout=connect_timeout, jitter=jitter), as_json, human=_touched)
