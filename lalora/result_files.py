"""The one reader of the notebooks' result files (``results/<profile>/NN_name.json``).

``lalora.verdicts`` judges what they say, ``lalora.report`` and ``lalora.site`` show it; none of them
opens a result file any other way. An unreadable file becomes ``{"_error": ...}`` so that callers say
so instead of failing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

PROFILE_ORDER = ["paper", "offline-full", "offline", "ci"]
RESULT_FILE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.json$")


def read_result(path: str | os.PathLike) -> dict | None:
    """A notebook's ``NN_name.json``: None when absent, ``{"_error": ...}`` when unreadable (callers say so)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"_error": f"{type(err).__name__}: {err}"}
    return data if isinstance(data, dict) else {"_error": f"{path.name} holds no JSON object"}


def profile_key(profile: str):
    return (PROFILE_ORDER.index(profile) if profile in PROFILE_ORDER else len(PROFILE_ORDER), profile)


def collect_results(results_root: str | os.PathLike,
                    profiles: Iterable[str] | None = None) -> dict[str, dict[str, dict]]:
    """{profile: {notebook: json}} for every ``results/<profile>/NN_*.json``, profiles in report order."""
    root = Path(results_root)
    if not root.is_dir():
        return {}
    names = [p.name for p in root.iterdir() if p.is_dir()]
    found: dict[str, dict[str, dict]] = {}
    for profile in (list(profiles) if profiles else sorted(names, key=profile_key)):
        folder = root / profile
        if not folder.is_dir():
            continue
        per_nb = {p.stem: read_result(p) for p in sorted(folder.iterdir()) if RESULT_FILE.match(p.name)}
        if per_nb:
            found[profile] = per_nb
    return found


def flatten(d: Mapping[str, Any], prefix: str = "", max_list: int | None = None) -> list[tuple[str, Any]]:
    """Nested dicts as ("a.b", value) pairs; lists longer than ``max_list`` as "[n values]"."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += flatten(v, key + ".", max_list)
        elif max_list is not None and isinstance(v, (list, tuple)) and len(v) > max_list:
            out.append((key, f"[{len(v)} values]"))
        else:
            out.append((key, v))
    return out


def profile_runs(per_nb: Mapping[str, Any]) -> list[dict]:
    """Every per-seed run record of a profile's notebooks."""
    return [r for data in per_nb.values() if isinstance(data, Mapping) and isinstance(data.get("runs"), list)
            for r in data["runs"] if isinstance(r, Mapping)]
