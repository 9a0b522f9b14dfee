"""``/metrics`` in Prometheus' text format, from the dashboard's latest view of the cluster
(prometheus-client's own registry and exposition, so any Prometheus parses it)."""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .feed import Feed

AGENT_STATES = ("REGISTERED", "PENDING", "STARTED", "READY", "RESTARTING", "DISCONNECTED", "TERMINATED")
WORKER_STATES = ("alive", "draining", "gone")


class ClusterCollector:
    """Collected at each scrape from what the feed last read (at most ``interval`` old)."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed

    def collect(self) -> Iterator[Metric]:
        state = self.feed.state()
        status: dict[str, Any] | None = state["status"]
        up = GaugeMetricFamily("pyorchestrate_up", "1 if the coordinator answered the dashboard's last query")
        up.add_metric([], 0.0 if state["error"] or status is None else 1.0)
        yield up
        if status is None:
            return
        agents = GaugeMetricFamily("pyorchestrate_agents", "agents by state", labels=["state"])
        by_state = status["agents"]["by_state"]
        for name in AGENT_STATES:
            agents.add_metric([name], by_state.get(name, 0))
        yield agents
        workers = GaugeMetricFamily("pyorchestrate_workers", "workers by state (gone: lost or left, "
                                    "remembered a while)", labels=["state"])
        for name in WORKER_STATES:
            workers.add_metric([name], status["workers"]["by_state"].get(name, 0))
        yield workers
        restarts = CounterMetricFamily("pyorchestrate_agent_restarts", "restarts of the agents the coordinator "
                                       "holds")
        restarts.add_metric([], status["agents"]["restarts"])
        yield restarts
        published = CounterMetricFamily("pyorchestrate_events_published", "events the coordinator published")
        published.add_metric([], status["events_published"])
        yield published
        lost = CounterMetricFamily("pyorchestrate_events_lost", "bus events known lost before the coordinator")
        lost.add_metric([], status["lost_events"])
        yield lost
        dropped = CounterMetricFamily("pyorchestrate_dropped_messages",
                                      "network input dropped, and messages agents never handled, by reason",
                                      labels=["reason"])
        for reason, count in sorted(status["dropped"].items()):
            dropped.add_metric([reason], count)
        yield dropped
        yield GaugeMetricFamily("pyorchestrate_loop_lag_seconds", "how late the coordinator loop's latest ticks "
                                "ran (max of the last 20)", value=status["loop_lag"])
        files = status.get("open_files")
        if files:  # a coordinator at its limit accepts no connection at all (README, Security)
            yield GaugeMetricFamily("pyorchestrate_open_files", "file descriptors the coordinator's process holds",
                                    value=files["open"])
            yield GaugeMetricFamily("pyorchestrate_open_files_limit", "its soft open-files limit (-1: none)",
                                    value=files["limit"])
        age = GaugeMetricFamily("pyorchestrate_worker_heartbeat_age_seconds", "seconds since each live worker's "
                                "last heartbeat", labels=["worker", "host"])
        for w in state["workers"]:
            if w["state"] != "gone":
                age.add_metric([w["name"], w["host"]], w["since_heartbeat"])
        yield age
        running = GaugeMetricFamily("pyorchestrate_worker_running_agents", "agents each live worker runs",
                                    labels=["worker"])
        for w in state["workers"]:
            if w["state"] != "gone":
                running.add_metric([w["name"]], w["running"])
        yield running
        dropped_on = CounterMetricFamily("pyorchestrate_worker_dropped", "what each worker dropped (network "
                                         "input, deliveries to agents that had ended, reports while it had no "
                                         "coordinator), by reason", labels=["worker", "reason"])
        for w in state["workers"]:
            for reason, count in sorted(w.get("dropped", {}).items()):
                dropped_on.add_metric([w["name"], reason], count)
        yield dropped_on


def registry(feed: Feed) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ClusterCollector(feed))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
