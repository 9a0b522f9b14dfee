"""Every time limit of liveness and leases, computed in one place from the heartbeat settings.

The coordinator and its workers both derive their limits from here (the worker learns the
interval and liveness in its welcome), so the two sides cannot disagree about what "silent too
long" means.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Limits:
    """``interval`` seconds between heartbeats both ways; ``liveness`` heartbeats may be missed."""

    interval: float = 1.0
    liveness: int = 5

    # silence and lease are read every loop turn on both sides: cached on the (frozen) instance,
    # so after the first read they are plain attribute reads, not a chain of property calls
    @cached_property
    def silence(self) -> float:
        """A worker silent this long is lost; a worker whose coordinator is silent this long
        re-registers and lets its lease run out (stops its agents with on_disconnect="replace")."""
        return self.interval * self.liveness

    @cached_property
    def lease(self) -> float:
        """How long a worker's agents may run after the last round trip with the coordinator that
        it can prove (the coordinator echoed a heartbeat the worker sent at time t: until t+lease)."""
        return self.silence

    @property
    def busy_cap(self) -> float:
        """A worker whose loop is silent but whose process answers (its pulse: alive, not stopped)
        is busy, not lost, for up to this long; then it is lost anyway (a loop that never comes
        back, say deadlocked, must not hold its agents for ever)."""
        return 6 * self.silence

    @property
    def reconnect_grace(self) -> float:
        """After a worker's connection closes: how long a live worker needs to reconnect and speak
        (ZeroMQ reconnects within 0.1 s; it speaks at its next heartbeat)."""
        return self.interval + 0.2

    @property
    def margin(self) -> float:
        """Added to the lease before a replacement starts elsewhere: the two clocks run at the same
        rate, but the stop the lease triggers takes a moment to reach the agent."""
        return max(0.2, self.interval)

    def replace_after(self, last_heard: float, stop_timeout: float) -> float:
        """The earliest moment (coordinator clock) a replacement for an agent on a worker last heard
        at ``last_heard`` may start: its worker's lease has run out and the agent has had its
        ``stop_timeout`` to finish."""
        return last_heard + self.lease + stop_timeout + self.margin

    def unknown_copy_gone(self, keeps_running: bool, stop_timeout: float) -> float:
        """After a coordinator crash, how long until a copy it left on a worker that never reports
        has certainly stopped: a replaced copy at its lease, a kept one at the orphan timeout."""
        return (ORPHAN_TIMEOUT if keeps_running else self.lease) + stop_timeout + self.margin

    @property
    def tick(self) -> float:
        """How often the coordinator judges liveness and sends heartbeats (at most)."""
        return min(self.interval, 0.25)

    @property
    def stall(self) -> float:
        """A gap between two ticks this long was a stall of our own (GC, SIGSTOP, a burst):
        nobody's silence during it counts against them."""
        return self.interval + self.tick

    def stop_deadline(self, timeout: float) -> float:
        """stop(): seconds after which agents that have not reported their end are given up (their
        stop timeout, and two heartbeats for the last reports to travel)."""
        return timeout + 2 * self.interval

    def stop_wait(self, timeout: float) -> float:
        """stop(): how long the caller waits for the run to end before shutting down regardless
        (the deadline above, a silent worker's window, and the wait for agents' last bus events)."""
        return self.stop_deadline(timeout) + self.silence + 5.0


#: a worker with no coordinator stops even the agents it keeps after this long (--orphan-timeout)
ORPHAN_TIMEOUT = 60.0

#: a worker looking for its coordinator retries at most this often (plus up to REGISTER_JITTER s)
REGISTER_BACKOFF_MAX = 2.0
REGISTER_JITTER = 0.5


def adopt_window(limits: Limits) -> float:
    """How long a coordinator that starts on an address workers may already know waits for them
    to report what a previous coordinator left running: a connected worker notices within one
    heartbeat (its heartbeat gets "register again"), one between retries within the back-off."""
    return max(limits.interval, REGISTER_BACKOFF_MAX + REGISTER_JITTER) + limits.margin
