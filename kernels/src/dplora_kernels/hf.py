"""DP-SGD inside a Hugging Face `transformers.Trainer`: `DPTrainer` (extra `dplora-kernels[hf]`).

    trainer = DPTrainer(model=peft_model, args=TrainingArguments(..., max_steps=200),
                        train_dataset=train, target_epsilon=3.0, target_delta=1e-5, clip_norm=1.0)
    trainer.train()                      # logs "epsilon" with every loss line
    trainer.epsilon_spent()

What it changes in the Trainer, and why:
  * Batches are Poisson samples: every step, each training example joins independently with
    probability q = per_device_train_batch_size / len(train_dataset) (the sampling the accountant
    assumes; a shuffled fixed-size batch would not match it). A batch may be empty: the step then
    adds noise only. One "epoch" is round(1/q) steps.
  * `training_step` is the DP step: per-sample losses (`per_sample_loss(model, batch) -> (N,)`,
    default: cross-entropy per example, token losses averaged per example), then
    `dplora_kernels.dp_gradient` (per-sample gradients of every trainable parameter, clipping to
    `clip_norm`, Gaussian noise sigma * clip_norm, division by the expected batch size q|D|), which
    writes p.grad; the Trainer's optimizer and scheduler then step as usual.
  * An Opacus accountant ("rdp" or "prv") calibrates sigma so that the planned steps (max_steps, or
    epochs x round(1/q)) spend at most `target_epsilon` at `target_delta`, records every step, and the
    run stops before a step that would exceed the budget (e.g. with an explicit `noise_multiplier`).
  * `precision="bf16"` (passed to dp_gradient): the forward runs under `torch.autocast(bfloat16)`; parameters, the optimizer
    state and p.grad stay fp32 (master weights), per-sample gradients accumulate in fp32.
Refused (ValueError naming the argument): gradient accumulation (each DP step must be one Poisson
batch), several processes (needs a distributed Poisson sampler), `max_grad_norm` > 0 is set to 0
(clipping is per sample; a second clip of the noised sum would only distort it), and
`resume_from_checkpoint` (the accountant's history is not in Trainer checkpoints: resuming would
under-count the steps taken).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("dplora_kernels.hf needs transformers and opacus: pip install 'dplora-kernels[hf]'") from err

__all__ = ["DPTrainer", "PoissonBatchSampler", "per_sample_cross_entropy", "calibrate_noise_multiplier",
           "epsilon_after", "max_steps_within"]

_PRECISIONS = ("fp32", "bf16")   # as dp_gradient: bf16 = autocast forward, fp32 weights and per-sample grads


# ----------------------------------------------------------------------------- sampling and losses
class PoissonBatchSampler(torch.utils.data.Sampler):
    """Yields, `steps` times, the indices i of range(n) with Bernoulli(q) each, drawn from `generator`."""

    def __init__(self, n: int, q: float, steps: int, generator: torch.Generator):
        if n < 1:
            raise ValueError(f"train_dataset must not be empty; got {n} examples")
        if not 0 < q <= 1:
            raise ValueError(f"sample rate q = batch size / dataset size must be in (0, 1]; got {q}")
        self.n, self.q, self.steps, self.generator = int(n), float(q), int(steps), generator

    def __iter__(self):
        for _ in range(self.steps):
            yield torch.nonzero(torch.rand(self.n, generator=self.generator) < self.q).flatten().tolist()

    def __len__(self) -> int:
        return self.steps


def per_sample_cross_entropy(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(N,) losses: cross-entropy of logits (N, C) against labels (N,); for token logits (N, T, C)
    the mean over each example's labelled tokens (label -100 is ignored). Causal LMs, whose labels
    must be shifted, need their own per_sample_loss."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
    labels = batch["labels"]
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    n = logits.shape[0]
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          reduction="none", ignore_index=-100).reshape(n, -1)
    return tok.sum(1) / (labels.reshape(n, -1) != -100).sum(1).clamp_min(1)


# ----------------------------------------------------------------------------- accounting (Opacus)
def _accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ValueError(f"accountant must be 'rdp' or 'prv'; got {kind!r}")


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float,
                  accountant: str = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (0 steps: 0)."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "rdp") -> float:
    """The sigma Opacus finds for `steps` steps to spend at most target_epsilon (checked again here)."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=accountant))
        spent = epsilon_after(steps, sigma, sample_rate, delta, accountant)
    if spent > target_epsilon:
        raise RuntimeError(f"calibrated sigma={sigma} spends ε={spent} > target {target_epsilon}")
    return sigma


