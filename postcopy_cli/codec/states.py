"""The postcopy command sequence on the main stream: its states and the one table of transitions.

As h11's ``EVENT_TRIGGERED_TRANSITIONS``: :data:`TRANSITIONS` maps each state to
the events allowed in it and the state each leads to; :func:`transition` looks
one up and refuses anything else with a :class:`ProtocolError` naming the event
and the state (the wording of :data:`REFUSALS`).  The events are the commands
(by their :class:`~postcopy_cli.codec.constants.Command` name), the STATE
section, the EOF section, and PAUSE: a channel broke from LISTEN on (post-copy
recovery, DESIGN.md section 9; the destination's event, never on the wire: a
break while LISTENING pauses too, as QEMU's postcopy-paused does, since the
source may have sent RUN and be paused itself).
A resumed main stream (RESUME section) starts PAUSED and its POSTCOPY_RESUME
leads back to RUNNING.  The decoder validates the wire with it and the
destination's :class:`~postcopy_cli.dest.phase.DestPhase` keeps its phase with
it.  QEMU checks the same order in each ``loadvm_postcopy_handle_*``
(migration/savevm.c).
"""
from __future__ import annotations

import enum

from ..errors import ProtocolError


class PostcopyState(enum.Enum):
    """Where a stream is in the postcopy command sequence (QEMU's PostcopyState)."""

    NONE = "none"
    ADVISE = "advise"
    DISCARD = "discard"
    LISTENING = "listening"
    RUNNING = "running"
    END = "end"
    #: Post-copy recovery: a channel broke while RUNNING; the program waits for its missing pages.
    PAUSED = "paused"


S = PostcopyState

#: Commands allowed in every state; they leave it as it is.
STAYING = frozenset({"PING", "RECV_BITMAP"})

#: The events that move the sequence (or are refused in some states).
EVENTS = ("OPEN_RETURN_PATH", "POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD", "POSTCOPY_LISTEN", "POSTCOPY_RUN",
          "STATE", "EOF", "POSTCOPY_RESUME", "PAUSE")

#: state -> {event allowed in it: the state it leads to}; an event missing from a row is refused there.
TRANSITIONS: dict[PostcopyState, dict[str, PostcopyState]] = {
    S.NONE: {"OPEN_RETURN_PATH": S.NONE, "POSTCOPY_ADVISE": S.ADVISE, "STATE": S.NONE, "EOF": S.END},
    S.ADVISE: {"OPEN_RETURN_PATH": S.ADVISE, "POSTCOPY_RAM_DISCARD": S.DISCARD, "POSTCOPY_LISTEN": S.LISTENING,
               "STATE": S.ADVISE, "EOF": S.END},
    S.DISCARD: {"OPEN_RETURN_PATH": S.DISCARD, "POSTCOPY_RAM_DISCARD": S.DISCARD, "POSTCOPY_LISTEN": S.LISTENING,
                "STATE": S.DISCARD, "EOF": S.END},
    S.LISTENING: {"POSTCOPY_RUN": S.RUNNING, "STATE": S.LISTENING, "EOF": S.END, "PAUSE": S.PAUSED},
    S.RUNNING: {"EOF": S.END, "PAUSE": S.PAUSED},
    S.END: {},
    # a failure during the resume handshake pauses again (QEMU's double failure)
    S.PAUSED: {"POSTCOPY_RESUME": S.RUNNING, "PAUSE": S.PAUSED},
}

_BEFORE_LISTEN = {S.NONE, S.ADVISE, S.DISCARD}
_FROM_LISTEN = {S.LISTENING, S.RUNNING}

#: event -> {state: why it is refused there}, for every pair that TRANSITIONS does not allow.
REFUSALS: dict[str, dict[PostcopyState, str]] = {
    "OPEN_RETURN_PATH": {s: "OPEN_RETURN_PATH after POSTCOPY_LISTEN" for s in _FROM_LISTEN},
    "POSTCOPY_ADVISE": {S.ADVISE: "POSTCOPY_ADVISE sent twice", S.DISCARD: "POSTCOPY_ADVISE sent twice",
                        **{s: "POSTCOPY_ADVISE after POSTCOPY_LISTEN" for s in _FROM_LISTEN}},
    "POSTCOPY_RAM_DISCARD": {S.NONE: "POSTCOPY_RAM_DISCARD before POSTCOPY_ADVISE",
                             **{s: "POSTCOPY_RAM_DISCARD after POSTCOPY_LISTEN" for s in _FROM_LISTEN}},
    "POSTCOPY_LISTEN": {S.NONE: "POSTCOPY_LISTEN before POSTCOPY_ADVISE",
                        **{s: "POSTCOPY_LISTEN sent twice" for s in _FROM_LISTEN}},
    "POSTCOPY_RUN": {**{s: "POSTCOPY_RUN before POSTCOPY_LISTEN" for s in _BEFORE_LISTEN},
                     S.RUNNING: "POSTCOPY_RUN sent twice"},
    "STATE": {S.RUNNING: "STATE after POSTCOPY_RUN", S.END: "STATE after POSTCOPY_RUN"},
    "EOF": {},
    "POSTCOPY_RESUME": {**{s: "POSTCOPY_RESUME on a stream that did not begin with a RESUME section"
                           for s in (S.NONE, S.ADVISE, S.DISCARD, S.LISTENING)},
                        S.RUNNING: "POSTCOPY_RESUME while running (sent twice, or without a RESUME section)"},
    "PAUSE": {s: "a channel broke before POSTCOPY_LISTEN: only a listening or running migration can pause"
              for s in (S.NONE, S.ADVISE, S.DISCARD)},
}
for _event in EVENTS:
    REFUSALS[_event].setdefault(S.END, f"{_event} after EOF")
    REFUSALS[_event].setdefault(S.PAUSED, f"{_event} while the migration is paused")
del _event


def transition(state: PostcopyState, event: str, *, section: str, offset: int | None) -> PostcopyState:
    """The state ``event`` leads to from ``state``; ProtocolError(section, offset) if it is refused there."""
    if event in STAYING:
        return state
    nxt = TRANSITIONS[state].get(event)
    if nxt is None:
        raise ProtocolError(REFUSALS[event][state], section=section, offset=offset)
    return nxt
