"""Benchmark of dplora_kernels: a full DP-LoRA training step against the non-private LoRA step and
Opacus (hooks and ghost clipping), plus each kernel's achieved memory bandwidth.

GPU mode (CUDA present): RoBERTa-base shapes (N=32, T=128, r=8, LoRA on query/value; random init
from RobertaConfig, nothing downloaded) and Swin-B shapes (N=32, 224x224, r=16, LoRA on attn.qkv and
attn.proj; timm swin_base_patch4_window7_224, pretrained=False). Step = forward + backward + DP clip/noise
+ SGD step; median over timed iterations after warm-up; peak memory from max_memory_allocated. Kernel
bandwidth is compared with a measured device-to-device copy (read + write bytes / time).

CPU mode (no CUDA): the same code at SMALL shapes, with the torch reference backend. These numbers
say nothing about GPU performance; the output says so.

Run:  .venv/bin/python benchmarks/kernels_bench.py [--out benchmarks/out] [--iters 10] [--skip-opacus]
Writes <out>/kernels_<cpu|gpu>.csv and .md (atomically).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

import dplora_kernels as dk

CLIP_NORM, NOISE_MULTIPLIER, LR = 1.0, 1.0, 1e-3


# ---------------------------------------------------------------------------------------------------
# Models


class PlainLoRALinear(nn.Module):
    """PEFT-style LoRA made of two nn.Linear (what Opacus' hooks understand); used for the non-private
    baseline and both Opacus modes. Same init as dplora_kernels.LoRALinear."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def inject(model: nn.Module, suffixes: tuple[str, ...], r: int, alpha: float, kind: str) -> int:
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        new = dk.LoRALinear(base, r, alpha, dropout=0.0) if kind == "dp" else PlainLoRALinear(base, r, alpha)
        setattr(parent, child, new.to(base.weight.device))
    if not names:
        raise ValueError(f"no module matched {suffixes}")
    return len(names)


class RobertaClassifier(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        from transformers import RobertaModel
        self.backbone = RobertaModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(cfg.hidden_size, 2)

    def forward(self, input_ids):
        return self.head(self.backbone(input_ids=input_ids).last_hidden_state[:, 0])


@dataclass
class Workload:
    name: str
    build: callable            # () -> nn.Module (frozen backbone, no LoRA yet)
    suffixes: tuple[str, ...]
    r: int
    alpha: float
    make_batch: callable       # (device) -> (inputs, labels)
    rows_per_sample: bool      # True when layers see several rows per sample (Swin windows)
    n: int


def roberta_workload(gpu: bool) -> Workload:
    from transformers import RobertaConfig
    if gpu:
        cfg, N, T = RobertaConfig(), 32, 128      # roberta-base defaults: 12 layers, 768 hidden
    else:
        cfg = RobertaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                            vocab_size=1000, max_position_embeddings=72)
        N, T = 8, 32
    cfg.attn_implementation = "eager"

    def batch(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randint(5, cfg.vocab_size, (N, T), generator=g).to(device),
                torch.randint(0, 2, (N,), generator=g).to(device))
    name = f"roberta-{'base' if gpu else 'tiny'} N={N} T={T} r=8 q,v"
    return Workload(name, lambda: RobertaClassifier(cfg), ("query", "value"), 8, 16.0, batch, False, N)


def swin_workload(gpu: bool) -> Workload:
    import timm
    if gpu:
        N, img = 32, 224
        build = lambda: timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=10)
    else:
        N, img = 4, 56
        from timm.models.swin_transformer import SwinTransformer
        build = lambda: SwinTransformer(img_size=56, patch_size=4, window_size=7, embed_dim=32, depths=(2, 2),
                                        num_heads=(2, 4), num_classes=10)

    def batch(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(N, 3, img, img, generator=g).to(device), torch.randint(0, 10, (N,), generator=g).to(device))
    name = f"swin-{'base' if gpu else 'tiny'} N={N} {img}px r=16 qkv,proj"
    return Workload(name, build, ("attn.qkv", "attn.proj"), 16, 16.0, batch, True, N)


