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
    """Base of all postcopy errors: the operation failed (exit 1).

    ``kind`` names the failure in ``--json`` error documents; ``stats`` (set by
    the engine or command that has them, see :func:`with_stats`) are the
    figures reached before the failure, printed with it under ``--json``.
    """

    exit_code = EXIT_FAILED
    kind = "failed"
    stats: dict | None = None


class UsageError(PostcopyError):
    """Bad options or arguments given by the local user (exit 2)."""

    exit_code = EXIT_USAGE
    kind = "usage"


class ProtocolError(PostcopyError):
    """The peer broke the protocol (exit 3).

    ``section`` names where in the stream it happened, ``offset`` is the byte
    offset in the stream of the offending item.
    """

    exit_code = EXIT_PROTOCOL
    kind = "protocol"

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
    kind = "disconnected"


class TlsRefused(PeerDisconnected):
    """A TLS handshake failed: the peer's certificate, or ours, was refused, or the peer does not
    speak TLS (exit 1; a paused source retries it like any failed reconnection)."""

    exit_code = EXIT_FAILED
    kind = "tls"


class TlsExpected(TlsRefused):
    """The destination answered a plaintext stream with a TLS alert: it has --tls-creds and this source not
    (exit 1; a reconnection would meet the same, so it is not retried)."""


class PeerTimeout(PeerDisconnected):
    """The peer stopped sending for longer than the allowed time (exit 4)."""

    kind = "timeout"


class DestinationRefused(ProtocolError):
    """The destination ended the stream with a nonzero SHUT (exit 3).

    A destination that refuses what it receives (blocks, sizes, page sizes, a
    command out of order) sends SHUT with a nonzero value on the return path
    before it closes; the source finds it there after its write error or EOF.
    """

    kind = "refused"

    def __init__(self, status: int):
        self.status = status
        # SHUT carries no reason: 1 is also what a destination whose program died sends
        self.problem = (f"the destination refused the stream (SHUT {status}): check that both sides agree on "
                        f"blocks, sizes and page sizes, and that its program still runs; its own log says why")
        self.section, self.offset = "return path", None
        PostcopyError.__init__(self, self.problem)


def with_stats(error: BaseException, stats: dict | None) -> BaseException:
    """``error`` carrying ``stats`` (unless it carries some already): the figures at the failure."""
    if stats is not None and getattr(error, "stats", None) is None:
        try:
            error.stats = stats
        except AttributeError:     # an exception type without a __dict__
            pass
    return error
