"""A DNS server for the multi-host tests: answers A queries for the names in the file ``names``
beside ``--ready`` (``NAME=IPV4`` lines, read at every query, so a test can move a name), and goes
silent (a resolver then waits for its timeout, as with a DNS server down or unreachable) while a
file named ``silent`` exists there.

    python fake_dns.py --bind 10.1.2.3 --ready DIR/ready

Queries for other names get NXDOMAIN, AAAA queries an empty answer.  Every query is logged (one
line each, ``<time> <name> <type> answered|silent``) to stdout.  Stdlib only: the wire format of
one question and one A answer is a few lines (RFC 1035 4.1).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

TYPE_A = 1


def _question(packet: bytes) -> tuple[str, int, int]:
    """The query's first name, its type and where the question ends."""
    labels, at = [], 12
    while packet[at]:
        length = packet[at]
        labels.append(packet[at + 1:at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    qtype = struct.unpack("!H", packet[at + 1:at + 3])[0]
    return ".".join(labels).lower(), qtype, at + 5


def answer(packet: bytes, names: dict[str, str]) -> bytes:
    """The reply to one query: an A record from ``names``, an empty answer, or NXDOMAIN."""
    name, qtype, end = _question(packet)
    ident = packet[:2]
    known = name in names
    rcode = 0 if known else 3
    records = b""
    if known and qtype == TYPE_A:
        # a pointer to the question's name (offset 12), type A, class IN, TTL 1 s, 4 bytes
        records = struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, 1, 4) + socket.inet_aton(names[name])
    flags = 0x8180 | rcode  # a response, recursion desired and available
    header = ident + struct.pack("!HHHHH", flags, 1, 1 if records else 0, 0, 0)
    return header + packet[12:end] + records


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--ready", required=True, help="a file written once listening")
    args = parser.parse_args()
    silent = os.path.join(os.path.dirname(args.ready), "silent")
    names_file = os.path.join(os.path.dirname(args.ready), "names")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, 53))
    with open(args.ready, "w") as f:
        f.write("ready\n")
    while True:
        packet, peer = sock.recvfrom(1500)
        try:
            name, qtype, _ = _question(packet)
        except (IndexError, struct.error):
            continue
        quiet = os.path.exists(silent)
        print(f"{time.time():.3f} {name} {qtype} {'silent' if quiet else 'answered'}", flush=True)
        if not quiet:
            with open(names_file) as f:
                names = dict(line.strip().lower().split("=", 1) for line in f if "=" in line)
            sock.sendto(answer(packet, names), peer)


if __name__ == "__main__":
    sys.exit(main())
