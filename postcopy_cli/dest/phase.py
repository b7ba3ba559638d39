"""The destination's phase: one object, one method per transition, each listing its side effects.

The allowed order is :data:`postcopy_cli.codec.states.TRANSITIONS` (the decoder
refuses a stream out of order with the same table); this object keeps where
the destination is and does what each step means here:

============  ==============================================================
ADVISE        native phase (nothing else changes yet)
DISCARD       native phase
LISTENING     place the assembled pages; register own memory; native phase:
              faults become page requests, those read before are sent now
RUNNING       place the assembled pages; native phase: no page present is
              overwritten any more, a staged page is served from its copy (the
              threads that faulted on one are woken to fault again); tell the
              program to run with the state;
              ``t_run``; downtime from a PING right before LISTEN
END           place the pages staged for the working-set record; ``t_complete``;
              native phase; wind down (SHUT 0, fault thread, registration); tell
              the program it is complete
PAUSED        (a channel broke from LISTEN on) native phase: faults only mark
              their pages requested; tell the program; the pause starts
RUNNING       (POSTCOPY_RESUME on a resumed stream) native phase: every page
again         requested and not received is requested again; tell the
              program (to run, if the break lost RUN: a source resumes only
              after it sent RUN); the pause ends (its duration is a recovery's)
============  ==============================================================
"""
from __future__ import annotations

import base64
import time
from typing import Callable, Protocol

from .._native import lib
from ..codec.states import TRANSITIONS, PostcopyState, transition

#: PostcopyState -> enum pc_dest_phase (native/dest.h)
NATIVE_PHASE = {
    PostcopyState.NONE: lib.PC_PHASE_NONE,
    PostcopyState.ADVISE: lib.PC_PHASE_ADVISE,
    PostcopyState.DISCARD: lib.PC_PHASE_DISCARD,
    PostcopyState.LISTENING: lib.PC_PHASE_LISTENING,
    PostcopyState.RUNNING: lib.PC_PHASE_RUNNING,
    PostcopyState.END: lib.PC_PHASE_END,
    PostcopyState.PAUSED: lib.PC_PHASE_PAUSED,
}


class PhaseMemory(Protocol):
    """What a transition changes in the placement layer (:class:`~postcopy_cli.dest.placement.Placement`)."""

    def set_phase(self, phase: int) -> None: ...
    def register_own_memory(self) -> None: ...
    def place_staged(self) -> None: ...


class PhaseProgram(Protocol):
    """What a transition tells the attached program (:class:`~postcopy_cli.dest.program.AttachedProgram`)."""

    def tell(self, message: dict) -> None: ...


