"""How a paused post-copy reconnects (DESIGN.md section 9): :class:`Recovery`, given to the
PageStreamer, and :func:`connect_once`, one connection attempt to the destination."""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Callable

from ..channels import transport
from ..channels.tls import Credentials
from ..errors import PeerDisconnected, TlsRefused

log = logging.getLogger("postcopy.recovery")

BACKOFF_FIRST = 0.05     # seconds between the first reconnection attempts; doubling
BACKOFF_MAX = 2.0        # up to this
RECOVER_TIMEOUT = 600.0  # --recover-timeout's default


@dataclass
class Recovery:
    """``connect()``: one attempt at a new connection to the destination (PeerDisconnected or
    OSError when it fails); ``timeout``: seconds paused before giving up (--recover-timeout; 0:
    a failure after RUN fails the migration); ``to``: the destination, for messages."""

    connect: Callable[[], socket.socket]
    timeout: float = RECOVER_TIMEOUT
    to: str = "the destination"


class _NotListening(Exception):
    pass


def _no_retry(_seconds: float) -> None:
    raise _NotListening


def connect_once(address: transport.Address, timeout: float, *, tls: Credentials | None = None,
                 hostname: str | None = None) -> socket.socket:
    """One connection attempt to ``address`` (the caller retries with backoff): at most ``timeout``
    seconds to connect; refused (nothing listens) fails at once.  A failed TLS handshake is logged
    (the caller retries it quietly, like any failed attempt)."""
    try:
        # transport.connect retries a refused connection, calling on_wait before each retry
        return transport.connect(address, timeout=timeout, on_wait=_no_retry, tls=tls, hostname=hostname)
    except _NotListening:
        raise PeerDisconnected(f"cannot connect to {address}: nothing listens there") from None
    except TlsRefused as e:
        log.warning("%s", e)
        raise


def recovery_to(address: transport.Address, *, timeout: float, recover_timeout: float,
                tls: Credentials | None = None, hostname: str | None = None) -> Recovery:
    """The Recovery of a source connecting to ``address`` (``timeout``: --timeout; ``tls``,
    ``hostname``: --tls-creds, --tls-hostname)."""
    return Recovery(lambda: connect_once(address, timeout, tls=tls, hostname=hostname), recover_timeout,
                    str(address))
