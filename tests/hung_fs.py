"""A filesystem that stops answering, as a hard-mounted NFS server that went away does: a FUSE
mount served by this process through ``/dev/fuse`` (no libfuse needed), an empty directory while
it answers; after SIGUSR1 it answers nothing, so whoever looks at it (``stat``) waits until it is
killed.  Needs root and ``/dev/fuse`` (see :func:`available`).

    python hung_fs.py MOUNTPOINT        # prints "mounted" once it serves

Bounded: it exits (which aborts the mount: whoever waits on it gets an error) once it has answered
nothing for ``HANG_MAX`` seconds, or once the process that started it is gone, so a test that dies
midway leaves nothing that hangs whatever touches the path later (pytest's removal of old
temporary directories among them).
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import threading
import time

FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_OPENDIR, FUSE_READDIR, FUSE_RELEASEDIR = 1, 2, 3, 27, 28, 29
FUSE_INIT, FUSE_BATCH_FORGET, FUSE_DESTROY = 26, 42, 38
IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr
ATTR_OUT = struct.Struct("<QII" + "QQQQQQIIIIIIIIII")
ENOENT, ENOSYS = 2, 38
HANG_MAX = 60.0  #: seconds it answers nothing at most, then exits


def available() -> str:
    """Why this machine cannot run it ("" if it can)."""
    if os.geteuid() != 0:
        return "FUSE mounts need root here"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return ""


def _reply(fd: int, unique: int, body: bytes = b"", error: int = 0) -> None:
    try:
        os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)
    except OSError:
        pass  # the request was interrupted meanwhile


def _root_attr() -> bytes:
    # valid for 0 s: every stat asks us; a directory, mode 0755, two links
    return ATTR_OUT.pack(0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o040755, 2, 0, 0, 0, 4096, 0)


def serve(mountpoint: str) -> None:
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"hungfs", mountpoint.encode(), b"fuse", 0x2 | 0x4, options) != 0:  # MS_NOSUID | MS_NODEV
        raise OSError(ctypes.get_errno(), f"mount {mountpoint}: {os.strerror(ctypes.get_errno())}")
    hung: list[float] = []
    signal.signal(signal.SIGUSR1, lambda *_: hung.append(time.monotonic()))
    parent = os.getppid()

    def bounded() -> None:
        while os.getppid() == parent and not (hung and time.monotonic() - hung[0] > HANG_MAX):
            time.sleep(0.2)
        os._exit(0)  # the kernel aborts the mount's connection: its waiters get ENOTCONN

    # (made with SIGUSR1 blocked, which it keeps: the kernel gives the signal to the main thread,
    # whose read it interrupts, so the handler runs at once; a signal given to this thread waited
    # in Python until the main thread's read returned, as relay.py's did)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Thread(target=bounded, daemon=True).start()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    print("mounted", flush=True)
    while True:
        try:
            request = os.read(fd, 1 << 17)
        except InterruptedError:
            continue
        except OSError:
            return  # unmounted
        if hung:
            continue  # read, never answered: the caller waits
        _, opcode, unique, nodeid = IN_HEADER.unpack_from(request)[:4]
        if opcode == FUSE_INIT:
            major, minor, readahead, flags = struct.unpack_from("<IIII", request, IN_HEADER.size)
            _reply(fd, unique, struct.pack("<IIIIHHIIHHI7I", 7, min(minor, 31), readahead, 0, 16, 12, 65536, 1,
                                           0, 0, 0, *([0] * 7)))
        elif opcode in (FUSE_FORGET, FUSE_BATCH_FORGET):
            continue  # no reply to these
        elif opcode == FUSE_GETATTR and nodeid == 1:
            _reply(fd, unique, _root_attr())
        elif opcode == FUSE_LOOKUP:
            _reply(fd, unique, error=ENOENT)  # an empty directory
        elif opcode == FUSE_OPENDIR:
            _reply(fd, unique, struct.pack("<QII", 1, 0, 0))  # fh, open_flags, padding
        elif opcode == FUSE_READDIR:
            _reply(fd, unique)  # no entries
        elif opcode == FUSE_RELEASEDIR:
            _reply(fd, unique)
        elif opcode == FUSE_DESTROY:
            _reply(fd, unique)
            return
        else:
            _reply(fd, unique, error=ENOSYS)


if __name__ == "__main__":
    serve(sys.argv[1])
