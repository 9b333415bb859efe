"""The DP-SGD gradient on the per-sample-gradient engine: clip, sum, Gaussian noise, scale.

    p.grad = (sum_i c_i g_i + N(0, sigma^2 C^2 I)) / expected_batch_size     for every trainable p

g_i are the per-sample gradients of exactly the parameters trainable now (requires_grad), from one
backward pass (PerSampleGradEngine), in one fp32 arena. Clipping:
  * "flat" (default): c_i = min(1, C / (||g_i|| + 1e-6)), ||g_i|| over all trainable tensors jointly.
    Clip, sum and noise of the whole (N, P) arena are ONE call (api.clip_and_noise on the arena: one
    matvec on the torch path, one launch with Triton); one-row-per-sample heads (ghost norms, see engine.py) are summed as (c ⊙ g)^T x.
  * "per_layer": each of the K trainable tensors is clipped on its own to C_k = C / sqrt(K), so the
    per-sample contribution still has total norm <= C and the same noise N(0, sigma^2 C^2) gives the
    same guarantee as flat clipping.
The divisor is the *expected* batch size q|D| (Poisson sampling), not the realised one, as the
accountant assumes. An empty batch (N = 0) gives noise only and never calls the model. NaN/Inf in a
per-sample gradient raises FloatingPointError naming the parameter, leaving every p.grad untouched;
the check is ONE host synchronisation per step (on the total squared norm), the parameter is looked
for only after it fails. Noise is drawn from `generator` on its device (put it on the model's device
to keep the draw there).

precision="bf16" runs the forward under torch.autocast(bfloat16); LoRA weights stay fp32 and the
per-sample gradients, norms, clipped sum and noise are accumulated in fp32 (see engine.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .api import _add_noise, clip_and_noise, clipped_noised_sum, gaussian_noise
from .api import clip_factors as _clip_factors
from .checks import run_unit_check, unit_check_due
from .engine import PerSampleGradEngine, PerSampleGrads

__all__ = ["dp_gradient", "grouped_dp_gradient", "DPStepResult", "per_sample_gradients", "PerSampleGrads", "batch_size_of",
           "PRECISIONS", "autocast_for"]

PRECISIONS = ("fp32", "bf16")


@dataclass
class DPStepResult:
    """What a DP step wrote, for tests and audits.

    grads: the privatized gradient written to p.grad, by parameter name.
    per_sample_norms: (N,) flat per-sample norms before clipping.
    clip_factors: (N,) under flat clipping; (N, K) under per-layer (columns in `grads` order).
    batch_size: N, the realised batch size.
    """
    grads: dict[str, torch.Tensor]
    per_sample_norms: torch.Tensor
    clip_factors: torch.Tensor
    batch_size: int


def batch_size_of(batch: Any) -> int:
    """N of a batch: dict (its "labels", else its first tensor), tensor, or tuple/list of tensors."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        if isinstance(batch.get("labels"), torch.Tensor):
            return int(batch["labels"].shape[0])
        vals = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    elif isinstance(batch, (tuple, list)):
        vals = [v for v in batch if isinstance(v, torch.Tensor)]
    else:
        vals = []
    if not vals:
        raise ValueError(f"batch must be a tensor, or a dict/tuple holding tensors; got {type(batch).__name__}")
    return int(vals[0].shape[0])


def _batch_tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    vals = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else []
    return [v for v in vals if isinstance(v, torch.Tensor)]