# ---------------------------------------------------------------------------------------------------
# Training steps


def make_step(method: str, wl: Workload, device):
    """Return a zero-argument function doing one full training step with `method`."""
    torch.manual_seed(0)
    model = wl.build().to(device)
    kind = "dp" if method == "dplora" else "plain"
    inject(model, wl.suffixes, wl.r, wl.alpha, kind)
    model.train()
    x, y = wl.make_batch(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    ce = nn.CrossEntropyLoss(reduction="sum")

    if method == "nonprivate":
        def step():
            ce(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    if method == "dplora":
        gen = torch.Generator(device=device).manual_seed(0)
        per_sample_ce = nn.CrossEntropyLoss(reduction="none")

        def step():   # the one engine; Swin: windows are rows, images (num_samples=N) the clipping unit
            dk.dp_gradient(model, lambda m, b: per_sample_ce(m(b[0]), b[1]), (x, y), clip_norm=CLIP_NORM,
                           noise_multiplier=NOISE_MULTIPLIER, expected_batch_size=wl.n, generator=gen)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=wl.n)
    mode = {"opacus_hooks": "hooks", "opacus_ghost": "ghost"}[method]
    pe = PrivacyEngine()
    out = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
                          max_grad_norm=CLIP_NORM, poisson_sampling=False, loss_reduction="sum",
                          grad_sample_mode=mode, criterion=ce)
    if mode == "ghost":
        gmodel, dopt, crit, _ = out
    else:
        (gmodel, dopt, _), crit = out, ce

    def step():
        crit(gmodel(x), y).backward()
        dopt.step()
        dopt.zero_grad(set_to_none=True)
    return step


def time_step(step, device, warmup: int, iters: int) -> tuple[float, float, float | None]:
    """Median wall time per step (ms), median process CPU time per step (ms; the steadier number on a
    shared CPU machine) and peak allocated memory (MiB, CUDA only)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return statistics.median(times), statistics.median(cpu), peak


# ---------------------------------------------------------------------------------------------------
# Kernel bandwidth


def bench_fn(fn, device, reps: int) -> float:
    """Median time of fn() in ms."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    ts = []
    for _ in range(reps):   # CPU: process CPU time (torch runs single-threaded here), steadier when shared
        t0 = time.process_time()
        fn()
        ts.append((time.process_time() - t0) * 1e3)
    return statistics.median(ts)


