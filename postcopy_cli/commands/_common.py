"""Options every command takes (--json, --log-level) and rendering helpers."""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ..units import parse_size

LOG_LEVELS = ["debug", "info", "warning", "error"]


def common_options(f):
    """Add ``--json`` and ``--log-level``; the command receives ``as_json``."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout (nothing else there).")
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


def emit_json(obj) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
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