def autocast_for(precision: str, device: torch.device | str):
    """The context the forward runs in: nullcontext for fp32, torch.autocast(bfloat16) for bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _check_args(clip_norm, noise_multiplier, expected_batch_size, clipping, precision) -> None:
    if not (float(clip_norm) > 0):
        raise ValueError(f"clip_norm must be > 0 (inf disables clipping); got {clip_norm!r}")
    if not (float(noise_multiplier) >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be finite and >= 0; got {noise_multiplier!r}")
    if math.isinf(clip_norm) and noise_multiplier > 0:
        raise ValueError("noise_multiplier > 0 needs a finite clip_norm (noise std is sigma * C)")
    if not (float(expected_batch_size) > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be finite and > 0; got {expected_batch_size!r}")
    if clipping not in ("flat", "per_layer"):
        raise ValueError(f"clipping must be 'flat' or 'per_layer'; got {clipping!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def _check_batch_device(batch: Any, device: torch.device) -> None:
    for t in _batch_tensors(batch):
        if t.device != device:
            raise ValueError(f"batch holds a tensor on {t.device} but the model's trainable parameters are "
                             f"on {device}; move the batch to {device}")


def _run(engine, model, loss_fn, batch, n, precision, ghost):
    """Forward under the engine (and autocast for bf16), one backward -> PerSampleGrads."""
    with engine:
        _check_batch_device(batch, engine.device)
        with autocast_for(precision, engine.device):
            losses = loss_fn(model, batch)
        if losses.dim() != 1 or losses.shape[0] != n:
            raise ValueError(f"loss_fn must return per-sample losses of shape ({n},); got {tuple(losses.shape)}")
        return engine.backward(losses.float().sum() if losses.dtype != torch.float64 else losses.sum(), n,
                               ghost=ghost)


def per_sample_gradients(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                         num_samples: int | None = None, backend: str = "auto",
                         precision: str = "fp32") -> PerSampleGrads:
    """Per-sample gradients of the trainable parameters on `batch`, no clipping or noise.

    Returns PerSampleGrads: .grads name -> (N, *shape) (views of one fp32 arena), .sqnorms name -> (N,),
    .total_sqnorm() (N,), .num_samples.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    n = batch_size_of(batch) if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1; got {n}")
    return _run(PerSampleGradEngine(model, backend=backend), model, loss_fn, batch, n, precision, ghost=False)


def dp_gradient(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                generator: torch.Generator | None, clipping: str = "flat", backend: str = "auto",
                num_samples: int | None = None, precision: str = "fp32",
                verify_unit: bool | None = None, secure: bool = False,
                physical_batch_size: int | None = None, distributed: bool = False,
                process_group: Any = None) -> DPStepResult:
    """Privatized gradient of the trainable parameters on `batch`, written to p.grad (see module doc).

    loss_fn(model, batch) -> (N,) per-sample losses (reduction "none"); the engine sums them.
    num_samples overrides batch_size_of(batch) (the clipping unit when rows are not samples).
    verify_unit: the model check (checks.py, unit_probe.py) on two samples of `batch`, before anything
    is computed or written: raises UnattributedGradientError when a trainable parameter is also used
    functionally (F.linear(x, layer.weight)), ClippingUnitError when a layer's rows are not one sample
    each (sequence-first input, a batch reordered mid-forward). None (default): on the schedule of
    checks.py (first call per model and trainable set, then every 1000 calls); True: every call;
    False: never (opt-out).
    secure=True draws the noise from the OS CSPRNG (noise.py; `generator` must be None): never
    reproducible, what a release wants. secure=False draws it from `generator` (seeded: reproducible).
    physical_batch_size: the logical (Poisson) batch is run in chunks of at most this many samples
    (one forward/backward each, so memory is that of one chunk); each chunk's per-sample gradients
    are clipped and summed, the sums added, and the noise drawn ONCE for the logical step (the same
    draws as the unsplit step): the result equals the unsplit step up to float summation order.
    distributed=True (torch.distributed initialised, `process_group` or the default group): each
    process passes ITS share of the logical batch (disjoint shards; expected_batch_size is the
    global q|D|); the clipped sums are all-reduced (one all-reduce of one flat buffer), the noise is
    drawn on rank 0 only (from its `generator`, or secure) and added before the reduction, so every
    rank writes the same p.grad = (sum over all processes' samples + one noise) / expected_batch_size,
    equal to one process on the concatenated batch. Call it on the plain model (not a
    DistributedDataParallel wrapper: the engine does its own reduction). per_sample_norms, clip
    factors and batch_size in the result are this process's.
    """
    _check_args(clip_norm, noise_multiplier, expected_batch_size, clipping, precision)
    if physical_batch_size is not None and not (isinstance(physical_batch_size, int) and physical_batch_size >= 1):
        raise ValueError(f"physical_batch_size must be None or an int >= 1; got {physical_batch_size!r}")
    rank = 0
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised (init_process_group)")
        rank = torch.distributed.get_rank(group=process_group)
    if secure and generator is not None:
        raise ValueError("secure=True draws the noise from the OS CSPRNG: pass generator=None "
                         "(or secure=False for a seeded, reproducible generator)")
    engine = PerSampleGradEngine(model, backend=backend)   # validates devices and backend up front
    params = dict(engine.params)   # the trainable parameters, by name (the engine's one walk)
    n = batch_size_of(batch) if num_samples is None else int(num_samples)
    if unit_check_due(model, params, n, verify_unit):   # before anything is computed or released
        run_unit_check(model, loss_fn, batch, params, n=n, num_samples=num_samples,
                       per_sample_fn=lambda m, f, b: per_sample_gradients(m, f, b, backend=backend),
                       explicit=verify_unit is True)
    std = float(noise_multiplier) * float(clip_norm) if noise_multiplier > 0 else 0.0
    if not params:
        return DPStepResult({}, torch.zeros(n), torch.ones(n), n)
    names = list(params)
    shapes = [params[k].shape for k in names]
    device = engine.device
    # The noise is added here, in the one-batch path (bitwise as before), or after the clipped sum by
    # _step_noise: CSPRNG noise (secure), physical chunks, and distributed (rank 0 only, then all-reduce).
    late = secure or distributed or (physical_batch_size is not None and n > physical_batch_size)
    torch_std = 0.0 if late else std
    ghost: set = set()
    if n == 0:   # Poisson drew nobody: noise only, the model is not called
        summed, total, factors = _privatize(None, names, shapes, device, float(clip_norm), torch_std,
                                            generator, clipping, backend)
        norms = total
    elif physical_batch_size is not None and n > physical_batch_size:
        summed, norms, factors, ghost = _chunked(engine, model, loss_fn, batch, n, physical_batch_size, names,
                                                 shapes, device, float(clip_norm), clipping, backend, precision)
    else:
        psg = _run(engine, model, loss_fn, batch, n, precision, ghost=True)
        total = _check_finite(psg)
        ghost = {k for gl in psg.ghost for k in gl.names}
        summed, total, factors = _privatize(psg, names, shapes, device, float(clip_norm), torch_std,
                                            generator, clipping, backend, total)
        norms = total.sqrt()
        del psg
    if late and std > 0 and rank == 0:
        summed = _step_noise(summed, names, ghost, std, generator, clipping, device, backend, secure)
    if distributed:   # every rank: sum_ranks (clipped sum) + rank 0's noise, ONE all-reduce
        sizes = [t.numel() for t in summed]
        # one dtype on every rank (an empty shard's zeros are fp32): the arena's, float64 for float64 models
        dt = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32
        flat = torch.cat([t.reshape(-1).to(dt) for t in summed])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=process_group)
        summed = [part.view(t.shape) for part, t in zip(flat.split(sizes), summed)]
    return _write(params, names, summed, expected_batch_size, norms, factors, n)


