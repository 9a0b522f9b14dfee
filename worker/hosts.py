"""The worker's side of one agent host (see host.py): the pipe to it, which of the worker's thread
agents it runs, and what to report for them if it dies.

The loop only puts messages in an outbox (a writer thread sends them: a full pipe must never
block the loop) and assigns slots; a reader thread starts the process, relays everything the host
sends and, when the pipe closes, reports every agent still in it as failed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

import msgpack

from pyorchestrate import own_threads
from pyorchestrate.agents.inbox import TallyPlace, tally_fields
from pyorchestrate.events import stamp
from pyorchestrate.log_thread import deferrable

from . import host as host_process
from . import stack_dump, watch
from .child import BUS, bus_marker
from .child_link import BACKLOG_DELIVERIES_MAX
from .errors import how_it_exited

log = deferrable(logging.getLogger("pyorchestrate.worker.hosts"))

#: (record, event, fields): how the reader hands an agent's report to the supervisor
Relay = Callable[[Any, str, dict], None]


class AgentHost:
    """One host process and the thread agents it runs (``slots``: slot number -> the worker's
    record of that copy)."""

    def __init__(self, mp: Any, number: int, worker: str, host: str, events_address: str | None,
                 events_key: Any, bus: bool, log_level: int, capacity: int = 0) -> None:
        self.number = number
        self.worker = worker
        self.conn, self._child_conn = mp.Pipe()
        # each agent's inbox counts (taken, dropped) in a place of this memory shared with the host
        # (at most ``capacity`` agents at a time): a host that dies reports nothing, and what its
        # agents had been sent and never took would be lost uncounted (inbox.py)
        self.tally = mp.RawArray("q", 2 * capacity) if capacity else None
        self._places = list(range(capacity - 1, -1, -1))  # free places, the lowest last
        self.place: dict[int, int] = {}  # slot -> its place in tally
        self._heard: set[int] = set()  # slots the host reported on: it has zeroed their places
        self.process = mp.Process(target=host_process.main,
                                  args=(self._child_conn, worker, host, events_address, events_key, bus, log_level,
                                        os.getpid(), self.tally),
                                  name=f"agent-host-{number}", daemon=False)
        self.lock = threading.Lock()
        self.slots: dict[int, Any] = {}
        self.classes: set[str] = set()  #: class ids already sent (a host caches what it unpacked)
        self.count = 0  #: copies placed here and not yet forgotten by the loop
        self.retired = False  #: the loop places nothing more here
        self.dead = False  #: the pipe closed: the reader reported what was left
        # (bytes, data): bytes counted as a delivery's (0: anything else); None: the writer ends
        self._outbox: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._delivery_bytes = 0  # of the deliveries in the outbox (the loop adds, the writer takes off)
        self._bytes_lock = threading.Lock()
        self.refused = 0  #: deliveries refused because the outbox held its bound of them

    def add(self, slot: int, record: Any) -> bool:
        """Place a copy here (the loop); False if the host died meanwhile."""
        with self.lock:
            if self.dead:
                return False
            self.slots[slot] = record
            self.count += 1
            if self._places:
                self.place[slot] = self._places.pop()
            return True

    def forget(self, slot: int) -> None:
        with self.lock:
            if self.slots.pop(slot, None) is not None:
                self.count -= 1
            place = self.place.pop(slot, None)
            if place is not None:  # its agent ended: the host writes there again only for the next
                self._places.append(place)
            self._heard.discard(slot)

    def _counts(self, slot: int) -> dict[str, int]:
        """What the agent in ``slot`` took and dropped, as its place in the tally says (its end,
        reported for it when the host died, carries them: see Core._count_lost_messages)."""
        place = self.place.get(slot)
        if place is None or self.tally is None:
            return {}
        if slot not in self._heard:
            # the host died before it started this agent (it says STARTED before it takes
            # anything, and all it wrote was read): its place may still hold the counts of the
            # agent there before, which the host zeroes only as it starts this one
            return {"messages_taken": 0}
        return tally_fields(TallyPlace(self.tally, place))

    def send(self, message: list) -> bool:
        """Queue ``message`` for the host; False if it is a delivery refused because the outbox
        holds its bound of them (a stopped host: see child_link.BACKLOG_DELIVERIES_MAX)."""
        data = msgpack.packb(message, use_bin_type=True)
        counted = 0
        if message[0] == "deliver":
            counted = len(data)
            with self._bytes_lock:
                if self._delivery_bytes and self._delivery_bytes + counted > BACKLOG_DELIVERIES_MAX:
                    self.refused += 1
                    return False
                self._delivery_bytes += counted
        self._outbox.put((counted, data))
        return True

    def retire(self) -> None:
        """No agents left (or the worker ends): tell the host to exit once the pipe is drained."""
        if not self.retired:
            self.retired = True
            self.send(["exit"])
            self._outbox.put(None)

    def _write(self) -> None:
        while (item := self._outbox.get()) is not None:
            counted, data = item
            try:
                self.conn.send_bytes(data)
            except (OSError, ValueError):
                return  # the host is gone; the reader reports its agents
            if counted:
                with self._bytes_lock:
                    self._delivery_bytes -= counted

    def serve(self, relay: Relay, emit: Relay, sink: Callable[[Any], None] | None) -> None:
        """The reader thread: start the host, relay what it says, report its agents if it dies."""
        try:
            stack_dump.start_forkserver()  # deaf to SIGUSR1, and its children until they listen
            self.process.start()
        except Exception as exc:  # noqa: BLE001 - reported for every agent placed here
            self.unstarted(relay, emit, exc, "its host process")
            return
        self._child_conn.close()
        writer: threading.Thread | None = own_threads.thread(self._write, f"host-{self.number}-writer")
        try:
            writer.start()  # type: ignore[union-attr]
        except RuntimeError as exc:  # no thread to be had (a pids limit): a host nobody writes to is no use
            log.error("agent host %s: could not start its writer thread (%s): ending it", self.number, exc)
            self.process.kill()  # its agents are reported below, as for any host that died
            writer = None
        failed: set[int] = set()  # slots that reported an error (a death adds none)
        last_bus: dict[int, dict[str, Any]] = {}  # slot -> marker of its last bus event
        watched = watch.ChildWatch(self.conn, self.process)
        try:
            while True:
                if not watched.readable():
                    break  # it ended, and all it wrote before has been read
                message = msgpack.unpackb(self.conn.recv_bytes(), raw=False)
                if message[0] == BUS:
                    slot, item = message[1], tuple(message[2:])
                    if sink is not None:
                        sink(item)
                    last_bus[slot] = bus_marker(item)
                    continue
                slot, event, fields = message
                record = self.slots.get(slot)
                if record is None:
                    continue
                self._heard.add(slot)
                if event == "AGENT_ERROR":
                    failed.add(slot)
                elif event == "AGENT_TERMINATED":
                    failed.discard(slot)
                    last_bus.pop(slot, None)
                relay(record, event, fields)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("bad message from agent host %s", self.number)
        self.process.join(5.0)
        code = self.process.exitcode
        watch.kill_group_left_by(self.process.pid)  # what its agents started, before they are reported
        how = f"its host process (pid {self.process.pid}) {how_it_exited(code)}"
        self._gone(relay, emit, last_bus, failed, how, code)
        self._outbox.put(None)
        if writer is not None:
            writer.join(5.0)
        self.conn.close()

    def unstarted(self, relay: Relay, emit: Relay, exc: BaseException, what: str = "the thread that reads it") -> None:
        """The host could not be started (``what`` could not): its agents are reported failed."""
        self._child_conn.close()
        self._gone(relay, emit, {}, set(), f"could not start {what}: {exc}", None, before_start=True)
        self.conn.close()

    def _gone(self, relay: Relay, emit: Relay, last_bus: dict[int, dict], failed: set[int], how: str,
              code: int | None, before_start: bool = False) -> None:
        with self.lock:
            self.dead = True
            left = [(slot, record) for slot, record in self.slots.items() if not record.terminated]
        if left and not self.retired:
            log.error("agent host %s: %s with %d agents", self.number, how, len(left))
        for slot, record in left:
            if not record.terminated:
                if before_start:
                    emit(record, "AGENT_STARTED", {})
                if slot not in failed:
                    emit(record, "AGENT_ERROR", {"error_message": f"thread agent {record.name} ended: {how} on worker "
                                                                  f"{self.worker}", "traceback": "", "exitcode": code})
                relay(record, "AGENT_TERMINATED", {**stamp(), "ok": False, "exitcode": code, **last_bus.get(slot, {}),
                                                   **self._counts(slot)})
