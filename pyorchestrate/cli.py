"""``pyorchestrate``: command-line tools for a running cluster."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import __version__, cli_control
from .client import ControlClient, ControlError, resolve_address
from .keys import ROLES, KeyDir, KeysError
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
    subscriber = _subscriber(args, [topic], timeout=None if args.follow else 1.0, history=True)
    if subscriber is None:
        return 2
    with subscriber:
        if not subscriber.wait_connected(timeout=5.0):
            why = subscriber.handshake_failure()
            if why:
                print(f"pyorchestrate logs: {why}{_control_port_hint(args)}", file=sys.stderr)
                return 1
            print(f"pyorchestrate logs: no coordinator answered at {args.address} (is it running, and is this its "
                  "events address?)", file=sys.stderr)
            return 3
        printed = 0
        try:
            for ev in subscriber:
                if args.agent and ev.get("agent_name") != args.agent:
                    continue  # a prefix match on another agent (e.g. "api" vs "api2")
                print(json.dumps(ev, default=str, sort_keys=True) if args.json else format_log(ev), flush=True)
                printed += 1
        except (KeyboardInterrupt, BrokenPipeError):
            return 0
        if args.agent and not printed and not args.follow:
            print(f"pyorchestrate logs: no log lines of {args.agent!r} in the coordinator's history (is the name "
                  "right? `pyorchestrate ps` lists the agents)", file=sys.stderr)
            return 1
    return 0


def _events(args: argparse.Namespace) -> int:
    if not _address_ok(args):
        return 2
    topics = args.topic or [""]
    seen = 0
    subscriber = _subscriber(args, topics, history=args.history)  # _until_idle applies --timeout
    if subscriber is None:
        return 2
    with subscriber:
        if subscriber.wait_connected(timeout=min(args.timeout or 3.0, 3.0)):
            print(f"connected to {args.address}", file=sys.stderr, flush=True)
        elif subscriber.handshake_failure():
            # keys do not match: waiting would not help
            print(f"pyorchestrate events: {subscriber.handshake_failure()}{_control_port_hint(args)}", file=sys.stderr,
                  flush=True)
            return 1
        else:
            print(f"no coordinator heartbeat from {args.address} yet; waiting", file=sys.stderr, flush=True)
        try:
            # heartbeats (one per agent and worker a second) drown everything else: shown only
            # when asked for by name (--topic AGENT_HEARTBEAT) or with --heartbeats
            beats = args.heartbeats or any("HEARTBEAT" in t for t in topics)
            shown = (lambda ev: True) if beats else (lambda ev: not ev.event.endswith("_HEARTBEAT"))
            def connected() -> None:
                print(f"connected to {args.address}", file=sys.stderr, flush=True)

            for ev in _until_idle(subscriber, args.timeout, shown, None if subscriber.connected else connected):
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
        except _Refused as exc:
            print(f"pyorchestrate events: {exc}{_control_port_hint(args)}", file=sys.stderr, flush=True)
            return 1
        if not subscriber.connected and not seen:
            print(f"pyorchestrate events: no coordinator answered at {args.address} within {args.timeout:g} s "
                  f"(is it running, and is this its events address?)", file=sys.stderr, flush=True)
            return 3
    return 0


def _control_port_hint(args: argparse.Namespace) -> str:
    """If ``args.address`` is a coordinator's control port, where its events port is (asked there)."""
    try:
        with ControlClient(args.address, keys=args.keys, key_name=args.key_name, timeout=1.0,
                           roles=("reader", "admin", "worker")) as client:
            events = client.status()["addresses"]["events"]
    except (ControlError, KeysError, KeyError, TypeError):
        return ""
    return f"\n{args.address} is the coordinator's control port; its events port is {events}"


class _Refused(Exception):
    """The coordinator and this client do not agree on keys: waiting will not help."""


