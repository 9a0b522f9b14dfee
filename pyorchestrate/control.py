"""What clients may ask the coordinator on its control port (``pyorchestrate status/ps/...``, the
dashboard), who may ask it, and the plain-data answers.  Pure logic: the coordinator's loop owns
the socket and calls in here (the way :mod:`pyorchestrate.commands` serves the script's thread).

Roles (with keys; the key a client connected with, see :mod:`pyorchestrate.curve`): a reader key
may query, an admin key may also act.  Without keys the coordinator listens on loopback only (or
was started ``insecure``), and any client there may do both: the zero-config laptop case.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import commands as cmd
from . import protocol
from .protocol import Optional

_STR, _NUM, _INT = str, (int, float), int
_OPT_STR = Optional((str, type(None)), None)


@dataclass(frozen=True)
class Op:
    role: str  #: "reader": a query; "admin": an action
    args: dict[str, Any]  #: protocol-style schema of the arguments
    help: str


OPS: dict[str, Op] = {
    "status": Op("reader", {}, "cluster summary"),
    "agents": Op("reader", {"state": _OPT_STR, "worker": _OPT_STR, "limit": Optional(_INT, 0)},
                 "agents (filters: state, worker; limit: at most so many, errors first; 0: all)"),
    "workers": Op("reader", {}, "workers"),
    "history": Op("reader", {"agent": _OPT_STR, "since": Optional((int, float, type(None)), None),
                             "limit": Optional(_INT, 1000)}, "events the coordinator still holds"),
    "start": Op("admin", {"agent": _STR}, "start a terminated agent again"),
    "stop": Op("admin", {"agent": _STR, "timeout": Optional(_NUM, 10.0)}, "stop an agent"),
    "restart": Op("admin", {"agent": _STR, "timeout": Optional(_NUM, 10.0)}, "restart an agent"),
    "drain": Op("admin", {"worker": _STR}, "move every agent off a worker, then release it"),
    "shutdown": Op("admin", {"timeout": Optional(_NUM, 10.0)}, "stop every agent and end the run"),
}

#: seconds of client-given timeouts we accept (a typo of 1e9 must not park the cluster)
MAX_TIMEOUT = 3600.0
HISTORY_MAX = 10_000
#: the most bytes of events one ``history`` reply carries (at least one): 1,100 log lines of 64 KB
#: made a reply over the client's 64 MiB limit, which cost it the connection, and it said that no
#: coordinator answered
HISTORY_BYTES = 16 * 1024 * 1024


class Refused(Exception):
    """A request this client may not make, or that makes no sense; the text goes back to it."""


def check(op: str, args: dict[str, Any], role: str | None) -> dict[str, Any]:
    """The request's arguments, checked and completed with defaults; raises :class:`Refused`.
    ``role``: the client's key role, None without keys (everything allowed)."""
    spec = OPS.get(op)
    if spec is None:
        raise Refused(f"unknown request {op!r} (known: {', '.join(OPS)})")
    if role is not None and not _may(role, spec.role):
        needed = "an admin key" if spec.role == "admin" else "a reader or admin key"
        raise Refused(f"{op!r} needs {needed}; this client connected with a {role} key "
                      f"(pyorchestrate keys add {'admin' if spec.role == 'admin' else 'reader'} NAME, then keys export)")
    args = dict(args)
    unknown = sorted(set(args) - set(spec.args))
    if unknown:
        raise Refused(f"{op!r} takes no argument {unknown[0]!r} (it takes: {', '.join(spec.args) or 'none'})")
    try:
        protocol.check_fields(op, spec.args, args)
    except protocol.ProtocolError as exc:
        raise Refused(str(exc)) from None
    if "timeout" in args and not 0 <= args["timeout"] <= MAX_TIMEOUT:
        raise Refused(f"timeout must be between 0 and {MAX_TIMEOUT:.0f} seconds")
    return args


def _may(role: str, needed: str) -> bool:
    return role == "admin" or (needed == "reader" and role == "reader")


def command(op: str, args: dict[str, Any]) -> list[cmd.Command]:
    """The core commands an admin request carries out (in order)."""
    if op == "start":
        return [cmd.StartAgent(args["agent"])]
    if op == "stop":
        return [cmd.StopAgent(args["agent"], float(args["timeout"]))]
    if op == "restart":
        return [cmd.RestartAgent(args["agent"], float(args["timeout"]))]
    if op == "drain":
        return [cmd.DrainWorker(args["worker"])]
    if op == "shutdown":  # what Orchestrator.stop() asks: the script's join() returns
        return [cmd.RequestStop(), cmd.StopAll(float(args["timeout"]))]
    raise Refused(f"{op!r} is not an action")


# ---------------------------------------------------------------- answers to queries


def worker_state(worker: dict[str, Any]) -> str:
    if worker.get("alive"):
        return "draining" if worker.get("draining") else "alive"
    return "gone"


def agents(expanded: dict[str, dict[str, Any]], now_wall: float) -> list[dict[str, Any]]:
    """``ps``: the picked agents' rows (expanded), sorted by name; ``uptime`` in seconds while it runs."""
    rows = []
    for row in expanded.values():
        running = row["state"] in ("STARTED", "READY") and row.get("started_at")
        rows.append({**row, "uptime": round(now_wall - row["started_at"], 1) if running else None})
    rows.sort(key=lambda r: r["name"])
    return rows


