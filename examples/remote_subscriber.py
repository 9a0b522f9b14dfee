"""Watch a cluster from another process or host: print every event as it arrives.

    python examples/remote_subscriber.py tcp://COORDINATOR_HOST:5556 [--topic AGENT_] [--count N]

The address is the coordinator's events address (printed in its log at start).
"""

import argparse

from pyorchestrate import EventSubscriber


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("--topic", default="", help="only topics starting with this, e.g. AGENT_ERROR")
    parser.add_argument("--count", type=int, default=0, help="stop after this many events")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many quiet seconds")
    args = parser.parse_args()

    with EventSubscriber(args.address, topics=[args.topic], timeout=args.timeout) as events:
        if events.wait_connected(timeout=10):
            print("connected", flush=True)
        for n, ev in enumerate(events, 1):
            where = f" on {ev.worker}@{ev.host}" if ev.get("host") and ev.get("agent_name") else ""
            print(f"{ev.event_time} #{ev.seq} {ev.event} {ev.subject}{where}", flush=True)
            if args.count and n >= args.count:
                break
    print(f"lost: {events.lost}", flush=True)


if __name__ == "__main__":
    main()
