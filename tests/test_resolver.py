"""The worker's own lookup of its coordinator's host name (worker/resolver.py), with a lookup
function the test controls: answers, failures, a lookup that hangs as one does while DNS is silent."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pyorchestrate_worker.resolver import Resolver, lookup_ipv4


class Lookups:
    """A lookup function whose answers the test sets; ``hold`` makes lookups hang until released."""

    def __init__(self, answer: str) -> None:
        self.answer: str | Exception = answer
        self.hosts: list[str] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, host: str) -> str:
        self.hosts.append(host)
        assert self.hold.wait(30), "the test never released the lookup"
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_an_address_given_as_an_ip_is_its_own_answer_and_never_looked_up():
    lookups = Lookups("10.0.0.9")
    resolver = Resolver("tcp://10.1.2.3:5555", lookups)
    assert resolver.address() == "tcp://10.1.2.3:5555"
    ticket = resolver.refresh()
    assert resolver.answered(ticket) and resolver.wait(ticket, 0.0)
    assert lookups.hosts == []
    assert Resolver("tcp://[::1]:5555", lookups).address() == "tcp://[::1]:5555"


def test_a_name_is_looked_up_in_the_resolvers_thread_and_a_new_answer_replaces_the_old():
    lookups = Lookups("10.0.0.1")
    resolver = Resolver("tcp://coordinator.example:5555", lookups)
    assert resolver.address() is None  # nothing until a lookup
    assert resolver.wait(resolver.refresh(), 10)
    assert resolver.address() == "tcp://10.0.0.1:5555" and resolver.error == ""
    lookups.answer = "10.0.0.2"  # the coordinator moved
    assert resolver.wait(resolver.refresh(), 10)
    assert resolver.address() == "tcp://10.0.0.2:5555"
    assert lookups.hosts == ["coordinator.example"] * 2
    resolver.close()


def test_a_failed_lookup_keeps_the_last_answer_and_says_why():
    lookups = Lookups("10.0.0.1")
    resolver = Resolver("tcp://coordinator.example:5555", lookups)
    assert resolver.wait(resolver.refresh(), 10)
    lookups.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert resolver.wait(resolver.refresh(), 10)
    assert resolver.address() == "tcp://10.0.0.1:5555"
    assert "Temporary failure in name resolution" in resolver.error
    lookups.answer = "10.0.0.1"
    assert resolver.wait(resolver.refresh(), 10)
    assert resolver.error == ""
    resolver.close()


def test_a_hanging_lookup_never_holds_the_caller_and_an_ask_made_meanwhile_waits_for_a_newer_lookup():
    lookups = Lookups("10.0.0.1")
    resolver = Resolver("tcp://coordinator.example:5555", lookups)
    assert resolver.wait(resolver.refresh(), 10)
    lookups.hold.clear()  # DNS goes silent
    lookups.answer = "10.0.0.2"
    first = resolver.refresh()
    assert not resolver.wait(first, 0.2)  # the caller waits only as long as it says
    assert resolver.address() == "tcp://10.0.0.1:5555"
    second = resolver.refresh()  # asked while the first lookup hangs: it began before this ask
    lookups.hold.set()
    assert resolver.wait(first, 10)
    assert resolver.wait(second, 10)
    assert resolver.address() == "tcp://10.0.0.2:5555"
    assert len(lookups.hosts) == 3  # the first, the hung one, and one begun after the second ask
    resolver.close()


def test_a_closed_resolver_wakes_its_waiters():
    lookups = Lookups("10.0.0.1")
    lookups.hold.clear()
    resolver = Resolver("tcp://coordinator.example:5555", lookups)
    ticket = resolver.refresh()
    threading.Timer(0.1, resolver.close).start()
    began = time.monotonic()
    assert not resolver.wait(ticket, 10)
    assert time.monotonic() - began < 5, "woken by close, not by its timeout"
    lookups.hold.set()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_the_real_lookup_takes_an_ipv4_address(host):
    assert lookup_ipv4(host) == "127.0.0.1"
