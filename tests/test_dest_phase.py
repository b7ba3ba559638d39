"""The destination's phase: the transition table (codec/states.py) and DestPhase's side effects per transition.

No subprocesses, no sockets: the object under test is the phase logic, so the native placement and the
attached program are fakes that record what they are told.
"""
import base64

import pytest

from postcopy_cli._native import lib
from postcopy_cli.codec.states import EVENTS, STAYING, TRANSITIONS, PostcopyState, transition
from postcopy_cli.dest.phase import NATIVE_PHASE, DestPhase
from postcopy_cli.errors import ProtocolError
from postcopy_cli.uffd import UffdError

S = PostcopyState

# (state, event) -> the state it leads to, or the refusal's message; every pair is listed.
EXPECTED = {
    (S.NONE, "OPEN_RETURN_PATH"): S.NONE,
    (S.NONE, "POSTCOPY_ADVISE"): S.ADVISE,
    (S.NONE, "POSTCOPY_RAM_DISCARD"): "POSTCOPY_RAM_DISCARD before POSTCOPY_ADVISE",
    (S.NONE, "POSTCOPY_LISTEN"): "POSTCOPY_LISTEN before POSTCOPY_ADVISE",
    (S.NONE, "POSTCOPY_RUN"): "POSTCOPY_RUN before POSTCOPY_LISTEN",
    (S.NONE, "STATE"): S.NONE,
    (S.NONE, "EOF"): S.END,
    (S.ADVISE, "OPEN_RETURN_PATH"): S.ADVISE,
    (S.ADVISE, "POSTCOPY_ADVISE"): "POSTCOPY_ADVISE sent twice",
    (S.ADVISE, "POSTCOPY_RAM_DISCARD"): S.DISCARD,
    (S.ADVISE, "POSTCOPY_LISTEN"): S.LISTENING,
    (S.ADVISE, "POSTCOPY_RUN"): "POSTCOPY_RUN before POSTCOPY_LISTEN",
    (S.ADVISE, "STATE"): S.ADVISE,
    (S.ADVISE, "EOF"): S.END,
    (S.DISCARD, "OPEN_RETURN_PATH"): S.DISCARD,
    (S.DISCARD, "POSTCOPY_ADVISE"): "POSTCOPY_ADVISE sent twice",
    (S.DISCARD, "POSTCOPY_RAM_DISCARD"): S.DISCARD,
    (S.DISCARD, "POSTCOPY_LISTEN"): S.LISTENING,
    (S.DISCARD, "POSTCOPY_RUN"): "POSTCOPY_RUN before POSTCOPY_LISTEN",
    (S.DISCARD, "STATE"): S.DISCARD,
    (S.DISCARD, "EOF"): S.END,
    (S.LISTENING, "OPEN_RETURN_PATH"): "OPEN_RETURN_PATH after POSTCOPY_LISTEN",
    (S.LISTENING, "POSTCOPY_ADVISE"): "POSTCOPY_ADVISE after POSTCOPY_LISTEN",
    (S.LISTENING, "POSTCOPY_RAM_DISCARD"): "POSTCOPY_RAM_DISCARD after POSTCOPY_LISTEN",
    (S.LISTENING, "POSTCOPY_LISTEN"): "POSTCOPY_LISTEN sent twice",
    (S.LISTENING, "POSTCOPY_RUN"): S.RUNNING,
    (S.LISTENING, "STATE"): S.LISTENING,
    (S.LISTENING, "EOF"): S.END,
    (S.RUNNING, "OPEN_RETURN_PATH"): "OPEN_RETURN_PATH after POSTCOPY_LISTEN",
    (S.RUNNING, "POSTCOPY_ADVISE"): "POSTCOPY_ADVISE after POSTCOPY_LISTEN",
    (S.RUNNING, "POSTCOPY_RAM_DISCARD"): "POSTCOPY_RAM_DISCARD after POSTCOPY_LISTEN",
    (S.RUNNING, "POSTCOPY_LISTEN"): "POSTCOPY_LISTEN sent twice",
    (S.RUNNING, "POSTCOPY_RUN"): "POSTCOPY_RUN sent twice",
    (S.RUNNING, "STATE"): "STATE after POSTCOPY_RUN",
    (S.RUNNING, "EOF"): S.END,
    (S.END, "OPEN_RETURN_PATH"): "OPEN_RETURN_PATH after EOF",
    (S.END, "POSTCOPY_ADVISE"): "POSTCOPY_ADVISE after EOF",
    (S.END, "POSTCOPY_RAM_DISCARD"): "POSTCOPY_RAM_DISCARD after EOF",
    (S.END, "POSTCOPY_LISTEN"): "POSTCOPY_LISTEN after EOF",
    (S.END, "POSTCOPY_RUN"): "POSTCOPY_RUN after EOF",
    (S.END, "STATE"): "STATE after POSTCOPY_RUN",
    (S.END, "EOF"): "EOF after EOF",
    **{(S.PAUSED, e): f"{e} while the migration is paused" for e in EVENTS},
    (S.PAUSED, "POSTCOPY_RESUME"): S.RUNNING,
    (S.PAUSED, "PAUSE"): S.PAUSED,
    (S.RUNNING, "PAUSE"): S.PAUSED,
    (S.END, "PAUSE"): "PAUSE after EOF",
    (S.END, "POSTCOPY_RESUME"): "POSTCOPY_RESUME after EOF",
    (S.RUNNING, "POSTCOPY_RESUME"): "POSTCOPY_RESUME while running (sent twice, or without a RESUME section)",
    **{(s, "POSTCOPY_RESUME"): "POSTCOPY_RESUME on a stream that did not begin with a RESUME section"
       for s in (S.NONE, S.ADVISE, S.DISCARD, S.LISTENING)},
    (S.LISTENING, "PAUSE"): S.PAUSED,
    **{(s, "PAUSE"): "a channel broke before POSTCOPY_LISTEN: only a listening or running migration can pause"
       for s in (S.NONE, S.ADVISE, S.DISCARD)},
}