def _chunked(engine, model, loss_fn, batch, n, chunk, names, shapes, device, clip_norm, clipping, backend,
             precision):
    """The logical step in physical chunks: per chunk, the clipped sum without noise, added up (the
    noise comes once, from _step_noise). Nothing is written to p.grad until every chunk has passed
    its finiteness check. Returns (sums in names order, (N,) norms, clip factors, ghost names)."""
    from .unit_probe import take_samples

    summed, norms, factors, ghost = None, [], [], set()
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        psg = _run(engine, model, loss_fn, take_samples(batch, idx, n), len(idx), precision, ghost=True)
        total = _check_finite(psg)
        part, total, f = _privatize(psg, names, shapes, device, clip_norm, 0.0, None, clipping, backend, total)
        summed = part if summed is None else [a + b for a, b in zip(summed, part)]
        norms.append(total.sqrt())
        factors.append(f)
        ghost = {k for gl in psg.ghost for k in gl.names}
        del psg
    return summed, torch.cat(norms), torch.cat(factors), ghost


def _step_noise(summed, names, ghost, std, generator, clipping, device, backend, secure):
    """Add the step's noise to clipped sums computed without it. secure: one CSPRNG draw over the
    parameters in names order (noise.py). Otherwise drawn from `generator` exactly as the one-batch
    step draws it (_privatize: flat clipping draws the arena's parameters, then the ghost heads';
    per-layer clipping one draw in names order), so physical chunks and distributed steps equal it."""
    if secure:
        from .noise import secure_gaussian_like

        noise = secure_gaussian_like([t.shape for t in summed], std, device, summed[0].dtype)
        return [t + z for t, z in zip(summed, noise)]
    out = dict(zip(names, summed))
    if clipping == "flat":   # as _flat: the arena's draw added in its dtype, the ghost heads' as _noise_only
        arena = [k for k in names if k not in ghost]
        if arena:
            z = gaussian_noise([out[k].shape for k in arena], std, generator, device)
            out.update(zip(arena, _add_noise([out[k] for k in arena], z, std)))
        heads = [k for k in names if k in ghost]
        if heads:
            zs = _noise_only([out[k].shape for k in heads], device, std, generator, backend)
            out.update((k, out[k] + z) for k, z in zip(heads, zs))
    else:                    # as _privatize's per-layer branch: one draw in names order
        zs = _noise_only([out[k].shape for k in names], device, std, generator, backend)
        out.update((k, out[k] + z) for k, z in zip(names, zs))
    return [out[k] for k in names]


