"""Options every command takes (--json, --log-level) and rendering helpers."""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ..units import parse_size

LOG_LEVELS = ["debug", "info", "warning", "error"]


class _JsonRequest:
    """Whether this run's command was given --json: the CLI's error map (cli.py) reads it to print
    failures as a JSON document too.  Set while the options are parsed (an eager option, so a
    later bad option still finds it set), reset by cli.run for each run."""

    given = False


json_request = _JsonRequest()


def _note_json(ctx, param, value):
    if value:
        json_request.given = True
    return value


def common_options(f):
    """Add ``--json`` and ``--log-level``; the command receives ``as_json``."""

    @click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_note_json,
                  help="Machine-readable output on stdout (nothing else there): one JSON document, "
                       "{\"error\": {\"code\", \"kind\", \"message\"}, ...} when the command fails.")
    @click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="warning",
                  show_default=True, help="Verbosity of the log on stderr.")
    @functools.wraps(f)
    def wrapper(*args, log_level: str, **kwargs):
        logging.getLogger("postcopy").setLevel(log_level.upper())
        logging.getLogger().setLevel(log_level.upper())
        return f(*args, **kwargs)

    return wrapper


class SizeParam(click.ParamType):
    """Bytes as users write them: 4096, 64K, 512M, 1G (powers of 1024)."""

    name = "SIZE"

    def __init__(self, *, power_of_two: bool = False, minimum: int = 1):
        self.power_of_two = power_of_two
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            size = parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if size < self.minimum:
            self.fail(f"{value!r} is less than {self.minimum}", param, ctx)
        if self.power_of_two and size & (size - 1):
            self.fail(f"{value!r} is not a power of two", param, ctx)
        return size


class BlockNameParam(click.ParamType):
    """A RAM block name as the wire carries it: 1..255 bytes of UTF-8 without NUL."""

    name = "NAME"

    def convert(self, value, param, ctx):
        check_block_name(value, param, ctx)
        return value


def check_block_name(value: str, param=None, ctx=None) -> None:
    """Fail as a usage error (exit 2) unless ``value`` is a block name the wire can carry."""
    from ..codec import encode_name
    from ..errors import LocalProtocolError

    try:
        encode_name(value)
    except LocalProtocolError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


# Until 0.3.0 every key spelled with "_" before 0.2.0 is also written that way (deprecated; CHANGELOG.md).
DEPRECATED_SNAKE_KEYS = True


