"""Numerics on the GPU: dplora_kernels triton vs torch backend vs float64, fp32/bf16/fp16, at odd and
model-sized shapes; clip factors triton == torch bit for bit; a grid past 65,535 tiles; the DP step
(dplora_kernels.dp_gradient) vs a float64 per-sample loop with and without bf16 autocast; the number of
kernel compilations while the Poisson batch size N varies. Writes $OUT/numerics.json; exit 1 on a failure.

Tolerances (max |err| / max |ref|): fp32 1e-5, fp16 5e-3, bf16 3e-2 (the kernel tests'); torch backend 1e-5.
"""

import copy
import math
import sys
import time
import traceback

from common import DRY, dev, gpu_name, rel, sync, write_json

import torch  # noqa: E402  (after common: TRITON_INTERPRET)
from torch import nn  # noqa: E402

import dplora_kernels as dk  # noqa: E402
from dplora_kernels import triton_kernels as tk  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RESULTS, FAILS = {}, []


def check(name, err, tol, **extra):
    ok = err <= tol
    RESULTS[name] = dict(err=err, tol=tol, ok=ok, **extra)
    if not ok:
        FAILS.append(name)
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {err:.2e} (tol {tol:g}) {extra if extra else ''}", flush=True)


def data(N, k, T, n, m, r, dt, seed=0):
    gen = torch.Generator(device=dev).manual_seed(seed)
    sx = (N * k, T, n) if T else (N * k, n)
    x = torch.randn(sx, generator=gen, device=dev).to(dt)
    g = torch.randn(sx[:-1] + (m,), generator=gen, device=dev).to(dt)
    A = (torch.randn(r, n, generator=gen, device=dev) / math.sqrt(n)).to(dt)
    B = torch.randn(m, r, generator=gen, device=dev).to(dt)
    return x, g, A, B


def ref64(x, g, A, B, s, N):
    L = x.numel() // x.shape[-1] // N if N else 1
    xs, gs = x.double().reshape(N, L, x.shape[-1]), g.double().reshape(N, L, g.shape[-1])
    GA = torch.einsum("nlr,nld->nrd", s * gs @ B.double(), xs)
    GB = s * torch.einsum("nlm,nlr->nmr", gs, xs @ A.double().T)
    return GA, GB


SHAPES = [  # N, k, T, n, m, r
    (3, 1, 1, 16, 16, 1), (1, 1, 5, 1, 40, 1), (5, 1, 77, 100, 300, 3), (0, 1, 7, 16, 16, 4),
    (32, 1, 128, 768, 768, 8),          # RoBERTa-base q/v
    (32, 64, 49, 128, 384, 16),         # Swin-B stage 1 qkv (64 windows x 49 tokens per image)
    (32, 4, 49, 512, 1536, 16),         # Swin-B stage 3 qkv
    (2, 1, 8192, 64, 96, 16),           # long sequence: T-split + reduction kernel
    (8, 1, None, 768, 768, 8),          # 2-D input (one row per sample)
    (16, 1, 512, 4096, 4096, 64),       # large activations
]
if DRY:
    SHAPES = [(3, 1, 1, 16, 16, 1), (1, 1, 5, 1, 40, 1), (2, 1, 300, 16, 24, 16), (3, 1, None, 24, 40, 4),
              (0, 1, 7, 16, 16, 4)]


def lora_cases():
    print("== lora_per_sample_grads: triton / torch vs float64", flush=True)
    for shp in SHAPES:
        N, k, T, n, m, r = shp
        for dt in DTYPES:
            x, g, A, B = data(*shp, dt)
            wA, wB = ref64(x, g, A, B, 0.5, N)
            wsq = wA.flatten(1).pow(2).sum(1) + wB.flatten(1).pow(2).sum(1)
            for be in ("triton", "torch"):
                res = dk.lora_per_sample_grads(x, g, A, B, 0.5, N, backend=be)
                err = max(rel(res.grad_A, wA), rel(res.grad_B, wB), rel(res.sqnorm_A + res.sqnorm_B, wsq))
                nan = bool(torch.isnan(res.grad_A).any() or torch.isnan(res.grad_B).any())
                check(f"lora {be} {shp} {str(dt)[6:]}", float("inf") if nan else err,
                      TOL[dt] if be == "triton" else 1e-5)
            del x, g, A, B, wA, wB, res
            if not DRY:
                torch.cuda.empty_cache()