def workers(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """``workers``: one row per worker the coordinator knows (alive, draining, or gone a while)."""
    rows = []
    for w in snapshot["workers"].values():
        rows.append({"name": w["name"], "host": w["host"], "pid": w["pid"], "labels": w["labels"],
                     "capacity": w["capacity"], "running": w["running"], "since_heartbeat": w["since_heartbeat"],
                     "state": worker_state(w), "agents": sorted(w["agents"]), "dropped": w.get("dropped", {})})
    rows.sort(key=lambda r: r["name"])
    return rows


# The loop's captured agent rows (snapshots.capture_agents): the queries below pick and count on
# these tuples and expand only the rows they return, so a dashboard asking every second for a
# page of 10,000 agents costs the loop a capture, not 10,000 dicts.
NAME, STATE, WORKER, RESTARTS, ERROR = 0, 1, 2, 3, 4


def pick(rows: list[tuple], args: dict[str, Any]) -> list[tuple]:
    """The captured rows ``agents`` returns: filtered by state and worker, and with ``limit``
    at most so many (those with an error first, then by name)."""
    state, worker, limit = (args.get("state") or "").upper(), args.get("worker"), args.get("limit", 0)
    if state:
        rows = [r for r in rows if r[STATE].value == state]
    if worker:
        rows = [r for r in rows if r[WORKER] == worker]
    if limit and len(rows) > limit:
        rows = sorted(rows, key=lambda r: (r[ERROR] is None, r[NAME]))[:limit]
    return rows


def status(rows: list[tuple], snapshot: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``status``: the cluster in one screen, from the captured agent ``rows`` and the rest of
    the snapshot.  ``extra``: what the coordinator adds (name, uptime, events published, loop lag)."""
    by_state = Counter(r[STATE].value for r in rows)
    by_worker_state = Counter(worker_state(w) for w in snapshot["workers"].values())
    on_workers: Counter[str] = Counter()
    for w in snapshot["workers"].values():
        on_workers.update(w.get("dropped", {}))
    failed = sorted((r for r in rows if r[ERROR]), key=lambda r: r[NAME])
    return {**extra,
            "agents": {"total": len(rows), "by_state": dict(sorted(by_state.items())),
                       "restarts": sum(r[RESTARTS] for r in rows),
                       "with_errors": [{"name": r[NAME], "state": r[STATE].value, "last_error": r[ERROR]}
                                       for r in failed[:20]]},
            "workers": {"total": len(snapshot["workers"]), "by_state": dict(sorted(by_worker_state.items())),
                        "dropped": dict(sorted(on_workers.items()))},
            "lost_events": snapshot.get("lost_events", 0), "dropped": snapshot.get("dropped", {}),
            "security": snapshot.get("security", {}), "addresses": snapshot.get("addresses", {}),
            "pulse_running": snapshot.get("pulse_running", False),
            "forgotten_agents": snapshot.get("forgotten_agents", 0)}


def history(items: Iterable[tuple[int, str, bytes]], args: dict[str, Any],
            decode: Callable[[str, bytes], dict[str, Any]]) -> list[dict[str, Any]]:
    """``history``: the latest ``limit`` events held (as many as fit in HISTORY_BYTES), oldest
    first, of one agent (or worker) and/or since a wall time; heartbeats left out (they say nothing
    a row of ``ps`` does not)."""
    agent, since = args.get("agent"), args.get("since")
    limit = max(0, min(int(args.get("limit", 1000)), HISTORY_MAX))
    picked: list[tuple[int, str, bytes]] = []
    # an agent's own AGENT_EVENTs hold its name (UTF-8, in whatever msgpack header) in their body:
    # one search in C each spares decoding the others' (every AGENT_EVENT held was decoded: 0.19 s
    # of the coordinator's loop for 100,000 of another agent's)
    name = agent.encode() if agent else b""
    for item in items:
        event, _, subject = item[1].partition(".")
        if event in ("AGENT_HEARTBEAT", "WORKER_HEARTBEAT"):
            continue
        # the subject whole (agent "b" is not "a.b"), and an agent's own events whatever their
        # topic: AGENT_EVENT.<topic> names the topic it published, not the agent (seen decoded)
        if agent and subject != agent and (event != "AGENT_EVENT" or name not in item[2]):
            continue
        picked.append(item)
    rows = []
    size = 0
    for seq, topic, body in reversed(picked):  # newest first until the limit, then put in order
        if len(rows) >= limit or (rows and size + len(body) > HISTORY_BYTES):
            break
        try:
            fields = decode(topic, body)
        except protocol.ProtocolError:
            continue
        if agent and topic.startswith("AGENT_EVENT.") and fields.get("agent_name") != agent:
            continue
        if since is not None and _event_wall(fields) < since:
            break  # newest first: everything older follows
        size += len(body)
        rows.append({"seq": seq, "event": topic.partition(".")[0], **fields})
    rows.reverse()
    return rows


def _event_wall(fields: dict[str, Any]) -> float:
    """An event's wall time (seconds since the epoch) from its local date and time fields."""
    try:
        whole, _, fraction = str(fields["event_time"]).partition(".")
        stamp = time.mktime(time.strptime(f"{fields['event_date']} {whole}", "%Y-%m-%d %H:%M:%S"))
        return stamp + float(f"0.{fraction or 0}")
    except (KeyError, ValueError):
        return float("inf")  # no usable time: keep it rather than lose it
