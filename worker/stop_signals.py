"""SIGTERM and SIGINT as a request to stop, asked from a thread of its own.

A Python signal handler runs in the main thread between any two bytecodes, possibly while that
thread holds the lock a ``threading.Event`` keeps for its bookkeeping (``Event.wait`` holds it on
either side of the actual wait; the worker's main thread waits on its shutdown event many times a
second). That lock is not reentrant, so a handler calling ``Event.set()`` at that moment waits for
ever on its own thread: the worker ignores SIGTERM and never exits. A plain script that loops
``Event.wait(0)`` hangs on 11 of 20 single SIGTERMs; a worker's main thread holds that lock far
less of the time, so there it is rare (CI saw a drained worker ignore SIGTERM twice, without
stacks to say whether this was why).

So the handler takes no lock: it writes one byte to a pipe (``os.write`` on a non-blocking pipe
waits for nothing), and a daemon thread that reads the pipe calls ``request``. That thread may
wait for the main thread's lock for a moment, as any thread may.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Callable

from pyorchestrate import own_threads
from pyorchestrate.log_thread import deferrable

log = deferrable(logging.getLogger("pyorchestrate.worker"))


def request_on_signals(request: Callable[[], None], signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                       force: Callable[[], None] | None = None) -> None:
    """Call ``request()`` from a helper thread each time one of ``signals`` arrives; ``force()``
    instead from the second SIGINT on (Ctrl-C twice: an operator who will not wait for the agents'
    stop timeouts, as with Celery's cold shutdown).  A second SIGTERM asks again: systemd, docker
    and our tests repeat it, and mean "stop".

    Call it from the main thread (only it may set signal handlers). ``request`` must be safe to
    call more than once."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    owner = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            # a child forked by an agent (multiprocessing's default start method on Linux) has
            # this handler and our pipe but not the thread reading it: its stop signal would stop
            # the worker. It gets Python's default instead, as if we had never set one
            if signum == signal.SIGINT:
                signal.signal(signum, signal.default_int_handler)
                signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        try:
            os.write(write_end, bytes([signum]))
        except BlockingIOError:
            pass  # the pipe is full of earlier signals: the helper has a request to make already

    def relay() -> None:
        interrupts = 0
        while received := os.read(read_end, 64):
            interrupts += received.count(signal.SIGINT)
            if force is not None and interrupts >= 2:
                force()
                continue
            # said, so that the log of a process that seems not to stop shows whether it was asked
            log.info("%s received: stopping%s", ", ".join(signal.Signals(n).name for n in dict.fromkeys(received)),
                     " (Ctrl-C again: exit at once)" if force is not None and interrupts else "")
            request()

    try:
        own_threads.thread(relay, "pyorchestrate-stop-signals").start()
    except RuntimeError as exc:  # no thread to be had (a pids limit): better their default than no answer
        log.warning("could not start the thread that acts on %s (%s): they keep their default action",
                    ", ".join(signal.Signals(n).name for n in signals), exc)
        return
    for signum in signals:
        signal.signal(signum, on_signal)
