"""The wire format: every control message and bus event, built and parsed here and nowhere else.

A control frame is one msgpack map ``{"v": PROTOCOL_VERSION, "type": ..., <fields>}``.  A bus
event is two frames: the topic (``EVENT.<agent or worker>``, so subscribers can filter with
ZeroMQ's prefix match) and a msgpack map of the event's fields.

Everything arriving from the network goes through :func:`decode` or :func:`decode_event`, which
raise :class:`ProtocolError` for anything malformed; receive loops drop and count those.
"""

from __future__ import annotations

from operator import contains
from typing import Any

import msgpack

PROTOCOL_VERSION = 10  # 10: flow control both ways (flow.py; heartbeats and their echoes not numbered)
# 5: a worker process's secret token (register, bus frames); 6: pulse
# 9: a short run's STARTED and READY folded into its AGENT_TERMINATED ("folded": True) when all
#    went in one report (worker/fold.py)
# 8: starts (the agents placed on one worker in one pass, in one frame)
# 7: client requests on the control port (the CLI, the dashboard)
# 4: one bus outbox per worker (batches of many runs), beats frames, coordinator seq on every event

# Frames larger than this are refused by libzmq itself (ZMQ_MAXMSGSIZE); see sockets.py.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: the most bytes one agent's start (its pickled class, sent to a worker the first time, and its
#: config) or one payload for it (trigger, send) may take.  A worker's socket takes frames up to
#: DEFAULT_MAX_MESSAGE_SIZE, and one over it costs the worker its connection and everything on it:
#: 100 agents with a 1 MB config each, placed together, made one 100 MB starts frame, and the worker
#: was lost with all 100 agents, none of which had run
MAX_AGENT_BYTES = DEFAULT_MAX_MESSAGE_SIZE // 2
#: starts for one worker go in a frame of their own once the next would take them past this, so a
#: starts frame stays under max(STARTS_FRAME_BYTES, MAX_AGENT_BYTES) plus its fields
STARTS_FRAME_BYTES = DEFAULT_MAX_MESSAGE_SIZE // 4

# Field name -> accepted Python type(s), per message type.  Extra fields are allowed (newer peers
# may add some); missing or mistyped required ones are a ProtocolError.
_STR = str
_INT = int
_NUM = (int, float)
_BYTES = bytes
_DICT = dict
_LIST = list


class Optional:
    """A field a message may leave out; :func:`decode` fills in ``default`` (a fresh copy for
    lists and dicts), so handlers never guess with ``.get()``."""

    def __init__(self, kind: Any, default: Any) -> None:
        self.kind = kind
        self.default = default


_MISSING = object()


