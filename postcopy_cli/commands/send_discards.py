"""`postcopy send-discards`: dirty pages -> POSTCOPY_RAM_DISCARD commands.

Thin: parse options, call :mod:`postcopy_cli.codec.discards`, render.
"""
from __future__ import annotations

import json
import logging
import sys

import click

from ..errors import LocalProtocolError, UsageError
from ._common import BlockNameParam, SizeParam, common_options, emit_json

log = logging.getLogger("postcopy.send_discards")


def _split_commands(chunk: bytes):
    """Split concatenated COMMAND sections (0x08, be16 cmd, be16 len, payload)."""
    p = 0
    n = len(chunk)
    while p < n:
        end = p + 5 + int.from_bytes(chunk[p + 3:p + 5], "big")
        yield chunk[p:end]
        p = end


class _Output:
    """Where the commands go: stdout, a file, or a connection (``conn``)."""

    def __init__(self, path: str, enabled: bool, conn=None):
        self.path = path
        self.enabled = enabled
        self.conn = conn
        self.f = None

    def __enter__(self):
        if self.conn is not None:
            self.f = self.conn.makefile("wb")
            return self
        if not self.enabled:
            return self
        if self.path == "-":
            self.f = sys.stdout.buffer
        else:
            try:
                self.f = open(self.path, "wb")
            except OSError as e:
                raise UsageError(f"--output: cannot write {self.path}: {e.strerror or e}") from None
        return self

    def write(self, data: bytes) -> None:
        if self.f is not None:
            self.f.write(data)

    def __exit__(self, *exc):
        if self.conn is not None:
            try:
                self.f.close()
            finally:
                self.conn.close()
        elif self.f is not None:
            if self.path == "-":
                self.f.flush()
            else:
                self.f.close()
        return False


@click.command("send-discards")
@click.option("--block", "block", required=True, type=BlockNameParam(), help="RAM block the pages belong to.")
@click.option("--bitmap", "bitmap_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              metavar="FILE", help="Dirty-page bitmap: little-endian, bit i of byte i/8 = page i ('-' = stdin).")
@click.option("--pages", "pages", default=None, metavar="LIST", help="Dirty pages, e.g. 3,7-9 (inclusive ranges).")
@click.option("--page-size", type=SizeParam(), default=4096, show_default=True,
              help="Bytes per page of the bitmap / page list (e.g. 4096, 2M).")
@click.option("--max-per-command", type=int, default=12, show_default=True,
              help="Most ranges in one POSTCOPY_RAM_DISCARD command.")
@click.option("--format", "fmt", type=click.Choice(["raw", "hex", "json"]), default="hex", show_default=True,
              help="raw: the COMMAND section bytes; hex: one command per line; json: a list of commands.")
@click.option("--output", "-o", "output", default="-", show_default=True, metavar="FILE|-",
              help="Where the commands go (with --json and '-', only the summary is printed).")
@click.option("--to", "to", default=None, metavar="URI",
              help="Send the commands (raw bytes, as on the main stream) to tcp:HOST:PORT or unix:PATH "
                   "instead of writing them.")
@common_options
def send_discards(block: str, bitmap_path: str | None, pages: str | None, page_size: int, max_per_command: int,
                  fmt: str, output: str, to: str | None, as_json: bool) -> None:
    """Turn dirty pages into POSTCOPY_RAM_DISCARD commands (QEMU's byte layout).

    Runs of dirty pages become (start, length) ranges in bytes, at most
    --max-per-command per command.  With --json a summary
    {"block","pages","ranges","commands","bytes"} is printed on stdout.
    """
    from ..codec import discards

    if (bitmap_path is None) == (pages is None):
        raise UsageError("give exactly one of --bitmap FILE or --pages LIST")
    if max_per_command < 1:
        raise UsageError(f"--max-per-command must be at least 1 (got {max_per_command})")
    if max_per_command > discards.MAX_RANGES_LIMIT:
        raise UsageError(f"--max-per-command must be at most {discards.MAX_RANGES_LIMIT} (got {max_per_command})")
    try:
        enc = discards.DiscardEncoder(block, page_size=page_size, max_per_command=max_per_command)
    except LocalProtocolError as e:
        opt = "--page-size" if "page size" in str(e) else "--block"
        raise UsageError(f"{opt}: {e}") from None
    conn = None
    if to is not None:
        from ..channels import transport

        if fmt != "raw" or output != "-":
            raise UsageError("--to sends raw commands: it goes without --format json|hex and --output")
        conn = transport.connect(transport.parse_address(to), timeout=2.0)

    bitmap = None
    runs = None
    if bitmap_path is not None:
        try:
            if bitmap_path == "-":
                bitmap = sys.stdin.buffer.read()
            else:
                with open(bitmap_path, "rb") as f:
                    bitmap = f.read()
        except OSError as e:
            raise UsageError(f"--bitmap: cannot read {bitmap_path}: {e.strerror or e}") from None
    else:
        runs = discards.parse_page_list(pages)
        last = runs[-1][0] + runs[-1][1]
        if last * page_size > 1 << 64:
            raise UsageError(f"--pages: page {last - 1} is beyond the 64-bit byte range of a block "
                             f"(pages of {page_size} bytes)")

    name_len = len(block.encode("utf-8"))
    write_cmds = not (as_json and output == "-")
    with _Output(output, write_cmds, conn) as out:
        if fmt == "json":
            source = discards.page_runs(bitmap) if bitmap is not None else runs
            out.write(b"[")
            first = True
            for cmd in enc.commands(source):
                enc.stats.bytes += 8 + name_len + 16 * len(cmd.ranges)
                item = json.dumps({"block": cmd.block, "ranges": [list(r) for r in cmd.ranges]})
                out.write((("\n  " if first else ",\n  ") + item).encode())
                first = False
            out.write(b"\n]\n" if not first else b"]\n")
        else:
            chunks = enc.encoded_from_bitmap(bitmap) if bitmap is not None else enc.encoded(runs)
            for chunk in chunks:
                if fmt == "raw":
                    out.write(chunk)
                else:
                    out.write(b"".join(c.hex().encode() + b"\n" for c in _split_commands(chunk)))
    st = enc.stats
    log.info("%d pages in %d ranges -> %d commands (%d bytes)", st.pages, st.ranges, st.commands, st.bytes)
    if as_json:
        emit_json({"block": block, "pages": st.pages, "ranges": st.ranges, "commands": st.commands,
                   "bytes": st.bytes})
