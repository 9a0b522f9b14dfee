"""The key directory: who may connect to a coordinator, in which role, and with which key.

One directory serves every role.  ``keys init DIR`` makes all of it on one host, which is enough to
try keys out (coordinator, workers and subscribers all pointed at DIR); ``keys export`` writes what
one other host needs and nothing more::

    DIR/coordinator.key                 the coordinator's public key (every client needs it)
    DIR/coordinator.key_secret          its secret key (only the coordinator's host)
    DIR/allowed/ROLE/NAME.key           public keys the coordinator admits, ROLE = worker|reader|admin
    DIR/revoked/ROLE/NAME.key           revoked ones (refused; kept so ``keys list`` shows them)
    DIR/own/ROLE/NAME.key_secret        client key pairs held on this host
    DIR/links.key_secret                the agent-link pair: ZmqPubSub/ZmqReqRep between agents
                                        (every worker host holds it; only its holders can connect)

Files use ZeroMQ's certificate format (``zmq.auth.load_certificate`` reads them).  A secret key file
that anyone but its owner may read is refused: a key others can copy authenticates them too.

Roles: a *worker* key may register as a worker and publish on the bus; a *reader* key may only
subscribe to events; an *admin* key is for clients that act on the cluster (the control commands).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from .log_thread import deferrable

#: deferrable: the coordinator's gatekeeper thread logs on it too (curve.py), and must not wait on a stream
log = deferrable(logging.getLogger("pyorchestrate.keys"))

ROLES = ("worker", "reader", "admin")
ENV = "PYORCHESTRATE_KEYS"
NAME_ENV = "PYORCHESTRATE_KEY_NAME"


class KeysError(ValueError):
    """A key directory or key file that cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class ClientKey:
    """What a client socket needs: its own pair and the coordinator's public key (z85 bytes)."""

    role: str
    name: str
    public: bytes
    secret: bytes
    server: bytes


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeysError(f"key name {name!r}: use letters, digits, '-', '_' and '.' only")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise KeysError(f"role {role!r}: must be one of {', '.join(ROLES)}")


def _write(path: Path, public: bytes, secret: bytes | None, what: str) -> None:
    """One certificate file; a secret one is created 0600 from the start (never readable by others,
    not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M} by pyorchestrate  ****\n"
            f"#   ZeroMQ CURVE {'**Secret** ' if secret else 'Public '}Certificate: {what}\n"
            + ("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n" if secret else "")
            + "\nmetadata\ncurve\n"
            f"    public-key = \"{public.decode()}\"\n"
            + (f"    secret-key = \"{secret.decode()}\"\n" if secret else ""))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(text)


def check_private(path: Path) -> None:
    """Refuse a secret key file that others than its owner may read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"secret key file {path} is readable by others than its owner "
                        f"(mode {stat.S_IMODE(mode):o}): run `chmod 600 {path}`")


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if secret:
        check_private(path)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read key file {path}: {exc}") from None
    if secret and not secret_key:
        raise KeysError(f"key file {path} holds no secret key")
    return public, secret_key


