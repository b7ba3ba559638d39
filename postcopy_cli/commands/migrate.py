"""`postcopy migrate`: the source side of a migration."""
from __future__ import annotations

import sys

import click

from ..errors import UsageError
from ..memory import parse_size
from ._common import common_options, emit_json, not_built


def _rate(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return float(parse_size(text.removesuffix("/s")))
    except ValueError as e:
        raise UsageError(f"--max-bandwidth {text!r}: {e}") from None


@click.command("migrate")
@click.option("--to", "to", required=True, metavar="URI", help="The destination's serve-dest: tcp:HOST:PORT or unix:PATH.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Serve this memory image lazily (block 'mem').")
@click.option("--attach", metavar="PATH", help="Migrate the live program that connects to this Unix socket.")
@click.option("--state-file", type=click.Path(exists=True, dir_okay=False),
              help="Bytes handed to the destination program at RUN (the device state).")
@click.option("--max-bandwidth", metavar="RATE", help="Cap on the stream, bytes per second (K/M/G suffixes).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the destination before giving up.")
@common_options
def migrate(as_json, to, image, attach, state_file, max_bandwidth, timeout):
    """Migrate memory to a serve-dest: an image file (lazy restore) or a live program.

    With --image, the destination's requested pages are sent first and the rest
    streams in background; zero pages go as ZERO records. Exit 0 when the
    destination answers SHUT 0; 1 on failure; 3 on a malformed return path;
    4 if the destination disconnected.
    """
    from .. import transport
    from ..source import ImageMemory, migrate_image

    if bool(image) == bool(attach):
        raise UsageError("give exactly one of --image FILE or --attach PATH")
    if attach:
        not_built("postcopy migrate --attach (live migration)")
    rate = _rate(max_bandwidth)
    state = b""
    if state_file:
        with open(state_file, "rb") as f:
            state = f.read()
    address = transport.parse_address(to)
    memory = ImageMemory(image)
    try:
        conn = transport.connect(address, timeout=timeout)
        try:
            stats = migrate_image(conn, memory, state=state, max_bandwidth=rate, timeout=timeout)
        finally:
            conn.close()
    finally:
        memory.close()
    if as_json:
        emit_json(stats)
    else:
        print(f"postcopy: migrated {stats['pages']} pages in {stats['total_seconds']} s "
              f"({stats['requests']} requests answered first)", file=sys.stderr)