class ListOf:
    """A list whose every item is a map checked against ``schema`` (one bad item: the whole
    message is dropped; a peer that sends one bad item is not to be trusted with the rest)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        #: the fields and the exact classes each may have, if every field is of plain types
        #: (AGENT_EVENT's and START_ITEM's are): an item with all of them, each of one of those
        #: exact classes, passes a quick look (see _check_value)
        self.exact: tuple[tuple[str, frozenset[type]], ...] | None = None
        if isinstance(schema, dict) and schema:
            fields = tuple((name, classes) for name, kind in schema.items()
                           if (classes := _exact_classes(kind)) is not None)
            self.exact = fields if len(fields) == len(schema) else None
        # the same, as three tuples for a quick look at C speed (see _check_value)
        self.names = tuple(name for name, _ in self.exact or ())
        self.classes = tuple(classes for _, classes in self.exact or ())
        self.missing = (_MISSING,) * len(self.names)


def _exact_classes(kind: Any) -> frozenset[type] | None:
    """The classes a value of ``kind`` may have for the quick look: a plain type or a tuple of
    them (an optional field's too: only a present one passes the quick look, so a missing one
    still gets its default from the full check).  Exact classes: a bool is never taken for an
    int there, as the full check never takes it for one."""
    if isinstance(kind, Optional):
        kind = kind.kind
    kinds = kind if kind.__class__ is tuple else (kind,)
    if all(k.__class__ is type and k is not object for k in kinds):
        return frozenset(kinds)
    return None


class MapOf:
    """A map of strings to values of ``kind``."""

    def __init__(self, kind: Any) -> None:
        self.kind = kind


# One agent event reported by a worker (inside agent_events and register).
AGENT_EVENT: dict[str, Any] = {"agent": _STR, "run": _STR, "epoch": _INT, "event": _STR, "fields": _DICT}
#: the fields of an agent's AGENT_ERROR report whose types the coordinator relies on: it logs the
#: error's message and traceback, and fails the run unless the error is recoverable.  A report with
#: one of another type is no worker's of ours, and its frame is dropped: an AGENT_ERROR whose
#: traceback was not a string ended the coordinator's loop, and the whole cluster with it (one
#: frame, found by tests/test_hostile_peers.py).  Only errors: a run's other reports carry nothing
#: the coordinator reads unchecked (it says itself whether an end was ok), and errors are rare,
#: where a check of every end cost each report's decoding a fifth more.  Other fields go on as they
#: came: the bus carries them as given
ERROR_FIELDS: dict[str, type] = {"error_message": str, "traceback": str, "recoverable": bool}
# for the quick look in _check_errors: each field's name, and the classes it may have (None too:
# what a report leaves out reads as None, and the coordinator takes a None as it takes no value)
_ERROR_NAMES = tuple(ERROR_FIELDS)
_ERROR_CLASSES = tuple(frozenset({kind, type(None)}) for kind in ERROR_FIELDS.values())
# One agent copy a worker runs (inside register): enough to fence it, reconnect it or adopt it.
RUN_REPORT: dict[str, Any] = {"agent": _STR, "run": _STR, "epoch": _INT, "state": _STR,
                              "coordinator": _STR, "definition": _STR,
                              # asked to stop (its lease ran out, the orphan timeout, a coordinator's
                              # stop) and ending: never adopted, and no sign it is its agent's only copy
                              "stopping": Optional(bool, False)}
# One agent a coordinator tells a worker to start (inside starts).
START_ITEM: dict[str, Any] = {
    "agent": _STR,
    "run": _STR,
    "epoch": _INT,
    "class_id": _STR,
    "class_blob": (bytes, type(None)),
    "config": _BYTES,
    "mode": _STR,
    "stop_timeout": Optional(_NUM, 10.0),
    "hold": Optional(bool, False),
    "keep": Optional(bool, False),  # keep running while the coordinator is unreachable
    "definition": Optional(_STR, ""),
}
# One frame of reports a worker sent that the coordinator had not said it read (inside register):
# its number on the connection it went on, and its reports.
UNREAD_FRAME: dict[str, Any] = {"n": _INT, "events": ListOf(AGENT_EVENT)}
# One copy a coordinator tells a worker to stop (inside welcome).
STOP_ITEM: dict[str, Any] = {"agent": _STR, "run": _STR, "epoch": _INT, "timeout": _NUM}

# In every control frame: ``n`` numbers the frames one side sends on one connection (1, 2, ...;
# 0 = not numbered).  A gap means the transport lost frames (a reset connection): the worker then
# registers again on a new connection, which sets every count right (see core.py).
ENVELOPE: dict[str, Any] = {"n": Optional(_INT, 0)}

MESSAGES: dict[str, dict[str, Any]] = {
    # worker -> coordinator
    "register": {
        "name": _STR,
        "incarnation": _STR,
        "host": _STR,
        "pid": _INT,
        "labels": MapOf(_STR),
        "capacity": _INT,
        "versions": MapOf(_STR),
        "agents": ListOf(RUN_REPORT),
        # what happened to agents while the worker had no coordinator: delivered, never dropped
        "events": Optional(ListOf(AGENT_EVENT), []),
        "bus_seq": Optional(_INT, 0),
        "drained_by": Optional(_LIST, []),
        # a secret the worker process made at start, never published: a register naming its
        # incarnation must show it (the incarnation is on the bus), and so must its bus frames
        "token": _STR,
        "t": Optional(_NUM, 0.0),  # the worker's clock when it sent this: echoed back (its lease)
        # the last coordinator frame number it handled on this connection: a start numbered
        # higher is still on its way, not lost
        "seen": Optional(_INT, 0),
        # the coordinator session whose welcome it had read when it wrote this (whose frames
        # ``seen`` counts); None: not said (an older worker)
        "seen_session": Optional(_STR, None),
        # its --orphan-timeout (0: it never stops the agents it keeps); None: not said (an older
        # worker: the default is assumed).  How long a kept copy can outlive its worker's silence
        "orphan_timeout": Optional(_NUM, None),
        # which connection of this worker process it is (1, 2, ...): a register that arrives from
        # an older one after a newer one spoke is a stale snapshot and is ignored
        "conn": Optional(_INT, 0),
        # the coordinator (name and session) this worker served last, unless that one said it
        # finished (a drain does not say so): a coordinator of that name started anew learns here
        # that its predecessor may have crashed, where no run marker told it (predecessor.py).
        # "" both: it finished, or none yet (and an older worker)
        "left_by": Optional(_STR, ""),
        "left_session": Optional(_STR, ""),
        # the frames of reports it sent on connection ``unread_conn`` (its last welcomed one, or
        # this one) that the coordinator has not said it read: lost on the way, or read late from a
        # connection that is no longer the worker's.  The coordinator takes those it never read,
        # before ``events`` (registration.py)
        "unread": Optional(ListOf(UNREAD_FRAME), []),
        "unread_conn": Optional(_INT, 0),
    },
    # running: how many copies the worker runs (-1: not said); a persistent difference from what
    # the coordinator believes makes it ask for a full registration (lost messages are repaired)
    # read: the number of the last coordinator frame the worker had read (-1: not said)
    # leaving (optional both ways): it shuts down and stops its copies (their ends say
    # worker_leaving): place nothing new on it
    # dropped (optional both ways): what the worker dropped so far, by reason (its log says it too)
    # sent (optional both ways; -1: not said): the number of the last numbered frame the worker
    # sent before this heartbeat, which is not numbered (flow.py); waiting (optional both ways):
    # it holds reports back for room, so its count may be ahead of what it reported
    # lease_age (optional both ways; negative: not said): how old its lease was as it sent this (the
    # latest echo's stamp, on its clock): late, the coordinator sends it less at a time (flow.py)
    "heartbeat": {"t": Optional(_NUM, 0.0), "running": Optional(_INT, -1), "read": Optional(_INT, -1),
                  "leaving": Optional(bool, False), "dropped": Optional(MapOf(_INT), {}),
                  "sent": Optional(_INT, -1), "waiting": Optional(bool, False),
                  "lease_age": Optional(_NUM, -1.0)},
    # what happened to agents since the last one (a thread agent's STARTED, READY and TERMINATED
    # often travel together)
    "agent_events": {"events": ListOf(AGENT_EVENT)},
    # the number of the last coordinator frame the worker has read, said between heartbeats while
    # frames pour in: what it has read makes room for what waits to be sent to it (flow.py)
    "read": {"read": _INT},
    "goodbye": {},
    # the worker closes this connection on purpose and opens another: its close is no death
    # exiting (optional both ways): the worker shuts down, and copies that ignored their stop end
    # with its process
    "closing": {"exiting": Optional(bool, False)},
    # from the worker's pulse process (worker/pulse.py), on a connection of its own: the worker's
    # process is alive and not stopped, though its loop may be starved of the GIL
    "pulse": {"name": _STR, "token": _STR, "t": _NUM},
    # to the coordinator's pulse process (coordinator_pulse.py), on its own port: the loop's echoes
    # are late; is it stalled?  (``t``: the worker's clock, echoed back)
    "coordinator_pulse": {"t": _NUM},
    # coordinator -> worker
    "welcome": {
        "coordinator": _STR,
        "session": _STR,
        "heartbeat_interval": _NUM,
        "heartbeat_liveness": _INT,
        "bus_port": _INT,
        "events_port": Optional((int, type(None)), None),
        "stop": ListOf(STOP_ITEM),
        "warnings": _LIST,
        "echo": Optional(_NUM, 0.0),
        # what its sockets take (optional both ways): the worker keeps each bus event to a quarter
        "max_message_size": Optional(_INT, DEFAULT_MAX_MESSAGE_SIZE),
        # the port of the coordinator's pulse process (optional both ways; 0: none)
        "pulse_port": Optional(_INT, 0),
    },
    # stop (optional both ways): copies the refused worker runs that no coordinator can manage now
    "refused": {"reason": _STR, "retry": Optional(bool, False), "stop": Optional(ListOf(STOP_ITEM), [])},
    "reregister": {},
    # a piece of a big starts or deliver frame (flow.py): the pieces of one frame are numbered in a
    # row, and the frame they make takes the last one's number
    "part": {"data": _BYTES, "last": bool},
    # the agents placed on one worker in one pass, in one frame (one send and one decode, not
    # one per agent: a burst of 10,000 starts is 40 frames)
    "starts": {"agents": ListOf(START_ITEM)},
    "stop": {"agent": _STR, "run": _STR, "epoch": _INT, "timeout": _NUM},
    "deliver": {"agent": _STR, "run": _STR, "epoch": _INT, "kind": _STR, "payload": object},
    # sent (optional both ways; -1: not said): the number of the last numbered frame sent before
    # this reply on its connection; a worker that has not read that far lost frames (flow.py)
    # read (optional both ways; -1: not said): the number of the last worker frame read (flow.py)
    "heartbeat_reply": {"echo": _NUM, "sent": Optional(_INT, -1), "read": Optional(_INT, -1)},
    "pulse_reply": {"echo": _NUM},
    # the coordinator's loop is stalled, its process alive and not stopped (coordinator_pulse.py);
    # session: the coordinator's, as in its welcome (a worker takes only its own coordinator's word)
    "coordinator_pulse_reply": {"echo": _NUM, "session": _STR},
    "release": {"drain": Optional(bool, False)},
    # client (pyorchestrate status/ps/stop/..., the dashboard) -> coordinator, on the control port;
    # ``op`` is one of control.OPS, ``args`` are checked there
    "request": {"id": _STR, "op": _STR, "args": Optional(_DICT, {})},
    # coordinator -> client
    "reply": {"id": _STR, "ok": bool, "result": Optional(object, None), "error": Optional(_STR, "")},
}


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol version."""


