"""`postcopy serve-dest`: receive one incoming post-copy migration."""
from __future__ import annotations

import json
import os
import sys
import time

import click

from .. import signals
from ..errors import UsageError, with_stats
from ..codec.constants import TARGET_PAGE_SIZE as TP
from ..units import parse_size, plural
from ._common import RateMeter, check_block_name, common_options, emit_json, eta_of, live_status, status_line


class DestStatus:
    """serve-dest's live status from Destination.progress() snapshots (plus ``t``, monotonic seconds).

    Pre-copy and post-copy are separate rows: pages copied in pre-copy may be
    discarded at the switch-over (sent again), so the pre-copy row stops at what
    pre-copy copied, and the post-copy row counts pages in for good (after RUN the
    count only grows).  Neither figure ever goes down.
    """

    def __init__(self):
        self._rate = RateMeter()
        self._precopy: str | None = None    # the pre-copy row, frozen once pre-copy is over

    def __call__(self, snap: dict, width: int) -> list[str]:
        phase = snap["phase"]
        rate = self._rate.add(snap["t"], snap["arrived"] * TP)
        total, received = snap["total"] * TP, snap["received"] * TP
        rows = []
        if phase == "pre-copy":
            if received:
                self._precopy = status_line("pre-copy ", done=received, total=total, width=width)
            return [status_line("pre-copy ", done=received, total=total, rate=rate,
                                eta=eta_of(total - received, rate), width=width)]
        if self._precopy is not None:
            rows.append(self._precopy)
        if phase == "switch-over":
            rows.append(status_line("switch-over: discarding stale pages, waiting for RUN", width=width))
        elif phase == "paused":
            rows.append(status_line(f"PAUSED {snap['paused_s']:.0f}/{snap['recover_timeout']:g} s", done=received,
                                    total=total, extra=f"waiting for the source to resume ({snap['reason']})",
                                    width=width))
        else:
            rows.append(status_line("post-copy" if phase == "post-copy" else "done     ", done=received, total=total,
                                    rate=rate, eta=eta_of(total - received, rate),
                                    extra=plural(snap["requests"], "request"), width=width))
        return rows


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


def _write_workset(dest, path: str) -> None:
    """--record-workset: what the program faulted on; a file that cannot be written is a warning (the
    migration's own outcome stands)."""
    from ..codec import workset

    ws, whole = dest.workset()
    try:
        workset.save(path, ws)
    except OSError as e:
        print(f"postcopy: warning: --record-workset {path}: {e.strerror or e}", file=sys.stderr)
        return
    if not whole:
        print(f"postcopy: warning: --record-workset {path}: the record stopped early (out of memory); it holds "
              f"the first {ws.pages} pages", file=sys.stderr)


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
@click.option("--recover-timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="After RUN, seconds a broken or silent source connection may stay paused waiting for the "
                   "source to resume (0: fail at once).")
@click.option("--stats", "stats_file", metavar="FILE",
              help="Also write the final statistics as JSON to this file.")
@click.option("--record-workset", "workset_file", metavar="FILE",
              help="Write the pages the program faulted on, in order of first fault, to this file at the end "
                   "(also when the migration fails: what was seen); migrate --image --workset FILE replays it.")
@click.option("--insecure", is_flag=True, help="Allow listening on a non-loopback TCP address without authentication.")
@click.option("--tls-creds", "tls_creds", metavar="DIR",
              help="Every connection is TLS (1.2 or later): DIR holds ca-cert.pem, server-cert.pem and "
                   "server-key.pem (QEMU's tls-creds-x509 layout, e.g. /etc/pki/qemu); the source must present "
                   "a client certificate signed by that CA. Then any address may be listened on.")
@common_options
def serve_dest(as_json, listen, uffd_socket, ram, timeout, recover_timeout, stats_file, insecure, workset_file,
               tls_creds):
    """Receive one migration: fill RAM blocks on demand and in background.

    Waits for a program to hand over its memory through --uffd-socket (or uses
    --ram memory of its own), then for a source on --listen. Every page the
    program touches before it has arrived is caught by userfaultfd, requested
    from the source and placed atomically; the rest streams in background.
    After RUN a broken connection pauses the migration: the program's threads
    wait for their pages while the source reconnects and resumes (for up to
    --recover-timeout seconds).
    Exit 0 when every page is in; 1 on failure (e.g. the program exited);
    3 on a protocol error from the source; 4 if the source disconnected and
    did not resume. With --tls-creds a connection that fails the TLS handshake
    (no or a foreign certificate, a plaintext source) is refused on its own
    with a warning, and the wait goes on.

    With --json, stdout is JSON lines (each line one JSON document): first
    {"event": "listening", "address": "tcp:HOST:PORT", "uffd-socket": PATH or
    null} once the sockets listen (scripts read the bound address there), then
    the final statistics, or on failure {"error": {"code", "kind", "message"}}
    with the statistics reached so far.
    """
    from .. import hoptrace
    from ..channels.tls import Credentials
    from ..dest.serve import ServeDest, ServeOptions

    if bool(uffd_socket) == bool(ram):
        raise UsageError("give exactly one of --uffd-socket PATH or --ram NAME=SIZE")
    if stats_file:
        _check_writable(stats_file, "--stats")
    if workset_file:
        _check_writable(workset_file, "--record-workset")
    tls = Credentials.load(tls_creds, server=True) if tls_creds else None
    opts = ServeOptions(listen=listen, uffd_socket=uffd_socket, ram=_parse_ram(ram), timeout=timeout,
                        insecure=insecure, recover_timeout=recover_timeout, record_workset=bool(workset_file),
                        tls=tls, hop_trace=hoptrace.capacity() if hoptrace.directory() else None)

    def announce(server):
        print(f"postcopy: listening on {server.bound}" +
              (f", memory hand-over on unix:{uffd_socket}" if uffd_socket else ""), file=sys.stderr, flush=True)
        if as_json:
            emit_json({"event": "listening", "address": str(server.bound), "uffd_socket": uffd_socket})

    server = ServeDest(opts, on_listening=announce)
    try:
        with signals.guard(at_risk=lambda: server.dest.at_risk() if server.dest else None,
                           wake=lambda error: server.dest is not None and server.dest.stop(error)), \
                live_status(DestStatus(), enabled=not as_json) as status:
            result = server.run(progress=(lambda p: status.update(dict(p, t=time.monotonic())))
                                if status.enabled else None)
    except BaseException as e:
        if server.dest is not None:
            with_stats(e, server.dest.stats())
        raise
    finally:
        server.close()
        if workset_file and server.dest is not None:
            _write_workset(server.dest, workset_file)
        if opts.hop_trace is not None and server.dest is not None:
            rows, claimed = server.dest.hop_trace()
            hoptrace.write(hoptrace.directory(), "dest", hoptrace.DEST_COLUMNS, rows, claimed=claimed,
                           capacity=server.dest.hop_capacity)
    if stats_file:
        with open(stats_file, "w") as f:
            json.dump(result.stats, f, indent=2)
    if as_json:
        emit_json(result.stats)
    else:
        s = result.stats
        lat = s["latency-us"]
        print(f"postcopy: migration complete: {plural(s['pages']['received'], 'page')} "
              f"({s['pages']['demand']} on demand, {s['pages']['background']} in background) in "
              f"{s['total-time-ms']:.0f} ms; {plural(s['postcopy-requests'], 'request')}" +
              (f", latency p50 <= {lat['p50']} us, p99 <= {lat['p99']} us" if lat["p50"] is not None else ""),
              file=sys.stderr)
