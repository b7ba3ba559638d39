"""`postcopy migrate`: the source side of a migration."""
from __future__ import annotations

import os
import sys

import click

from .. import hoptrace, signals
from ..errors import PostcopyError, UsageError
from ..units import parse_size
from ..units import plural
from ._common import RateMeter, common_options, emit_json, eta_of, format_duration, live_status, status_line


class SourceStatus:
    """The source's live status (``virsh migrate --verbose``, QEMU's ``info migrate``), from snapshots:
    the engine's progress() or, before there is one, {"phase": "connecting", "waiting": (address, seconds)}."""

    def __init__(self):
        self._rate = RateMeter()

    def __call__(self, snap: dict, width: int) -> list[str]:
        phase = snap["phase"]
        if phase == "program":
            return [status_line(f"waiting for the program on {snap['program']} ({format_duration(snap['waiting'])})",
                                width=width)]
        if phase == "connecting":
            waiting = snap.get("waiting")
            if waiting is None:
                return [status_line(f"connecting to {snap['to']}", width=width)]
            return [status_line(f"waiting for {snap['to']} ({format_duration(waiting)})", width=width)]
        rate = self._rate.add(snap["t"], snap["sent_bytes"])
        if phase == "starting":
            return [status_line(f"connected to {snap.get('to', 'the destination')}: starting", width=width)]
        if phase == "switch-over":
            return [status_line("switch-over: program paused, sending discards and RUN", width=width)]
        if phase == "done":
            return [status_line("done", width=width)]
        if phase == "paused":
            return [status_line(f"PAUSED {format_duration(snap['paused_s'])}: {snap['reason']}; reconnecting "
                                f"to {snap.get('to', 'the destination')} (attempt {snap['attempts']})", width=width)]
        total, done = snap["phase_bytes"], snap["phase_done_bytes"]
        if phase == "pre-copy":
            label = f"pre-copy pass {snap['pass']}"
            extra = f"{snap['pages_left']} dirty"
        else:
            label, extra = "post-copy", plural(snap["requests"], "request")
        return [status_line(label, done=done, total=total, rate=rate, eta=eta_of(total - done, rate), extra=extra,
                            width=width)]


