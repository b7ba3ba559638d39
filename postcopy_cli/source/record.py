"""The record of an image migration that a restarted source resumes (``migrate --image --resume``).

One JSON file per (image, destination) in ``$POSTCOPY_STATE_DIR`` (default ``/run/postcopy``,
created 0700): {"migration-id", "image", "to", "pid", "preempt-channels"}.  Written before the
first byte is sent; removed when the migration completes or fails before RUN; kept when it
fails or is killed after RUN, so that a new process can name the paused migration.
"""
from __future__ import annotations

import hashlib
import json
import os

from ..errors import PostcopyError

DEFAULT_DIR = "/run/postcopy"


def state_dir() -> str:
    return os.environ.get("POSTCOPY_STATE_DIR") or DEFAULT_DIR


def record_path(image: str, to: str) -> str:
    key = hashlib.sha256(os.path.realpath(image).encode() + b"\0" + to.encode()).hexdigest()
    return os.path.join(state_dir(), f"migrate-{key}.json")


def write_record(image: str, to: str, migration_id: bytes, preempt_channels: int) -> str:
    """Write the record (atomically: a rename); returns its path."""
    directory = state_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        path = record_path(image, to)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"migration-id": migration_id.hex(), "image": os.path.realpath(image), "to": to,
                       "pid": os.getpid(), "preempt-channels": preempt_channels}, f)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise PostcopyError(f"cannot write the migration record in {directory} ($POSTCOPY_STATE_DIR): "
                            f"{e.strerror or e}") from None
    return path


def read_record(image: str, to: str) -> dict | None:
    """The record of (image, to), or None when there is none."""
    path = record_path(image, to)
    try:
        with open(path) as f:
            rec = json.load(f)
        bytes.fromhex(rec["migration-id"])
        return rec
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PostcopyError(f"unreadable migration record {path}: {e}") from None


def remove_record(path: str | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
