"""A TCP relay in a process of its own, to cut one worker off from a live coordinator on
127.0.0.1: SIGSTOP the relay and neither side hears the other, while both connections stay open
(as a partition does; ``bridge link set ... state 0`` needs namespaces).  One way only: SIGUSR1
holds what goes to the target (the coordinator), SIGUSR2 what comes back, SIGHUP lets both go
again (held, not dropped: TCP keeps it, as on a path that stalls one way).

    python relay.py TARGET_PORT   # prints the port it listens on, then relays each connection
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading


def start(target: str) -> tuple[subprocess.Popen, str]:
    """A relay to ``target`` (``tcp://127.0.0.1:PORT``): its process and the address to use instead."""
    port = target.rsplit(":", 1)[1]
    proc = subprocess.Popen([sys.executable, __file__, port], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, f"tcp://127.0.0.1:{proc.stdout.readline().strip()}"


#: set while that way flows: [to the target, back from it]
FLOWING = [threading.Event(), threading.Event()]


def _pipe(source: socket.socket, sink: socket.socket, way: threading.Event) -> None:
    try:
        while way.wait() and (data := source.recv(65536)):
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main() -> None:
    target = int(sys.argv[1])
    for way in FLOWING:
        way.set()
    signal.signal(signal.SIGUSR1, lambda *_: FLOWING[0].clear())
    signal.signal(signal.SIGUSR2, lambda *_: FLOWING[1].clear())
    signal.signal(signal.SIGHUP, lambda *_: [way.set() for way in FLOWING])
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for a, b, way in ((client, upstream, FLOWING[0]), (upstream, client, FLOWING[1])):
            threading.Thread(target=_pipe, args=(a, b, way), daemon=True).start()


if __name__ == "__main__":
    main()