def cut_text(text: Any, most: int) -> Any:
    """``text`` if it is at most ``most`` characters, else its head and tail around a note of what
    was cut: text of an agent's making (an error, a log line) must fit in a frame with room to
    spare, since a frame over the receiver's max_message_size costs the connection."""
    if not isinstance(text, str) or len(text) <= most:
        return text
    keep = most // 2
    return f"{text[:keep]}\n[... {len(text) - 2 * keep:,} characters cut ...]\n{text[-keep:]}"


def pack_plain(value: Any, what: str) -> bytes:
    """msgpack ``value`` (user data bound for the wire), or raise a TypeError that says what could
    not be sent (``what``) and what can."""
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} ({exc}); use numbers, strings, bytes, lists and dicts") from None


def encode(type_: str, **fields: Any) -> bytes:
    """Build one control frame.  Raises ``KeyError`` for an unknown type (a bug, not input)."""
    schema = MESSAGES[type_]
    missing = [name for name, kind in schema.items() if name not in fields and not isinstance(kind, Optional)]
    if missing:
        raise TypeError(f"message {type_!r} needs fields {missing}")
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": type_, **fields}, use_bin_type=True)


def _unpack(frame: bytes, max_size: int) -> Any:
    if len(frame) > max_size:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_size}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not msgpack: {type(exc).__name__}: {exc}") from None


