"""Provenance: what a result depends on beyond its config, recorded next to every result.

Why: a float result (a pretrained backbone, a run's accuracy) is a function of the code, the
library versions, the CPU's instruction set and the thread count, not only of the config. Issue 19
was a committed result nobody could reproduce and nothing in the repo said which of those differed.
So every results JSON carries :func:`provenance` (one function, used by run summaries, the notebook
runner and ``lalora verify-results``), and the caches key their entries by :func:`source_hash` of
the modules that produce them (never a hand-bumped version number, which goes stale silently).

    provenance(accountant="prv") -> {"git": {...}, "versions": {...}, "cpu": {...},
                                      "threads": {...}, "backbones": {...}, "accountant": "prv"}
    source_hash("lalora.tasks.pretrain", "lalora.tasks.vision") -> sha256 hex of the files' bytes
    state_dict_sha256(sd) -> sha256 hex of a state_dict's names, dtypes, shapes and bytes
    directory_sha256(path) -> sha256 hex of a folder's files (names and bytes): a shipped model's key
    record_backbone(name, sha) / backbones() -> checksums of the backbones this process loaded
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# CPU flags that change float kernels' results (vector width, fused multiply-add, matrix units).
FLOAT_ISA_PREFIXES = ("avx", "fma", "amx", "f16c", "sse4")
# Paths whose uncommitted edits make the code differ from the recorded commit (results/ and runs/
# are outputs: writing them must not mark the run "dirty").
SOURCE_PATHS = ("lalora", "kernels/src", "notebooks", "pyproject.toml")
# Fields that decide whether two runs can be bitwise equal (see lalora.verify).
BITWISE_FIELDS = ("versions.torch", "versions.numpy", "versions.timm", "versions.opacus",
                  "cpu.model", "cpu.float_flags", "threads.torch_intra_op", "backbones")

_BACKBONES: dict[str, str] = {}


def source_hash(*modules: str) -> str:
    """SHA-256 over the bytes of the named modules' source files (names included, sorted).

    A cache keyed by this is invalidated by any edit of the code that fills it."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise ValueError(f"module {name!r} not found (cannot hash its source)")
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return h.hexdigest()


def state_dict_sha256(state_dict: dict) -> str:
    """Checksum of a state_dict's tensors (names, dtypes, shapes, bytes), order-independent."""
    import numpy as np

    h = hashlib.sha256()
    for key in sorted(state_dict):
        a = np.ascontiguousarray(state_dict[key].detach().cpu().numpy())
        h.update(f"{key}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def directory_sha256(path: str | os.PathLike) -> str:
    """Checksum of the files under ``path``: each file's relative name and bytes, sorted. The content
    key of a pretrained model shipped as a folder (MiniLM's), where the folder's location says nothing
    about what it holds. Cached per (file names, sizes, modification times)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    stamp = tuple((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _directory_sha256(str(root), stamp)


@functools.lru_cache(maxsize=8)
def _directory_sha256(root: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for name, _, _ in stamp:
        h.update(name.encode() + b"\0")
        with open(Path(root) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def record_backbone(name: str, sha256: str) -> None:
    """Note that this process used backbone ``name`` with these weights (see :func:`backbones`)."""
    _BACKBONES[name] = sha256


def backbones() -> dict[str, str]:
    return dict(sorted(_BACKBONES.items()))


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model and the ISA flags that matter for float kernels (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = sorted(f for f in value.split() if f.startswith(FLOAT_ISA_PREFIXES))
    return {"model": model, "machine": platform.machine(), "float_flags": flags,
            "logical_cpus": os.cpu_count()}


def library_versions() -> dict[str, str | None]:
    import importlib.metadata as md
    import sys

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("torch", "numpy", "timm", "opacus", "transformers", "lalora", "dplora-kernels"):
        try:
            out[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def thread_info() -> dict[str, Any]:
    import torch

    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    return {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
            **env}


def git_info(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit of the source checkout and whether its code paths have uncommitted edits
    (``None`` fields outside a git checkout, e.g. an installed wheel)."""
    root = Path(root) if root else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                 timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance(*, accountant: str | None = None, **extra: Any) -> dict[str, Any]:
    """Everything besides the config that a user needs to judge whether a result can be
    reproduced bitwise on their machine (``BITWISE_FIELDS``) or only within a tolerance."""
    record = {"git": git_info(), "versions": library_versions(), "cpu": cpu_info(),
              "threads": thread_info(), "backbones": backbones()}
    if accountant is not None:
        record["accountant"] = accountant
    record.update(extra)
    return record


def run_provenance(task, *, accountant: str) -> dict[str, Any]:
    """:func:`provenance` of one federated run: its own backbone's checksum (``Task.info``)
    rather than every backbone this process happened to load."""
    info = getattr(task, "info", None) or {}
    pre = info.get("pretrain") if isinstance(info, dict) else None
    if isinstance(pre, dict) and pre.get("weights_sha256"):
        return provenance(accountant=accountant, backbones={pre.get("source", task.name): pre["weights_sha256"]})
    return provenance(accountant=accountant)


def field(record: dict, dotted: str) -> Any:
    """``field(p, "cpu.model")``: a dotted path into a provenance record (None if absent)."""
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def differing_fields(a: dict, b: dict, fields: tuple[str, ...] = BITWISE_FIELDS) -> list[str]:
    """The ``fields`` whose values differ between two provenance records, as
    ``"name: a -> b"`` strings (empty: the runs may be compared bitwise)."""
    out = []
    for name in fields:
        va, vb = field(a, name), field(b, name)
        if name == "backbones" and isinstance(va, dict) and isinstance(vb, dict):
            shared = set(va) & set(vb)
            va, vb = {k: va[k] for k in shared}, {k: vb[k] for k in shared}
        if va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def _accountants(obj: Any, found: set) -> set:
    if isinstance(obj, dict):
        if isinstance(obj.get("accountant"), str):
            found.add(obj["accountant"])
        for v in obj.values():
            _accountants(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _accountants(v, found)
    return found


def stamp_result_json(path: str | os.PathLike) -> bool:
    """Add ``"provenance"`` (this process's :func:`provenance`, with the accountants its records
    name) to an existing results JSON, atomically. False if there is no such file."""
    from lalora.results import atomic_write_json, read_json

    path = Path(path)
    if not path.exists():
        return False
    data = read_json(path)
    if not isinstance(data, dict):
        return False
    data.pop("provenance", None)
    data["provenance"] = provenance(accountants=sorted(_accountants(data, set())))
    atomic_write_json(path, data)
    return True
