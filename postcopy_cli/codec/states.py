"""The postcopy command sequence on the main stream."""
import enum


class PostcopyState(enum.Enum):
    """Where a stream is in the postcopy command sequence (QEMU's PostcopyState)."""

    NONE = "none"
    ADVISE = "advise"
    DISCARD = "discard"
    LISTENING = "listening"
    RUNNING = "running"
    END = "end"
