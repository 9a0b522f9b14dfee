"""A TCP relay in a process of its own, to cut one worker off from a live coordinator on
127.0.0.1: SIGSTOP the relay and neither side hears the other, while both connections stay open
(as a partition does; ``bridge link set ... state 0`` needs namespaces).  One way only: SIGUSR1
holds what goes to the target (the coordinator), SIGUSR2 what comes back, SIGHUP lets both go
again (held, not dropped: TCP keeps it, as on a path that stalls one way).  ``delay``: each way
carries what it reads that many seconds later, in order (a long link; this kernel has no netem).
``rate``: each way carries at most that many bytes a second, shared by all its connections (a
narrow link: what waits for its turn backs up in the sockets' buffers, as behind a real one).
``narrow_later``: the link carries ``rate`` only from SIGWINCH on (a link that narrows: a test
sets up at loopback speed, then measures what it is after over the narrow link).  SIGQUIT resets
every connection it carries, both ends, and goes on listening (a NAT or firewall forgetting them).

    python relay.py TARGET_PORT [DELAY [RATE [later]]]   # prints the port it listens on, then relays each connection
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time


def start(target: str, delay: float = 0.0, rate: float = 0.0,
          narrow_later: bool = False) -> tuple[subprocess.Popen, str]:
    """A relay to ``target`` (``tcp://127.0.0.1:PORT``): its process and the address to use instead.
    ``rate``: bytes a second each way (0: as fast as loopback); ``narrow_later``: only once the
    relay gets SIGWINCH."""
    port = target.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, __file__, port, str(delay), str(rate), *(["later"] * narrow_later)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"tcp://127.0.0.1:{proc.stdout.readline().strip()}"


#: what the relay is told by (their handlers run in the main thread, see _spawn)
SIGNALS = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGWINCH, signal.SIGQUIT}
#: set while that way flows: [to the target, back from it]
FLOWING = [threading.Event(), threading.Event()]
#: the ends of every connection carried so far (SIGQUIT shuts them all)
ENDS: list[socket.socket] = []


class Narrow:
    """One way's bandwidth, shared by its connections: each chunk waits for its turn on the link."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def cross(self, size: int) -> None:
        if not self.rate:
            return
        with self._lock:
            self._free_at = max(self._free_at, time.monotonic()) + size / self.rate
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))


def _spawn(target, *args) -> None:
    """A thread that never takes the relay's signals, so the kernel gives them to the main thread.

    Python runs a handler only in the main thread, and only once that thread runs bytecode: a
    signal the kernel gave to a piping thread left the main thread asleep in accept() with the
    handler pending, until the next connection came.  A link told to reset or flow did neither
    (seen beside 4 CPU burners: a worker went unheard for its whole window, then was declared lost).
    Blocked in the main thread while the thread is made: a new thread takes its maker's mask."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        threading.Thread(target=target, args=args, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _pipe(source: socket.socket, sink: socket.socket, way: threading.Event, delay: float, link: Narrow) -> None:
    late: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
    if delay:
        _spawn(_deliver, late, sink)
    try:
        # (a narrow link: small turns, so one connection cannot hog it)
        while way.wait() and (data := source.recv(4096 if link.rate else 65536)):
            link.cross(len(data))
            if delay:
                late.put((time.monotonic() + delay, data))
            else:
                sink.sendall(data)
    except OSError:
        pass
    if delay:
        late.put((time.monotonic() + delay, b""))
        return
    _close(source, sink)


def _deliver(late: queue.SimpleQueue, sink: socket.socket) -> None:
    """Send what a delayed way read, each chunk once its time has come; b"": the end."""
    try:
        while True:
            due, data = late.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    _close(sink)


def _close(*ends: socket.socket) -> None:
    for end in ends:
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _end_with_parent(parent: int) -> None:
    """A test that died without killing its relay leaves none behind: it ends once orphaned."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main() -> None:
    target, delay = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    rate = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    later = sys.argv[4:] == ["later"]
    links = [Narrow(0.0 if later else rate), Narrow(0.0 if later else rate)]  # one per way
    _spawn(_end_with_parent, os.getppid())
    for way in FLOWING:
        way.set()
    signal.signal(signal.SIGUSR1, lambda *_: FLOWING[0].clear())
    signal.signal(signal.SIGUSR2, lambda *_: FLOWING[1].clear())
    signal.signal(signal.SIGHUP, lambda *_: [way.set() for way in FLOWING])
    signal.signal(signal.SIGWINCH, lambda *_: [setattr(link, "rate", rate) for link in links])
    signal.signal(signal.SIGQUIT, lambda *_: _close(*ENDS))
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target))
        except OSError:  # nobody there (yet): as a refused connection to it would be
            client.close()
            continue
        ENDS.extend((client, upstream))
        for a, b, way, link in ((client, upstream, FLOWING[0], links[0]), (upstream, client, FLOWING[1], links[1])):
            _spawn(_pipe, a, b, way, delay, link)


if __name__ == "__main__":
    main()