def _check_finite(psg: PerSampleGrads) -> torch.Tensor:
    """Raise if any per-sample gradient is not finite; returns the (N,) total squared norms it checked."""
    total = psg.total_sqnorm()
    if not bool(torch.isfinite(total).all()):   # the step's one host synchronisation
        raise FloatingPointError(f"NaN/Inf in the per-sample gradient of parameter {_non_finite(psg)!r}; "
                                 "p.grad left untouched")
    return total


def _privatize(psg: PerSampleGrads | None, names, shapes, device, clip_norm, std, generator, clipping,
               backend, total: torch.Tensor | None = None):
    """Clipped sum + noise of one client's per-sample gradients (psg None or empty: noise only, ONE
    draw over all `names`). Returns (sums in `names` order, (N,) squared norms, clip factors). The
    single place that fixes the order and shapes of the noise draws, shared by dp_gradient and
    grouped_dp_gradient so a client's noise is the same whether it runs alone or grouped."""
    if psg is None or psg.num_samples == 0:
        summed = _noise_only(shapes, device, std, generator, backend)
        return summed, torch.zeros(0, device=device), torch.ones(0, device=device)
    total = psg.total_sqnorm() if total is None else total   # (N,), from _check_finite when it ran
    ghost = {k: (gl, j) for gl in psg.ghost for j, k in enumerate(gl.names)}
    if clipping == "flat":
        summed, factors = _flat(psg, names, ghost, total, clip_norm, std, generator, backend)
    else:
        c_k = clip_norm / math.sqrt(len(names))
        sq = psg.sqnorms
        cols = [_clip_factors(sq[k], c_k) for k in names]
        factors = torch.stack(cols, dim=1)
        # noise for all tensors in one draw, in `names` order, as in the flat case
        noise = _noise_only(shapes, device, std, generator, backend)
        summed = []
        for k, f, z in zip(names, cols, noise):
            if k in ghost:
                gl, j = ghost[k]
                s = gl.clipped_sums(f)[j]
            else:
                s = clipped_noised_sum([psg.grads[k]], f, 0.0, None, backend=backend)[0]
            summed.append(s + z)
    return summed, total, factors


def grouped_dp_gradient(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any, *,
                        sizes: Sequence[int], stacks: dict[str, torch.Tensor], clip_norm: float,
                        noise_multiplier: float, expected_batch_sizes: Sequence[float],
                        generators: Sequence[torch.Generator | None],
                        dropout_generators: Sequence[torch.Generator] | None = None,
                        clipping: str = "flat", backend: str = "auto", precision: str = "fp32") -> list[int]:
    """dp_gradient for M clients at once (grouped.py): `batch` is the concatenation of the clients'
    batches (client j's sizes[j] samples contiguous), `stacks` name -> (M, *shape) client stacks of
    every LoRA factor and head parameter. One forward and one backward over the whole batch; then,
    for each client j, ITS rows only: flat clipping per sample, clipped sum, noise from
    generators[j] (same draws as dp_gradient on that client alone), / expected_batch_sizes[j].
    Writes stacks[k].grad (M, *shape) for every stack with requires_grad; the model's own
    parameters must carry the same requires_grad flags (they name the arena's slots). A client with
    no samples gets noise only. Returns the sizes."""
    from .grouped import client_groups, slice_samples

    m = len(sizes)
    if len(expected_batch_sizes) != m or len(generators) != m:
        raise ValueError(f"expected_batch_sizes and generators need one entry per client ({m})")
    for e in expected_batch_sizes:
        _check_args(clip_norm, noise_multiplier, e, clipping, precision)
    std = float(noise_multiplier) * float(clip_norm) if noise_multiplier > 0 else 0.0
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    trainable = {k: s for k, s in stacks.items() if s.requires_grad}
    if set(params) != set(trainable):
        raise ValueError("the model's trainable parameters and the trainable client stacks differ: "
                         f"{sorted(set(params) ^ set(trainable))[:5]}")
    if not params:
        return list(sizes)
    names = list(params)
    shapes = [params[k].shape for k in names]
    engine = PerSampleGradEngine(model, backend=backend)
    device = engine.device
    n = int(sum(sizes))
    psg = None
    if n > 0:
        with client_groups(model, sizes, stacks, dropout_generators):
            psg = _run(engine, model, loss_fn, batch, n, precision, ghost=True)
        _check_finite(psg)   # one host synchronisation for all clients
    per_client = []
    start = 0
    for j, nj in enumerate(sizes):
        part = None if psg is None or nj == 0 else slice_samples(psg, start, start + nj)
        start += nj
        summed, _, _ = _privatize(part, names, shapes, device, float(clip_norm), std, generators[j],
                                  clipping, backend)
        per_client.append([g / float(expected_batch_sizes[j]) for g in summed])
    for i, k in enumerate(names):
        s = trainable[k]
        s.grad = torch.stack([pc[i] for pc in per_client]).to(dtype=s.dtype, device=s.device)
    return list(sizes)