def machine_keys(obj):
    """``obj`` with QEMU's kebab-case keys: ``total_seconds`` becomes ``total-seconds`` (plus, while
    :data:`DEPRECATED_SNAKE_KEYS`, the old spelling after the new ones).  Only lower-case word keys
    change, so data used as keys (histogram buckets, capability names) stay as they are."""
    if isinstance(obj, list):
        return [machine_keys(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out, old = {}, {}
    for k, v in obj.items():
        v = machine_keys(v)
        if isinstance(k, str) and "_" in k and k.replace("_", "").isalnum() and k.islower():
            out[k.replace("_", "-")] = v
            if DEPRECATED_SNAKE_KEYS:
                old[k] = v
        else:
            out[k] = v
    out.update(old)
    return out


def emit_json(obj) -> None:
    """Write one JSON document to stdout (one line: a stream of them is JSON lines)."""
    sys.stdout.write(json.dumps(machine_keys(obj), sort_keys=False) + "\n")
    sys.stdout.flush()


def format_size(n: float) -> str:
    """Bytes in binary units, as every command's human output shows them: 512 B, 4.0 KiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_rate(bytes_per_s: float) -> str:
    """A rate in binary units: 120.5 MiB/s."""
    return f"{format_size(bytes_per_s)}/s"


def format_duration(seconds: float) -> str:
    """0:07, 1:02:03."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def status_line(label: str, *, done: int | None = None, total: int | None = None, rate: float | None = None,
                eta: float | None = None, extra: str = "", width: int = 80) -> str:
    """One status line of at most ``width - 1`` columns: label, bar, percent, done/total, rate, ETA, extra.

    Fields that do not fit are dropped (the extra first, then the ETA, the rate,
    the bar), never wrapped.  The last column stays free: a line that fills it
    wraps on some terminals.
    """
    fields = []
    has_bar = done is not None and bool(total)
    if has_bar:
        fields.append(("pct", f"{100 * min(done, total) / total:5.1f}%"))
        d, t = format_size(done), format_size(total)
        unit = t.split()[1]
        fields.append(("size", f"{d.split()[0]}/{t}" if d.split()[1] == unit else f"{d}/{t}"))
    if rate is not None:
        fields.append(("rate", format_rate(rate)))
    if eta is not None:
        fields.append(("eta", f"ETA {format_duration(eta)}"))
    if extra:
        fields.append(("extra", extra))
    for drop in ("", "extra", "eta", "rate", "bar", "size", "pct"):
        if drop == "bar":
            has_bar = False
        elif drop:
            fields = [f for f in fields if f[0] != drop]
        parts = [label] + [v for _, v in fields]
        line = " ".join(parts)
        cells = min(30, width - 1 - len(line) - 1)   # the bar takes the room left, 8 to 30 cells
        if has_bar and cells >= 8:
            filled = cells * min(done, total) // total
            return " ".join([label, "━" * filled + "─" * (cells - filled)] + parts[1:])
        if not has_bar and len(line) <= width - 1:
            return line
    return label[:width - 1]


class RateMeter:
    """Bytes per second over the last few seconds of (time, bytes) samples."""

    WINDOW = 3.0

    def __init__(self):
        self._samples: list[tuple[float, int]] = []

    def add(self, t: float, nbytes: int) -> float | None:
        self._samples.append((t, nbytes))
        while len(self._samples) > 2 and t - self._samples[1][0] >= self.WINDOW:
            self._samples.pop(0)
        t0, b0 = self._samples[0]
        return (nbytes - b0) / (t - t0) if t > t0 else None


def eta_of(left_bytes: int, rate: float | None) -> float | None:
    return left_bytes / rate if rate and rate > 0 and left_bytes >= 0 else None


class live_status:
    """A live status on stderr while a command runs, when stderr is a terminal; nothing otherwise.

    ``render(snapshot, width)`` turns a snapshot into status lines; ``snapshot()``
    is polled every 0.25 s by a thread of this object (the engines expose their
    counters, read without locks).  ``console``: where to draw (tests: a
    StringIO console); default stderr, only if it is a terminal.
    """

    INTERVAL = 0.25

    def __init__(self, render, snapshot=None, *, enabled: bool = True, console=None):
        self.render = render
        self.snapshot = snapshot
        self.console = console
        self.enabled = enabled and (console is not None or sys.stderr.isatty())
        self._live = None
        self._thread = None
        self._stop = None
        self._lines: list[str] = []
        import threading

        self._lock = threading.Lock()   # updates come from a polling thread; the end from the command

    def renderable(self):
        from rich.text import Text

        return Text("\n".join(self._lines), no_wrap=True, overflow="crop")

    def update(self, snap) -> None:
        """Render ``snap`` (also what the polling thread does)."""
        with self._lock:
            width = self._live.console.width if self._live is not None else 80
            self._lines = self.render(snap, width)
            if self._live is not None:
                self._live.update(self.renderable(), refresh=True)

    def _poll(self):
        import time

        while not self._stop.wait(self.INTERVAL):
            try:
                snap = self.snapshot(time.monotonic())
            except Exception:   # a display must never end a migration
                continue
            if snap is not None:
                self.update(snap)

    def __enter__(self):
        if not self.enabled:
            return self
        import threading

        from rich.console import Console
        from rich.live import Live

        console = self.console or Console(stderr=True)
        # on a real terminal, lines the command prints on stderr meanwhile go above the status
        self._live = Live(self.renderable(), console=console, auto_refresh=False, transient=True,
                          redirect_stdout=False, redirect_stderr=self.console is None)
        self._live.start()
        if self.snapshot is not None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, name="postcopy/status", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
