"""The coordinator's pulse: a small process of its own that tells workers "the coordinator's loop
is stalled, its process is alive and not stopped, and it will judge nobody for the silence", when
the loop cannot say so itself.

The coordinator's loop is a thread of the user's script.  A script whose main thread runs one long
C call that holds the GIL (sorting 12 M floats took 4.3 s here; a big ``json.loads``, a regex, some
numeric code) stops the loop from answering heartbeats.  Each worker then saw its lease run out
and stopped its agents, which the coordinator restarted once it came back: a false death, caused
by a stall of the coordinator's own.  A worker cannot tell that stall from a partition by itself.
This process, with a GIL of its own, can: the loop writes the start of each tick into memory
shared with it, and a worker whose heartbeats go unanswered asks it on a port of its own.

**Why a vouch is safe.**  After a stall longer than ``Limits.stall``, the loop gives every worker a
fresh window (it was not listening: nobody's silence counts).  This process vouches only while the
loop is in such a stall, and the loop honours every vouch at its next tick, before it judges
anyone, so a worker's lease never runs past what the coordinator counts for it:

* The pulse first records the moment it may vouch up to (on a pipe the loop reads), and only then
  reads the loop's last tick; the loop first writes its tick, and only then reads the pipe.  So if
  the pulse saw an old tick (a stall) and vouched, the loop's next tick sees that moment, and it
  takes every live worker as heard then (``ClusterCore.tick``'s ``vouched``).  Each of the two
  pipe operations takes the pipe's lock, which orders the shared-memory access next to it.
* A worker takes a vouch only for a ping it sent while its lease still ran, and only if the answer
  came within ``Limits.stall``.  A worker the coordinator had already declared lost has an expired
  lease (it was silent longer than the lease), so no vouch brings it back; and a late answer, from
  a link that delays or buffers, proves nothing about now.
* A stopped (SIGSTOP) or dead coordinator gets no vouch, as a stopped worker gets no pulse: its
  workers' leases run out as before.

The process is started by the coordinator when it binds, configured through its stdin (one JSON
line); it listens on a socket the coordinator bound.  It ends when the coordinator closes its stdin
or is gone.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Callable

import zmq

from . import protocol, sockets
from .proc_state import alive_and_running, worker_state

STAMP = struct.Struct("d")  #: one time.monotonic() value (the same clock in both processes)
#: a recorded moment covers vouches this much after it, so the pipe takes one write per this long
#: (and, 8 bytes each, holds 800 s of them: a loop stalled longer gets no more vouches)
AHEAD = 0.1
#: how often the pulse looks whether the coordinator is still its parent: once it is gone, the
#: port must be free for the script started again in its place
PARENT_CHECK = 0.05
#: how long a coordinator waits for its predecessor's pulse to free the port (it ends within
#: PARENT_CHECK of its coordinator)
BIND_RETRY = 1.0


# Ctrl-C at the script's terminal reaches its whole process group, this process too: it is ignored
# here (first thing, before the imports), and the process ends when the script closes its stdin or
# is gone.  It stays in the script's group, so that whoever ends the group (a shell, a supervisor,
# a test) ends it too.  The package's __init__ (the whole library: the orchestrator, agents,
# asyncio through zmq.auth) is not run: this module needs protocol, sockets and proc_state (and,
# with keys, the key modules).  That is 18 MB and a third of the start-up time instead of 34 MB
# (1.1 s against 3.9 s on this machine under load): every coordinator starts one.
_MAIN = ("import signal, sys, types; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
         "package = types.ModuleType('pyorchestrate'); package.__path__ = [{path!r}]\n"
         "sys.modules['pyorchestrate'] = package\n"
         "from pyorchestrate.coordinator_pulse import main; raise SystemExit(main())")


def stalled(now: float, last_tick: float, stall: float) -> bool:
    """Has the loop not started a tick for longer than a stall (after which it judges nobody for
    the silence)?"""
    return now - last_tick > stall


class PulseLink:
    """The coordinator's end: starts the pulse process, writes each tick, reads what it vouched.
    Owned by the coordinator's loop (``tick``); ``close`` from the thread that shuts it down."""

    def __init__(self, address: str, stall: float, keys: str | None, session: str) -> None:
        """``address``: where the pulse listens (``tcp://host:port``, port 0 or ``*``: the OS picks).
        The socket is bound here and handed over, so the port is known at once (workers learn it
        in their welcome) and nobody waits for the process to start."""
        listener = _listen(address)
        self.port = listener.getsockname()[1]
        self._fd = os.memfd_create("pyorchestrate-ticks")
        os.ftruncate(self._fd, STAMP.size)
        self._ticks = mmap.mmap(self._fd, STAMP.size)
        self._ticks[:] = STAMP.pack(time.monotonic())  # no stall before the first tick
        self._vouch_r, vouch_w = os.pipe()
        os.set_blocking(self._vouch_r, False)
        config = {"pid": os.getpid(), "address": sockets.with_port(address, self.port), "stall": stall, "keys": keys,
                  "session": session, "ticks_fd": self._fd, "vouch_fd": vouch_w, "listen_fd": listener.fileno()}
        try:
            # (-c, not -m: the package imports this module, and runpy warns about running it again;
            # and -m would run the package's __init__)
            main = _MAIN.format(path=os.path.dirname(os.path.abspath(__file__)))
            self.process = subprocess.Popen([sys.executable, "-c", main],
                                            stdin=subprocess.PIPE, pass_fds=(self._fd, vouch_w, listener.fileno()))
            assert self.process.stdin is not None
            self.process.stdin.write((json.dumps(config) + "\n").encode())
            self.process.stdin.flush()
        except BaseException:
            os.close(self._vouch_r)
            self._ticks.close()
            os.close(self._fd)
            raise
        finally:
            os.close(vouch_w)
            listener.close()  # the process has its own copy

    def tick(self, now: float) -> float:
        """The loop starts a tick at ``now``: say so, then read the latest moment the pulse vouched
        up to (0.0 if none since the last tick).  The order matters (see the module's docstring)."""
        self._ticks[:] = STAMP.pack(now)
        latest = 0.0
        while True:
            try:
                data = os.read(self._vouch_r, 512 * STAMP.size)
            except OSError:  # BlockingIOError: nothing more
                break
            if not data:
                break
            whole = len(data) - len(data) % STAMP.size
            latest = max([latest] + [STAMP.unpack_from(data, i)[0] for i in range(0, whole, STAMP.size)])
        return latest

    def running(self) -> bool:
        """Is the process still there (status() says so: without it, a stall of the script's stops
        agents)?"""
        return self.process.poll() is None

    def close(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()  # its cue to end
            self.process.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(2)
        os.close(self._vouch_r)
        self._ticks.close()
        os.close(self._fd)


def _listen(address: str) -> socket.socket:
    host, port = sockets.parse_tcp(address)
    deadline = time.monotonic() + BIND_RETRY
    while True:
        try:
            return socket.create_server(("" if host == "*" else host, 0 if port == "*" else int(port)),
                                        family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(PARENT_CHECK)


def _gatekeeper(ctx: zmq.Context, keys: str | None, sock: zmq.Socket) -> Callable[[], None]:
    """With keys: a CURVE server that admits workers' keys only (its own gatekeeper and key
    reader: nobody without a worker's key gets an answer).  Returns what stops them, to be called
    before the context ends (the gatekeeper's socket is in it: ``term`` waited for ever, and its
    thread spun on the terminated context, at two thirds of a CPU)."""
    if keys is None:
        return lambda: None
    from . import curve
    from .key_watch import KeyWatch
    from .keys import KeyDir
    keydir = KeyDir(keys)
    watch = KeyWatch(keydir)
    watch.start()
    gate = curve.Gatekeeper(ctx, keydir)
    gate.start()
    curve.serve(sock, keydir.coordinator_pair(), "pulse")

    def stop() -> None:
        gate.stop()
        watch.stop()
    return stop


def main() -> int:
    config = json.loads(sys.stdin.readline())
    parent, stall = int(config["pid"]), float(config["stall"])
    ticks = mmap.mmap(int(config["ticks_fd"]), STAMP.size, access=mmap.ACCESS_READ)
    vouch = int(config["vouch_fd"])
    os.set_blocking(vouch, False)  # a loop that never reads its pipe gets no more vouches, never blocks us
    ctx = zmq.Context()
    router = sockets.make_socket(ctx, zmq.ROUTER, linger_ms=0, max_message_size=4096)
    stop_gatekeeper = _gatekeeper(ctx, config.get("keys"), router)
    router.setsockopt(zmq.USE_FD, int(config["listen_fd"]))  # the coordinator bound it (PulseLink)
    router.bind(config["address"])
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)  # closed (EOF) when the coordinator stops
    recorded = 0.0  # the latest moment written to the pipe: vouches up to it are covered
    try:
        while True:
            # the coordinator may die without closing our stdin (SIGKILL while a fork holds it)
            for sock, _ in poller.poll(int(PARENT_CHECK * 1000)):
                if sock is router:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                    now = time.monotonic()
                    answer = _answer(frames, now, STAMP.unpack_from(ticks, 0)[0], stall, parent, config["session"])
                    if answer is None:
                        continue
                    if recorded < now:
                        # first the moment, then the tick (again): see the module's docstring
                        try:
                            os.write(vouch, STAMP.pack(now + AHEAD))
                        except OSError:  # full (the loop reads nothing) or closed: no vouch
                            continue
                        recorded = now + AHEAD
                        if not stalled(now, STAMP.unpack_from(ticks, 0)[0], stall):
                            continue
                    try:
                        router.send_multipart([frames[0], answer], zmq.NOBLOCK)
                    except zmq.ZMQError:  # full, or the worker has gone
                        pass
                elif not sys.stdin.buffer.read1(1):
                    return 0  # the coordinator closed our stdin: it is stopping
            if os.getppid() != parent:
                return 0  # the coordinator is gone (we were handed to another parent; no pid reuse fools this)
    finally:
        router.close(0)
        stop_gatekeeper()
        ctx.term()


def _answer(frames: list[bytes], now: float, last_tick: float, stall: float, parent: int,
            session: str) -> bytes | None:
    """The reply to a worker's ping if the loop is stalled and the coordinator's process is alive
    and not stopped (None: say nothing; the worker's lease runs on the loop's own echoes)."""
    if len(frames) != 2 or not stalled(now, last_tick, stall):
        return None
    try:
        message = protocol.decode(frames[1])
    except protocol.ProtocolError:
        return None  # (no answer; nothing here to count it in: a stranger's garbage, or a newer peer's)
    if (message["type"] != "coordinator_pulse" or os.getppid() != parent
            or not alive_and_running(worker_state(parent))):
        return None
    return protocol.encode("coordinator_pulse_reply", echo=message["t"], session=session)

