"""A thread agent on a worker makes its logger and its bus only when it uses them (issue #13:
"a trivial agent allocates a handful of objects"), and its log records and events reach the bus
all the same, whenever the logger was made.  Run through a real Supervisor (agent threads, the
bus outbox), without sockets."""

import logging
import threading

import msgpack

from pyorchestrate import BaseThreadAgent, publisher, shipping
from pyorchestrate_worker.supervisor import Supervisor

TIMEOUT = 10


class Held(BaseThreadAgent):
    """Waits in execute() until the test lets it go; logs or publishes only if told to.  (Files,
    not Events: the class travels by value, as to any worker.)"""

    class Config(BaseThreadAgent.Config):
        directory = ""
        log = False
        publish_threads = 0
        early_logger = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.early_logger:
            self.logger.debug("made in __init__, before the worker attached the bus")

    def execute(self):
        import os
        import time

        made = [what for what, value in (("logger", self.__dict__.get("_logger")), ("bus", self._bus)) if value]
        with open(os.path.join(self.config.directory, "inside.tmp"), "w") as f:
            f.write(",".join(made))
        os.replace(os.path.join(self.config.directory, "inside.tmp"), os.path.join(self.config.directory, "inside"))
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(self.config.directory, "go")) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.config.log:
            self.logger.info("hello from %s", self.name)
        if self.config.publish_threads:
            threads = [threading.Thread(target=lambda: [self.publish("tick", i=i) for i in range(50)])
                       for _ in range(self.config.publish_threads)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)


def _run(directory, name, **settings):
    """Run one Held agent on a real Supervisor: (what it had made by execute(), whether its logger
    was registered then, its TERMINATED fields, the bus items)."""
    import time

    ended = threading.Event()
    terminated = {}

    def report(agent, run, epoch, event, fields):
        if event == "AGENT_TERMINATED":
            terminated.update(fields)
            ended.set()

    outbox = publisher.BusOutbox(wake=lambda: None)
    supervisor = Supervisor(report, "w1", outbox)
    class_id, blob = shipping.pack_class(Held, Held.Config)
    config = Held.Config(directory=str(directory), **settings)
    try:
        supervisor.start(name, "run1", 1, class_id, blob, shipping.pack_config(config, name), "thread")
        inside = directory / "inside"
        deadline = time.monotonic() + TIMEOUT
        while not inside.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        made = inside.read_text()
        registered = f"pyorchestrate.agent.{name}" in logging.Logger.manager.loggerDict
        (directory / "go").touch()
        assert ended.wait(TIMEOUT)
        return made, registered, terminated, outbox.take()
    finally:
        supervisor.close()  # its idle agent thread and starter thread end with the test


def test_an_agent_that_neither_logs_nor_publishes_makes_no_logger_and_no_bus(tmp_path):
    made, registered, terminated, items = _run(tmp_path, "lazy-quiet")
    assert made == ""
    assert not registered
    assert items == []
    assert "bus_seq" not in terminated  # nothing published: the coordinator waits for nothing


def test_log_records_reach_the_bus_whether_the_logger_was_made_before_or_during_the_run(tmp_path):
    for name, early in (("lazy-late", False), ("lazy-early", True)):
        (tmp_path / name).mkdir()
        made, _, terminated, items = _run(tmp_path / name, name, log=True, early_logger=early)
        assert made == ("logger" if early else ""), name
        logs = [msgpack.unpackb(body) for _, _, topic, _, body in items if topic.startswith("AGENT_LOG.")]
        assert [entry["message"] for entry in logs if entry["level"] == "INFO"] == [f"hello from {name}"], name
        assert terminated["bus_seq"] == items[-1][3]
        # the run's logger left logging's registry with the run (one per agent name would grow it)
        assert f"pyorchestrate.agent.{name}" not in logging.Logger.manager.loggerDict, name


def test_threads_of_one_agent_publishing_at_once_share_one_numbered_stream(tmp_path):
    _, _, terminated, items = _run(tmp_path, "lazy-threads", publish_threads=4)
    seqs = [seq for _, _, topic, seq, _ in items if topic == "AGENT_EVENT.tick"]
    assert sorted(seqs) == list(range(1, 201))  # one bus: no seq twice, none missing
    assert terminated["bus_seq"] == 200


