"""Canary audit of ONE DP step of lalora's real mechanism (`lalora.privacy.dp_step.dp_gradient`).

Two neighbouring worlds: a fixed batch ("out") and the same batch plus a worst-case canary ("in"),
whose gradient has norm `canary_norm` x C (≥ C) along a fixed direction u. Each trial is one call of
the real DP step (real per-sample gradients, real flat clipping, real Gaussian noise); its score is
the projection of the released noisy gradient on u, in units of C. The audit turns the two score
samples into an assumption-free lower bound on ε and a Gaussian-fit estimate (lalora.audit.stats;
only the bound decides) and sets them against the accountant's ε for
exactly this mechanism: one step, sampling rate q = 1 (the full batch, so the canary is present in
every "in" trial), noise multiplier σ = calibrate_sigma(ε, δ, [(q=1, steps=1)]).

Fast AND honest -- many trials per DP call: `BlockLoRA` is one LoRALinear(T·d -> T·k) whose inputs,
outputs and factors are split into T diagonal blocks; a sample of trial j has its input in block j
and its loss on output block j, so its per-sample gradient lives only in A[:, block j] and
B[block j, :]. One `dp_gradient` call on T·(batch) samples therefore runs T independent copies of
the same tiny LoRA model through the real engine, flat clipping (over A and B jointly) and noise,
and block j of the released gradient is trial j's output. Nothing is re-implemented: a bug in
dp_gradient (noise scale, clip factors, clipping unit) shows in the scores.

`audit_swin_step` does the same on a small timm Swin (LoRA on windowed attention), one trial per
call, with a canary *image* made of identical windows: correct per-image clipping bounds its
contribution by C, per-window clipping would give nW·C. `sensitivity_probe*` measure that
contribution directly (noise 0): ||clipped sum(in) − clipped sum(out)|| / C, which must be ≤ 1.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoRALinear, set_active_factors
from . import stats

__all__ = ["BlockLoRA", "CanaryAuditResult", "audit_dp_step", "audit_swin_step",
           "sensitivity_probe", "sensitivity_probe_swin", "mechanism_epsilons"]


@contextmanager
def single_thread():
    """Run with one intra-op thread: the audit's tensors are tiny, and on a loaded machine torch's
    thread pool makes each call 20-50x slower (measured: 0.4 ms vs 20 ms per trial)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _dp_gradient(*args, **kwargs):
    """The mechanism under audit, looked up at call time (so lalora.audit.planted's patches apply)."""
    from ..privacy import dp_step

    # the audit measures the mechanism as it is (planted bugs included): the kernels' default
    # clipping-unit check (issue 31) would refuse some plants before the audit could see them
    kwargs.setdefault("verify_unit", False)
    return dp_step.dp_gradient(*args, **kwargs)


def mechanism_epsilons(epsilon: float, delta: float) -> dict:
    """σ for one full-batch step at target ε, the accountant's ε for that σ (what the audit is set
    against) and the exact ε of that Gaussian mechanism (μ = 1/σ GDP), the best any audit can reach."""
    from ..privacy import calibrate_sigma, epsilon_for

    sigma = calibrate_sigma(epsilon, delta, [(1.0, 1)])   # the one calibration (one full-batch step)
    return {"noise_multiplier": sigma, "accountant_epsilon": epsilon_for(sigma, delta, 1.0, 1),
            "exact_epsilon": stats.gdp_epsilon(1.0 / sigma, delta)}


