"""The store server's wire: where its socket lives, how frames look, what they carry.

Transport (DESIGN.md §4, §11): a Unix domain socket, mode 0600, inside a
directory only the user can enter (0700): ``$NBRUNBOOK_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/nbrunbook``, else ``/tmp/nbrunbook-<uid>``. Each store gets
its own socket, lock and log file there, named from a hash of the store file's
real path. Socket paths longer than the OS limit (``sun_path``, ~107 bytes)
are reached through ``/proc/self/fd/<dir fd>/<name>``.

Frames: a 4-byte big-endian length, then one UTF-8 JSON object. The first
frame each way is the *hello*, ``{"t": "hello", "protocol": N, ...}``; that
shape never changes, so any two versions can tell each other apart and the
client raises one clear :class:`~.errors.ProtocolError` on a mismatch. Then:

* client -> server ``{"t": "req", "id": N, "op": NAME, "args": {...}}``;
* server -> client ``{"t": "res", "id": N, "ok": RESULT}`` or ``"err": ERROR``,
  ``{"t": "push", "sub": N, "events": [...]}`` (subscriptions), and
  ``{"t": "bye", "reason": ...}`` before a graceful shutdown.

Records travel as their ``to_dict()`` form; recorded values' bytes as base64.
Errors travel as class name, message and fields, and are rebuilt on the
client as the same class with the same message.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import errors, model, wirejson
from .errors import ProtocolError, RunbookError, StoreError, StoreUnavailable

#: Bumped on any incompatible change of the messages below (never of the hello).
PROTOCOL_VERSION = 1
#: Largest frame accepted (recorded values are capped at 16 MiB before base64).
MAX_FRAME = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
#: Seconds without any client after which an auto-started server exits.
DEFAULT_IDLE = 60.0
# sun_path is 108 bytes on Linux, 104 on macOS; stay below both with the NUL.
_SUN_PATH_MAX = 100
#: The longest Unix socket path bound directly (longer ones need a detour, see _ShortPath).
SOCKET_PATH_MAX = _SUN_PATH_MAX


class ServerRunning(StoreUnavailable):
    """A store server for this file already runs (a second one is refused)."""

    def __init__(self, path: str, pid: int | None, socket_path: str) -> None:
        self.pid = pid
        self.socket_path = socket_path
        who = f"PID {pid}" if pid else "another process"
        super().__init__(path, f"a store server already serves this file ({who}, socket {socket_path})")


# --------------------------------------------------------------------- paths


@dataclass(frozen=True)
class ServerPaths:
    """The files of one store's server inside the runtime directory."""

    store: str  # real path of the store file
    directory: str
    socket: str
    lock: str  # held (flock) by the running server; holds its JSON info
    start_lock: str  # held by a client while it starts a server
    log: str  # stderr of a detached server


def runtime_dir() -> str:
    """The private per-user directory for sockets and locks (created 0700, checked)."""
    base = os.environ.get("NBRUNBOOK_RUNTIME_DIR")
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.stat(xdg).st_uid == os.getuid():
            base = os.path.join(xdg, "nbrunbook")
        else:
            tmp = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
            base = os.path.join(tmp, f"nbrunbook-{os.getuid()}")
    return _private_dir(os.path.abspath(base))


