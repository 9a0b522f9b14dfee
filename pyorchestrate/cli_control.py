"""``pyorchestrate status|ps|workers|start|stop|restart|drain|shutdown|history|top``: the
coordinator's control port from a shell (see :mod:`pyorchestrate.client`).

Exit codes: 0 done; 1 the coordinator refused (it says why: unknown agent, a reader key asked for
an action, ...); 2 a usage mistake (bad address, no key); 3 no coordinator answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from . import tables
from .client import ADDRESS_ENV, ControlClient, ControlError, NoAnswer
from .keys import KeysError

OK, REFUSED, USAGE, NO_ANSWER = 0, 1, 2, 3


# ---------------------------------------------------------------- argument types
# argparse turns the ValueError of a type into "argument --timeout: invalid ... value" and exit 2:
# before, --timeout nan ended in a traceback, --timeout -1 or 0 said no coordinator answered
# "within -1 s", --limit -1 and --since -5 printed nothing, and a mistyped --state an empty table


def seconds(minimum: float = 0.0, *, inclusive: bool = True, forever: bool = False) -> Callable[[str], float]:
    """An argparse type: a number of seconds, at least ``minimum`` (or above it), inf if ``forever``."""
    def parse(text: str) -> float:
        value = float(text)  # "abc" too: argparse names the type, from __name__ below
        if value != value or (value == float("inf") and not forever):
            raise ValueError(text)
        if value < minimum or (value == minimum and not inclusive):
            raise ValueError(text)
        return value
    parse.__name__ = f"seconds ({'>=' if inclusive else '>'} {minimum:g}{', or inf' if forever else ''})"
    return parse


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number, at least ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value
    parse.__name__ = f"whole number (>= {minimum})"
    return parse


def agent_state(text: str) -> str:
    """An argparse type: an agent state, in any case."""
    from .states import AgentState

    names = [s.value for s in AgentState]
    if text.upper() not in names:
        raise argparse.ArgumentTypeError(f"unknown state {text!r}: use one of {', '.join(names)}")
    return text.upper()


def _client(args: argparse.Namespace) -> ControlClient:
    roles = ("admin",) if args.command in ("start", "stop", "restart", "drain", "shutdown") else ("reader", "admin")
    return ControlClient(args.address, keys=args.keys, key_name=args.key_name, timeout=args.timeout, roles=roles)


def _run(args: argparse.Namespace, body: Callable[[ControlClient, argparse.Namespace], None]) -> int:
    try:
        client = _client(args)
    except (ControlError, KeysError) as exc:
        print(f"pyorchestrate {args.command}: {exc}", file=sys.stderr)
        return USAGE
    try:
        body(client, args)
    except NoAnswer as exc:
        print(f"pyorchestrate {args.command}: {exc}", file=sys.stderr)
        return NO_ANSWER
    except ControlError as exc:
        print(f"pyorchestrate {args.command}: {exc}", file=sys.stderr)
        return REFUSED
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        client.close()
    return OK


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------- views (shared with top)


def _open_files(files: dict[str, int] | None) -> str:
    """`  files 35 of 1024`, and a warning past 80 % of the limit (at it, nothing else connects)."""
    if not files:
        return ""
    text = f"  files {files['open']} of {files['limit'] if files['limit'] >= 0 else 'unlimited'}"
    if files["limit"] > 0 and files["open"] >= 0.8 * files["limit"]:
        text += " (near its open-files limit: new connections will be refused; see README, Security)"
    return text


def _pulse(s: dict[str, Any]) -> str:
    """`  pulse on`: the process that vouches for the coordinator while its script holds the GIL."""
    if not s["addresses"].get("pulse"):
        return "  pulse off"
    if s.get("pulse_running"):
        return "  pulse on"
    return "  pulse ENDED (a call of the script that holds the GIL past the lease stops agents)"


def status_view(s: dict[str, Any]) -> list[Any]:
    agents, workers = s["agents"], s["workers"]
    lines = [
        f"coordinator {s['coordinator']}  up {tables.duration(s['uptime'])}  control {s['addresses'].get('control')}"
        f"  events {s['addresses'].get('events')}  keys {'on' if s['security'].get('keys') else 'off'}"
        + _pulse(s) + _open_files(s.get("open_files")),
        f"agents   {agents['total']:>6}  " + "  ".join(f"{k.lower()} {v}" for k, v in agents["by_state"].items())
        + f"  restarts {agents['restarts']}",
        f"workers  {workers['total']:>6}  " + "  ".join(f"{k} {v}" for k, v in workers["by_state"].items()),
        f"events   {s['events_published']:>6}  lost {s['lost_events']}  held {s['history_held']}"
        f"  loop lag {s['loop_lag'] * 1000:.1f} ms"
        + (f"  dropped {sum(s['dropped'].values())}" if s["dropped"] else "")
        + (f"  dropped on workers {sum(workers['dropped'].values())}" if workers.get("dropped") else ""),
    ]
    if agents["with_errors"]:
        lines.append(tables.build("last errors", ["NAME", "STATE", "ERROR"],
                                  [[r["name"], r["state"], tables.short(r["last_error"], 80)]
                                   for r in agents["with_errors"]]))
    return lines


def agents_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    return tables.build(title, ["NAME", "STATE", "WORKER", "RESTARTS", "UPTIME", "LAST ERROR"],
                        [[r["name"], r["state"], r["worker"] or "-", r["restarts"], tables.duration(r["uptime"]),
                          tables.short(r["last_error"] or r["pending_reason"], 60)] for r in rows])


def workers_table(rows: list[dict[str, Any]], title: str = "") -> Any:
    return tables.build(title, ["NAME", "HOST", "PID", "STATE", "RUNNING", "CAPACITY", "HEARTBEAT", "DROPPED",
                               "LABELS"],
                        [[r["name"], r["host"], r["pid"], r["state"], r["running"], r["capacity"] or "-",
                          f"{r['since_heartbeat']:.1f}s ago", sum(r.get("dropped", {}).values()),
                          ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"] for r in rows])


def history_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        subject = r.get("agent_name") or r.get("worker") or r.get("coordinator") or ""
        extra = r.get("message") or r.get("error_message") or r.get("reason") or ""
        out.append(f"{r.get('event_date', '')} {str(r.get('event_time', ''))[:12]} {r['event']:<20} "
                   f"{subject:<20} {tables.short(extra, 80)}".rstrip())
    return out


# ---------------------------------------------------------------- commands


def _status(client: ControlClient, args: argparse.Namespace) -> None:
    s = client.status()
    _json(s) if args.json else tables.show(*status_view(s))


def _ps(client: ControlClient, args: argparse.Namespace) -> None:
    rows = client.agents(state=args.state, worker=args.worker)
    _json(rows) if args.json else tables.show(agents_table(rows))


def _workers(client: ControlClient, args: argparse.Namespace) -> None:
    rows = client.workers()
    _json(rows) if args.json else tables.show(workers_table(rows))


def _history(client: ControlClient, args: argparse.Namespace) -> None:
    since = None
    if args.since is not None:
        since = time.time() - args.since if args.since < 1e9 else args.since
    rows = client.history(agent=args.agent, since=since, limit=args.limit)
    if args.json:
        _json(rows)
    else:
        for line in history_lines(rows):
            print(line)


def _action(op: str) -> Callable[[ControlClient, argparse.Namespace], None]:
    def act(client: ControlClient, args: argparse.Namespace) -> None:
        target = getattr(args, "agent", None) or getattr(args, "worker", None)
        options = {k: getattr(args, a) for k, a in (("agent", "agent"), ("worker", "worker"), ("timeout", "stop_timeout"))
                   if hasattr(args, a)}
        result = client.request(op, **options)
        if args.json:
            _json(result)
        else:
            print({"start": f"{target}: start requested", "stop": f"{target}: stop requested",
                   "restart": f"{target}: restart requested",
                   "drain": f"{target}: draining (its agents move; it is released when empty)",
                   "shutdown": "shutdown requested: every agent stops, then the run ends"}[op])
    return act


def _top(client: ControlClient, args: argparse.Namespace) -> None:
    """Refresh status, workers and agents every --interval seconds (until Ctrl-C or --count)."""
    def frame() -> list[Any]:
        s = client.status()
        return [*status_view(s), workers_table(client.workers(), "workers"),
                agents_table(client.agents()[: args.rows], "agents")]

    shown = 0
    if tables.rich is not None and sys.stdout.isatty():
        from rich.console import Group
        from rich.live import Live
        with Live(Group(*frame()), refresh_per_second=4, screen=False) as live:
            while args.count == 0 or shown < args.count:
                shown += 1
                time.sleep(args.interval)
                live.update(Group(*frame()))
        return
    while args.count == 0 or shown < args.count:  # not a terminal: one block per refresh
        shown += 1
        tables.show(f"--- {time.strftime('%H:%M:%S')}", *frame())
        sys.stdout.flush()
        if args.count == 0 or shown < args.count:
            time.sleep(args.interval)


# ---------------------------------------------------------------- parsers


def _common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                   help=f"the coordinator's control address, the one workers use (default: ${ADDRESS_ENV})")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=seconds(0, inclusive=False, forever=True), default=5.0, metavar="SECONDS",
                   help="give up when the coordinator has not answered in SECONDS (exit 3)")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="key directory (default: $PYORCHESTRATE_KEYS); queries need a reader or admin key, "
                        "actions an admin key")
    p.add_argument("--key-name", metavar="NAME", default=None, help="which key in DIR, if it holds several")


def add_parsers(sub: Any) -> None:
    """Add the control-port commands to the ``pyorchestrate`` parser."""
    def wrap(body: Callable[[ControlClient, argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
        return lambda args: _run(args, body)

    p = sub.add_parser("status", help="cluster summary: agents and workers by state, events, loop lag")
    _common(p)
    p.set_defaults(func=wrap(_status))
    p = sub.add_parser("ps", aliases=["agents"], help="agents: name, state, worker, restarts, uptime, last error")
    p.add_argument("--state", type=agent_state, default=None, help="only agents in this state (e.g. READY, TERMINATED)")
    p.add_argument("--worker", default=None, help="only agents on this worker")
    _common(p)
    p.set_defaults(func=wrap(_ps))
    p = sub.add_parser("workers", help="workers: host, state, running agents, capacity, heartbeat age, labels")
    _common(p)
    p.set_defaults(func=wrap(_workers))
    for op, what in (("start", "start a terminated agent again"), ("stop", "stop an agent"),
                     ("restart", "stop an agent and start it again")):
        p = sub.add_parser(op, help=f"{what} (admin key)")
        p.add_argument("agent")
        if op != "start":
            p.add_argument("--stop-timeout", type=seconds(0), default=None, metavar="SECONDS",
                           help="how long the agent has to stop (default 10)")
        _common(p)
        p.set_defaults(func=wrap(_action(op)))
    p = sub.add_parser("drain", help="move every agent off a worker, then release it (admin key)")
    p.add_argument("worker")
    _common(p)
    p.set_defaults(func=wrap(_action("drain")))
    p = sub.add_parser("shutdown", help="stop every agent and end the coordinator's run (admin key)")
    p.add_argument("--stop-timeout", type=seconds(0), default=None, metavar="SECONDS")
    _common(p)
    p.set_defaults(func=wrap(_action("shutdown")))
    p = sub.add_parser("history", help="recent events the coordinator still holds")
    p.add_argument("--agent", default=None, help="only this agent's (or worker's) events")
    p.add_argument("--since", type=seconds(0), default=None, metavar="T",
                   help="only events of the last T seconds (or since the Unix time T)")
    p.add_argument("--limit", type=count(1), default=1000, help="at most this many (the latest)")
    _common(p)
    p.set_defaults(func=wrap(_history))
    p = sub.add_parser("top", help="a live view of status, workers and agents")
    p.add_argument("--interval", type=seconds(0, inclusive=False), default=2.0, metavar="SECONDS")
    p.add_argument("--rows", type=count(1), default=40, help="agents shown")
    p.add_argument("--count", type=count(0), default=0, metavar="N", help="exit after N refreshes (0: until Ctrl-C)")
    _common(p, json_flag=False)
    p.set_defaults(func=wrap(_top))