def test_every_pair_is_listed():
    assert set(EXPECTED) == {(s, e) for s in PostcopyState for e in EVENTS}
    assert set(TRANSITIONS) == set(PostcopyState)


@pytest.mark.parametrize("state,event", sorted(EXPECTED, key=lambda k: (k[0].value, k[1])),
                         ids=[f"{s.name}-{e}" for s, e in sorted(EXPECTED, key=lambda k: (k[0].value, k[1]))])
def test_transition(state, event):
    want = EXPECTED[(state, event)]
    if isinstance(want, PostcopyState):
        assert transition(state, event, section="here", offset=7) is want
    else:
        with pytest.raises(ProtocolError) as ei:
            transition(state, event, section="COMMAND X", offset=7)
        assert ei.value.problem == want
        assert (ei.value.section, ei.value.offset) == ("COMMAND X", 7)


@pytest.mark.parametrize("event", sorted(STAYING))
@pytest.mark.parametrize("state", list(PostcopyState), ids=lambda s: s.name)
def test_staying_commands_keep_every_state(state, event):
    assert transition(state, event, section="s", offset=0) is state


def test_native_phases_are_in_order():
    # pc_dest_set_phase compares phases (>= LISTENING, < RUNNING): the enum must keep codec's order
    assert [NATIVE_PHASE[s] for s in PostcopyState] == [
        lib.PC_PHASE_NONE, lib.PC_PHASE_ADVISE, lib.PC_PHASE_DISCARD, lib.PC_PHASE_LISTENING, lib.PC_PHASE_RUNNING,
        lib.PC_PHASE_END, lib.PC_PHASE_PAUSED]
    assert sorted(NATIVE_PHASE.values()) == list(range(len(PostcopyState)))


class Recorder:
    """The fake native placement, program, flush and clock: every call lands in one list, in order."""

    def __init__(self, *, fail_phase: int | None = None):
        self.calls = []
        self.now = 100.0
        self.fail_phase = fail_phase

    # PhaseMemory
    def set_phase(self, phase):
        if phase == self.fail_phase:
            raise UffdError(107, "sending page requests")
        self.calls.append(("phase", phase))

    def register_own_memory(self):
        self.calls.append(("register",))

    def place_staged(self):
        self.calls.append(("place staged",))

    # PhaseProgram
    def tell(self, message):
        self.calls.append(("tell", message))

    def flush(self):
        self.calls.append(("flush",))

    def clock(self):
        return self.now


def phase_for(rec, *, program):
    return DestPhase(rec, rec if program else None, flush=rec.flush, clock=rec.clock)