def small_rank_paths():
    print("== ranks 1..8: outer-product path vs forced tl.dot path (bf16 RoBERTa q/v shape)", flush=True)
    N, T, n = (2, 16, 24) if DRY else (32, 128, 768)
    for r in (1, 4, 8):
        x, g, A, B = data(N, 1, T, n, n, r, torch.bfloat16)
        wA, _ = ref64(x, g, A, B, 1.0, N)
        v = (g @ B).reshape(N, T, r)
        for use_dot in (False, True):
            out = torch.empty(N, r, n, device=dev)
            tk.per_sample_outer(v, x.reshape(N, T, n), out, 1.0, use_dot=use_dot)
            check(f"rank {r} use_dot={use_dot}", rel(out, wA), TOL[torch.bfloat16])


def big_grid():
    print("== grid past 65,535 output tiles in one sample (old grid axis y limit) and int64 offsets", flush=True)
    N, T, n, m = (1, 2, 130, 70) if DRY else (2, 4, 16448, 16448)   # 257 x 257 = 66,049 tiles of 64 x 64
    x, g, _, _ = data(N, 1, T, n, m, 1, torch.bfloat16)
    res = dk.linear_per_sample_grads(x, g, N, bias=False, backend="triton")
    want = torch.einsum("nlm,nld->nmd", g.float().reshape(N, T, m), x.float().reshape(N, T, n))
    check(f"linear {N}x{T}x{n}->{m} ({math.ceil(n / 64) * math.ceil(m / 64)} tiles/sample)",
          rel(res.grad_weight, want), 1e-5)


def linear_cases():
    print("== linear_per_sample_grads (head): triton vs float64", flush=True)
    for (N, T, n, m) in ([(3, None, 24, 2), (3, 5, 1, 1)] if DRY else [(32, None, 768, 2), (8, 128, 768, 768)]):
        for dt in DTYPES:
            x, g, _, _ = data(N, 1, T, n, m, 1, dt)
            xs, gs = x.double().reshape(N, -1, n), g.double().reshape(N, -1, m)
            res = dk.linear_per_sample_grads(x, g, N, backend="triton")
            err = max(rel(res.grad_weight, torch.einsum("nlm,nld->nmd", gs, xs)), rel(res.grad_bias, gs.sum(1)))
            check(f"linear N{N} T{T} n{n} m{m} {str(dt)[6:]}", err, TOL[dt])


def clip_cases():
    print("== clip_and_noise: triton vs torch (same generator -> same noise), factors bit for bit", flush=True)
    for (N, P) in ([(3, 37), (4, 5000)] if DRY else [(3, 37), (32, 294912), (64, 1 << 20)]):
        gen = torch.Generator(device=dev).manual_seed(0)
        arena = torch.randn(N, P, device=dev, generator=gen) * torch.rand(N, 1, device=dev, generator=gen)
        sq = arena.pow(2).sum(1)
        outs = {be: dk.clip_and_noise([arena], sq, 0.3, 1.0, torch.Generator(device=dev).manual_seed(1), backend=be)
                for be in ("triton", "torch")}
        check(f"clip sum N{N} P{P}", rel(outs["triton"][0][0], outs["torch"][0][0]), 1e-5)
        differ = int((outs["triton"][1] != outs["torch"][1]).sum())
        check(f"clip factors N{N} (count differing from torch)", differ, 0)


def dp_step_case():
    print("== dplora_kernels.dp_gradient (LoRA MLP + LayerNorm + trained head) vs float64 per-sample loop", flush=True)
    from lalora.lora import inject_lora
    N, T, n, m, C = 6, 7, 48, 80, 0.05
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m), nn.GELU(), nn.Linear(m, n), nn.LayerNorm(n), nn.Linear(n, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, ["0", "2"], r=4, alpha=8.0, dropout=0.0)
    for p in model[4].parameters():
        p.requires_grad_(True)
    for mod in model.modules():
        if hasattr(mod, "lora_B"):
            nn.init.normal_(mod.lora_B, std=0.5)
    m64 = copy.deepcopy(model).double().to(dev)
    model = model.to(dev)
    x, y = torch.randn(N, T, n, device=dev), torch.randint(0, 3, (N,), device=dev)
    p64 = [p for p in m64.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in p64]
    for i in range(N):
        li = nn.functional.cross_entropy(m64(x[i:i + 1].double()).mean(1), y[i:i + 1], reduction="sum")
        gs = torch.autograd.grad(li, p64)
        c = min(1.0, C / (math.sqrt(sum(gg.pow(2).sum().item() for gg in gs)) + 1e-6))
        for s_, gg in zip(sums, gs):
            s_ += c * gg
    for amp in (False, True):
        def loss_fn(mm, b):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = mm(b[0])
            return nn.functional.cross_entropy(out.float().mean(1), b[1], reduction="none")
        for be in ("triton", "torch"):
            for p in model.parameters():
                p.grad = None
            dk.dp_gradient(model, loss_fn, (x, y), clip_norm=C, noise_multiplier=0.0, expected_batch_size=N,
                           generator=None, num_samples=N, backend=be)
            params = [p for p in model.parameters() if p.requires_grad]
            err = max(rel(p.grad * N, w) for p, w in zip(params, sums))
            check(f"dp_gradient {be} bf16-autocast={amp}", err, 3e-2 if amp else 1e-4)