# ----------------------------------------------------------------------------- the block model
class BlockLoRA(nn.Module):
    """T copies of one tiny LoRA classifier (d inputs, k classes, rank r) as ONE LoRALinear with
    block-diagonal structure (see the module docstring). Copies share nothing trainable."""

    def __init__(self, copies: int, d: int, k: int, r: int, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.copies, self.d, self.k = copies, d, k
        W0 = torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        A0 = (torch.rand(r, d, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
        B0 = torch.randn(k, r, generator=g, dtype=torch.float64)     # nonzero: mid-training state
        self.tiny = {"W": W0, "A": A0, "B": B0, "scaling": 1.0}
        base = nn.Linear(copies * d, copies * k, bias=False).to(dtype)
        with torch.no_grad():
            base.weight.copy_(torch.block_diag(*[W0] * copies))
        self.lora = LoRALinear(base, r=r, alpha=float(r), dropout=0.0).to(dtype)
        with torch.no_grad():
            self.lora.lora_A.copy_(A0.repeat(1, copies))
            self.lora.lora_B.copy_(B0.repeat(copies, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)

    def embed(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """(N, d) inputs of the tiny model, (N,) copy index -> (N, T·d) block inputs."""
        out = torch.zeros(x.shape[0], self.copies, self.d, dtype=self.lora.lora_A.dtype)
        out[torch.arange(x.shape[0]), slot] = x.to(out.dtype)
        return out.reshape(x.shape[0], -1)

    def loss_fn(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(batch["x"]).reshape(-1, self.copies, self.k)
        own = logits[torch.arange(logits.shape[0]), batch["slot"]]          # (N, k): its own block
        return F.cross_entropy(own, batch["labels"], reduction="none")

    def block_grads(self, grads: dict[str, torch.Tensor], which: str) -> torch.Tensor:
        """(T, p) per-copy view of the released gradient, in the order of `tiny_grad`."""
        parts = []
        if which in ("A", "both"):
            A = grads["lora.lora_A"]                                         # (r, T·d)
            parts.append(A.reshape(A.shape[0], self.copies, self.d).permute(1, 0, 2).reshape(self.copies, -1))
        if which in ("B", "both"):
            parts.append(grads["lora.lora_B"].reshape(self.copies, -1))      # (T·k, r) -> (T, k·r)
        return torch.cat(parts, dim=1).to(torch.float64)

    def tiny_grad(self, x: torch.Tensor, y: int, which: str) -> torch.Tensor:
        """Float64 autograd gradient of one sample on the tiny model (independent of the engine)."""
        A = self.tiny["A"].clone().requires_grad_(True)
        B = self.tiny["B"].clone().requires_grad_(True)
        x = x.to(torch.float64)
        logits = self.tiny["W"] @ x + self.tiny["scaling"] * (B @ (A @ x))
        loss = F.cross_entropy(logits[None], torch.tensor([y]))
        gA, gB = torch.autograd.grad(loss, [A, B])
        parts = ([gA.reshape(-1)] if which in ("A", "both") else []) + \
                ([gB.reshape(-1)] if which in ("B", "both") else [])
        return torch.cat(parts)


def _worst_case_canary(model: BlockLoRA, which: str, norm: float, seed: int):
    """A canary input/label whose tiny-model gradient has norm ≈ `norm` (bisection on the scale)."""
    g = torch.Generator().manual_seed(seed + 7919)
    x0 = torch.randn(model.d, generator=g, dtype=torch.float64)
    x0 /= x0.norm()
    logits = model.tiny["W"] @ x0 + model.tiny["B"] @ (model.tiny["A"] @ x0)
    y = int(logits.argmin())     # the least likely label: the gradient does not vanish as x grows
    lo, hi = 0.0, 1.0
    while model.tiny_grad(hi * x0, y, which).norm() < norm:
        hi *= 2
        if hi > 1e8:
            raise ValueError("could not build a canary of the requested gradient norm")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if model.tiny_grad(mid * x0, y, which).norm() < norm else (lo, mid)
    x = hi * x0
    gvec = model.tiny_grad(x, y, which)
    return x, y, gvec / gvec.norm(), float(gvec.norm())


@dataclass
class CanaryAuditResult:
    model: str
    planted: str | None
    epsilon_target: float
    delta: float
    noise_multiplier: float
    accountant_epsilon: float     # the accountant's ε for the mechanism run (1 step, q = 1)
    exact_epsilon: float          # exact ε of that Gaussian mechanism (μ = 1/σ)
    trials_per_world: int
    canary_norm: float            # canary gradient norm / C before clipping
    threshold: dict               # stats.ThresholdBound (assumption-free, Clopper–Pearson): the bound
    gaussian: dict                # stats.GaussianEstimate: an estimate, not a bound, never a verdict
    mean_shift: float             # mean score(in) − mean score(out), in units of C (≤ 1 if correct)
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def epsilon_lb(self) -> float:
        """The audit's lower bound (Clopper–Pearson, assumption-free) at its stated confidence."""
        return self.threshold["epsilon_lb"]

    @property
    def confidence(self) -> float:
        return self.threshold["confidence"]

    @property
    def violates(self) -> bool:
        """True when the assumption-free lower bound exceeds the accountant's ε: a privacy bug."""
        return self.epsilon_lb > self.accountant_epsilon

    @property
    def estimate_exceeds(self) -> bool:
        """The Gaussian estimate exceeds the accountant's ε: worth a look (more trials, the
        threshold bound), not a verdict."""
        return self.gaussian["epsilon_estimate"] > self.accountant_epsilon

    def to_dict(self) -> dict:
        d = asdict(self)
        d["epsilon_lb"], d["confidence"], d["violates"] = self.epsilon_lb, self.confidence, self.violates
        d["estimate_exceeds"] = self.estimate_exceeds
        return d


def _finish(name, planted, epsilon, delta, mech, trials, canary_norm, out, inn, confidence, method,
            seed, t0, extra=None) -> CanaryAuditResult:
    # One bound (assumption-free) at `confidence`; the Gaussian figure is an estimate beside it.
    thr = stats.threshold_epsilon_lb(out, inn, delta=delta, confidence=confidence, method=method, seed=seed)
    gau = stats.gaussian_epsilon_estimate(out, inn, delta=delta, confidence=confidence)
    return CanaryAuditResult(
        model=name, planted=planted, epsilon_target=epsilon, delta=delta,
        noise_multiplier=mech["noise_multiplier"], accountant_epsilon=mech["accountant_epsilon"],
        exact_epsilon=mech["exact_epsilon"], trials_per_world=trials, canary_norm=canary_norm,
        threshold=thr.to_dict(), gaussian=gau.to_dict(),
        mean_shift=float(np.mean(inn) - np.mean(out)), seconds=time.perf_counter() - t0,
        extra=extra or {})


def _block_setup(copies, d, k, r, batch, which, canary_norm, seed):
    model = BlockLoRA(copies, d, k, r, seed=seed)
    set_active_factors(model, which)
    g = torch.Generator().manual_seed(seed + 1)
    fx = torch.randn(batch, d, generator=g, dtype=torch.float64) * 2.0   # fixed batch (some clipped)
    fy = torch.randint(0, k, (batch,), generator=g)
    cx, cy, u, raw = _worst_case_canary(model, which, canary_norm, seed)
    slot = torch.arange(copies)

    def world(with_canary: bool) -> dict:
        xs = [fx[i].expand(copies, d) for i in range(batch)]
        ys = [fy[i].expand(copies) for i in range(batch)]
        if with_canary:
            xs.append(cx.expand(copies, d))
            ys.append(torch.full((copies,), cy))
        x = torch.cat(xs)
        s = slot.repeat(len(xs))
        return {"x": model.embed(x, s), "slot": s, "labels": torch.cat(ys)}

    return model, world(False), world(True), u, raw


@single_thread()
def audit_dp_step(epsilon: float = 1.0, *, delta: float = 1e-5, clip_norm: float = 1.0,
                  trials: int = 2000, trials_per_call: int = 50, which: str = "both",
                  d: int = 4, k: int = 3, r: int = 2, batch: int = 3, canary_norm: float = 10.0,
                  confidence: float = 0.95, method: str = "split", seed: int = 0,
                  planted: str | None = None, clipping: str = "flat") -> CanaryAuditResult:
    """Canary audit of one DP step on the block LoRA model (module docstring); `trials` per world.

    `which` picks the trainable factors ("both" = a DP-LoRA step, "A"/"B" = an LA-LoRA step).
    `planted` only labels the result (apply a planted bug with lalora.audit.planted around the call).
    """
    if trials < 4:
        raise ValueError(f"trials must be >= 4, got {trials}")
    t0 = time.perf_counter()
    mech = mechanism_epsilons(epsilon, delta)
    sigma = mech["noise_multiplier"]
    copies = min(trials_per_call, trials)
    model, b_out, b_in, u, raw = _block_setup(copies, d, k, r, batch, which, canary_norm * clip_norm, seed)
    scores = {False: [], True: []}
    for with_canary, b in ((False, b_out), (True, b_in)):
        gen = torch.Generator().manual_seed(seed * 1000 + 17 + int(with_canary))
        done = 0
        while done < trials:
            res = _dp_gradient(model, model.loss_fn, b, clip_norm=clip_norm, noise_multiplier=sigma,
                               expected_batch_size=batch + 1, generator=gen, clipping=clipping)
            s = model.block_grads(res.grads, which) @ u * (batch + 1) / clip_norm
            scores[with_canary].append(s[: trials - done].numpy())
            done += len(s)
    out, inn = np.concatenate(scores[False]), np.concatenate(scores[True])
    return _finish(f"BlockLoRA(d={d}, k={k}, r={r}, factors={which}, clipping={clipping}, "
                   f"batch={batch}+canary)", planted,
                   epsilon, delta, mech, trials, raw / clip_norm, out, inn, confidence, method, seed, t0)


@single_thread()
def sensitivity_probe(*, clip_norm: float = 1.0, which: str = "both", d: int = 4, k: int = 3, r: int = 2,
                      batch: int = 3, canary_norm: float = 10.0, seed: int = 0, clipping: str = "flat") -> float:
    """||released(in) − released(out)|| · ebs / C with noise 0: the canary's clipped contribution,
    in units of C. Must be ≤ 1 for any canary (here ≈ 1: the canary's norm exceeds C)."""
    model, b_out, b_in, _, _ = _block_setup(1, d, k, r, batch, which, canary_norm * clip_norm, seed)
    g = [model.block_grads(_dp_gradient(model, model.loss_fn, b, clip_norm=clip_norm, noise_multiplier=0.0,
                                        expected_batch_size=batch + 1, generator=None,
                                        clipping=clipping).grads, which)
         for b in (b_out, b_in)]
    return float((g[1] - g[0]).norm() * (batch + 1) / clip_norm)


# ----------------------------------------------------------------------------- small Swin
def small_swin_for_audit(seed: int = 0) -> tuple[nn.Module, int]:
    """A one-stage timm Swin (16x16 grey images, patch 2, window 4 -> 4 windows per image) with
    LoRA on the window attention's qkv and everything else frozen (so every trainable layer sees
    (B·nW) window rows). Returns (model, windows per image)."""
    from timm.models.swin_transformer import SwinTransformer

    from ..lora import inject_lora

    torch.manual_seed(seed)
    model = SwinTransformer(img_size=16, patch_size=2, in_chans=1, window_size=4, embed_dim=8,
                            depths=(1,), num_heads=(1,), num_classes=3, mlp_ratio=2.0,
                            drop_rate=0.0, drop_path_rate=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, ["attn.qkv"], r=2, alpha=2.0, dropout=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 3)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval(), 4


def _swin_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"], reduction="none")


def _swin_setup(canary_norm: float, batch: int, seed: int):
    """Model, trainable names, nW, worlds, canary direction u, and the clip norm C that makes the
    canary's gradient norm `canary_norm` x C."""
    model, n_windows = small_swin_for_audit(seed)
    g = torch.Generator().manual_seed(seed + 11)
    fx = torch.randn(batch, 1, 16, 16, generator=g)
    fy = torch.randint(0, 3, (batch,), generator=g)
    tile = torch.randn(1, 1, 8, 8, generator=g)            # one window's pixels
    base = tile.repeat(1, 1, 2, 2)                         # identical windows -> aligned window grads
    with torch.no_grad():
        cy = int(model(base).argmin())
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_of(x):
        loss = _swin_loss(model, {"x": x, "labels": torch.tensor([cy])}).sum()
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).to(torch.float64)

    # LayerNorm makes a Swin's gradient nearly scale-invariant in the input, so the canary is made
    # worst-case by choosing C below its gradient norm: C = ||g_canary|| / canary_norm.
    cx = base
    gvec = grad_of(cx)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    b_out = {"x": fx, "labels": fy}
    b_in = {"x": torch.cat([fx, cx]), "labels": torch.cat([fy, torch.tensor([cy])])}
    return model, names, n_windows, b_out, b_in, gvec / gvec.norm(), float(gvec.norm()) / canary_norm


@single_thread()
def audit_swin_step(epsilon: float = 1.0, *, delta: float = 1e-5,
                    trials: int = 300, batch: int = 3, canary_norm: float = 4.0, confidence: float = 0.95,
                    method: str = "split", seed: int = 0, planted: str | None = None) -> CanaryAuditResult:
    """Canary audit of one DP step on a small Swin (one dp_gradient call per trial)."""
    t0 = time.perf_counter()
    mech = mechanism_epsilons(epsilon, delta)
    model, names, n_windows, b_out, b_in, u, clip_norm = _swin_setup(canary_norm, batch, seed)
    scores = {}
    for with_canary, b in ((False, b_out), (True, b_in)):
        gen = torch.Generator().manual_seed(seed * 1000 + 23 + int(with_canary))
        vals = []
        for _ in range(trials):
            res = _dp_gradient(model, _swin_loss, b, clip_norm=clip_norm,
                               noise_multiplier=mech["noise_multiplier"], expected_batch_size=batch + 1,
                               generator=gen)
            flat = torch.cat([res.grads[n].reshape(-1) for n in names]).to(torch.float64)
            vals.append(float(flat @ u) * (batch + 1) / clip_norm)
        scores[with_canary] = np.array(vals)
    return _finish(f"small Swin (1 stage, {n_windows} windows/image, LoRA on qkv)", planted, epsilon,
                   delta, mech, trials, canary_norm, scores[False], scores[True], confidence, method,
                   seed, t0, extra={"windows_per_image": n_windows, "clip_norm": clip_norm})


@single_thread()
def sensitivity_probe_swin(*, batch: int = 3, canary_norm: float = 4.0, seed: int = 0) -> float:
    """The Swin canary image's clipped contribution (noise 0) in units of C; ≤ 1 when the clipping
    unit is the image, up to nW when it is the window."""
    model, names, _, b_out, b_in, _, clip_norm = _swin_setup(canary_norm, batch, seed)
    flat = []
    for b in (b_out, b_in):
        res = _dp_gradient(model, _swin_loss, b, clip_norm=clip_norm, noise_multiplier=0.0,
                           expected_batch_size=batch + 1, generator=None)
        flat.append(torch.cat([res.grads[n].reshape(-1) for n in names]).to(torch.float64))
    return float((flat[1] - flat[0]).norm() * (batch + 1) / clip_norm)