class DestPhase:
    """Where the destination is (``state``) and the side effects of getting to the next phase.

    ``memory``: the native placement; ``program``: the attached program (None for own memory);
    ``flush``: places the pages the main stream has assembled so far.
    """

    def __init__(self, memory: PhaseMemory, program: PhaseProgram | None, *, flush: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic):
        self.memory = memory
        self.program = program
        self.flush = flush
        self.clock = clock
        self.state = PostcopyState.NONE
        self.t_run: float | None = None
        self.t_complete: float | None = None
        self.downtime_ms: float | None = None
        self._last_ping: tuple[int, float] | None = None   # (value, when) of the last PING
        self._prev_was_ping = False
        #: post-copy recovery: (when paused, when resumed or None) per pause, in order
        self.pauses: list[tuple[float, float | None]] = []
        self.pause_reason: str | None = None

    def _next(self, event: str, offset: int | None) -> PostcopyState:
        """The phase ``event`` leads to, or ProtocolError before any side effect."""
        return transition(self.state, event, section="EOF" if event == "EOF" else f"COMMAND {event}", offset=offset)

    def _enter(self, state: PostcopyState) -> None:
        self.memory.set_phase(NATIVE_PHASE[state])
        self.state = state

    def _tell(self, message: dict) -> None:
        if self.program is not None:
            self.program.tell(message)

    # -- commands that do not move the phase but date it -------------------------
    def on_ping(self, value: int) -> None:
        # a live source's PING right before LISTEN: microseconds since it paused
        self._last_ping = (value, self.clock())

    def command_done(self, was_ping: bool) -> None:
        """After every command of the main stream: only a PING right before LISTEN dates the pause."""
        self._prev_was_ping = was_ping

    # -- the transitions ---------------------------------------------------------
    def on_advise(self, offset: int) -> None:
        self._enter(self._next("POSTCOPY_ADVISE", offset))

    def on_discard(self, offset: int) -> None:
        self._enter(self._next("POSTCOPY_RAM_DISCARD", offset))

    def on_listen(self, offset: int) -> None:
        state = self._next("POSTCOPY_LISTEN", offset)
        self.flush()
        if self.program is None:
            self.memory.register_own_memory()
        if not self._prev_was_ping:
            self._last_ping = None
        self._enter(state)

    def on_run(self, offset: int, state_bytes: bytes) -> None:
        state = self._next("POSTCOPY_RUN", offset)
        self.flush()
        self._enter(state)
        self._tell({"event": "run", "state": base64.b64encode(state_bytes).decode()})
        self.t_run = self.clock()
        if self._last_ping is not None:
            us, at = self._last_ping
            self.downtime_ms = round(us / 1000 + (self.t_run - at) * 1000, 3)

    def on_end(self, offset: int, wind_down: Callable[[], None]) -> None:
        """EOF with every page in: ``wind_down`` (SHUT 0, stop the fault thread, unregister) runs before the
        program is told.  The pages staged for the working-set record go in first: the migration is
        complete only once every page is in the program's memory."""
        state = self._next("EOF", offset)
        self.memory.place_staged()
        self._enter(state)
        self.t_complete = self.clock()
        wind_down()
        self._tell({"event": "complete"})

    def on_pause(self, reason: str) -> bool:
        """A channel broke after RUN (or again while paused).  True if this starts a pause."""
        state = self._next("PAUSE", None)
        if self.state is PostcopyState.PAUSED:
            return False
        self._enter(state)
        self.pauses.append((self.clock(), None))
        self.pause_reason = reason
        self._tell({"event": "paused", "reason": reason})
        return True

    def on_resume(self, offset: int, state_bytes: bytes) -> float:
        """POSTCOPY_RESUME on a resumed stream (RESUME_ACK sent): running again.  Returns the pause's
        seconds."""
        state = self._next("POSTCOPY_RESUME", offset)
        self._enter(state)
        start, _ = self.pauses[-1]
        now = self.clock()
        self.pauses[-1] = (start, now)
        self.pause_reason = None
        if self.t_run is None:
            # paused while LISTENING: the RUN the source sent went down with the connection
            self._tell({"event": "run", "state": base64.b64encode(state_bytes).decode()})
            self.t_run = now
        else:
            self._tell({"event": "resumed"})
        return now - start

    # -- questions -----------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """Post-copy recovery: waiting for the source to resume on a new connection."""
        return self.state is PostcopyState.PAUSED

    @property
    def can_pause(self) -> bool:
        """A broken channel may pause the migration here (the table's PAUSE event: from LISTEN on)."""
        return "PAUSE" in TRANSITIONS[self.state]

    def recovery_figures(self) -> dict:
        """postcopy-recoveries, postcopy-paused-ms (all pauses, the current one so far) and
        postcopy-recovery-ms (each completed recovery)."""
        now = self.clock()
        done = [round((e - s) * 1000, 3) for s, e in self.pauses if e is not None]
        total = sum(((e if e is not None else now) - s) for s, e in self.pauses)
        return {"postcopy-recoveries": len(done), "postcopy-paused-ms": round(total * 1000, 3),
                "postcopy-recovery-ms": done}

    @property
    def running(self) -> bool:
        """The program runs on this side's pages and the migration has not ended."""
        return self.state is PostcopyState.RUNNING

    @property
    def ended(self) -> bool:
        return self.state is PostcopyState.END