def _private_dir(path: str) -> str:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise StoreUnavailable(path, f"cannot create the store server's runtime directory: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreUnavailable(path, "the store server's runtime directory is not a directory (a symlink?)")
    if st.st_uid != os.getuid():
        raise StoreUnavailable(path, f"the store server's runtime directory belongs to uid {st.st_uid}, not to you")
    if stat.S_IMODE(st.st_mode) & 0o077:
        # Ours, but others could enter it: make it private before using it.
        os.chmod(path, 0o700)
    return path


def server_paths(store_path: str, directory: str | None = None) -> ServerPaths:
    """Socket, lock and log paths of the server for ``store_path``."""
    real = os.path.realpath(os.path.abspath(store_path))
    directory = directory or runtime_dir()
    name = hashlib.sha256(real.encode()).hexdigest()[:24]
    base = os.path.join(directory, name)
    return ServerPaths(real, directory, base + ".sock", base + ".lock", base + ".start", base + ".log")


class _ShortPath:
    """A socket path usable with bind/connect, even past the ``sun_path`` limit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.address = path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            directory, name = os.path.split(path)
            if not os.path.isdir("/proc/self/fd"):
                raise StoreUnavailable(
                    path, f"socket path longer than the OS limit ({_SUN_PATH_MAX} bytes); set NBRUNBOOK_RUNTIME_DIR"
                )
            # The directory is reached through its open descriptor: short and race-free.
            self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            self.address = f"/proc/self/fd/{self.fd}/{name}"

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def connect_unix(path: str, timeout: float | None) -> socket.socket:
    """Connect to the socket at ``path`` (raises ``OSError`` if nobody listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        with _ShortPath(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: str) -> socket.socket:
    """A listening socket at ``path`` created with mode 0600 (no window where it is wider)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with _ShortPath(path) as address:
            sock.bind(address)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end (``SO_PEERCRED``, Linux).

    Where the OS has no ``SO_PEERCRED`` this reports our own uid: the 0700
    runtime directory is then the only guard.
    """
    if not hasattr(socket, "SO_PEERCRED"):
        return 0, os.getuid(), os.getgid()
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_allowed(uid: int) -> bool:
    """Only the user who runs the server may talk to it."""
    return uid == os.getuid()


def can_connect(path: str) -> bool:
    """True if a server accepts connections at ``path``."""
    try:
        connect_unix(path, timeout=2.0).close()
    except OSError:
        return False
    return True


def read_lock_info(paths: ServerPaths) -> dict[str, Any]:
    """What the running (or last) server wrote into its lock file."""
    try:
        with open(paths.lock, "rb") as fh:
            data = json.loads(fh.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_held(paths: ServerPaths) -> bool:
    """True while a server process holds the lock of ``paths`` (it is alive)."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -------------------------------------------------------------------- frames


def dumps(msg: dict[str, Any]) -> bytes:
    """One frame: header + compact JSON. Payloads that are not JSON become ``str`` (as in the journal)."""
    body = wirejson.encode(msg)
    if len(body) > MAX_FRAME:
        raise StoreError("", f"message of {len(body)} bytes exceeds the store server's limit of {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


class Readable(Protocol):
    """A buffered binary stream (``socket.makefile("rb")``)."""

    def read(self, size: int, /) -> bytes: ...

    def close(self) -> None: ...


def read_frame(stream: Readable) -> dict[str, Any] | None:
    """The next message, or ``None`` at a clean end of stream."""
    head = stream.read(_HEADER.size)
    if not head:
        return None
    if len(head) < _HEADER.size:
        raise EOFError("connection closed inside a frame header")
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError("", f"frame of {size} bytes announced; not an nbrunbook store server peer")
    body = stream.read(size)
    if len(body) < size:
        raise EOFError("connection closed inside a frame")
    msg = wirejson.decode(body)
    if not isinstance(msg, dict):
        raise ProtocolError("", "malformed frame")
    return msg


class SocketReader:
    """Frames read straight from a socket, with the bytes buffered so far in view.

    A :class:`Readable` (``read`` returns exactly ``size`` bytes unless the
    peer hung up), plus the two halves the client's shared connection needs:
    :meth:`fill` (one ``recv``) and :meth:`frame` (the next complete frame
    already buffered, never blocking). A ``makefile`` buffer hides what it
    holds, so a thread could not tell whether reading more would block.
    """

    _CHUNK = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0

    def read(self, size: int, /) -> bytes:
        while len(self._buf) - self._pos < size:
            if not self.fill():
                break
        start = self._pos
        self._pos = min(len(self._buf), start + size)
        data = bytes(self._buf[start : self._pos])
        self._compact()
        return data

    def fill(self) -> bool:
        """One ``recv`` into the buffer (blocks until data or end); False at end of stream."""
        data = self.sock.recv(self._CHUNK)
        if not data:
            return False
        self._buf += data
        return True

    def frame(self) -> dict[str, Any] | None:
        """The next message if all of it is buffered, else ``None`` (nothing consumed)."""
        pos = self._pos
        if len(self._buf) - pos < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buf, pos)
        if size > MAX_FRAME:
            raise ProtocolError("", f"frame of {size} bytes announced; not an nbrunbook store server peer")
        end = pos + _HEADER.size + size
        if len(self._buf) < end:
            return None
        msg = wirejson.decode(self._buf[pos + _HEADER.size : end])
        self._pos = end
        self._compact()
        if not isinstance(msg, dict):
            raise ProtocolError("", "malformed frame")
        return msg

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > self._CHUNK:
            del self._buf[: self._pos]
            self._pos = 0

    def close(self) -> None:
        """Nothing to release: the socket's owner closes it."""


def hello(**fields: Any) -> dict[str, Any]:
    """The first message each side sends."""
    from nbrunbook import __version__

    return {"t": "hello", "protocol": PROTOCOL_VERSION, "version": __version__, "pid": os.getpid(), **fields}


def version_mismatch(store: str, ours: dict[str, Any], theirs: dict[str, Any], socket_path: str) -> ProtocolError:
    """The one clear error for a client and server that speak different protocols."""
    return ProtocolError(
        store,
        f"the store server (PID {theirs.get('pid')}, nbrunbook {theirs.get('version')}) speaks protocol "
        f"{theirs.get('protocol')}, this client (nbrunbook {ours.get('version')}) speaks protocol "
        f"{ours.get('protocol')}; use one nbrunbook version for every process of this store, or stop the "
        f"server (`nbrunbook server stop --store {store}`) so the next client starts its own "
        f"(socket {socket_path})",
    )


# -------------------------------------------------------------------- errors


def encode_error(exc: BaseException, store: str) -> dict[str, Any]:
    """An exception as data; unknown kinds become a ``StoreError`` naming them."""
    if isinstance(exc, RunbookError):
        fields = {}
        for k, v in vars(exc).items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                continue
            fields[k] = v
        return {"type": type(exc).__name__, "message": str(exc), "fields": fields}
    if type(exc) in _BUILTIN_ERRORS.values():
        return {"type": type(exc).__name__, "message": str(exc), "fields": {}, "builtin": True}
    return {
        "type": "StoreError",
        "message": str(StoreError(store, f"the store server failed: {type(exc).__name__}: {exc}")),
        "fields": {"path": store, "reason": f"the store server failed: {type(exc).__name__}: {exc}"},
    }


_BUILTIN_ERRORS: dict[str, type[Exception]] = {
    c.__name__: c for c in (ValueError, TypeError, KeyError, LookupError, IndexError)
}


def decode_error(data: dict[str, Any]) -> Exception:
    """Rebuild the exception: same class, same message, same fields."""
    name = str(data.get("type", ""))
    message = str(data.get("message", ""))
    if data.get("builtin"):
        return _BUILTIN_ERRORS.get(name, RuntimeError)(message)
    cls = getattr(errors, name, None) or globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, RunbookError)):
        return StoreError(str(data.get("fields", {}).get("path", "")), message)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(data.get("fields") or {})
    return exc


# ------------------------------------------------------------------- records


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_values(values: dict[str, model.EncodedValue] | None) -> dict[str, list[str]] | None:
    """Recorded values for the wire: ``{name: [encoding, base64]}``."""
    if values is None:
        return None
    return {name: [v.encoding, _b64(v.data)] for name, v in values.items()}


def decode_values(data: dict[str, list[str]] | None) -> dict[str, model.EncodedValue] | None:
    """The inverse of :func:`encode_values`."""
    if data is None:
        return None
    return {name: model.EncodedValue(enc, base64.b64decode(b64)) for name, (enc, b64) in data.items()}


def _state(s: model.StepState) -> dict[str, Any]:
    return dict(s.__dict__)  # frozen dataclass of plain fields: cheaper than asdict()


def _claim(c: model.Claim) -> dict[str, Any]:
    data: dict[str, Any] = {
        "outcome": c.outcome.value,
        "state": _state(c.state),
        "missing": c.missing,
        "max_attempts": c.max_attempts,
    }
    if c.values is not None:
        data["values"] = encode_values(c.values)
    return data


def _decode_claim(data: dict[str, Any]) -> model.Claim:
    values = decode_values(data.pop("values", None))
    claim = model.Claim.from_dict(data)
    return claim if values is None else dataclasses.replace(claim, values=values)


def _event(e: model.Event) -> dict[str, Any]:
    return dict(e.__dict__)


def _manifest(m: model.Manifest) -> dict[str, Any]:
    return {**m.__dict__, "cells": [dict(c.__dict__) for c in m.cells]}


def _decode_status(d: dict[str, Any]) -> model.InstanceStatus:
    return model.InstanceStatus.from_dict(d)


_Codec = tuple[Callable[[Any], Any], Callable[[Any], Any]]

_RESULTS: dict[str, _Codec] = {
    "none": (lambda v: None, lambda d: None),
    "manifest": (_manifest, model.Manifest.from_dict),
    "instance": (lambda i: dict(i.__dict__), lambda d: model.Instance(**d)),
    "instance_pair": (
        lambda p: [dict(p[0].__dict__), bool(p[1])],
        lambda d: (model.Instance(**d[0]), bool(d[1])),
    ),
    "claim": (_claim, _decode_claim),
    "claims": (lambda cs: [_claim(c) for c in cs], lambda d: [_decode_claim(c) for c in d]),
    "state": (_state, lambda d: model.StepState(**d)),
    "state_or_none": (
        lambda s: None if s is None else _state(s),
        lambda d: None if d is None else model.StepState(**d),
    ),
    "states": (lambda ss: [_state(s) for s in ss], lambda d: [model.StepState(**s) for s in d]),
    "event": (_event, lambda d: model.Event(**d)),
    "events": (lambda es: [_event(e) for e in es], lambda d: [model.Event(**e) for e in d]),
    "status": (
        lambda s: {
            **s.__dict__,
            "instance": dict(s.instance.__dict__),
            "manifest": _manifest(s.manifest) if s.manifest else None,
            "steps": [_state(x) for x in s.steps],
        },
        _decode_status,
    ),
    "summaries": (lambda ss: [dict(s.__dict__) for s in ss], lambda d: [model.InstanceSummary(**s) for s in d]),
    "values": (encode_values, decode_values),
    "info": (lambda v: v, lambda d: d),
}

#: Store operations the server executes: name -> result codec.
OPS: dict[str, str] = {
    "pin_manifest": "manifest",
    "manifest": "manifest",
    "open_instance": "instance_pair",
    "get_instance": "instance",
    "claim": "claim",
    "claim_many": "claims",
    "renew": "state",
    "complete": "state",
    "fail": "state",
    "rerun": "state",
    "resolve": "state",
    "release_owner": "states",
    "append": "event",
    "step": "state_or_none",
    "steps": "states",
    "instance_status": "status",
    "journal": "events",
    "instances": "summaries",
    "values": "values",
    "wait": "state_or_none",
    "flush": "none",
    # Server control, not Store methods.
    "subscribe": "none",
    "unsubscribe": "none",
    "status": "info",
    "shutdown": "none",
    "ping": "info",
}

#: Operations whose owner argument ties the owner's liveness to the connection.
HOLDING_OPS = frozenset({"claim", "claim_many", "renew", "complete", "fail"})

#: Writes that may be sent again after a lost connection: a repeat that finds
#: its own earlier commit answers the same (claim tokens, owner+epoch checks,
#: manifest hashes). The others are refused rather than applied twice.
RETRYABLE_WRITES = frozenset({"pin_manifest", "claim", "claim_many", "renew", "complete", "fail", "flush"})
WRITES = frozenset({"open_instance", "rerun", "resolve", "release_owner", "append"}) | RETRYABLE_WRITES


def retryable(op: str, args: dict[str, Any]) -> bool:
    """May this request be sent again after the connection was lost mid-flight?"""
    if op not in WRITES:
        return True  # reads and server control
    if op in RETRYABLE_WRITES:
        return True
    if op == "append":
        return bool(args.get("once"))
    # Opening an instance again finds it (only ``created`` may read False).
    return op == "open_instance" and not args.get("force_params")


def encode_result(op: str, value: Any) -> Any:
    """A store method's return value as wire data."""
    return _RESULTS[OPS[op]][0](value)


def decode_result(op: str, data: Any) -> Any:
    """Wire data back into the store method's return type."""
    return _RESULTS[OPS[op]][1](data)


def encode_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments for the wire (records as dicts, bytes as base64)."""
    if op == "pin_manifest":
        args = {**args, "cells": [dict(c.__dict__) for c in args["cells"]]}
    elif op == "complete" and args.get("values") is not None:
        args = {**args, "values": encode_values(dict(args["values"]))}
    return args


def decode_args(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`encode_args` (server side)."""
    if op == "pin_manifest":
        args = {**args, "cells": [model.ManifestCell.from_dict(c) for c in args["cells"]]}
    elif op == "complete" and args.get("values") is not None:
        args = {**args, "values": decode_values(args["values"])}
    return args