def _until_idle(subscriber: EventSubscriber, timeout: float | None, shown: Any = None, on_connect: Any = None):
    """Events (those ``shown`` keeps) until ``timeout`` seconds pass without one (None: for
    ever).  A coordinator that appears later and refuses our keys ends it at once (raises
    :class:`_Refused`); one that appears later and accepts calls ``on_connect`` once."""
    idle_since = time.monotonic()
    while True:
        ev = subscriber.recv(timeout=0.5)
        if on_connect is not None and subscriber.connected:
            on_connect()
            on_connect = None
        if ev is not None and (shown is None or shown(ev)):
            idle_since = time.monotonic()
            yield ev
            continue
        if not subscriber.connected and subscriber.handshake_failure():
            raise _Refused(subscriber.handshake_failure())
        if timeout is not None and time.monotonic() - idle_since >= timeout:
            return


def _subscriber(args: argparse.Namespace, topics: list[str], **options: Any) -> EventSubscriber | None:
    try:
        return EventSubscriber(args.address, topics, keys=args.keys, key_name=args.key_name, **options)
    except (KeysError, ValueError) as exc:  # (ValueError: topics the events port would refuse)
        print(f"pyorchestrate {args.command}: {exc}", file=sys.stderr)
        return None


def _keydir(args: argparse.Namespace) -> KeyDir:
    keydir = KeyDir.from_option(args.keys)
    if keydir is None:
        raise KeysError("which key directory? pass --keys DIR or set PYORCHESTRATE_KEYS")
    return keydir


