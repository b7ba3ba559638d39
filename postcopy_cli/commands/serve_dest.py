"""`postcopy serve-dest`: receive one incoming post-copy migration."""
from __future__ import annotations

import json
import os
import sys

import click

from .. import signals
from ..errors import UsageError, with_stats
from ..units import parse_size
from ._common import check_block_name, common_options, emit_json, progress_display


def _parse_ram(values) -> list[tuple[str, int]]:
    out: dict[str, int] = {}
    for v in values:
        name, sep, size = v.partition("=")
        if not sep or not name:
            raise UsageError(f"--ram {v!r}: expected NAME=SIZE, e.g. mem=1G")
        try:
            check_block_name(name)
        except click.BadParameter as e:
            raise UsageError(f"--ram: {e.message}") from None
        if name in out:
            raise UsageError(f"--ram: block {name!r} is given twice")
        try:
            out[name] = parse_size(size)
        except ValueError as e:
            raise UsageError(f"--ram {v!r}: {e}") from None
        if out[name] % 4096:
            raise UsageError(f"--ram {v!r}: size must be a multiple of 4096")
    return list(out.items())


def _check_writable(path: str, option: str) -> None:
    """Before anything listens: the file can be written at the end (its folder exists and is writable)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable")


@click.command("serve-dest")
@click.option("--listen", "listen", required=True, metavar="URI",
              help="Where the source connects: tcp:HOST:PORT or unix:PATH (port 0 picks one).")
@click.option("--uffd-socket", metavar="PATH",
              help="Unix socket where the program that owns the memory hands it over "
                   "(Firecracker's UFFD handshake).")
@click.option("--ram", multiple=True, metavar="NAME=SIZE",
              help="Receive into memory of this process instead (repeatable; library use and tests).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds without data from the source before giving up.")
@click.option("--stats", "stats_file", metavar="FILE",
              help="Also write the final statistics as JSON to this file.")
@click.option("--insecure", is_flag=True, help="Allow listening on a non-loopback TCP address without authentication.")
@common_options
def serve_dest(as_json, listen, uffd_socket, ram, timeout, stats_file, insecure):
    """Receive one migration: fill RAM blocks on demand and in background.

    Waits for a program to hand over its memory through --uffd-socket (or uses
    --ram memory of its own), then for a source on --listen. Every page the
    program touches before it has arrived is caught by userfaultfd, requested
    from the source and placed atomically; the rest streams in background.
    Exit 0 when every page is in; 1 on failure (e.g. the program exited);
    3 on a protocol error from the source; 4 if the source disconnected.

    With --json, stdout is JSON lines (each line one JSON document): first
    {"event": "listening", "address": "tcp:HOST:PORT", "uffd-socket": PATH or
    null} once the sockets listen (scripts read the bound address there), then
    the final statistics, or on failure {"error": {"code", "kind", "message"}}
    with the statistics reached so far.
    """
    from ..dest.serve import ServeDest, ServeOptions

    if bool(uffd_socket) == bool(ram):
        raise UsageError("give exactly one of --uffd-socket PATH or --ram NAME=SIZE")
    if stats_file:
        _check_writable(stats_file, "--stats")
    opts = ServeOptions(listen=listen, uffd_socket=uffd_socket, ram=_parse_ram(ram), timeout=timeout,
                        insecure=insecure)

    def announce(server):
        print(f"postcopy: listening on {server.bound}" +
              (f", memory hand-over on unix:{uffd_socket}" if uffd_socket else ""), file=sys.stderr, flush=True)
        if as_json:
            emit_json({"event": "listening", "address": str(server.bound), "uffd_socket": uffd_socket})

    server = ServeDest(opts, on_listening=announce)
    try:
        with signals.guard(at_risk=lambda: server.dest.at_risk() if server.dest else None,
                           wake=lambda error: server.dest is not None and server.dest.stop(error)), \
                progress_display(enabled=not as_json, title="receiving") as progress:
            result = server.run(progress=progress)
    except BaseException as e:
        if server.dest is not None:
            with_stats(e, server.dest.stats())
        raise
    finally:
        server.close()
    if stats_file:
        with open(stats_file, "w") as f:
            json.dump(result.stats, f, indent=2)
    if as_json:
        emit_json(result.stats)
    else:
        s = result.stats
        lat = s["latency-us"]
        print(f"postcopy: migration complete: {s['pages']['received']} pages "
              f"({s['pages']['demand']} on demand, {s['pages']['background']} in background) in "
              f"{s['total-time-ms']:.0f} ms; {s['postcopy-requests']} requests, latency p50 <= {lat['p50']} us, "
              f"p99 <= {lat['p99']} us", file=sys.stderr)