def copy_bandwidth(device, reps: int) -> float:
    """Measured copy bandwidth in GB/s: (read + write bytes) / time for a 256 MiB (GPU) / 64 MiB copy."""
    n = (256 if device.type == "cuda" else 64) * 2 ** 20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    ms = bench_fn(lambda: b.copy_(a), device, reps)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def kernel_rows(device, backend: str, dtype, reps: int) -> list[dict]:
    """Per-kernel time and achieved bandwidth at the benchmark's per-module shapes."""
    gpu = device.type == "cuda"
    # (label, N, rows per sample, n, m, r)
    shapes = ([("roberta q/v module", 32, 128, 768, 768, 8), ("swin stage-1 qkv (per image)", 32, 3136, 128, 384, 16),
               ("swin stage-3 qkv", 32, 196, 512, 1536, 16)] if gpu else
              [("small module", 8, 32, 64, 64, 8), ("small long-T module", 4, 196, 32, 96, 16)])
    rows = []
    es = torch.tensor([], dtype=dtype).element_size()
    for label, N, L, n, m, r in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, L, n, generator=g).to(device, dtype)
        go = torch.randn(N, L, m, generator=g).to(device, dtype)
        A = (torch.randn(r, n, generator=g) * 0.02).to(device, dtype)
        B = (torch.randn(m, r, generator=g) * 0.02).to(device, dtype)
        u, gB = x @ A.T, go @ B
        if backend == "triton":
            from dplora_kernels import triton_kernels as tk
            outA = torch.empty(N, r, n, device=device)
            outB = torch.empty(N, m, r, device=device)
            fA = lambda: tk.per_sample_outer(gB, x, outA, 0.5)
            fB = lambda: tk.per_sample_outer(u, go, outB.transpose(1, 2), 0.5)
        else:
            fA = lambda: dk.lora_per_sample_grads(x, go, A, B, 0.5, N, u=u, backend="torch", which="A")
            fB = lambda: dk.lora_per_sample_grads(x, go, A, B, 0.5, N, u=u, backend="torch", which="B")
        # bytes the kernel must move: its inputs once + fp32 per-sample grads written once
        bytes_A = N * L * (r + n) * es + N * r * n * 4
        bytes_B = N * L * (r + m) * es + N * m * r * 4
        for kname, f, nbytes in (("per-sample G_A (+norm)", fA, bytes_A), ("per-sample G_B (+norm)", fB, bytes_B)):
            ms = bench_fn(f, device, reps)
            rows.append(dict(kernel=kname, shape=f"{label}: N={N} L={L} n={n} m={m} r={r} {str(dtype)[6:]}",
                             ms=ms, gbytes=nbytes / 1e9, gb_per_s=nbytes / (ms * 1e-3) / 1e9))
    # grouped clip + sum + noise over an arena of all modules' per-sample grads
    N, P = (32, 24 * 8 * 768 * 2) if gpu else (8, 4 * 8 * 64 * 2)
    arena = torch.randn(N, P, device=device)
    views = [arena]
    sq = arena.pow(2).sum(1)
    gen = torch.Generator(device=device).manual_seed(0)
    f = lambda: dk.clip_and_noise(views, sq, 1.0, 1.0, gen, backend=backend)
    ms = bench_fn(f, device, reps)
    nbytes = N * P * 4 + 2 * P * 4        # read arena + noise, write the sum
    rows.append(dict(kernel="grouped clip+sum+noise (incl. torch randn)", shape=f"arena N={N} P={P} fp32",
                     ms=ms, gbytes=nbytes / 1e9, gb_per_s=nbytes / (ms * 1e-3) / 1e9))
    return rows


