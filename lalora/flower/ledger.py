"""A deployed node's state folder: one writer at a time, and tamper/rollback evidence.

Two processes serving the same node (two runs at once, or Flower serving one node from two worker
processes) must not both read the ledger, both add a round and both write: the second write would
drop the first one's round, and the node would have released more than its ledger says.
:func:`exclusive` takes an exclusive ``fcntl.flock`` on ``<state-dir>/node.lock`` for the whole
read-admit-train-record sequence; a second process waits (up to ``timeout``) and then reads the
ledger the first one wrote -- or is refused, never served from a stale ledger.

The state file ``<state-dir>/node-state.pt`` is sealed (:func:`seal` / :func:`unseal`):

- an HMAC-SHA256 over its bytes, keyed by ``<state-dir>/node-secret`` -- 32 bytes from the OS
  CSPRNG, created on the node's first start with mode 0600, never sent anywhere. Editing the ledger
  and recomputing a plain hash no longer works: the MAC needs the secret;
- a sequence number, +1 at every write, inside the MAC'd bytes. The highest number the node has
  written is also kept apart from the state file, in ``<state-dir>/node-seen`` (MAC'd too).
  Restoring an older, validly MAC'd copy of the state file (a rollback, to be served a round
  twice) is refused: its number is below the one seen.

What this cannot detect (docs/FLOWER.md, section 7): whoever can write the folder can restore the
state file *and* node-seen together (or the whole folder, secret included) from one older backup;
that rollback looks like a crash. Deleting the whole folder resets the ledger. Keep the folder on
storage the server side cannot reach; the operator is trusted.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import time
from pathlib import Path

import torch

from lalora.flower.errors import RequestRefused
from lalora.results import CheckpointCorruptedError

__all__ = ["StateTamperedError", "exclusive", "node_secret", "seal", "unseal", "read_seen", "write_seen",
           "LOCK_FILE", "SECRET_FILE", "SEEN_FILE"]

LOCK_FILE = "node.lock"
SECRET_FILE = "node-secret"
SEEN_FILE = "node-seen"
MAGIC = b"LALORA-NODE-v2\n"


class StateTamperedError(CheckpointCorruptedError):
    """The node's state file fails its MAC, is older than the last one written, or is missing."""


@contextlib.contextmanager
def exclusive(state_dir: str | os.PathLike, *, timeout: float = 900.0, poll_s: float = 0.05):
    """Hold the node's exclusive lock (across processes) for the body; wait up to ``timeout``."""

    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise RequestRefused("the node is busy serving another request (its state folder "
                                         "is locked); try again later") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def node_secret(state_dir: str | os.PathLike, *, create: bool) -> bytes:
    """The node's MAC key. Created (0600, OS entropy) only when the folder holds no state yet: a
    state file whose secret is gone cannot be verified and is refused, never re-keyed."""
    path = Path(state_dir) / SECRET_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise StateTamperedError(f"{path} is readable by others (mode {oct(path.stat().st_mode & 0o777)});"
                                     " it must be 0600")
        key = path.read_bytes()
        if len(key) != 32:
            raise StateTamperedError(f"{path} is not a node secret (expected 32 bytes)")
        return key
    if not create:
        raise StateTamperedError(f"{path} is missing: the node state cannot be verified (an operator "
                                 "who really wants to start this node over deletes the whole folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
        fh.flush()
        os.fsync(fh.fileno())
    return path.read_bytes()


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def seal(key: bytes, seq: int, payload: dict) -> bytes:
    """The file bytes: MAGIC + hex HMAC + newline + torch.save({"seq", "payload"})."""
    buf = io.BytesIO()
    torch.save({"seq": int(seq), "payload": payload}, buf)
    body = buf.getvalue()
    return MAGIC + _mac(key, body) + b"\n" + body


def unseal(key: bytes, raw: bytes, path) -> tuple[int, dict]:
    """(sequence number, payload) of sealed bytes; StateTamperedError unless the MAC matches."""
    head = len(MAGIC) + 64 + 1
    if not raw.startswith(MAGIC) or len(raw) < head:
        raise StateTamperedError(f"{path} is not a sealed lalora node state (bad header; a state folder "
                                 "written by an older lalora is not accepted: give the node a new one)")
    body = raw[head:]
    if not hmac.compare_digest(raw[len(MAGIC): head - 1], _mac(key, body)):
        raise StateTamperedError(f"{path} fails its MAC: the node state was edited or damaged; refusing "
                                 "it (never reset to an empty ledger)")
    data = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    return int(data["seq"]), data["payload"]


def read_seen(key: bytes, state_dir) -> int:
    """The highest sequence number this node has written (0 before its first write)."""
    path = Path(state_dir) / SEEN_FILE
    if not path.exists():
        return 0
    raw = path.read_bytes()
    body, _, mac = raw.rpartition(b"\n")
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise StateTamperedError(f"{path} fails its MAC: refusing the node state")
    return int(json.loads(body)["seq"])


def write_seen(key: bytes, state_dir, seq: int) -> None:
    from lalora.results import atomic_write_bytes

    body = json.dumps({"seq": int(seq)}).encode()
    atomic_write_bytes(Path(state_dir) / SEEN_FILE, body + b"\n" + _mac(key, body))
