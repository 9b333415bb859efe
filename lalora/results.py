"""Run folders, atomic writes, JSONL metrics and checksummed checkpoints.

Every experiment owns one folder ``<runs_dir>/<task>/<method>/<config-hash>/`` holding

- ``config.json``    the resolved run config (written once, atomically);
- ``metrics.jsonl``  one JSON record per round, appended and fsynced as the run goes;
- ``checkpoint.pt``  the full resumable state after the last finished round;
- ``final.json``     the summary, written last: its presence means "finished".

Why this shape: a notebook reads finished runs without re-training, a killed run resumes from its
last checkpoint, and a half-written file can never be mistaken for a good one. Whole-file writes go
to a temporary file in the same folder, are fsynced, then ``os.replace``-d over the target (atomic on
POSIX), and the folder is fsynced so the rename itself survives a crash.

A checkpoint file is ``MAGIC + sha256(payload) + "\\n" + payload`` where the payload is a
``torch.save`` of plain containers and tensors; :func:`load_checkpoint` recomputes the hash and
refuses a file whose bytes do not match (``CheckpointCorruptedError``), and it loads with
``weights_only=True`` so no arbitrary pickle runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import torch

CHECKPOINT_MAGIC = b"LALORA-CKPT-v1\n"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"


class CheckpointCorruptedError(ValueError):
    """The checkpoint's bytes do not match its recorded checksum (or it is not a checkpoint)."""


# ----------------------------------------------------------------------------- atomic primitives
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK_LOCK = threading.Lock()


def _default_file_mode() -> int:
    """0666 less the process umask: what ``open(path, "w")`` would create (0644 under the usual
    umask 022). Read by setting and restoring the umask (the only portable way), under a lock."""
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` so a reader sees either the old file or the whole new one.
    ``mode``: file permissions; by default those of a plainly created file (0666 less the umask).
    Why: mkstemp creates 0600, so final.json, config.json, adapters and site pages the user shares
    came out readable by their owner only, unlike metrics.jsonl (issue 29)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _default_file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON view of ``obj``: non-finite floats become the strings "inf"/"-inf"/"nan",
    tensors and numpy scalars become Python numbers or lists (strict JSON, readable anywhere)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar
        return to_jsonable(obj.tolist())
    return obj


def dumps_json(obj: Any, *, indent: int | None = None) -> str:
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=indent is not None, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (dumps_json(obj, indent=2) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a line and fsync it (a crash loses at most this line, never others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(dumps_json(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a torn last line (crash mid-append) is skipped, a torn middle
    line is an error."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically replace a JSONL file with ``records``."""
    text = "".join(dumps_json(r) + "\n" for r in records)
    return atomic_write_bytes(path, text.encode())


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Serialise ``payload`` (dicts/lists/tuples of tensors and Python scalars) with a checksum."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    return atomic_write_bytes(path, CHECKPOINT_MAGIC + digest + b"\n" + body)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its checksum first."""
    path = Path(path)
    raw = path.read_bytes()
    header_len = len(CHECKPOINT_MAGIC) + 64 + 1
    if not raw.startswith(CHECKPOINT_MAGIC) or len(raw) < header_len:
        raise CheckpointCorruptedError(f"{path} is not a lalora checkpoint (bad header)")
    recorded = raw[len(CHECKPOINT_MAGIC): header_len - 1].decode(errors="replace")
    body = raw[header_len:]
    actual = hashlib.sha256(body).hexdigest()
    if actual != recorded:
        raise CheckpointCorruptedError(
            f"checkpoint {path} is corrupted: sha256 {actual[:12]}… does not match the recorded "
            f"{recorded[:12]}…; delete it (or the run folder) to restart the run")
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- run folders
def config_hash(config_dict: dict, version: str, length: int = 12) -> str:
    """Stable short hash of a resolved config plus the package version."""
    canonical = json.dumps(to_jsonable({"config": config_dict, "version": version}),
                           sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


class RunDir:
    """The files of one run folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def for_config(cls, runs_dir: str | os.PathLike, task: str, method: str, digest: str) -> "RunDir":
        return cls(Path(runs_dir) / task / method / digest)

    config_path = property(lambda self: self.path / CONFIG_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    checkpoint_path = property(lambda self: self.path / CHECKPOINT_FILE)
    final_path = property(lambda self: self.path / FINAL_FILE)

    def is_finished(self) -> bool:
        return self.final_path.exists()

    @contextlib.contextmanager
    def exclusive(self):
        """Hold an exclusive lock on this run folder while training it (``fcntl.flock`` on
        ``<folder>/.lock``; ``reset`` never removes that file). Why: two processes sharing a runs
        folder (e.g. two ``lalora notebooks --only ...`` runners) once trained the same run at the
        same time and interleaved its metrics.jsonl; now the second waits, then finds it finished.
        Without ``fcntl`` (Windows) there is no lock."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:   # pragma: no cover - not on POSIX
            yield
            return
        with open(self.path / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists()

    def write_config(self, config_dict: dict) -> None:
        atomic_write_json(self.config_path, config_dict)

    def read_config(self) -> dict:
        return read_json(self.config_path)

    def append_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def truncate_metrics(self, last_round: int) -> list[dict]:
        """Keep only records of rounds <= ``last_round`` (used on resume: rounds after the last
        checkpoint are re-run and would otherwise be logged twice)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        write_jsonl(self.metrics_path, kept)
        return kept

    def save_checkpoint(self, payload: dict) -> None:
        save_checkpoint(self.checkpoint_path, payload)

    def load_checkpoint(self) -> dict:
        return load_checkpoint(self.checkpoint_path)

    def write_final(self, final: dict) -> None:
        atomic_write_json(self.final_path, final)

    def read_final(self) -> dict:
        return read_json(self.final_path)

    def reset(self) -> None:
        """Forget a previous (unfinished or finished) attempt: remove metrics, checkpoint, final."""
        for p in (self.metrics_path, self.checkpoint_path, self.final_path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