class KeyDir:
    """A key directory on disk.  Reading is done fresh each time it is asked (revocations and new
    keys take effect without a restart); :meth:`admitted` caches by the directories' mtimes."""

    def __init__(self, path: str | os.PathLike) -> None:
        # absolute now: it is read again for as long as the process runs, and the working directory
        # is the process's, which a script or a thread agent may change (``os.chdir``).  A relative
        # ``keys="keys"`` then named a directory without keys: the coordinator took its workers'
        # keys for revoked and let them go, and a worker's pulse and agents got a path to nowhere
        self.path = Path(path).expanduser().absolute()
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._admitted: dict[bytes, tuple[str, str]] = {}

    @classmethod
    def from_option(cls, value: str | os.PathLike | None) -> KeyDir | None:
        """The directory an option names, else ``$PYORCHESTRATE_KEYS``, else None (no keys)."""
        value = value or os.environ.get(ENV) or None
        if value is None:
            return None
        keydir = cls(value)
        if not keydir.path.is_dir():
            raise KeysError(f"key directory {keydir.path} does not exist: make one with "
                            f"`pyorchestrate keys init {keydir.path}`")
        return keydir

    # ------------------------------------------------------------------ making keys

    def init(self) -> list[str]:
        """The coordinator's pair and a first worker, reader and admin key.  Refuses to overwrite."""
        if (self.path / "coordinator.key_secret").exists():
            raise KeysError(f"{self.path} already holds a coordinator key: nothing was changed")
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        public, secret = zmq.curve_keypair()
        _write(self.path / "coordinator.key", public, None, "coordinator")
        _write(self.path / "coordinator.key_secret", public, secret, "coordinator")
        public, secret = zmq.curve_keypair()
        _write(self.path / "links.key_secret", public, secret, "agent links")
        made = ["coordinator", "agent-link"]
        for role in ROLES:
            self.add(role, role)
            made.append(f"{role} {role}")
        return made

    def add(self, role: str, name: str) -> Path:
        """A new key pair for a client: admitted at once (no coordinator restart)."""
        _check_role(role)
        _check_name(name)
        self._need_coordinator()
        existing = self.find(name)
        if existing is not None:
            raise KeysError(f"a key named {name!r} exists already ({existing[0]}, {existing[1]}): "
                            "pick another name, or revoke that one first")
        public, secret = zmq.curve_keypair()
        _write(self.path / "own" / role / f"{name}.key_secret", public, secret, f"{role} {name}")
        _write(self.path / "allowed" / role / f"{name}.key", public, None, f"{role} {name}")
        return self.path / "own" / role / f"{name}.key_secret"

    def revoke(self, name: str) -> str:
        """Refuse the key from now on (new connections at once; a connected worker is told to go)."""
        found = self.find(name)
        if found is None or found[1] != "allowed":
            raise KeysError(f"no admitted key named {name!r} in {self.path} (see `pyorchestrate keys list`)")
        role = found[0]
        target = self.path / "revoked" / role / f"{name}.key"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path / "allowed" / role / f"{name}.key", target)
        secret = self.path / "own" / role / f"{name}.key_secret"
        if secret.exists():
            secret.unlink()  # of no use any more, and it would make "the only worker key here" ambiguous
        return role

    def export(self, role: str, name: str, out: str | os.PathLike) -> list[Path]:
        """What one client host needs: the coordinator's public key and this client's own pair (and
        for a worker, the agent-link pair its agents' plugins use)."""
        _check_role(role)
        source = self.path / "own" / role / f"{name}.key_secret"
        if not source.exists():
            raise KeysError(f"no {role} key named {name!r} held in {self.path}: make it with "
                            f"`pyorchestrate keys add {role} {name}`")
        check_private(source)
        out = Path(out).expanduser()
        (out / "own" / role).mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        shutil.copyfile(self.path / "coordinator.key", out / "coordinator.key")
        target = out / "own" / role / f"{name}.key_secret"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(source.read_bytes())
        os.chmod(target, 0o600)
        written = [out / "coordinator.key", target]
        if role == "worker":
            links = out / "links.key_secret"
            fd = os.open(links, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._links_path().read_bytes())
            written.append(links)
        return written

    # ------------------------------------------------------------------ reading keys

    def find(self, name: str) -> tuple[str, str] | None:
        """(role, "allowed" or "revoked") of the key called ``name``, if any."""
        for state in ("allowed", "revoked"):
            for role in ROLES:
                if (self.path / state / role / f"{name}.key").exists():
                    return role, state
        return None

    def listing(self) -> list[dict[str, object]]:
        """Every key the directory knows, for ``keys list``."""
        rows = []
        for state in ("allowed", "revoked"):
            for role in ROLES:
                folder = self.path / state / role
                for path in sorted(folder.glob("*.key")) if folder.is_dir() else ():
                    public, _ = _load(path, secret=False)
                    rows.append({"name": path.stem, "role": role, "state": state, "public_key": public.decode(),
                                 "secret_here": (self.path / "own" / role / f"{path.stem}.key_secret").exists()})
        return rows

    def _links_path(self) -> Path:
        return _required(self.path / "links.key_secret", f"{self.path} holds no agent-link key (links.key_secret): "
                         "`keys export worker` writes it for a worker host; `keys init` makes it")

    def links(self) -> tuple[bytes, bytes]:
        """The agent-link pair (z85): ZmqPubSub/ZmqReqRep endpoints between agents use it on both sides."""
        public, secret = _load(self._links_path(), secret=True)
        assert secret is not None
        return public, secret

    def coordinator_public(self) -> bytes:
        path = self.path / "coordinator.key"
        if not path.exists():
            raise KeysError(f"{path} is missing: copy it from the coordinator's key directory "
                            "(`pyorchestrate keys export` writes it)")
        return _load(path, secret=False)[0]

    def coordinator_pair(self) -> tuple[bytes, bytes]:
        public, secret = _load(self._need_coordinator(), secret=True)
        assert secret is not None
        return public, secret

    def client(self, role: str, name: str | None = None) -> ClientKey:
        """This host's key for ``role``: the one named (option or ``$PYORCHESTRATE_KEY_NAME``), or
        the only one the directory holds."""
        _check_role(role)
        name = name or os.environ.get(NAME_ENV) or None
        folder = self.path / "own" / role
        held = sorted(p.stem for p in folder.glob("*.key_secret")) if folder.is_dir() else []
        if name is None:
            if not held:
                raise KeysError(f"{self.path} holds no {role} key: on the coordinator's host run "
                                f"`pyorchestrate keys add {role} NAME` and `pyorchestrate keys export {role} NAME DIR`")
            if len(held) > 1:
                raise KeysError(f"{self.path} holds several {role} keys ({', '.join(held)}): name one with "
                                f"--key-name or ${NAME_ENV}")
            name = held[0]
        elif name not in held:
            raise KeysError(f"{self.path} holds no {role} key named {name!r} (it holds: {', '.join(held) or 'none'})")
        public, secret = _load(folder / f"{name}.key_secret", secret=True)
        assert secret is not None
        return ClientKey(role, name, public, secret, self.coordinator_public())

    def held(self, role: str) -> list[str]:
        """Names of the ``role`` keys whose secrets this directory holds (sorted)."""
        folder = self.path / "own" / role
        return sorted(p.stem for p in folder.glob("*.key_secret")) if folder.is_dir() else []

    def client_any(self, roles: tuple[str, ...], name: str | None = None) -> ClientKey:
        """This host's key for the first of ``roles`` it holds one for (a subscriber takes a reader
        key, else an admin or a worker key: each may subscribe)."""
        for role in roles:
            folder = self.path / "own" / role
            if folder.is_dir() and any(folder.glob("*.key_secret")):
                return self.client(role, name)
        return self.client(roles[0], name)  # raises, saying what to do

    def admitted(self) -> dict[bytes, tuple[str, str]]:
        """Public key (z85) -> (role, name) of every admitted key, re-read when the directory changed.

        A role's folder that cannot be listed (gone, unreadable) keeps the keys it admitted when it
        last could be: a revocation removes a key's file (``keys revoke``), and a folder that is
        away for a moment (a deploy replacing the directory, a restore, a network filesystem's
        hiccup) revoked every key of that role, and the coordinator told all its workers to go."""
        stamp = tuple(_mtime(self.path / "allowed" / role) for role in ROLES)
        with self._lock:
            if stamp != self._stamp:
                admitted = {}
                for role in ROLES:
                    folder = self.path / "allowed" / role
                    paths = _key_files(folder)
                    if paths is None:
                        kept = {key: held for key, held in self._admitted.items() if held[0] == role}
                        admitted.update(kept)
                        if kept:
                            log.error("key directory: %s cannot be read; the %d %s key(s) it held stay admitted "
                                      "until it can (to revoke a key, remove its file: `pyorchestrate keys revoke`)",
                                      folder, len(kept), role)
                        continue
                    for path in paths:
                        try:
                            admitted[_load(path, secret=False)[0]] = (role, path.stem)
                        except KeysError:
                            continue  # a broken file admits nobody
                self._admitted, self._stamp = admitted, stamp
            return self._admitted

    def latest(self) -> dict[bytes, tuple[str, str]]:
        """What :meth:`admitted` found last, without looking at the directory (no file system
        work, no lock: for a thread that must not wait on a file system, see key_watch.py)."""
        return self._admitted

    def _need_coordinator(self) -> Path:
        return _required(self.path / "coordinator.key_secret", f"{self.path} holds no coordinator key: run "
                         f"`pyorchestrate keys init {self.path}` (on the coordinator's host)")


def _required(path: Path, missing: str) -> Path:
    """``path``, which must exist (else ``missing`` says what to do)."""
    if not path.exists():
        raise KeysError(missing)
    return path


def _key_files(folder: Path) -> list[Path] | None:
    """The ``*.key`` files in ``folder``; None if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return [folder / entry.name for entry in entries if entry.name.endswith(".key")]
    except OSError:
        return None


def _mtime(path: Path) -> int:
    """When ``path`` last changed; 0 if it is gone, -1 if it cannot be looked at (a change too)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0
    except OSError:
        return -1