def _keys(args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            keydir = KeyDir(args.dir)
            made = keydir.init()
            print(f"made {', '.join(made)} keys in {keydir.path}\n"
                  f"try it on this host:  Orchestrator.Config(keys={str(keydir.path)!r}, ...)\n"
                  f"                      pyorchestrate-worker --keys {keydir.path} --coordinator tcp://HOST:PORT\n"
                  f"                      pyorchestrate events --keys {keydir.path} --address tcp://HOST:PORT+1\n"
                  f"another host:         pyorchestrate keys export worker NAME OUTDIR --keys {keydir.path}")
        elif args.action == "add":
            path = _keydir(args).add(args.role, args.name)
            print(f"{args.role} key {args.name!r} admitted; its secret is {path}\n"
                  f"hand it to its host with: pyorchestrate keys export {args.role} {args.name} OUTDIR")
        elif args.action == "list":
            rows = _keydir(args).listing()
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print(f"{'NAME':<20} {'ROLE':<7} {'STATE':<8} {'SECRET HERE':<11} PUBLIC KEY")
                for row in rows:
                    print(f"{row['name']:<20} {row['role']:<7} {row['state']:<8} "
                          f"{'yes' if row['secret_here'] else 'no':<11} {row['public_key']}")
        elif args.action == "revoke":
            role = _keydir(args).revoke(args.name)
            print(f"{role} key {args.name!r} revoked: new connections with it are refused now"
                  + (", and a worker connected with it is told to go" if role == "worker" else ""))
        elif args.action == "export":
            written = _keydir(args).export(args.role, args.name, args.out)
            print("wrote " + ", ".join(str(p) for p in written) +
                  f"\non that host: --keys {args.out} (copy the directory there; keep it mode 700)")
    except KeysError as exc:
        print(f"pyorchestrate keys {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="key directory (default: $PYORCHESTRATE_KEYS; none: no keys)")
    p.add_argument("--key-name", metavar="NAME", default=None,
                   help="which key in DIR, if it holds several of a role (default: $PYORCHESTRATE_KEY_NAME)")


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
    ev.add_argument("--count", type=cli_control.count(0), default=0, metavar="N", help="exit after N events")
    ev.add_argument("--timeout", type=cli_control.seconds(0, inclusive=False, forever=True), default=None,
                    metavar="SECONDS",
                    help="exit after SECONDS without an event")
    ev.add_argument("--exit-on-shutdown", action="store_true", help="exit when the coordinator shuts down")
    ev.add_argument("--history", action="store_true", help="start with the recent events the coordinator remembers")
    ev.add_argument("--heartbeats", action="store_true",
                    help="show AGENT_HEARTBEAT / WORKER_HEARTBEAT events too (shown anyway when a --topic names them)")
    _key_options(ev)
    ev.set_defaults(func=_events)
    lg = sub.add_parser("logs", help="print agents' log lines", description="Print the log lines of one agent "
                        "(or all) on a cluster: the recent ones the coordinator remembers, then, with --follow, "
                        "new ones as they come.")
    lg.add_argument("agent", nargs="?", help="the agent's name (default: every agent)")
    lg.add_argument("--address", required=True, metavar="tcp://HOST:PORT", help="the coordinator's events address")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    lg.add_argument("--json", action="store_true", help="one JSON object per line")
    _key_options(lg)
    lg.set_defaults(func=_logs)
    ks = sub.add_parser("keys", help="make, list, revoke and hand out CurveZMQ keys",
                        description="Keys decide who may connect to a coordinator and as what: worker keys may "
                                    "register and publish, reader keys may subscribe and query, admin keys may also act.")
    kact = ks.add_subparsers(dest="action", required=True)
    k = kact.add_parser("init", help="make DIR: the coordinator's key pair and a first worker, reader and admin key")
    k.add_argument("dir", metavar="DIR")
    k = kact.add_parser("add", help="make and admit a new client key (no coordinator restart)")
    k.add_argument("role", choices=ROLES)
    k.add_argument("name")
    k.add_argument("--keys", metavar="DIR", default=None, help="key directory (default: $PYORCHESTRATE_KEYS)")
    k = kact.add_parser("list", help="every key: name, role, admitted or revoked")
    k.add_argument("--keys", metavar="DIR", default=None, help="key directory (default: $PYORCHESTRATE_KEYS)")
    k.add_argument("--json", action="store_true")
    k = kact.add_parser("revoke", help="refuse a key from now on (a connected worker is told to go)")
    k.add_argument("name")
    k.add_argument("--keys", metavar="DIR", default=None, help="key directory (default: $PYORCHESTRATE_KEYS)")
    k = kact.add_parser("export", help="write what one client host needs into OUT: the coordinator's public key "
                                       "and that client's own key pair")
    k.add_argument("role", choices=ROLES)
    k.add_argument("name")
    k.add_argument("out", metavar="OUT")
    k.add_argument("--keys", metavar="DIR", default=None, help="key directory (default: $PYORCHESTRATE_KEYS)")
    ks.set_defaults(func=_keys)
    cli_control.add_parsers(sub)
    db = sub.add_parser("dashboard", help="serve a live web page of the cluster (needs pyorchestrate[dashboard])",
                        description="A web dashboard in its own process: workers, agents, a live event and log "
                                    "stream, start/stop/restart/drain buttons (admin key or no keys), /api/... JSON "
                                    "and Prometheus /metrics.  Every page needs the token it prints.")
    db.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                    help="the coordinator's control address (default: $PYORCHESTRATE_ADDRESS)")
    db.add_argument("--listen", default="127.0.0.1:8265", metavar="HOST:PORT",
                    help="where the page is served (default 127.0.0.1:8265; port 0: any free one)")
    db.add_argument("--token", default=None, help="the sign-in token (default: $PYORCHESTRATE_DASHBOARD_TOKEN, "
                                                  "else a random one, printed)")
    db.add_argument("--interval", type=cli_control.seconds(0, inclusive=False), default=1.0, metavar="SECONDS",
                    help="how often the coordinator is asked")
    _key_options(db)
    db.set_defaults(func=_dashboard)
    return p


def _dashboard(args: argparse.Namespace) -> int:
    try:
        address = resolve_address(args.address)
        from . import dashboard
        import starlette, uvicorn, prometheus_client  # noqa: F401  (said clearly here, not mid-start)
    except ControlError as exc:
        print(f"pyorchestrate dashboard: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"pyorchestrate dashboard: {exc.name} is missing: install the dashboard extra, "
              "pip install 'pyorchestrate[dashboard]' (from a clone: pip install -e '.[dashboard]')", file=sys.stderr)
        return 2
    try:
        dashboard.serve(address, args.listen, token=args.token, keys=args.keys, key_name=args.key_name,
                        interval=args.interval)
    except (KeysError, OSError, ValueError) as exc:
        print(f"pyorchestrate dashboard: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