def test_lazy_events_never_miss_a_set_whoever_comes_first():
    """An agent's six events make a real Event only when somebody waits on one that is clear,
    and take no lock on the way there (signals.LazyEvent).  Waiters and a setter racing, many
    times over: every wait returns True once set; clear() clears for waiters to come; a wait
    on a clear event times out False."""
    import sys

    from pyorchestrate.agents.signals import LazyEvent

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the races happen
    try:
        _race_lazy_events(LazyEvent)
    finally:
        sys.setswitchinterval(interval)


def test_a_set_while_a_waiter_makes_its_event_is_not_missed(monkeypatch):
    """The one interleaving the lock-free path must get right, made to happen: a waiter found
    the event clear and is making its real Event when another thread sets it (and, seeing no
    Event yet, sets only the flag).  The waiter must return True at once, not wait for ever."""
    from pyorchestrate.agents import signals

    event = signals.LazyEvent()
    real = signals._make_event

    def made_while_set():
        setter = threading.Thread(target=event.set)
        setter.start()
        setter.join(TIMEOUT)
        return real()

    monkeypatch.setattr(signals, "_make_event", made_while_set)
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(event.wait(2.0)))
    waiter.start()
    waiter.join(TIMEOUT)
    assert waited == [True] and event.is_set()


def _race_lazy_events(LazyEvent):
    for round_ in range(300):
        event = LazyEvent()
        results = []
        if round_ % 2:
            event.clear()  # cleared, never set: as hold_after_ready does to execute_event
        start = threading.Barrier(4)

        def waiter():
            start.wait(TIMEOUT)
            results.append(event.wait(TIMEOUT))

        waiters = [threading.Thread(target=waiter) for _ in range(3)]
        for thread in waiters:
            thread.start()
        start.wait(TIMEOUT)
        if round_ % 3:  # sometimes before the waiters make the Event, sometimes after
            threading.Event().wait(0.0001 * (round_ % 5))
        event.set()
        for thread in waiters:
            thread.join(TIMEOUT)
        assert results == [True, True, True], f"round {round_}: {results}"
        assert event.is_set()
        event.clear()
        assert not event.is_set() and event.wait(0.001) is False
        event.set()
        assert event.wait(0) is True


def _first_uses_at_once(make_class, use, rounds: int = 30, threads: int = 6) -> list[BaseException]:
    """``use`` of a class never used before, from several threads at once, ``rounds`` times over:
    what any of them raised."""
    import sys

    failures: list[BaseException] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: the race happens
    try:
        for _ in range(rounds):
            klass = make_class()
            start = threading.Barrier(threads)

            def first_use():
                start.wait(TIMEOUT)
                try:
                    use(klass)
                except BaseException as exc:  # noqa: BLE001 - what the test is after
                    failures.append(exc)

            runners = [threading.Thread(target=first_use) for _ in range(threads)]
            for runner in runners:
                runner.start()
            for runner in runners:
                runner.join(TIMEOUT)
    finally:
        sys.setswitchinterval(interval)
    return failures


def test_agents_of_one_class_starting_at_once_on_first_use_all_start():
    """The names of an agent's events and its plugins are walked once per class and kept on the
    class.  Agents of a class never started before, starting at once in their own threads (a
    worker starting its capacity of them): one thread's walk read the class's dict while another
    wrote the kept result into it, and that agent failed, "dictionary changed size during
    iteration" (1 of 10,000 agents in a run of S9)."""
    from pyorchestrate.agents.signals import StateEvents
    from pyorchestrate.plugins import Plugins

    many = 2_000  # a long walk: the other threads' writes land inside it

    def events_class():
        return type("Events", (StateEvents,), {f"a{i}_event": None for i in range(many)})

    failures = _first_uses_at_once(events_class, lambda klass: klass(lambda: None))
    assert not failures, failures[:3]

    class Held:
        def initialize(self, owner):
            pass

        def finalize(self, owner, error):
            pass

    def plugins_class():
        return type("Plugin", (Plugins,), {f"p{i}": Held() for i in range(many)})

    failures = _first_uses_at_once(plugins_class, lambda klass: klass.declared())
    assert not failures, failures[:3]
    assert len(plugins_class().declared()) == many