def peek_version(frame: bytes) -> tuple[Any, Any]:
    """Return ``(v, type)`` of a frame without validating the rest (for refusing old peers)."""
    message = _unpack(frame, DEFAULT_MAX_MESSAGE_SIZE)
    if not isinstance(message, dict):
        raise ProtocolError("message is not a map")
    return message.get("v"), message.get("type")


def decode(frame: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """Parse and validate one control frame; raise :class:`ProtocolError` if it is not valid."""
    message = _unpack(frame, max_size)
    if not isinstance(message, dict):
        raise ProtocolError("message is not a map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    type_ = message.get("type")
    schema = MESSAGES.get(type_) if isinstance(type_, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {type_!r}")
    _check(type_, schema, message)
    if type_ in _REPORTING:
        _check_errors(type_, message)
    # the envelope's one field, looked at inline: what msgpack decodes is an exact int or absent
    # (a second _check pass was 13 of the lines each decode ran, two decodes a launch)
    if message.setdefault("n", 0).__class__ is not int:
        _check("envelope", ENVELOPE, message)  # says what is wrong (a bool, a str...)
    return message


#: the messages that carry agent reports (AGENT_EVENT items): their errors' fields are checked too
_REPORTING = frozenset({"agent_events", "register"})


def _check_errors(what: str, message: dict[str, Any]) -> None:
    """The fields of every AGENT_ERROR ``message`` carries, against ERROR_FIELDS (exact classes,
    as msgpack decodes them: a bool is no int here)."""
    batches = [message["events"]]
    if what == "register":
        batches += [frame["events"] for frame in message["unread"]]
    for items in batches:
        for item in items:
            if item["event"] != "AGENT_ERROR":
                continue
            get = item["fields"].get
            # one expression of C calls, as ListOf's quick look
            if not all(map(contains, _ERROR_CLASSES, map(type, map(get, _ERROR_NAMES)))):
                name = next(name for name, classes in zip(_ERROR_NAMES, _ERROR_CLASSES)
                            if type(get(name)) not in classes)
                raise ProtocolError(f"{what}: AGENT_ERROR of {item['agent']!r} has {name!r} of type "
                                    f"{type(get(name)).__name__}, expected {ERROR_FIELDS[name].__name__}")


def check_fields(what: str, schema: dict[str, Any], fields: dict[str, Any]) -> None:
    """Check ``fields`` against a schema like :data:`MESSAGES`' (filling in optional defaults);
    raise :class:`ProtocolError` saying what is wrong."""
    _check(what, schema, fields)


def _check(what: str, schema: dict[str, Any], message: dict[str, Any]) -> None:
    for name, expected in schema.items():
        if name not in message:
            if isinstance(expected, Optional):
                default = expected.default
                message[name] = type(default)(default) if isinstance(default, (list, dict)) else default
                continue
            raise ProtocolError(f"{what}: missing field {name!r}")
        value = message[name]
        if expected.__class__ is type or expected.__class__ is tuple:
            # a plain type, the common case, checked inline: the error text is built only for an
            # error (building it for every field was most of decoding a worker's report)
            if not isinstance(value, expected) or (value.__class__ is bool and expected is not bool):
                raise ProtocolError(f"{what}: field {name!r} has type {type(value).__name__}")
            if value.__class__ is float and value - value != 0 and expected is not object:
                # NaN or infinity in a setting or a time: every comparison with a deadline built
                # from it goes one way (a NaN orphan_timeout made a lost worker's kept copy count
                # as stopped at once).  ``object`` is user data (a payload): any float goes
                raise ProtocolError(f"{what}: field {name!r} is not a finite number")
            continue
        _check_value(f"{what}: field {name!r}", expected, value)


def _check_value(what: str, expected: Any, value: Any) -> None:
    if isinstance(expected, Optional):
        expected = expected.kind
    if isinstance(expected, ListOf):
        if not isinstance(value, list):
            raise ProtocolError(f"{what} has type {type(value).__name__}, expected a list")
        exact, names, classes, missing = expected.exact, expected.names, expected.classes, expected.missing
        for item in value:
            # what msgpack decodes is of the exact builtin types: a quick look accepts those (a
            # third of decoding a worker's report); anything else, and every error, takes the
            # full check below, which accepts exactly what it did before.  The look is one
            # expression of C calls: each field's class in its set (a Python loop over a start's
            # eleven fields was 25 of the 430 lines a worker runs per launch)
            if exact is not None and item.__class__ is dict and all(
                    map(contains, classes, map(type, map(item.get, names, missing)))):
                continue
            if not isinstance(item, dict):
                raise ProtocolError(f"{what}: an item is not a map")
            _check(what + " item", expected.schema, item)
        return
    if isinstance(expected, MapOf):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{what} is not a map with string keys")
        for item in value.values():
            _check_value(what, expected.kind, item)
        return
    # bool is an int subclass; never accept it where a number is meant
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ProtocolError(f"{what} has type {type(value).__name__}")
    if value.__class__ is float and value - value != 0 and expected is not object:  # NaN or infinity (see _check)
        raise ProtocolError(f"{what} is not a finite number")


def agent_event(agent: str, run: str, epoch: int, event: str, fields: dict[str, Any]) -> dict[str, Any]:
    """One item of an ``agent_events`` message."""
    return {"agent": agent, "run": run, "epoch": epoch, "event": event, "fields": fields}


# ---------------------------------------------------------------------------- bus events

# Fields every bus event carries (checked on decode).
EVENT_FIELDS: dict[str, Any] = {
    "event": _STR,
    "seq": _INT,
    "publisher": _STR,
    "incarnation": _STR,
    "event_date": _STR,
    "event_time": _STR,
}


def is_name(text: str) -> bool:
    """Is ``text`` a name an agent or a worker may have: printable characters without spaces?
    (Names are in every event's topic and every log line.)  split(): one C call, where a
    generator over the characters cost more than the rest of registering an agent."""
    return text.split() == [text] and text.isprintable()


def is_worker_name(text: str) -> bool:
    """Is ``text`` a name a worker may have: a name without "/"?  Its agents publish on the bus as
    "<worker>/<agent>" (an agent's name may hold "/"): all the logs and events of the agents of a
    worker named "rack1/w1" were dropped as another worker's."""
    return is_name(text) and "/" not in text


def event_topic(event: str, subject: str) -> str:
    """The bus topic of an event about ``subject`` (an agent or worker name)."""
    return f"{event}.{subject}"


def encode_event(topic: str, fields: dict[str, Any]) -> list[bytes]:
    """Build the two frames of one bus event."""
    return [topic.encode(), msgpack.packb(fields, use_bin_type=True)]


def decode_event(frames: list[bytes], max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """Parse and validate the frames of one bus event (a third frame, the coordinator's stamp,
    is read with :func:`decode_stamp`)."""
    if len(frames) not in (2, 3):
        raise ProtocolError(f"event has {len(frames)} frames, expected 2 or 3")
    try:
        topic = frames[0].decode()
    except UnicodeDecodeError:
        raise ProtocolError("event topic is not UTF-8") from None
    return decode_body(topic, frames[1], max_size)


def decode_body(topic: str, body: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> dict[str, Any]:
    """Parse and validate one event's body (its msgpack fields) published under ``topic``."""
    return check_event(topic, _unpack(body, max_size))


def check_event(topic: Any, fields: Any) -> dict[str, Any]:
    """Validate one event's topic and fields."""
    if not isinstance(topic, str):
        raise ProtocolError("event topic is not a string")
    if not isinstance(fields, dict):
        raise ProtocolError("event body is not a map")
    for name, expected in EVENT_FIELDS.items():
        value = fields.get(name)
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ProtocolError(f"event field {name!r} missing or mistyped")
    if not topic.startswith(fields["event"]):
        raise ProtocolError("event topic does not match its event name")
    return fields


BATCH_TOPIC = b"_BATCH"
HISTORY_TOPIC = "_HISTORY."


#: the longest subscription frame the coordinator's events port takes (bytes): libzmq closes the
#: connection of a subscriber that sends a longer one, which then connects again, subscribes again,
#: and so on.  Subscriptions are a prefix each, and history requests (one names every prefix): an
#: EventSubscriber of 90 topics with history never connected, and said nothing
SUBSCRIPTION_MAX = 4096
#: the longest topic a SUB may subscribe to there: ZMTP 3.1 sends a subscription as a command,
#: b"\x09SUBSCRIBE" and the topic, and the limit counts all of it (measured: a topic of 4,086
#: bytes is taken, one of 4,087 closes the connection)
TOPIC_MAX = SUBSCRIPTION_MAX - len(b"\x09SUBSCRIBE")


def history_request(nonce: str, prefixes: list[str]) -> str:
    """The subscription that asks the coordinator for recent history: a unique topic only this
    subscriber listens to, naming the prefixes it wants."""
    return HISTORY_TOPIC + nonce + "\n" + "\n".join(prefixes)


def parse_history_request(subscription: bytes) -> list[str] | None:
    """The prefixes a history subscription asks for, or None if it is not one."""
    try:
        text = subscription.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(HISTORY_TOPIC) or "\n" not in text:
        return None
    return text.split("\n")[1:]


def encode_batch(worker: str, token: str, wseq: int, items: list) -> list[bytes]:
    """The frames of one batch from a worker's bus outbox: ``items`` are ``(publisher,
    incarnation, topic, seq, body)`` of any of its agents' runs, each body already one event's
    msgpack fields, so the coordinator forwards it unchanged.  ``wseq`` numbers the worker's bus
    frames (a lost frame is a gap there).  ``token`` is the worker process's secret (sent in its
    register): the bus input cannot tell who connected, and this shows the frame is its own."""
    return [BATCH_TOPIC, msgpack.packb([worker, token, wseq, items], use_bin_type=True)]


def _check_worker_frame(frames: list[bytes], topic: bytes, what: str, max_size: int) -> list:
    if len(frames) != 2 or frames[0] != topic:
        raise ProtocolError(f"not a {what}")
    frame = _unpack(frames[1], max_size)
    if not (isinstance(frame, list) and len(frame) == 4 and isinstance(frame[0], str)
            and isinstance(frame[1], str) and type(frame[2]) is int and isinstance(frame[3], list)):
        raise ProtocolError(f"{what} is not [worker, token, wseq, items]")
    return frame


def decode_batch(frames: list[bytes], max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> tuple[str, str, int, list]:
    """Parse a batch (see :func:`encode_batch`): ``(worker, token, wseq, items)``.  The
    envelope is checked here, each body only where it is read (:func:`decode_body`); a malformed
    item makes the whole batch invalid."""
    batch = _check_worker_frame(frames, BATCH_TOPIC, "batch", max_size)
    for item in batch[3]:
        if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str) and isinstance(item[1], str)
                and isinstance(item[2], str) and item[2][:1] != "_" and type(item[3]) is int
                and isinstance(item[4], bytes)):
            raise ProtocolError("batch item is not [publisher, incarnation, topic, seq, body]")
    return batch[0], batch[1], batch[2], batch[3]


BEATS_TOPIC = b"_BEATS"


def encode_beats(worker: str, token: str, wseq: int, beats: list) -> list[bytes]:
    """One frame for every running agent of a worker, once per heartbeat interval: ``beats`` are
    ``(agent, run tag, last bus seq of that run)``.  The seqs let the coordinator notice a lost
    tail of an agent's stream without waiting for the agent to end."""
    return [BEATS_TOPIC, msgpack.packb([worker, token, wseq, beats], use_bin_type=True)]


def decode_beats(frames: list[bytes], max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> tuple[str, str, int, list]:
    frame = _check_worker_frame(frames, BEATS_TOPIC, "beats frame", max_size)
    for beat in frame[3]:
        if not (isinstance(beat, list) and len(beat) == 3 and isinstance(beat[0], str) and isinstance(beat[1], str)
                and type(beat[2]) is int):
            raise ProtocolError("beat is not [agent, run, seq]")
    return frame[0], frame[1], frame[2], frame[3]


# ---------------------------------------------------------------- the coordinator's seq on events
#
# Everything the coordinator puts on its XPUB carries a third frame: [session, seq, numbered,
# started].  ``seq`` numbers the events it publishes (its own and those it forwards), one stream
# per coordinator run; unnumbered ones (heartbeats) carry the last seq, so a lost tail shows.
# ``started`` is the run's wall-clock start: a subscriber up before it wants the run from seq 1.

def encode_stamp(session: str, seq: int, numbered: bool, started: float) -> bytes:
    return msgpack.packb([session, seq, numbered, started], use_bin_type=True)


def stamp_encoder(session: str, started: float) -> Any:
    """A fast :func:`encode_stamp` for one coordinator run: the same bytes, with only the seq
    packed per event (the rest is fixed for the run)."""
    head = b"\x94" + msgpack.packb(session, use_bin_type=True)  # a 4-element array, then session
    tails = {True: b"\xc3" + msgpack.packb(started), False: b"\xc2" + msgpack.packb(started)}
    pack = msgpack.Packer(use_bin_type=True).pack

    def encode(seq: int, numbered: bool) -> bytes:
        return head + pack(seq) + tails[numbered]
    return encode


def decode_stamp(frame: bytes) -> tuple[str, int, bool, float]:
    stamp_ = _unpack(frame, 1024)
    if not (isinstance(stamp_, list) and len(stamp_) == 4 and isinstance(stamp_[0], str) and type(stamp_[1]) is int
            and isinstance(stamp_[2], bool) and isinstance(stamp_[3], (int, float))):
        raise ProtocolError("event stamp is not [session, seq, numbered, started]")
    return stamp_[0], stamp_[1], stamp_[2], float(stamp_[3])


RANGE_TOPIC = "_RANGE."
HELLO_TOPIC = "_HELLO."


def hello_request(nonce: str) -> str:
    """The subscription that asks the coordinator to say it hears this subscriber: its answer
    (a bus heartbeat under this unique topic) comes through the same connection after every
    subscription made before it, so from then on nothing published under those is missed."""
    return HELLO_TOPIC + nonce


def range_request(nonce: str, session: str, first: int, last: int) -> str:
    """The subscription that asks the coordinator for its events ``first..last`` of run
    ``session``: a unique topic only the asker listens to; the reply comes under it."""
    return f"{RANGE_TOPIC}{nonce}\n{session}\n{first}\n{last}"


def parse_range_request(subscription: bytes) -> tuple[str, int, int] | None:
    """``(session, first, last)`` of a range request, or None if it is not one."""
    if not subscription.startswith(RANGE_TOPIC.encode()):
        return None
    try:
        _, session, first, last = subscription.decode().split("\n")
        span = int(first), int(last)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("malformed range request") from None
    # within what a reply can carry (msgpack's 64 bits): a first of 10**30 failed the reply's
    # packing, in the loop's handler, where a subscriber's request must not reach
    if not all(-2**63 <= n < 2**63 for n in span):
        raise ProtocolError("range request out of range")
    return session, *span


def encode_range_reply(session: str, first: int, covered: int, items: list, refused: str = "") -> bytes:
    """An answer to a range request: ``items`` ``(seq, topic, body)`` held of ``first..covered``
    (the rest of that span is lost), or why it was refused."""
    return msgpack.packb({"session": session, "first": first, "covered": covered, "items": items,
                          "refused": refused}, use_bin_type=True)


RANGE_REPLY = {"session": _STR, "first": _INT, "covered": _INT, "items": ListOf(list), "refused": _STR}


def decode_range_reply(body: bytes) -> dict[str, Any]:
    reply = _unpack(body, DEFAULT_MAX_MESSAGE_SIZE)
    if not isinstance(reply, dict):
        raise ProtocolError("range reply is not a map")
    for name, expected in RANGE_REPLY.items():
        value = reply.get(name)
        ok = isinstance(value, list) if isinstance(expected, ListOf) else isinstance(value, expected)
        if not ok or isinstance(value, bool):
            raise ProtocolError(f"range reply field {name!r} missing or mistyped")
    for item in reply["items"]:
        if not (len(item) == 3 and type(item[0]) is int and isinstance(item[1], str) and isinstance(item[2], bytes)):
            raise ProtocolError("range reply item is not [seq, topic, body]")
    return reply
