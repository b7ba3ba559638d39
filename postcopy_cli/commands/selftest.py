"""`postcopy selftest`: real migrations over loopback, every byte verified."""
from __future__ import annotations

import sys

import click

from ..codec.constants import TARGET_PAGE_SIZE
from ..errors import UsageError, with_stats
from ..units import parse_size
from ._common import common_options, emit_json, format_size


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"postcopy selftest: {format_size(report['size'])} per case, {report['seconds']:.1f} s")
    table.add_column("case", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("MiB/s", justify="right", no_wrap=True)
    table.add_column("reqs", justify="right", no_wrap=True)
    table.add_column("p50/p99 µs", justify="right", no_wrap=True)
    table.add_column("blocktime ms", justify="right", no_wrap=True)
    for r in report["cases"]:
        m = r.get("metrics") or {}
        lat = "-" if m.get("latency_p50_us") is None else \
            f"{_fmt(m.get('latency_p50_us'), '.0f')}/{_fmt(m.get('latency_p99_us'), '.0f')}"
        table.add_row(r["name"], "[green]pass[/]" if r["passed"] else "[red]FAIL[/]",
                      _fmt(m.get("throughput_mib_s"), ".0f"), _fmt(m.get("requests")), lat,
                      _fmt(m.get("blocktime_ms"), ".1f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))   # a log file: don't squeeze to 80 columns
    console.print(table)
    for r in report["cases"]:
        console.print(f"  {r['name']}: {r['detail']}", markup=False, highlight=False, soft_wrap=True)
    console.print("  (latency: demand-request service time, upper bound of its power-of-two bucket)",
                  style="dim")
    failed = [r["name"] for r in report["cases"] if not r["passed"]]
    console.print("[green]all cases passed[/]" if not failed else f"[red]failed: {', '.join(failed)}[/]")


def _help() -> str:
    """The command's help, listing the cases from the selftest's own table."""
    import textwrap

    from ..selftest import cases as core

    cases = "\n".join(f"{c.name}\n" + textwrap.indent(textwrap.fill(c.description, 72, break_on_hyphens=False), "    ")
                      for c in core.CASES)
    return f"""Run real migrations on this host over loopback and verify every byte.

    First runs the checks of `postcopy probe`: on a host that cannot do
    post-copy it exits 1 at once with the failed check and its remedy. Each case
    then runs serve-dest, workload and migrate as real subprocesses (the
    in-process case runs ServeDest and migrate_image in two threads), each
    killed on --timeout. The cases, in the order they run (select with --case
    NAME):

    \b
{textwrap.indent(cases, "    ")}

    Output: a table with one row per case (case, result pass/FAIL, MiB/s,
    reqs: demand requests, p50/p99 µs: demand-request service time as the upper
    bound of its power-of-two bucket, blocktime ms), then one detail line per
    case, then "all cases passed" or "failed: NAMES". On a terminal, stderr
    shows "postcopy: NAME: pass|FAIL" as each case ends. With --json: one
    document {{"passed", "size", "seconds", "cases": [{{"name", "passed",
    "detail", "metrics"}}]}}. Exit 0 only if every case passed, 1 otherwise.
    """


@click.command("selftest", help=_help())
@click.option("--size", "size", default="64M", show_default=True, metavar="SIZE",
              help="Memory migrated per case (K/M/G suffixes; a multiple of 4096).")
@click.option("--case", "only", multiple=True, metavar="NAME",
              help="Run only this case (repeatable): one of the cases listed above.")
@click.option("--timeout", type=click.FloatRange(min=1), default=20.0, show_default=True,
              help="Seconds each case may take before its processes are killed.")
@common_options
def selftest(as_json: bool, size: str, only: tuple[str, ...], timeout: float) -> None:
    from ..selftest import cases as core

    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise UsageError(f"--size {size!r}: {e}") from None
    if nbytes % TARGET_PAGE_SIZE or nbytes < 16 * TARGET_PAGE_SIZE:
        raise UsageError(f"--size {size!r}: must be a multiple of {TARGET_PAGE_SIZE} bytes and at least 64K")
    unknown = [n for n in only if n not in core.case_names()]
    if unknown:
        raise UsageError(f"--case {unknown[0]!r}: unknown case; known: {', '.join(core.case_names())}")

    # Without a usable userfaultfd every case would only time out: say why at once instead.
    from ..probe import run_probe

    host = run_probe()
    if not host.supported:
        raise core.SelftestFailed(f"selftest cannot run on this host: {host.why_unsupported()}")

    def progress(r: dict) -> None:
        if not as_json and sys.stderr.isatty():
            print(f"postcopy: {r['name']}: {'pass' if r['passed'] else 'FAIL'}", file=sys.stderr, flush=True)

    report = core.run_selftest(size=nbytes, timeout=timeout, only=list(only) or None, on_result=progress)
    if not as_json:
        _render(report)
    if not report["passed"]:
        failed = [r["name"] for r in report["cases"] if not r["passed"]]
        # with --json the report goes with the error: one document
        raise with_stats(core.SelftestFailed(f"selftest failed: {', '.join(failed) or 'no case ran'}"),
                         report if as_json else None)
    if as_json:
        emit_json(report)
