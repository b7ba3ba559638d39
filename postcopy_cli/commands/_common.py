"""Options every command takes (--json, --log-level) and rendering helpers."""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from ..errors import NotBuiltError

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


def emit_json(obj) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


def not_built(what: str):
    raise NotBuiltError(f"{what} is not built yet in this version")
