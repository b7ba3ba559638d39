"""`postcopy workset`: look into working-set files (serve-dest --record-workset)."""
from __future__ import annotations

import click

from ..errors import UsageError
from ..units import plural
from ._common import common_options, emit_json


@click.group("workset")
def workset() -> None:
    """Working-set files: the pages a restored program faulted on (serve-dest --record-workset),
    replayed first by migrate --image --workset."""


def summary(ws, first: int) -> dict:
    """The JSON document of ``workset show``."""
    runs = ws.in_fault_order()
    times = [us for *_, us in runs]
    return {"version": 1, "image-size": ws.image_size, "pages": ws.pages, "runs": ws.runs,
            "first-us": min(times, default=None), "last-us": max(times, default=None),
            "span-us": (max(times) - min(times)) if times else 0,
            "blocks": [{"name": b.name, "length": b.length, "page-size": b.page_size, "pages": b.pages,
                        "runs": len(b.runs)} for b in ws.blocks],
            "first-runs": [{"block": name, "page": page, "count": count, "us": us}
                           for name, page, count, us in runs[:first]]}


@workset.command("show")
@click.argument("path", metavar="FILE")
@click.option("--first", type=click.IntRange(min=0), default=10, show_default=True,
              help="List this many runs, in order of first fault.")
@common_options
def show(path: str, first: int, as_json: bool) -> None:
    """Summarise a working-set file: pages, runs, the span of fault times, the first runs.

    A file that is truncated, corrupt or of another format version is refused (exit 2).
    With --json: one document (version, image-size, pages, runs, first-us, last-us, span-us,
    blocks [{name, length, page-size, pages, runs}], first-runs [{block, page, count, us}]);
    pages are in units of their block's page size, times in microseconds after RUN."""
    from ..codec import workset as wsfile

    try:
        ws = wsfile.load(path)
    except wsfile.WorksetError as e:
        raise UsageError(str(e)) from None
    doc = summary(ws, first)
    if as_json:
        emit_json(doc)
        return
    lines = [f"workset {path}: {plural(doc['pages'], 'page')} in {plural(doc['runs'], 'run')}, "
             f"image {doc['image-size']} bytes, first faults {doc['span-us'] / 1000:.1f} ms apart"
             f" (from {doc['first-us'] / 1000:.1f} ms after RUN)" if doc["runs"] else
             f"workset {path}: no pages, image {doc['image-size']} bytes"]
    for b in doc["blocks"]:
        lines.append(f"  block {b['name']}: {b['length']} bytes in pages of {b['page-size']}, "
                     f"{plural(b['pages'], 'page')} in {plural(b['runs'], 'run')}")
    if doc["first-runs"]:
        lines.append(f"  first {plural(len(doc['first-runs']), 'run')} (page+count of block, us after RUN):")
        lines += [f"    {r['us']:>10} us  {r['block']} {r['page']}+{r['count']}" for r in doc["first-runs"]]
    click.echo("\n".join(lines))
