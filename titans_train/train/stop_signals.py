"""SIGTERM / SIGUSR1 caught from the first moment of a run, acted on by the trainer.

A scheduler may signal a job at any time, also while it is still importing torch or building the
model. The handlers are installed first thing by `titans-train train` (before the heavy imports)
and again, if not yet installed, when a `Trainer` starts (library use): they only record which
signal arrived. The trainer reads `received()` at its agreement points (before building, after
building, after every step; `callbacks.SignalStop`), where all ranks agree, and stops with exit
code 75: with a checkpoint when steps were taken, without one when nothing was trained yet.
Signals are process-wide, hence one module-level state.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None
_previous: dict[int, object] = {}
_owner_pid: int | None = None


def _record(signal_number, frame) -> None:
    global _received
    if os.getpid() != _owner_pid:
        # A forked child (a data-loader or pool worker) inherits the handler but is not the
        # trainer: it must die of the signal as usual, or `Pool.terminate()` waits for it forever.
        signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)
        return
    if _received is None:
        _received = signal_number


def catch() -> None:
    """Install the recording handlers (idempotent: a signal recorded so far is kept)."""
    global _received, _previous, _owner_pid
    if _previous:
        return
    _received = None
    _owner_pid = os.getpid()
    _previous = {sig: signal.signal(sig, _record) for sig in STOP_SIGNALS}


def received() -> int | None:
    """The first stop signal this process received since `catch()`, or None."""
    return _received


def description() -> str:
    """Which stop signal this rank received, or that another rank did (once the ranks agreed to stop)."""
    return f"signal {_received}" if _received is not None else "a signal on another rank"


def release() -> None:
    """Give the signals back to the handlers that were there before `catch()`."""
    global _previous
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous = {}
