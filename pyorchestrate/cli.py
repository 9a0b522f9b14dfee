"""``pyorchestrate``: command-line tools for a running cluster."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import __version__
from .sockets import AddressError, parse_tcp
from .subscriber import Event, EventSubscriber

_SKIP = {"event", "event_date", "event_time", "publisher", "incarnation", "agent_name", "traceback"}


def format_event(ev: Event) -> str:
    """One human-readable line per event."""
    extras = " ".join(f"{k}={v}" for k, v in ev.items() if k not in _SKIP and v not in (None, "", [], {}))
    line = f"{ev.get('event_time', '--:--:--')} {ev.event:<22} {ev.subject:<20} {extras}".rstrip()
    if ev.get("traceback"):
        line += "\n" + str(ev["traceback"]).rstrip()
    return line


def _address_ok(args: argparse.Namespace) -> bool:
    try:
        parse_tcp(args.address)
    except AddressError as exc:
        print(f"pyorchestrate {args.command}: {exc}", file=sys.stderr)
        return False
    return True


def format_log(ev: Event) -> str:
    return f"{ev.get('event_time', '')} {ev.get('level', 'INFO'):<8} {ev.subject}@{ev.get('worker', '?')}: {ev.get('message', '')}"


def _logs(args: argparse.Namespace) -> int:
    if not _address_ok(args):
        return 2
    topic = f"AGENT_LOG.{args.agent}" if args.agent else "AGENT_LOG."
    # without --follow: what the coordinator remembers, plus whatever arrives until a quiet second
    with EventSubscriber(args.address, [topic], timeout=None if args.follow else 1.0, history=True) as subscriber:
        if not subscriber.wait_connected(timeout=5.0):
            print(f"pyorchestrate logs: no coordinator answered at {args.address}", file=sys.stderr)
            return 1
        try:
            for ev in subscriber:
                if args.agent and ev.get("agent_name") != args.agent:
                    continue  # a prefix match on another agent (e.g. "api" vs "api2")
                print(json.dumps(ev, default=str, sort_keys=True) if args.json else format_log(ev), flush=True)
        except (KeyboardInterrupt, BrokenPipeError):
            pass
    return 0


def _events(args: argparse.Namespace) -> int:
    if not _address_ok(args):
        return 2
    topics = args.topic or [""]
    seen = 0
    with EventSubscriber(args.address, topics, timeout=args.timeout, history=args.history) as subscriber:
        if subscriber.wait_connected(timeout=min(args.timeout or 3.0, 3.0)):
            print(f"connected to {args.address}", file=sys.stderr, flush=True)
        else:
            print(f"no coordinator heartbeat from {args.address} yet; waiting", file=sys.stderr, flush=True)
        try:
            for ev in subscriber:
                out: Any = json.dumps(ev, default=str, sort_keys=True) if args.json else format_event(ev)
                print(out, flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
                if args.exit_on_shutdown and ev.event == "SHUTDOWN":
                    break
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            return 0
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyorchestrate", description="Tools for pyorchestrate clusters.")
    p.add_argument("--version", action="version", version=f"pyorchestrate {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("events", help="print a cluster's events as they arrive",
                        description="Subscribe to a coordinator's event bus and print every event.")
    ev.add_argument("--address", required=True, metavar="tcp://HOST:PORT",
                    help="the coordinator's events address (printed at its start; Orchestrator.Config.events_address)")
    ev.add_argument("--topic", action="append", metavar="PREFIX",
                    help="only events whose topic (EVENT.<agent or worker>) starts with PREFIX; repeatable")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.add_argument("--count", type=int, default=0, metavar="N", help="exit after N events")
    ev.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="exit after SECONDS without an event")
    ev.add_argument("--exit-on-shutdown", action="store_true", help="exit when the coordinator shuts down")
    ev.add_argument("--history", action="store_true", help="start with the recent events the coordinator remembers")
    ev.set_defaults(func=_events)
    lg = sub.add_parser("logs", help="print agents' log lines", description="Print the log lines of one agent "
                        "(or all) on a cluster: the recent ones the coordinator remembers, then, with --follow, "
                        "new ones as they come.")
    lg.add_argument("agent", nargs="?", help="the agent's name (default: every agent)")
    lg.add_argument("--address", required=True, metavar="tcp://HOST:PORT", help="the coordinator's events address")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    lg.add_argument("--json", action="store_true", help="one JSON object per line")
    lg.set_defaults(func=_logs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