class _Watch:
    """What the display polls: the connection wait, then the engine's progress()."""

    def __init__(self, to: str, program: str | None = None):
        self.to = to
        self.program = program     # --attach: waiting for the program on this socket until it connects
        self.waiting: float | None = None
        self.engine = None
        self._t0: float | None = None

    def on_program(self, *_) -> None:
        self.program = None

    def on_wait(self, seconds: float) -> None:
        self.waiting = seconds

    def on_start(self, engine) -> None:
        self.engine = engine
        if hoptrace.directory():
            # POSTCOPY_HOP_TRACE: before anything is sent (the request server starts after RUN)
            from ..codec.constants import TARGET_PAGE_SIZE

            streamer = getattr(engine, "streamer", engine)   # --attach: the LiveMigration's
            pages = sum(b.length // TARGET_PAGE_SIZE for b in streamer.blocks)
            streamer.enable_hop_trace(hoptrace.capacity(pages))

    def write_hop_trace(self) -> None:
        """POSTCOPY_HOP_TRACE: the source's entries, at the end (success or failure)."""
        if not hoptrace.directory() or self.engine is None:
            return
        streamer = getattr(self.engine, "streamer", self.engine)
        hoptrace.write(hoptrace.directory(), "source", hoptrace.SOURCE_COLUMNS, streamer.hop_rows,
                       claimed=streamer.hop_claimed, capacity=streamer.hop_capacity)

    def __call__(self, t: float) -> dict:
        engine = self.engine
        if self._t0 is None:
            self._t0 = t
        if engine is None and self.program is not None:
            return {"phase": "program", "program": self.program, "waiting": t - self._t0, "t": t}
        if engine is None:
            return {"phase": "connecting", "to": self.to, "waiting": self.waiting, "t": t}
        return dict(engine.progress(), to=self.to, t=t)


def _rate(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return float(parse_size(text.removesuffix("/s")))
    except ValueError as e:
        raise UsageError(f"--max-bandwidth {text!r}: {e}") from None


def _migration_id(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 16:
        raise UsageError(f"--migration-id {text!r}: must be 32 hex digits (16 bytes)")
    return value


def _announce(as_json: bool, migration_id: bytes, to: str) -> None:
    """The migration id on a terminal (a restarted source names the migration with it)."""
    if not as_json and sys.stderr.isatty():
        print(f"postcopy: migration {migration_id.hex()} to {to}", file=sys.stderr, flush=True)


def _page_size(text: str | None) -> int:
    if text is None:
        return 4096
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UsageError(f"--page-size {text!r}: {e}") from None
    if size < 4096 or size & (size - 1):
        raise UsageError(f"--page-size {text!r}: must be a power of two of at least 4096 bytes")
    return size


@click.command("migrate")
@click.option("--to", "to", required=True, metavar="URI", help="The destination's serve-dest: tcp:HOST:PORT or unix:PATH.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Serve this memory image lazily (block 'mem').")
@click.option("--page-size", "page_size", metavar="BYTES", default=None,
              help="--image: the host page size of block 'mem' (a power of two, at least 4096; default 4096), "
                   "e.g. 2M for a destination whose memory is in 2 MiB huge pages.")
@click.option("--workset", "worksets", multiple=True, metavar="FILE",
              help="--image: send the pages of this working set (serve-dest --record-workset) first, in the "
                   "order the program faulted on them, then the rest (repeatable: merged by first fault "
                   "time, each page once). Requested pages still go first.")
@click.option("--workset-before-run", "workset_before_run", is_flag=True,
              help="--workset: send the working set before RUN, so that the program starts with it in place "
                   "(fewer faults, a later start) instead of racing the stream for it.")
@click.option("--attach", metavar="PATH", help="Migrate the live program that connects to this Unix socket.")
@click.option("--state-file", type=click.Path(exists=True, dir_okay=False),
              help="Bytes handed to the destination program at RUN (the device state).")
@click.option("--max-bandwidth", metavar="RATE", help="Cap on the stream, bytes per second (K/M/G suffixes).")
@click.option("--postcopy-after", type=click.FloatRange(min=0), default=None,
              help="--attach: seconds of pre-copy before switching to post-copy (default 1; SIGUSR1 switches "
                   "at once).")
@click.option("--precopy-passes", type=click.IntRange(min=0), default=None,
              help="--attach: switch to post-copy after this many complete pre-copy passes.")
@click.option("--precopy-resend-hot", "resend_hot", is_flag=True,
              help="--attach: in pre-copy, send a page again however often the program writes it (QEMU's way); "
                   "by default a page written since the last sync (every 0.2 s), or written after it was sent, is "
                   "held back for post-copy (one never sent goes once quiet): each page goes at most once.")
@click.option("--kill-source", is_flag=True, help="--attach: end the source program once the migration succeeded.")
@click.option("--single-channel", is_flag=True,
              help="Send requested pages on the main connection instead of a second (preempt) connection.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds to wait for the destination before giving up.")
@click.option("--recover-timeout", "recover_timeout", type=click.FloatRange(min=0), default=600.0,
              show_default=True,
              help="After RUN, a failed or stalled connection pauses post-copy and the source reconnects and "
                   "resumes for up to this many seconds before giving up (exit 4); 0 fails at once.")
@click.option("--migration-id", "migration_id", metavar="HEX",
              help="The migration's id (32 hex digits): set it (default random), or with --resume name the "
                   "paused migration to take over.")
@click.option("--resume", is_flag=True,
              help="--image: take over a paused migration of this image to --to (a restarted source): the "
                   "resume handshake at once, then post-copy. The id comes from --migration-id or from the "
                   "record the first migrate wrote in $POSTCOPY_STATE_DIR (default /run/postcopy).")
@click.option("--tls-creds", "tls_creds", metavar="DIR",
              help="Every connection is TLS (1.2 or later): DIR holds ca-cert.pem, client-cert.pem and "
                   "client-key.pem (QEMU's tls-creds-x509 layout, e.g. /etc/pki/qemu); the destination's "
                   "certificate must be signed by that CA and name the destination.")
@click.option("--tls-hostname", "tls_hostname", metavar="NAME",
              help="--tls-creds: the name the destination's certificate must carry (default the host of --to; "
                   "an IP address is checked against the certificate's IP addresses).")
@common_options
def migrate(as_json, to, image, attach, page_size, state_file, max_bandwidth, timeout, postcopy_after,
            precopy_passes, resend_hot, kill_source, single_channel, recover_timeout, migration_id, resume, worksets,
            workset_before_run, tls_creds, tls_hostname):
    """Migrate memory to a serve-dest: an image file (lazy restore) or a live program.

    With --image, the destination's requested pages are sent first and the rest
    streams in background; zero pages go as ZERO records. --page-size serves
    the image in host pages of that size (a destination whose memory is in
    huge pages): requests and background runs are whole host pages. With --attach, a
    program on this host connects to PATH and hands over its memory and a
    userfaultfd registered for write-protect tracking (WP_ASYNC): pre-copy
    passes while it runs, then it is paused, stale pages are discarded, and the
    rest moves in post-copy. Exit 0 when the destination answers SHUT 0; 1 on
    failure (the source program is resumed if that happens before RUN); 3 on a
    malformed return path or when the destination refused the stream (it
    answered SHUT 1, e.g. blocks, sizes or page sizes differ); 4 if the
    destination disconnected (after RUN: once --recover-timeout has passed
    without a resume). With --tls-creds, a failed TLS handshake before RUN is
    exit 1 with the reason (after RUN it is retried like any reconnection). --json keys are kebab-case (total-seconds, ...);
    the snake_case keys of 0.1 are still written too, deprecated until 0.3.0.
    """
    from ..channels import transport
    from ..channels.tls import Credentials
    from ..source.live import shut_connections
    from ..source.image import ImageMemory, migrate_image
    from ..source import record
    from ..source.recovery import recovery_to

    if resume and not image:
        raise UsageError("--resume goes with --image FILE (it takes over a paused image migration)")
    if bool(image) == bool(attach):
        raise UsageError("give exactly one of --image FILE or --attach PATH")
    mid = _migration_id(migration_id)
    if image and (postcopy_after is not None or precopy_passes is not None or kill_source or resend_hot):
        raise UsageError("--postcopy-after, --precopy-passes, --precopy-resend-hot and --kill-source go with "
                         "--attach")
    if attach and page_size is not None:
        raise UsageError("--page-size goes with --image (a live program's page sizes come from its hand-over)")
    if attach and worksets:
        raise UsageError("--workset goes with --image (a working set replays a restore of an image)")
    if workset_before_run and not worksets:
        raise UsageError("--workset-before-run goes with --workset FILE")
    if tls_hostname and not tls_creds:
        raise UsageError("--tls-hostname goes with --tls-creds DIR")
    tls = {"tls": Credentials.load(tls_creds, server=False) if tls_creds else None, "hostname": tls_hostname}
    host_page = _page_size(page_size)
    rate = _rate(max_bandwidth)
    state = b""
    if state_file:
        with open(state_file, "rb") as f:
            state = f.read()
    if attach:
        _migrate_live(as_json, to, attach, state, rate, timeout, postcopy_after, precopy_passes, kill_source,
                      single_channel, recover_timeout, mid, tls, resend_hot)
        return
    address = transport.parse_address(to)
    preempt_channels = 0 if single_channel else 1
    if resume and mid is None:
        found = record.read_record(image, str(address))
        if found is None:
            raise UsageError(f"--resume: no record of a migration of {image} to {address} in "
                             f"{record.state_dir()} ($POSTCOPY_STATE_DIR); name it with --migration-id HEX")
        mid = bytes.fromhex(found["migration-id"])
        preempt_channels = int(found.get("preempt-channels", preempt_channels))
    memory = ImageMemory(image, page_size=host_page)
    try:
        priority = _workset_order(worksets, memory.blocks)
    except BaseException:
        memory.close()
        raise
    watch = _Watch(str(address))
    recovery = recovery_to(address, timeout=timeout, recover_timeout=recover_timeout, **tls)
    if mid is None:
        mid = os.urandom(16)
    _announce(as_json, mid, str(address))
    try:
        record_file = record.write_record(image, str(address), mid, preempt_channels)
    except PostcopyError as e:   # e.g. an unprivileged user and /run: --migration-id still names it
        print(f"postcopy: warning: {e}; a restarted source needs --migration-id {mid.hex()}", file=sys.stderr)
        record_file = None
    conn = preempt = None
    try:
        with live_status(SourceStatus(), watch, enabled=not as_json):
            try:
                if not resume:
                    conn = transport.connect(address, timeout=timeout, on_wait=watch.on_wait, **tls)
                    preempt = transport.connect(address, timeout=timeout, **tls) if preempt_channels else None
                # RUN goes right after the preamble: from here the destination's program runs
                with signals.guard(at_risk=lambda: "the destination's program runs and its missing pages come "
                                                   "from here",
                                   wake=lambda error: watch.engine.wake(error) if watch.engine is not None
                                   else shut_connections(conn, preempt)):
                    stats = migrate_image(conn, memory, state=state, max_bandwidth=rate, timeout=timeout,
                                          preempt=preempt, on_start=watch.on_start, migration_id=mid,
                                          preempt_channels=preempt_channels, recovery=recovery, resume=resume,
                                          priority=priority, priority_before_run=workset_before_run)
            finally:
                for sock in (conn, preempt):
                    if sock is not None:
                        sock.close()
    except BaseException:
        if watch.engine is None or not watch.engine.run_sent:
            record.remove_record(record_file)   # before RUN: nothing to resume
        raise
    finally:
        watch.write_hop_trace()
        memory.close()
    record.remove_record(record_file)
    stats["migration_id"] = mid.hex()
    if as_json:
        emit_json(stats)
    else:
        print(f"postcopy: migrated {plural(stats['pages'], 'page')} in {stats['total_seconds']} s "
              f"({plural(stats['requests'], 'request')} answered first)", file=sys.stderr)


def _workset_order(paths, blocks) -> list | None:
    """The --workset files' replay order for the image's blocks; exit 2 naming the file and the
    mismatch or damage."""
    if not paths:
        return None
    from ..codec import workset

    try:
        loaded = []
        for path in paths:
            ws = workset.load(path, where=f"--workset {path}")
            workset.check_fits(ws, blocks, where=f"--workset {path}")
            loaded.append(ws)
    except workset.WorksetError as e:
        raise UsageError(str(e)) from None
    return workset.priority_runs(loaded, blocks)


def _migrate_live(as_json, to, attach, state, rate, timeout, postcopy_after, precopy_passes, kill_source,
                  single_channel, recover_timeout, migration_id, tls, resend_hot=False):
    import signal
    import threading

    from ..channels import transport
    from ..source.live import LiveOptions, migrate_live

    watch = _Watch(str(transport.parse_address(to)), program=f"unix:{attach}")
    if postcopy_after is None and precopy_passes is None:
        postcopy_after = 1.0
    switchover = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: switchover.set())
    opts = LiveOptions(postcopy_after=postcopy_after, precopy_passes=precopy_passes, max_bandwidth=rate,
                       timeout=timeout, state=state, kill_source=kill_source, preempt=not single_channel,
                       recover_timeout=recover_timeout, migration_id=migration_id or os.urandom(16),
                       tls_hostname=tls["hostname"], tls=tls["tls"], hold_hot=not resend_hot)
    _announce(as_json, opts.migration_id, watch.to)
    try:
        with live_status(SourceStatus(), watch, enabled=not as_json):
            stats = migrate_live(attach, to, opts, switchover=switchover, on_wait=watch.on_wait,
                                 on_program=watch.on_program, on_start=watch.on_start,
                                 on_ready=lambda: print(f"postcopy: waiting for the program on unix:{attach}",
                                                        file=sys.stderr, flush=True))
    finally:
        watch.write_hop_trace()
        signal.signal(signal.SIGUSR1, previous)
    if as_json:
        emit_json(stats)
    else:
        print(f"postcopy: migrated live in {stats['total_seconds']} s: "
              f"{plural(stats['precopy_passes'], 'pre-copy pass', 'pre-copy passes')}, downtime "
              f"{stats['downtime_ms']} ms, {plural(stats['discarded_pages'], 'page')} discarded, "
              f"post-copy {stats['postcopy_seconds']} s with {plural(stats['postcopy_requests'], 'request')}",
              file=sys.stderr)