def recompiles():
    print("== compilations while the Poisson batch size varies (RoBERTa q/v module shape, bf16)", flush=True)
    n, m, r, T = (24, 40, 16, 300) if DRY else (768, 768, 8, 128)
    kernels = {"outer": tk._per_sample_outer_kernel, "reduce": tk._reduce_splits_kernel,
               "clip": tk._clip_sum_noise_kernel}

    def count():
        out = {}
        for k, kern in kernels.items():
            caches = getattr(kern, "device_caches", None)   # JITFunction (GPU); absent under the interpreter
            out[k] = sum(len(c[0]) for c in caches.values()) if caches is not None else -1
        return out

    Ns = range(1, 5) if DRY else range(2, 60)
    times = []
    x, g, A, B = data(Ns[0], 1, T, n, m, r, torch.bfloat16)
    res = dk.lora_per_sample_grads(x, g, A, B, 0.5, Ns[0], backend="triton")
    dk.clip_and_noise([res.grad_A, res.grad_B], res.sqnorm_A + res.sqnorm_B, 1.0, 1.0, None, backend="triton")
    before = count()
    for N in Ns[1:]:
        x, g, A, B = data(N, 1, T, n, m, r, torch.bfloat16, seed=N)
        sync()
        t0 = time.perf_counter()
        res = dk.lora_per_sample_grads(x, g, A, B, 0.5, N, backend="triton")
        dk.clip_and_noise([res.grad_A, res.grad_B], res.sqnorm_A + res.sqnorm_B, 1.0, 1.0, None, backend="triton")
        sync()
        times.append(((time.perf_counter() - t0) * 1e3, N))
    after = count()
    new = {k: after[k] - before[k] for k in kernels}
    RESULTS["recompiles"] = dict(before=before, after=after, N=[Ns[0], Ns[-1]], slowest_ms=sorted(times)[-3:])
    print(f"  compiled variants before/after N={Ns[1]}..{Ns[-1]}: {before} -> {after}; slowest calls "
          f"(ms, N): {sorted(times)[-3:]}", flush=True)
    if not DRY and min(before.values()) >= 0:
        check("new compilations over varying N", max(new.values()), 0)
    elif not DRY:
        FAILS.append("recompiles: this triton's JITFunction has no device_caches; count unknown")


def device_guard():
    print("== launch on the tensors' GPU, not the current one", flush=True)
    if DRY or torch.cuda.device_count() < 2:
        print("  skipped: needs two GPUs", flush=True)
        return
    with torch.cuda.device(0):
        x, g, A, B = (t.to("cuda:1") for t in data(2, 1, 9, 32, 32, 16, torch.float32))
        res = dk.lora_per_sample_grads(x, g, A, B, 1.0, 2, backend="triton")
        wA, _ = ref64(x, g, A, B, 1.0, 2)
        check("cuda:1 tensors with cuda:0 current", rel(res.grad_A, wA), 1e-5)


if __name__ == "__main__":
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {gpu_name()}", flush=True)
    t0 = time.time()
    for fn in (lora_cases, clip_cases, small_rank_paths, linear_cases, dp_step_case, recompiles, big_grid,
               device_guard):
        try:
            fn()
        except Exception as e:   # one failing section does not hide the others
            traceback.print_exc(limit=4)
            FAILS.append(f"{fn.__name__} raised {type(e).__name__}: {e}")
    write_json("numerics.json", dict(gpu=gpu_name(), torch=torch.__version__, triton=triton.__version__,
                                     dry_run=DRY, results=RESULTS, failures=FAILS))
    print(f"numerics done in {time.time() - t0:.0f}s;", "ALL PASS" if not FAILS else f"FAILURES: {FAILS}")
    sys.exit(1 if FAILS else 0)
