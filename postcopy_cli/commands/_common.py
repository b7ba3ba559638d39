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


class progress_display:
    """A rich progress bar on a terminal (stderr); nothing otherwise.

    Used as a context manager; the object is a callable taking a progress dict
    with ``received`` and ``total`` pages and optional counters.
    """

    def __init__(self, *, enabled: bool, title: str):
        self.enabled = enabled and sys.stderr.isatty()
        self.title = title
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.percentage:>5.1f}%"), TransferSpeedColumn(),
                                      TextColumn("{task.fields[detail]}"), console=Console(stderr=True),
                                      transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=None, detail="")
        return self if self.enabled else None

    def __call__(self, p: dict) -> None:
        detail = " ".join(f"{k}={v}" for k, v in p.items() if k not in ("received", "total"))
        self._progress.update(self._task, completed=p["received"] * 4096, total=p["total"] * 4096, detail=detail)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
