"""`postcopy probe`: can this host do post-copy migration?"""
from __future__ import annotations

import click

from ..errors import PostcopyError, with_stats
from ._common import SizeParam, common_options, emit_json


class PostcopyUnsupported(PostcopyError):
    """The host failed a check that post-copy needs (exit 1)."""


_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def _render(report, console=None) -> None:
    """A table on a terminal (long cells wrap, never cut); plain lines anywhere else.

    Off a terminal (a pipe, a file) rich would squeeze the table to 80 columns and
    cut long words with an ellipsis, so each check is printed as plain lines that
    nothing shortens: ``check  status  detail`` and, indented, ``remedy: ...``.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"postcopy probe: Linux {report.kernel}, host page {report.host_page_size} B"
    caps = "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in report.capabilities.items())
    verdict = "supported" if report.supported else "NOT supported"
    if not console.is_terminal:
        width = max(len(c.name) for c in report.checks)
        lines = [title]
        for c in report.checks:
            lines.append(f"{c.name:<{width}}  {c.status:<4}  {c.detail}")
            if c.remedy:
                lines.append(f"{'':<{width}}  {'':<4}  remedy: {c.remedy}")
        lines += [f"capabilities: {caps}", f"postcopy is {verdict} on this host ({report.elapsed_ms:.0f} ms)"]
        console.file.write("\n".join(lines) + "\n")
        console.file.flush()
        return
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    # fold: a word wider than its column (a sysctl name, a path) breaks across lines instead of being cut
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail)
    console.print(table)
    # remedies hold commands to copy: whole lines below the table (the terminal wraps them), never cells
    for c in report.checks:
        if c.remedy:
            console.print(f"remedy for {c.name}: {c.remedy}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"capabilities: {caps}", highlight=False)
    if report.supported:
        console.print(f"[green]postcopy is supported on this host[/] ({report.elapsed_ms:.0f} ms)")
    else:
        console.print(f"[bold red]postcopy is NOT supported on this host[/] ({report.elapsed_ms:.0f} ms)")


@click.command("probe")
@click.option("--target-page-size", type=SizeParam(minimum=512), default=4096, show_default=True,
              help="Page size of the migrated program's memory (QEMU's target page size).")
@common_options
def probe(as_json: bool, target_page_size: int) -> None:
    """Check whether this host supports post-copy migration.

    Runs every host check of QEMU's postcopy_ram_supported_by_host (page size,
    userfaultfd, the UFFDIO_API handshake, a real registration of anonymous
    memory, munlockall, hugetlbfs and shared memory) and more (THREAD_ID for
    blocktime, WP_ASYNC with PAGEMAP_SCAN for live dirty tracking, MINOR faults
    with UFFDIO_CONTINUE, transparent huge pages). Each check is pass, fail,
    warn or skip with a detail and a remedy; the QEMU migration capabilities
    the host supports are listed. On a terminal: a table, each remedy a whole
    line below it; in a pipe or a file: plain lines, "check status detail" and
    an indented "remedy: ..." under it, nothing cut. Exits 1 when post-copy is
    not supported.
    """
    from ..probe import run_probe

    report = run_probe(target_page_size)
    if not as_json:
        _render(report)
    if not report.supported:
        names = ", ".join(c.name for c in report.failed) or "core checks"
        # with --json the report goes with the error: one document
        raise with_stats(PostcopyUnsupported(f"post-copy is not supported on this host (failed: {names})"),
                         report.to_json() if as_json else None)
    if as_json:
        emit_json(report.to_json())
