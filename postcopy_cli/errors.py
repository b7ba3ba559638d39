"""The exception hierarchy and the exit code each maps to (DESIGN.md section 2).

Every failure a user can meet is one of these; ``postcopy_cli.cli`` is the one
place that turns them into exit codes and one-line messages on stderr.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PROTOCOL = 3
EXIT_DISCONNECTED = 4


class PostcopyError(Exception):
    """Base of all postcopy errors: the operation failed (exit 1)."""

    exit_code = EXIT_FAILED


class UsageError(PostcopyError):
    """Bad options or arguments given by the local user (exit 2)."""

    exit_code = EXIT_USAGE


class ProtocolError(PostcopyError):
    """The peer broke the protocol (exit 3).

    ``section`` names where in the stream it happened, ``offset`` is the byte
    offset in the stream of the offending item.
    """

    exit_code = EXIT_PROTOCOL

    def __init__(self, problem: str, *, section: str | None = None, offset: int | None = None):
        self.problem = problem
        self.section = section
        self.offset = offset
        where = []
        if section:
            where.append(f"in {section}")
        if offset is not None:
            where.append(f"at byte {offset}")
        super().__init__(f"protocol error {' '.join(where)}: {problem}" if where else f"protocol error: {problem}")


class LocalProtocolError(PostcopyError):
    """We were asked to send something the protocol does not allow (a bug or bad local input)."""


class PeerDisconnected(PostcopyError):
    """The peer went away before the migration completed (exit 4)."""

    exit_code = EXIT_DISCONNECTED


class PeerTimeout(PeerDisconnected):
    """The peer stopped sending for longer than the allowed time (exit 4)."""
