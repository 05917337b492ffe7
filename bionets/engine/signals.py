"""Ctrl-C and SIGTERM held off while a file is written: a stop in the middle of ``torch.save`` would
leave a half-written checkpoint (see :func:`ctrl_c_deferred`)."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


_deferring = False        # whether a ctrl_c_deferred block runs (an inner one leaves its signals to it)
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)     # Ctrl-C, and a scheduler's stop (SLURM, Kubernetes, kill)


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block and act on it when the block
    is done. Raised inside ``torch.save``, a KeyboardInterrupt makes its zip writer fail while
    closing, and the run ended on that RuntimeError's traceback; raised inside TensorBoard's writer,
    between its queue's put and the wake-up of the thread that drains it, it can stall the writer's
    close for up to its flush interval (two minutes); a SIGTERM that ends the process mid-write left
    a partial temporary file. A block inside another holds its signals for the outer one. A signal
    held acts as its handler before the block would have (Python's SIGINT handler raises
    KeyboardInterrupt; the CLI's SIGTERM handler :class:`~bionets.errors.Terminated`; the default
    SIGTERM action ends the process, now with the file whole); with both held, SIGTERM acts (the
    scheduler's stop is the one that cannot be waited out). A signal that arrives while the handlers
    are put or put back is not lost and leaves none of them half changed (:func:`restore_handlers`);
    one held while the block raised acts all the same (the block's error is its context). Python runs
    signal handlers in the main thread only, and a signal the process ignores (Ctrl-C when started
    in the background, or under nohup) stays ignored: in another thread, and for such a signal, this
    holds nothing."""
    global _deferring
    if threading.current_thread() is not threading.main_thread() or _deferring:
        yield
        return
    _deferring, held, previous = True, [], {}
    try:
        for signum in HELD_SIGNALS:        # (inside the try: a signal that raises here restores the rest)
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                previous[signum] = signal.signal(signum, lambda number, frame: held.append(number))
        yield
    finally:
        _deferring = False
        late = restore_handlers(previous)
        if held:                            # also when the block raised: the stop still acts
            signum = signal.SIGTERM if signal.SIGTERM in held else held[0]
            if callable(previous[signum]):
                previous[signum](signum, None)
            else:                           # SIG_DFL: the process ends as the signal would have ended it
                os.kill(os.getpid(), signum)
        if late is not None:
            raise late


def restore_handlers(previous: dict) -> KeyboardInterrupt | None:
    """Put the ``previous`` signal handlers back, every one. ``signal.signal`` first runs the handlers
    of signals that have arrived: a Ctrl-C just after SIGINT's own handler is back raises there,
    before SIGTERM's is, which left the deferral's handler on SIGTERM for good (every later SIGTERM
    swallowed). Such a KeyboardInterrupt (or Terminated) is kept and returned, and that handler set
    again (the check runs before the change, so it had not been)."""
    late = None
    for signum, handler in previous.items():
        while True:
            try:
                signal.signal(signum, handler)
                break
            except KeyboardInterrupt as err:    # a restored handler's, for a signal that came meanwhile
                late = late or err
    return late
