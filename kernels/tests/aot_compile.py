"""Ahead-of-time compilation of the dplora_kernels Triton kernels for NVIDIA targets, with no GPU and no
driver: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs TTIR -> TTGIR -> LLVM IR
-> PTX -> cubin (bundled ptxas). Used by test_kernels_compile.py (in a subprocess: with
TRITON_INTERPRET=1, Triton's own tl.* helpers are interpreter objects and cannot be compiled) and by
gpu_check.

    python kernels/tests/aot_compile.py [--set rep|all] [--arch 80 90] [--json OUT]

Prints one line per configuration and exits 1 if any fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_TT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
# PTX features reported per configuration (the test asserts on some)
FEATURES = {"wgmma": r"wgmma", "mma.sync": r"mma\.sync", "sqrt.rn": r"sqrt\.rn\.f32",
            "sqrt.approx": r"sqrt\.approx", "div.rn": r"div\.rn\.f32", "div.approx": r"div\.(full|approx)",
            "local-mem": r"ld\.local|st\.local"}


def label(cfg) -> str:
    name, dtypes, c = cfg
    d = "-".join(_TT[str(dtypes[k])] for k in sorted(dtypes))
    consts = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(c.items()))
    return f"{name}[{d}]{consts}" if d else f"{name}:{consts}"


def representative(configs):
    """One configuration per code path: each operand dtype on both paths (outer product, tl.dot), one
    mixed-dtype (upcast) dot, the smallest and largest tiles, one split reduction, every clip variant."""
    import torch
    out, seen = [], set()
    for cfg in configs:
        name, dtypes, c = cfg
        if name == "outer":
            ld, rd = dtypes["L_ptr"], dtypes["R_ptr"]
            keys = [("path", ld, c["USE_DOT"])] if ld == rd and c["BQ"] == 64 else []
            if c["UPCAST"] and c["BQ"] == 64:
                keys.append(("upcast",))
            if (c["BP"], c["BQ"]) in ((1, 16), (64, 64)) and ld == rd == torch.bfloat16:
                keys.append(("tile", c["BP"], c["BQ"]))
        elif name == "reduce":
            keys = [("reduce",)] if (c["BP"], c["BQ"]) == (16, 64) else []
        else:
            keys = [(name, tuple(sorted(c.items())))]
        if any(k not in seen for k in keys):
            seen.update(keys)
            out.append(cfg)
    return out


def as_jit(kernel):
    """A JITFunction for the kernel, also when TRITON_INTERPRET=1 made @triton.jit return an
    InterpretedFunction (same source function, same do_not_specialize list)."""
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)


def compile_config(arch: int, cfg, int_type: str = "i32") -> str:
    """Compile one (kernel name, pointer dtypes, constexprs) configuration; returns the PTX. Pointers
    carry the 16-byte alignment the launcher sees for fresh torch allocations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dplora_kernels import triton_kernels as tk
    name, dtypes, constexprs = cfg
    fn = as_jit(tk.KERNELS[name])
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in tk.POINTER_ARGS[name]:
            sig[arg] = "*" + _TT[str(dtypes.get(arg, "torch.float32"))]
        elif arg in tk.FLOAT_ARGS:
            sig[arg] = "fp32"
        else:
            sig[arg] = int_type
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in tk.POINTER_ARGS[name]}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    opts = backend.parse_options({"num_warps": 4, "num_stages": 3})
    return triton.compile(src, target=target, options=opts.__dict__).asm["ptx"]


def api_supported() -> str | None:
    """None if this triton has the ASTSource(fn, signature, constexprs, attrs) API (triton >= 3.3),
    else the reason it does not."""
    import inspect

    import triton
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return f"triton {triton.__version__}: ASTSource(constexprs=...) (triton >= 3.3) not available"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=("rep", "all", "rest"), default="rep",
                    help="rep: one per code path; all: every launch configuration; rest: all minus rep")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write {arch: {label: result}} here")
    args = ap.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"   # must precede the first triton import (see module doc)
    from dplora_kernels import triton_kernels as tk
    reason = api_supported()
    results: dict = {"skipped": reason, "results": {}}
    if reason is None:
        configs = tk.launch_configs()
        rep = representative(configs)
        chosen = {"rep": rep, "all": configs, "rest": [c for c in configs if c not in rep]}[args.set]
        for arch in args.arch:
            res = results["results"].setdefault(str(arch), {})
            for cfg in chosen + ([("outer-i64",) + cfg[1:] for cfg in rep[1:2]] if args.set == "rep" else []):
                i64 = cfg[0] == "outer-i64"
                real = ("outer",) + cfg[1:] if i64 else cfg
                key = label(real) + (":i64" if i64 else "")
                t0 = time.time()
                try:
                    ptx = compile_config(arch, real, "i64" if i64 else "i32")
                    feats = {k: len(re.findall(p, ptx)) for k, p in FEATURES.items()}
                    res[key] = {"ok": ".entry" in ptx, "features": feats, "seconds": round(time.time() - t0, 2)}
                except Exception as e:   # report every failure, not only the first
                    res[key] = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
                r = res[key]
                print(f"{'OK  ' if r['ok'] else 'FAIL'} sm_{arch} {key} "
                      f"{r.get('features', r.get('error', ''))}", flush=True)
    else:
        print("SKIP", reason)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [k for a in results["results"].values() for k, r in a.items() if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