def max_steps_within(target_epsilon: float, noise_multiplier: float, sample_rate: float, delta: float,
                     accountant: str = "rdp", limit: int = 10**7) -> int:
    """The largest k <= limit with ε after k steps <= target_epsilon (binary search; ε grows with k)."""
    if epsilon_after(1, noise_multiplier, sample_rate, delta, accountant) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi <= limit and epsilon_after(hi, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:            # ε(lo) <= target < ε(hi)
        mid = (lo + hi) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------- the Trainer
class DPTrainer(Trainer):
    """A `transformers.Trainer` whose every optimizer step is one DP-SGD step (see the module doc).

    target_epsilon, target_delta: the budget (target_delta is required). noise_multiplier: sigma;
    calibrated from the budget when None. clip_norm: C. accountant: "rdp" or "prv". clipping: "flat"
    or "per_layer" (as dp_gradient). per_sample_loss(model, batch) -> (N,). precision: "fp32" or
    "bf16" (autocast of the forward). sampling_seed / noise_seed: the Poisson sampler's and the noise's
    generators (noise_seed=None draws a non-reproducible seed, what a real release wants).
    backend: the kernels' backend ("auto": Triton on CUDA).
    """

    def __init__(self, *args, target_epsilon: float | None = None, target_delta: float | None = None,
                 noise_multiplier: float | None = None, clip_norm: float = 1.0, accountant: str = "rdp",
                 clipping: str = "flat", per_sample_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 precision: str = "fp32", sampling_seed: int | None = None, noise_seed: int | None = None,
                 backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if target_delta is None or not 0 < float(target_delta) < 1:
            raise ValueError(f"target_delta must be in (0, 1); got {target_delta!r}")
        if target_epsilon is None and noise_multiplier is None:
            raise ValueError("give target_epsilon (sigma is calibrated) or noise_multiplier")
        if target_epsilon is not None and not (float(target_epsilon) > 0 and math.isfinite(target_epsilon)):
            raise ValueError(f"target_epsilon must be finite and > 0; got {target_epsilon!r}")
        if noise_multiplier is not None and not (float(noise_multiplier) > 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and > 0; got {noise_multiplier!r}")
        if not (float(clip_norm) > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be finite and > 0; got {clip_norm!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}; got {precision!r}")
        _accountant(accountant)   # validates the name
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps must be 1: each DP step is one Poisson batch; "
                             f"got {self.args.gradient_accumulation_steps}")
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(f"DPTrainer runs in one process on one device (world_size={self.args.world_size}, "
                             f"n_gpu={self.args.n_gpu}): set CUDA_VISIBLE_DEVICES to one GPU")
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("train_dataset must be a map-style dataset with a length (Poisson sampling)")
        self.args.max_grad_norm = 0.0
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = float(target_delta)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip_norm, self.accountant_kind, self.clipping = float(clip_norm), accountant, clipping
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        self.precision, self.backend = precision, backend
        n = len(self.train_dataset)
        self.sample_rate = min(1.0, self.args.per_device_train_batch_size / n)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        seed = self.args.seed if sampling_seed is None else sampling_seed
        self._sampling_gen = torch.Generator().manual_seed(int(seed))
        self._noise_gen = torch.Generator()
        if noise_seed is None:
            self._noise_gen.seed()
        else:
            self._noise_gen.manual_seed(int(noise_seed))
        self.accountant = _accountant(accountant)
        self.dp_steps = 0
        self.budget_steps: int | None = None

    # ---- planning ----------------------------------------------------------------------------
    def planned_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return int(math.ceil(self.args.num_train_epochs * self.steps_per_epoch))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            raise ValueError("resume_from_checkpoint is not supported: Trainer checkpoints do not hold "
                             "the accountant's history, so resuming would under-count the DP steps")
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                self.target_epsilon, self.target_delta, self.sample_rate, self.planned_steps(),
                self.accountant_kind)
        if self.target_epsilon is not None:
            self.budget_steps = max_steps_within(self.target_epsilon, self.noise_multiplier, self.sample_rate,
                                                 self.target_delta, self.accountant_kind,
                                                 limit=self.dp_steps + self.planned_steps())
        return super().train(None, *args, **kwargs)

    def epsilon_spent(self) -> float:
        """ε of the steps taken so far (0 before the first)."""
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.target_delta))

    # ---- data --------------------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets
            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        sampler = PoissonBatchSampler(len(dataset), self.sample_rate, self.steps_per_epoch, self._sampling_gen)

        def collate_or_empty(features):
            # An empty Poisson batch keeps the keys and trailing shapes of a real one, with 0 rows.
            if features:
                return collate(features)
            one = collate([dataset[0]])
            return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in one.items()}

        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_empty,
                                           num_workers=self.args.dataloader_num_workers,
                                           pin_memory=self.args.dataloader_pin_memory)

    # ---- the DP step ---------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        from .dp import dp_gradient

        if self.budget_steps is not None and self.dp_steps >= self.budget_steps:
            # One more step would spend more than target_epsilon: take none, and stop.
            self.control.should_training_stop = True
            model.zero_grad(set_to_none=True)
            return torch.zeros((), device=self.args.device)
        model.train()
        inputs = self._prepare_inputs(inputs)
        n = int(inputs["labels"].shape[0]) if "labels" in inputs else _rows(inputs)
        losses: list[torch.Tensor] = []

        def loss_fn(m, batch):
            out = self.per_sample_loss(m, batch)   # dp_gradient runs it under autocast for bf16
            losses.append(out.detach())
            return out.float()

        dp_gradient(model, loss_fn, inputs, clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier,
                       expected_batch_size=self.sample_rate * len(self.train_dataset),
                       generator=self._noise_gen, clipping=self.clipping, backend=self.backend,
                       num_samples=n, precision=self.precision)
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.dp_steps += 1
        if self.budget_steps is not None and self.dp_steps >= self.budget_steps:
            self.control.should_training_stop = True
        loss = losses[0].float().mean() if losses and losses[0].numel() else torch.zeros(())
        return loss.to(self.args.device)

    def log(self, logs: dict, *args, **kwargs) -> None:
        logs = dict(logs)
        if self.dp_steps:
            logs["epsilon"] = self.epsilon_spent()
            logs["dp_steps"] = self.dp_steps
        super().log(logs, *args, **kwargs)


def _rows(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("the batch holds no tensor: cannot tell its number of examples")