def test_postcopy_sequence_for_an_attached_program():
    rec = Recorder()
    ph = phase_for(rec, program=True)
    ph.on_advise(10)
    ph.on_discard(20)
    ph.on_discard(30)
    ph.on_listen(40)
    assert ph.state is S.LISTENING and ph.t_run is None
    rec.now = 101.5
    ph.on_run(50, b"\x01\x02")
    assert ph.running and ph.t_run == 101.5
    rec.now = 103.0
    ph.on_end(60, lambda: rec.calls.append(("wind down",)))
    assert ph.ended and not ph.running and ph.t_complete == 103.0
    assert rec.calls == [
        ("phase", lib.PC_PHASE_ADVISE),
        ("phase", lib.PC_PHASE_DISCARD),
        ("phase", lib.PC_PHASE_DISCARD),
        ("flush",), ("phase", lib.PC_PHASE_LISTENING),               # its memory is registered already
        ("flush",), ("phase", lib.PC_PHASE_RUNNING),
        ("tell", {"event": "run", "state": base64.b64encode(b"\x01\x02").decode()}),
        ("place staged",), ("phase", lib.PC_PHASE_END), ("wind down",), ("tell", {"event": "complete"}),
    ]
    assert ph.downtime_ms is None   # no PING dated the pause


def test_own_memory_is_registered_at_listen_after_the_flush_and_nobody_is_told():
    rec = Recorder()
    ph = phase_for(rec, program=False)
    ph.on_advise(0)
    ph.on_listen(1)
    ph.on_run(2, b"")
    ph.on_end(3, lambda: None)
    assert rec.calls == [("phase", lib.PC_PHASE_ADVISE), ("flush",), ("register",), ("phase", lib.PC_PHASE_LISTENING),
                         ("flush",), ("phase", lib.PC_PHASE_RUNNING), ("place staged",), ("phase", lib.PC_PHASE_END)]


def test_a_ping_right_before_listen_dates_the_pause():
    rec = Recorder()
    ph = phase_for(rec, program=False)
    ph.on_advise(0)
    ph.command_done(False)
    rec.now = 200.0
    ph.on_ping(2500)            # the source paused 2.5 ms before it sent this
    ph.command_done(True)
    ph.on_listen(1)
    ph.command_done(False)
    rec.now = 200.25
    ph.on_run(2, b"")
    assert ph.downtime_ms == 252.5


def test_a_ping_not_right_before_listen_does_not():
    rec = Recorder()
    ph = phase_for(rec, program=False)
    ph.on_ping(2500)
    ph.command_done(True)
    ph.on_advise(0)
    ph.command_done(False)      # e.g. ADVISE, a DISCARD or the STATE between the PING and LISTEN
    ph.on_listen(1)
    ph.on_run(2, b"")
    assert ph.downtime_ms is None


@pytest.mark.parametrize("steps,problem", [
    (["listen"], "POSTCOPY_LISTEN before POSTCOPY_ADVISE"),
    (["advise", "run"], "POSTCOPY_RUN before POSTCOPY_LISTEN"),
    (["advise", "listen", "run", "run"], "POSTCOPY_RUN sent twice"),
    (["advise", "listen", "discard"], "POSTCOPY_RAM_DISCARD after POSTCOPY_LISTEN"),
    (["advise", "listen", "run", "end", "end"], "EOF after EOF"),
])
def test_a_refused_transition_has_no_side_effect(steps, problem):
    rec = Recorder()
    ph = phase_for(rec, program=True)
    do = {"advise": lambda: ph.on_advise(5), "discard": lambda: ph.on_discard(5), "listen": lambda: ph.on_listen(5),
          "run": lambda: ph.on_run(5, b""), "end": lambda: ph.on_end(5, lambda: rec.calls.append(("wind down",)))}
    for step in steps[:-1]:
        do[step]()
    before, state = list(rec.calls), ph.state
    with pytest.raises(ProtocolError) as ei:
        do[steps[-1]]()
    assert ei.value.problem == problem and ei.value.offset == 5
    assert rec.calls == before and ph.state is state


def test_a_native_failure_at_listen_leaves_the_phase():
    rec = Recorder(fail_phase=lib.PC_PHASE_LISTENING)
    ph = phase_for(rec, program=True)
    ph.on_advise(0)
    with pytest.raises(UffdError):
        ph.on_listen(1)
    assert ph.state is S.ADVISE