def _flat(psg: PerSampleGrads, names, ghost, total, clip_norm, std, generator, backend):
    """Flat clipping: the whole arena in one clip+sum+noise call, ghost heads after it."""
    arena_names = [k for k in names if k not in ghost]
    out: dict[str, torch.Tensor] = {}
    if arena_names:
        # the arena itself is the one (N, P) input: one matvec / one kernel launch for every parameter,
        # and the same flat noise draw as a list of its views (same total size, same order)
        sizes = [math.prod(psg.grads[k].shape[1:]) for k in arena_names]
        assert psg.arena is not None and sum(sizes) == psg.arena.shape[1]
        (flat,), factors = clip_and_noise([psg.arena], total, clip_norm, std, generator, backend=backend)
        for k, part in zip(arena_names, flat.split(sizes)):
            out[k] = part.view(psg.grads[k].shape[1:])
    else:
        factors = _clip_factors(total, clip_norm)
    if ghost:
        ghost_names = [k for k in names if k in ghost]
        for gl in psg.ghost:
            for k, s in zip(gl.names, gl.clipped_sums(factors)):
                out[k] = s
        if std > 0:   # the ghost heads' noise: one more draw, after the arena's
            noise = _noise_only([_ghost_shape(ghost[k]) for k in ghost_names], total.device, std,
                                generator, backend)
            for k, z in zip(ghost_names, noise):
                out[k] = out[k] + z
    return [out[k] for k in names], factors


def _ghost_shape(entry) -> torch.Size:
    gl, j = entry
    return torch.Size((gl.g.shape[1], gl.x.shape[1]) if j == 0 else (gl.g.shape[1],))


def _noise_only(shapes, device, std, generator, backend) -> list[torch.Tensor]:
    """N(0, std^2) tensors of the given shapes from ONE draw (zeros when std == 0): what
    clipped_noised_sum gives for an empty batch (a zero sum plus the noise, the same draw and the same
    two float ops), without building empty per-sample tensors and an empty sum per shape. `backend`
    does not matter here: the draw is torch's on both."""
    noise = gaussian_noise(shapes, std, generator, device)
    return _add_noise([torch.zeros(s, device=device) for s in shapes], noise, std)


def _non_finite(psg: PerSampleGrads) -> str:
    """The first parameter whose per-sample gradient or norm is not finite (only called on failure)."""
    for k, g in psg.grads.items():
        if not bool(torch.isfinite(g).all()):
            return k
    for gl in psg.ghost:
        for k, sq in zip(gl.names, gl.sqnorms):
            if not bool(torch.isfinite(sq).all()):
                return k
    for names, sq in psg.units:
        if not bool(torch.isfinite(sq).all()):
            return names[0]
    return "?"


def _write(params, names, summed, expected_batch_size, norms, factors, n) -> DPStepResult:
    grads = {}
    for k, g in zip(names, summed):
        p = params[k]
        grads[k] = (g / float(expected_batch_size)).to(dtype=p.dtype, device=p.device)
    for k in names:
        params[k].grad = grads[k].clone()
    return DPStepResult(grads, norms, factors, n)
