"""Ahead-of-time compilation of every kernel configuration the launchers can produce, for sm_80 (A100)
and sm_90 (H100/H200), with Triton's own compiler (see aot_compile.py): needs no GPU and no driver, so
CI fails here when a kernel stops compiling. Proves compilation only, not results (the interpreter
tests and `make gpu-check` cover those).

The configurations come from triton_kernels.launch_configs() (the same outer_config / clip_config the
launchers call). The default suite compiles one configuration per code path (aot_compile.representative);
the exhaustive set is marked slow. Compilation runs in one subprocess with TRITON_INTERPRET=0 and a
private Triton cache folder, so it really compiles every run and never writes ~/.triton.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import aot_compile  # noqa: E402  (kernels/tests is on sys.path, as for dplora_ref_loops)
from dplora_kernels import triton_kernels as tk  # noqa: E402

ARCHS = (80, 90)
ALL = tk.launch_configs()
REP = aot_compile.representative(ALL)


def _compile(which: str, tmp: Path) -> dict:
    out = tmp / f"aot_{which}.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp / "triton_cache"),
               TRITON_HOME=str(tmp))
    proc = subprocess.run([sys.executable, aot_compile.__file__, "--set", which, "--arch", *map(str, ARCHS),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    if not out.exists():
        raise AssertionError(f"aot_compile crashed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    if data["skipped"]:
        pytest.skip(data["skipped"])
    return data["results"]


@pytest.fixture(scope="module")
def rep_results(tmp_path_factory):
    return _compile("rep", tmp_path_factory.mktemp("aot"))


def test_launch_configs_cover_every_path():
    """The derived list reaches each branch of outer_config: the outer-product path for P <= 8 with
    BP = 1, 2, 4, 8 (small ranks not padded to 16), tl.dot with BP = 16/32/64, IEEE fp32 dot, the
    mixed-dtype upcast, all four clip variants; the representative subset has each dtype on each path."""
    outer = [c for n, _, c in ALL if n == "outer"]
    assert {c["BP"] for c in outer if not c["USE_DOT"]} == {1, 2, 4, 8}
    assert {c["BP"] for c in outer if c["USE_DOT"]} == {16, 32, 64}
    assert any(c["IEEE"] and not c["UPCAST"] for c in outer) and any(c["UPCAST"] for c in outer)
    assert not any(c["UPCAST"] for n, d, c in ALL if n == "outer" and d["L_ptr"] == d["R_ptr"])
    assert len([1 for n, _, _ in ALL if n == "clip"]) == 4
    paths = {(d["L_ptr"], c["USE_DOT"]) for n, d, c in REP if n == "outer" and d["L_ptr"] == d["R_ptr"]}
    assert len(paths) == 2 * len(tk.DTYPES)
    assert any(c.get("UPCAST") for _, _, c in REP)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("cfg", REP, ids=aot_compile.label)
def test_compiles(arch, cfg, rep_results):
    r = rep_results[str(arch)][aot_compile.label(cfg)]
    assert r["ok"], r.get("error")
    f = r["features"]
    if cfg[0] == "clip" and not cfg[2]["HAS_FACTORS"]:
        # clip factors equal torch's to the last ulp only with IEEE sqrt and division
        assert f["sqrt.rn"] and f["div.rn"] and not f["sqrt.approx"] and not f["div.approx"], f
    if cfg[0] == "outer" and cfg[2]["USE_DOT"] and not cfg[2]["IEEE"]:
        assert f["mma.sync"] or f["wgmma"], f"bf16/fp16 tl.dot without tensor-core MMA: {f}"


def test_compiles_with_int64_arguments(rep_results):
    """Strides past 2^31 reach the kernel as i64 (Triton types large Python ints so)."""
    i64 = [k for a in rep_results.values() for k in a if k.endswith(":i64")]
    assert i64 and all(rep_results[a][k]["ok"] for a in rep_results for k in rep_results[a] if k in i64)


@pytest.mark.slow
def test_compiles_exhaustive(tmp_path):
    res = _compile("rest", tmp_path)
    failed = {f"sm_{a}: {k}": r.get("error") for a, d in res.items() for k, r in d.items() if not r["ok"]}
    assert not failed, failed
    assert sum(len(d) for d in res.values()) == len(ARCHS) * (len(ALL) - len(REP))


@pytest.mark.parametrize("dtype", tk.DTYPES, ids=str)
def test_grouped_path_launches_only_compiled_configs(dtype, monkeypatch):
    """The client-grouped LoRA path (client_index) launches the same per-sample kernel once per factor
    over all samples; every configuration it asks outer_config for (as on a GPU) is in launch_configs(),
    i.e. compiled above -- for ranks on both paths (1 and 4: outer products; 16: tl.dot)."""
    import torch
    import dplora_kernels as dk

    seen = []
    real = tk.outer_config

    def spy(P, Q, ld, rd, interpreter, use_dot=None):
        seen.append((ld, rd, real(P, Q, ld, rd, interpreter=False, use_dot=use_dot)))
        return real(P, Q, ld, rd, interpreter, use_dot)

    monkeypatch.setattr(tk, "outer_config", spy)
    gen = torch.Generator().manual_seed(0)
    for r in (1, 4, 16):
        N, T, n, m, M = 3, 2, 20, 17, 2
        x = torch.randn(N, T, n, generator=gen).to(dtype)
        g = torch.randn(N, T, m, generator=gen).to(dtype)
        A = torch.randn(M, r, n, generator=gen)
        B = torch.randn(M, m, r, generator=gen)
        dk.lora_per_sample_grads(x, g, A, B, 1.0, N, backend="triton", client_index=torch.tensor([1, 0, 1]))
    compiled = {(d["L_ptr"], d.get("R_ptr"), tuple(sorted(c.items()))) for name, d, c in ALL if name == "outer"}
    assert len(seen) == 6
    for ld, rd, cfg in seen:
        assert (ld, rd, tuple(sorted(cfg.items()))) in compiled, (ld, rd, cfg)
