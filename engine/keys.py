"""Identities: instance ids, step keys, idempotency keys, owners and run ids.

A *step path* names a step without its invocation (``cell/abc``,
``cell/abc@1/check[3]``); the *step key* adds the invocation
(``cell/abc@2``). Keys are built from stable names only - never from
completion order, timestamps or journal seq (DESIGN.md §1-2).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import secrets
import socket
import time

from .errors import InvalidName

INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CELL_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Characters that structure a step key; they are escaped inside branch keys.
_RESERVED = "%/@[]"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def validate_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it is 1-128 chars of ``A-Za-z0-9._:-``, else raise."""
    if not isinstance(instance_id, str) or not INSTANCE_ID_RE.fullmatch(instance_id):
        raise InvalidName("instance id", str(instance_id), "use 1-128 characters of A-Z a-z 0-9 . _ : -")
    return instance_id


def validate_cell_id(cell_id: str) -> str:
    """Return ``cell_id`` if it is a valid nbformat cell id, else raise."""
    if not isinstance(cell_id, str) or not CELL_ID_RE.fullmatch(cell_id):
        raise InvalidName("cell id", str(cell_id), "use 1-64 characters of A-Z a-z 0-9 _ -")
    return cell_id


def ulid(now: float | None = None) -> str:
    """A 26-character sortable id: 48 bits of milliseconds, 80 random bits."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_instance_id() -> str:
    """A generated, time-sortable instance id."""
    return ulid()


def new_run_id() -> str:
    """A unique id for one advancing session (a kernel attaching, one ``nbrunbook run``)."""
    return "run-" + ulid()


def cell_path(cell_id: str) -> str:
    """The step path of a notebook cell."""
    return f"cell/{validate_cell_id(cell_id)}"


def step_key(path: str, invocation: int) -> str:
    """The full step key: the path plus ``@invocation``."""
    return f"{path}@{invocation}"


def split_step_key(key: str) -> tuple[str, int]:
    """Split a step key into (path, invocation); raise ``InvalidName`` if it has none."""
    path, sep, inv = key.rpartition("@")
    if not sep or not inv.isdigit() or not path:
        raise InvalidName("step key", key, "expected <path>@<invocation>")
    return path, int(inv)


def escape_component(value: str) -> str:
    """Percent-escape the characters that structure a step key."""
    out = []
    for ch in value:
        if ch in _RESERVED or ord(ch) < 32:
            out.append(f"%{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


def branch_path(parent_key: str, name: str, key: str) -> str:
    """The step path of a branch: ``<parent key>/<name>[<key>]`` (DESIGN.md §1)."""
    split_step_key(parent_key)  # the parent must carry its invocation
    return f"{parent_key}/{escape_component(name)}[{escape_component(key)}]"


def parent_of(path: str) -> str | None:
    """The parent step key of a branch path, or ``None`` for a cell."""
    head, sep, _ = path.rpartition("/")
    if not sep or head == "cell":
        return None
    return head


def is_cell_path(path: str) -> bool:
    """True for ``cell/<id>`` paths (top-level steps)."""
    return path.startswith("cell/") and "/" not in path[5:]


def idempotency_key(instance_id: str, key: str) -> str:
    """``hash(instance_id, step key)``: stable across attempts, new per invocation."""
    digest = hashlib.sha256(f"{instance_id}\x00{key}".encode()).hexdigest()
    return digest[:32]


class _Boot:
    """Per-process identity; regenerated after ``fork`` so children get their own."""

    pid = -1
    nonce = ""
    owner = ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): fall back to the uid
        return str(os.getuid())


def process_owner() -> str:
    """This process's owner id: ``user@host:pid:<random boot nonce>``."""
    pid = os.getpid()
    if _Boot.pid != pid:
        _Boot.pid = pid
        _Boot.nonce = secrets.token_hex(6)
        _Boot.owner = f"{_user()}@{socket.gethostname()}:{pid}:{_Boot.nonce}"
    return _Boot.owner


def parse_owner(owner: str) -> tuple[str, str, int, str] | None:
    """Split an owner id into (user, host, pid, nonce); ``None`` if it is not one."""
    m = re.fullmatch(r"(.*)@(.*):(\d+):([0-9a-zA-Z]+)", owner)
    if not m:
        return None
    return m.group(1), m.group(2), int(m.group(3)), m.group(4)
