"""Ctrl-C and SIGTERM for a study: the command line's handler, the points where a study stops,
and the blocks an interrupt must not cut (a checkpoint commit, the viewers' writers)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_INTERRUPT = threading.Event()
_SIGNAL = [int(signal.SIGINT)]
_DEFERRING = [0]  # depth of deferred_interrupts() blocks (signal handlers run in the main thread)


def request_interrupt(signum=None, frame=None) -> None:
    """SIGINT and SIGTERM handler of the command line: raises ``KeyboardInterrupt`` as Python's
    default SIGINT handler does, and also marks the request, so that the study stops at its next
    energy window even when the exception was raised inside a garbage-collection callback (JAX
    registers one), where Python prints "Exception ignored" and carries on. Inside
    :func:`deferred_interrupts` it only marks the request."""
    _SIGNAL[0] = int(signum or signal.SIGINT)
    _INTERRUPT.set()
    if not _DEFERRING[0]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Holds the command line's Ctrl-C and SIGTERM back while code runs that an exception raised at
    an arbitrary line would leave stuck, and raises ``KeyboardInterrupt`` when it ends instead. A
    TensorBoard writer interrupted between taking and releasing its queue's lock hangs the process
    on close: SIGTERM right after a phase was committed never exited."""
    _DEFERRING[0] += 1
    try:
        yield
    finally:
        _DEFERRING[0] -= 1
    if not _DEFERRING[0] and _INTERRUPT.is_set():
        _INTERRUPT.clear()
        raise KeyboardInterrupt


def interrupt_signal() -> int:
    """The signal of the last interrupt request (SIGINT unless SIGTERM was received)."""
    return _SIGNAL[0]


def take_interrupt() -> None:
    """Raises ``KeyboardInterrupt`` if one was requested and not raised yet (the study's windows
    call it as they begin: a request swallowed inside a garbage-collection callback still stops it)."""
    if _INTERRUPT.is_set():
        _INTERRUPT.clear()
        raise KeyboardInterrupt


def request_interrupt_later() -> None:
    """Marks an interrupt request without raising: the study stops at its next energy window, as
    after a swallowed Ctrl-C (what a test or an embedding application calls from another thread)."""
    _INTERRUPT.set()