# ---------------------------------------------------------------------------------------------------
# Output


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor() or "unknown CPU"
    return f"CPU: {model} ({os.cpu_count()} logical cores visible)"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "out"))
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--skip-opacus", action="store_true")
    ap.add_argument("--workloads", default="roberta,swin")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    backend = dk.resolve_backend("auto", device)
    iters = args.iters or (20 if gpu else 5)
    warmup = args.warmup or (5 if gpu else 2)
    machine = machine_name(device)
    banner = (f"GPU benchmark on {machine}, backend={backend}" if gpu else
              f"NO GPU: CPU run at SMALL shapes with the torch REFERENCE backend on {machine}. "
              "These numbers do not measure the Triton kernels or GPU performance.")
    print(banner, flush=True)
    load_start = os.getloadavg()
    if not gpu:
        torch.set_num_threads(1)   # so that process CPU time is the step's compute time
        print(f"load average at start: {load_start}", flush=True)

    step_rows = []
    methods = ["nonprivate", "dplora"] + ([] if args.skip_opacus else ["opacus_hooks", "opacus_ghost"])
    builders = {"roberta": roberta_workload, "swin": swin_workload}
    for wname in args.workloads.split(","):
        wl = builders[wname](gpu)
        base_ms = base_mem = base_cpu = None
        for method in methods:
            row = dict(workload=wl.name, method=method, ms=None, cpu_ms=None, cpu_vs_nonprivate=None, peak_mib=None, vs_nonprivate=None, mem_vs_nonprivate=None,
                       status="ok")
            try:
                step = make_step(method, wl, device)
                ms, cpu_ms, peak = time_step(step, device, warmup, iters)
                row.update(ms=ms, cpu_ms=cpu_ms, peak_mib=peak)
                if method == "nonprivate":
                    base_ms, base_mem, base_cpu = ms, peak, cpu_ms
                if base_ms:
                    row["vs_nonprivate"] = ms / base_ms
                    row["cpu_vs_nonprivate"] = cpu_ms / base_cpu
                if base_mem and peak:
                    row["mem_vs_nonprivate"] = peak / base_mem
            except Exception as e:   # e.g. Opacus cannot handle Swin's windowed rows: record, go on
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                traceback.print_exc(limit=2)
            finally:
                if gpu:
                    torch.cuda.empty_cache()
            print(row, flush=True)
            step_rows.append(row)

    dtype = torch.bfloat16 if gpu else torch.float32
    kern = kernel_rows(device, backend, dtype, reps=iters if gpu else 4 * iters)
    bw = copy_bandwidth(device, reps=iters if gpu else 4 * iters)
    load_end = os.getloadavg()
    for k in kern:
        k["frac_of_copy_bw"] = k["gb_per_s"] / bw
        print(k, flush=True)

    tag = "gpu" if gpu else "cpu"
    out = Path(args.out)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["machine", "backend", "section", "workload_or_kernel", "method_or_shape", "ms", "cpu_ms",
                "peak_mib", "vs_nonprivate", "cpu_vs_nonprivate", "mem_vs_nonprivate", "gb_per_s",
                "frac_of_copy_bw", "status"])
    for r in step_rows:
        w.writerow([machine, backend, "step", r["workload"], r["method"], r["ms"], r["cpu_ms"], r["peak_mib"],
                    r["vs_nonprivate"], r["cpu_vs_nonprivate"], r["mem_vs_nonprivate"], "", "", r["status"]])
    for k in kern:
        w.writerow([machine, backend, "kernel", k["kernel"], k["shape"], k["ms"], "", "", "", "", "", k["gb_per_s"],
                    k["frac_of_copy_bw"], "ok"])
    w.writerow([machine, backend, "copy", "device copy bandwidth", "", "", "", "", "", "", "", bw, 1.0, "ok"])
    atomic_write(out / f"kernels_{tag}.csv", buf.getvalue())

    f = lambda v, p=2: "—" if v is None else f"{v:.{p}f}"
    md = [f"**{banner}**", "", f"Command: `{' '.join([Path(sys.executable).name] + sys.argv)}`; "
          f"torch {torch.__version__}; median of {iters} steps after {warmup} warm-up."
          + ("" if gpu else f" torch threads: 1. Load average at start {load_start}, at end {load_end} "
             "(a shared machine: wall times are noisy; process CPU time is the steadier measure)."), "",
          "| workload | method | wall ms/step | × non-private (wall) | CPU ms/step | × non-private (CPU) | "
          "peak MiB | mem × non-private | status |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in step_rows:
        md.append(f"| {r['workload']} | {r['method']} | {f(r['ms'])} | {f(r['vs_nonprivate'])} | {f(r['cpu_ms'])} | "
                  f"{f(r['cpu_vs_nonprivate'])} | {f(r['peak_mib'], 0)} | {f(r['mem_vs_nonprivate'])} | {r['status']} |")
    timing = "CUDA (triton.testing.do_bench median)" if gpu else "process CPU time, median"
    md += ["", f"Measured copy bandwidth (read+write, {timing}): {bw:.2f} GB/s", "",
           f"| kernel | shape | ms ({timing}) | GB moved | GB/s | fraction of copy BW |", "|---|---|---|---|---|---|"]
    for k in kern:
        md.append(f"| {k['kernel']} | {k['shape']} | {k['ms']:.4f} | {k['gbytes']:.4f} | {k['gb_per_s']:.1f} | "
                  f"{k['frac_of_copy_bw']:.2f} |")
    atomic_write(out / f"kernels_{tag}.md", "\n".join(md) + "\n")
    print(f"wrote {out / f'kernels_{tag}.csv'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
