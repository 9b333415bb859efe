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
  * Safe by default: dp_gradient's model check (checks.py) runs at the first step and every 1000
    (`verify_unit=False` opts out); the noise comes from the OS CSPRNG (`secure=True`, the default;
    `secure=False, noise_seed=...` for bitwise reruns).
  * A σ that cannot afford one step is refused when train() starts (one line with σ, q, ε, target);
    noise_multiplier=0 only with `non_private=True`, and then every log line says NON-PRIVATE.
  * Memory: `physical_batch_size` runs each Poisson batch in chunks (noise once per step), and
    `gradient_accumulation_steps = k` splits each Poisson batch into k micro-batches, one per
    Trainer micro-step, clipped sums accumulated, noise added once on the last: one DP step (and one
    accountant step) per optimizer step either way.
  * Checkpoints: every Trainer checkpoint holds `dp_state.pt` (the accountant's history, the DP step
    count, σ, the seeded noise generator); `train(resume_from_checkpoint=...)` restores it, so ε
    continues from where it was; a checkpoint without it is refused.
  * Several processes (torchrun, DistributedDataParallel): every process draws the same Poisson
    batch (same sampling seed) and keeps its share (i % world == rank); the step is
    dp_gradient(distributed=True) on the unwrapped model: clipped sums all-reduced, noise added once
    (rank 0's), so every process applies the same update.
Refused (ValueError naming the argument): several GPUs in one process (nn.DataParallel),
`max_grad_norm` > 0 is set to 0 (clipping is per sample; a second clip of the noised sum would only
distort it).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("dplora_kernels.hf needs transformers and opacus: pip install 'dplora-kernels[hf]'") from err

__all__ = ["DPTrainer", "PoissonBatchSampler", "per_sample_cross_entropy", "per_sample_causal_lm_loss",
           "CausalLMCollator", "calibrate_noise_multiplier", "epsilon_after", "max_steps_within", "DP_STATE_NAME"]

DP_STATE_NAME = "dp_state.pt"   # the accountant's history etc., in every Trainer checkpoint folder

_PRECISIONS = ("fp32", "bf16")   # as dp_gradient: bf16 = autocast forward, fp32 weights and per-sample grads


# ----------------------------------------------------------------------------- sampling and losses
class PoissonBatchSampler(torch.utils.data.Sampler):
    """Yields, `steps` times, the indices i of range(n) with Bernoulli(q) each, drawn from `generator`;
    with parts = k > 1 each such Poisson batch is yielded as k consecutive micro-batches (sizes as
    equal as possible, some maybe empty) for gradient accumulation: the DP step is the whole batch.
    With world > 1 processes, all draw the same Poisson batch from the same seed and process `rank`
    keeps the examples i with i % world == rank: the union over processes is the one Poisson batch."""

    def __init__(self, n: int, q: float, steps: int, generator: torch.Generator, parts: int = 1,
                 rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError(f"train_dataset must not be empty; got {n} examples")
        if not 0 < q <= 1:
            raise ValueError(f"sample rate q = batch size / dataset size must be in (0, 1]; got {q}")
        if not (isinstance(parts, int) and parts >= 1):
            raise ValueError(f"gradient_accumulation_steps must be an int >= 1; got {parts!r}")
        self.n, self.q, self.steps, self.generator, self.parts = int(n), float(q), int(steps), generator, parts
        self.rank, self.world = int(rank), int(world)

    def __iter__(self):
        for _ in range(self.steps):
            idx = torch.nonzero(torch.rand(self.n, generator=self.generator) < self.q).flatten()
            if self.world > 1:   # every process draws the same batch (same seed) and keeps its share
                idx = idx[idx % self.world == self.rank]
            for part in torch.tensor_split(idx, self.parts):
                yield part.tolist()

    def __len__(self) -> int:
        return self.steps * self.parts


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


def per_sample_causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(N,) losses of a decoder (causal LM): token t predicts token t+1, so logits[:, :-1] are scored
    against labels[:, 1:] (the shift Hugging Face's models do inside their own mean loss), label
    -100 ignored, averaged over each example's own scored tokens (an example with none: 0). The
    labels are not passed to the model (its batch-mean loss is not needed)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    logits = out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out[0])
    labels = batch["labels"]
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"per_sample_causal_lm_loss needs logits (N, T, V) and labels (N, T); got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    n, t = labels.shape
    shifted = labels[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                          reduction="none", ignore_index=-100).reshape(n, t - 1)
    return tok.sum(1) / (shifted != -100).sum(1).clamp_min(1)


class CausalLMCollator:
    """Pads a list of {"input_ids": [...], optional "attention_mask"} to the longest example (right
    padding with `pad_token_id`) and sets labels = input_ids with padding -100, for
    per_sample_causal_lm_loss. `max_length` truncates. An empty list gives a (0, 1) batch."""

    def __init__(self, pad_token_id: int, max_length: int | None = None):
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int (e.g. tokenizer.eos_token_id for GPT-2); got {pad_token_id!r}")
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, features: list[dict]) -> dict:
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1)[:self.max_length] for f in features]
        masks = [torch.as_tensor(f["attention_mask"], dtype=torch.long).reshape(-1)[:self.max_length]
                 if "attention_mask" in f else torch.ones_like(i) for f, i in zip(features, ids)]
        t = max([len(i) for i in ids], default=1)
        input_ids = torch.full((len(ids), t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), t), dtype=torch.long)
        for r, (i, m) in enumerate(zip(ids, masks)):
            input_ids[r, :len(i)], attention_mask[r, :len(m)] = i, m
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
    or "per_layer" (as dp_gradient). per_sample_loss(model, batch) -> (N,) (per_sample_causal_lm_loss
    for decoders). precision: "fp32" or "bf16" (autocast of the forward). secure (default True):
    noise from the OS CSPRNG (noise.py), never reproducible; secure=False with noise_seed for
    bitwise reruns (noise_seed=None: a random seed). sampling_seed: the Poisson sampler's generator.
    verify_unit: dp_gradient's model check (None: its schedule, first step and every 1000;
    False: opt-out). physical_batch_size: run each Poisson batch in chunks of at most this many
    examples (memory), noise once per step. non_private=True: noise_multiplier 0, no accountant, no
    ε -- a debugging run, marked in every log line. backend: the kernels' backend ("auto": Triton on CUDA).
    """

    def __init__(self, *args, target_epsilon: float | None = None, target_delta: float | None = None,
                 noise_multiplier: float | None = None, clip_norm: float = 1.0, accountant: str = "rdp",
                 clipping: str = "flat", per_sample_loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 precision: str = "fp32", sampling_seed: int | None = None, noise_seed: int | None = None,
                 backend: str = "auto", secure: bool = True, verify_unit: bool | None = None,
                 physical_batch_size: int | None = None, non_private: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if non_private:
            if target_epsilon is not None or (noise_multiplier not in (None, 0, 0.0)):
                raise ValueError("non_private=True runs without noise: give neither target_epsilon nor a "
                                 f"noise_multiplier > 0 (got target_epsilon={target_epsilon!r}, "
                                 f"noise_multiplier={noise_multiplier!r})")
            noise_multiplier = 0.0
        else:
            if target_delta is None or not 0 < float(target_delta) < 1:
                raise ValueError(f"target_delta must be in (0, 1); got {target_delta!r}")
            if target_epsilon is None and noise_multiplier is None:
                raise ValueError("give target_epsilon (sigma is calibrated) or noise_multiplier")
            if target_epsilon is not None and not (float(target_epsilon) > 0 and math.isfinite(target_epsilon)):
                raise ValueError(f"target_epsilon must be finite and > 0; got {target_epsilon!r}")
            if noise_multiplier is not None and float(noise_multiplier) == 0:
                raise ValueError("noise_multiplier=0 gives no privacy: pass non_private=True for a noise-free "
                                 "debugging run (marked in every log line)")
            if noise_multiplier is not None and not (float(noise_multiplier) > 0 and math.isfinite(noise_multiplier)):
                raise ValueError(f"noise_multiplier must be finite and > 0; got {noise_multiplier!r}")
        if not (float(clip_norm) > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be finite and > 0; got {clip_norm!r}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}; got {precision!r}")
        if secure and noise_seed is not None:
            raise ValueError("noise_seed needs secure=False: secure noise comes from the OS CSPRNG and has no seed")
        if physical_batch_size is not None and not (isinstance(physical_batch_size, int) and physical_batch_size >= 1):
            raise ValueError(f"physical_batch_size must be None or an int >= 1; got {physical_batch_size!r}")
        _accountant(accountant)   # validates the name
        if self.args.n_gpu > 1:
            raise ValueError(f"DPTrainer needs one device per process (n_gpu={self.args.n_gpu}, nn.DataParallel): "
                             "launch one process per GPU (torchrun) for DistributedDataParallel")
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("train_dataset must be a map-style dataset with a length (Poisson sampling)")
        self.args.max_grad_norm = 0.0
        self.non_private = bool(non_private)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.target_delta = None if target_delta is None else float(target_delta)
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip_norm, self.accountant_kind, self.clipping = float(clip_norm), accountant, clipping
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        self.precision, self.backend = precision, backend
        self.secure, self.verify_unit, self.physical_batch_size = bool(secure), verify_unit, physical_batch_size
        n = len(self.train_dataset)
        # expected batch: per-device size x processes (the Trainer's total batch), one Poisson draw over all
        self.sample_rate = min(1.0, self.args.per_device_train_batch_size * self.args.world_size / n)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        seed = self.args.seed if sampling_seed is None else sampling_seed
        self._sampling_gen = torch.Generator().manual_seed(int(seed))
        self._noise_gen = None
        if not self.secure:
            self._noise_gen = torch.Generator()
            if noise_seed is None:
                self._noise_gen.seed()
            else:
                self._noise_gen.manual_seed(int(noise_seed))
        self.accountant = _accountant(accountant)
        self.dp_steps = 0
        self.budget_steps: int | None = None
        self._micro = 0              # micro-batch index within the logical step (gradient accumulation)
        self._acc: list | None = None

    # ---- planning ----------------------------------------------------------------------------
    def planned_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return int(math.ceil(self.args.num_train_epochs * self.steps_per_epoch))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            resume_from_checkpoint = self._load_dp_state(resume_from_checkpoint)
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                self.target_epsilon, self.target_delta, self.sample_rate, self.planned_steps(),
                self.accountant_kind)
        if self.target_epsilon is not None:
            self.budget_steps = max_steps_within(self.target_epsilon, self.noise_multiplier, self.sample_rate,
                                                 self.target_delta, self.accountant_kind,
                                                 limit=self.dp_steps + self.planned_steps())
            if self.budget_steps <= self.dp_steps:
                spent = epsilon_after(self.dp_steps + 1, self.noise_multiplier, self.sample_rate,
                                      self.target_delta, self.accountant_kind)
                raise ValueError(
                    f"noise_multiplier={self.noise_multiplier:.4g} cannot afford one more DP step: step "
                    f"{self.dp_steps + 1} at sample rate q={self.sample_rate:.4g} would spend ε={spent:.4g} > "
                    f"target_epsilon={self.target_epsilon:g} (δ={self.target_delta:g}); raise "
                    "noise_multiplier or target_epsilon")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def epsilon_spent(self) -> float:
        """ε of the steps taken so far (0 before the first; inf for a non_private run)."""
        if self.non_private:
            return math.inf
        if not self.accountant.history:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.target_delta))

    # ---- checkpoints: the accountant travels with the Trainer's own state ------------------------
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:   # one writer (the main process) under several processes
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = {"dp_steps": self.dp_steps, "history": list(self.accountant.history),
                 "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                 "accountant": self.accountant_kind, "target_delta": self.target_delta,
                 "non_private": self.non_private, "clip_norm": self.clip_norm,
                 "noise_generator": None if self._noise_gen is None else self._noise_gen.get_state()}
        tmp = folder / (DP_STATE_NAME + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / DP_STATE_NAME)   # atomic: a checkpoint has the whole state or none

    def _load_dp_state(self, checkpoint) -> str:
        """Restore the accountant, the DP step count, sigma and the seeded noise generator from a
        checkpoint written by DPTrainer; a checkpoint without them is refused (ε would be under-counted)."""
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}")
        path = Path(checkpoint) / DP_STATE_NAME
        if not path.is_file():
            raise ValueError(f"resume_from_checkpoint={str(checkpoint)!r} has no {DP_STATE_NAME}: not written by "
                             "DPTrainer, so the DP steps already taken are unknown and ε would be under-counted")
        state = torch.load(path, weights_only=False)
        for key, mine in (("sample_rate", self.sample_rate), ("accountant", self.accountant_kind),
                          ("target_delta", self.target_delta), ("non_private", self.non_private),
                          ("clip_norm", self.clip_norm)):
            if state[key] != mine:
                raise ValueError(f"resume_from_checkpoint: the checkpoint's {key}={state[key]!r} differs from "
                                 f"this trainer's {mine!r}; resume with the same DP settings")
        if self.noise_multiplier is not None and state["noise_multiplier"] != self.noise_multiplier:
            raise ValueError(f"resume_from_checkpoint: the checkpoint's noise_multiplier={state['noise_multiplier']!r} "
                             f"differs from this trainer's {self.noise_multiplier!r}")
        self.noise_multiplier = state["noise_multiplier"]
        self.accountant.history = [tuple(h) for h in state["history"]]
        self.dp_steps = int(state["dp_steps"])
        if self._noise_gen is not None and state["noise_generator"] is not None:
            self._noise_gen.set_state(state["noise_generator"])
        return str(checkpoint)

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
        sampler = PoissonBatchSampler(len(dataset), self.sample_rate, self.steps_per_epoch, self._sampling_gen,
                                      parts=self.args.gradient_accumulation_steps,
                                      rank=self.args.process_index, world=self.args.world_size)

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
        """One micro-batch. With gradient_accumulation_steps = k, the k micro-batches of one Poisson
        batch (PoissonBatchSampler parts) are clipped and summed one by one, and the noise is added
        once, on the last; k = 1 is one dp_gradient call."""
        from .dp import dp_gradient

        k = self.args.gradient_accumulation_steps
        if self._micro == 0 and self.budget_steps is not None and self.dp_steps >= self.budget_steps:
            # train() refuses a budget that cannot afford a step and the run stops after the last
            # affordable one, so this is a Trainer that kept calling: no fake loss, an error
            raise RuntimeError(f"DP step {self.dp_steps + 1} would exceed target_epsilon={self.target_epsilon}")
        distributed = self.args.world_size > 1
        if distributed:   # the engine reduces the clipped sums itself: run the plain model, not the DDP wrapper
            model = self.accelerator.unwrap_model(model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        n = int(inputs["labels"].shape[0]) if "labels" in inputs else _rows(inputs)
        losses: list[torch.Tensor] = []

        def loss_fn(m, batch):
            out = self.per_sample_loss(m, batch)   # dp_gradient runs it under autocast for bf16
            if m.training:   # the step's own calls (the model check runs in eval mode on two samples)
                losses.append(out.detach())
            return out.float()

        last = self._micro == k - 1
        expected = self.sample_rate * len(self.train_dataset)
        common = dict(clip_norm=self.clip_norm, clipping=self.clipping, backend=self.backend, num_samples=n,
                      precision=self.precision, verify_unit=self.verify_unit,
                      physical_batch_size=self.physical_batch_size)
        if k == 1:
            dp_gradient(model, loss_fn, inputs, noise_multiplier=self.noise_multiplier, expected_batch_size=expected,
                        generator=self._noise_gen, secure=self.secure and self.noise_multiplier > 0,
                        distributed=distributed, **common)
        else:
            res = dp_gradient(model, loss_fn, inputs, noise_multiplier=0.0, expected_batch_size=1.0, generator=None,
                              **common)   # this micro-batch's clipped sum, no noise
            params = {k_: p for k_, p in model.named_parameters() if p.requires_grad}
            sums = [res.grads[name] for name in params]
            self._acc = sums if self._acc is None else [a + b for a, b in zip(self._acc, sums)]
            for p in params.values():
                p.grad = None
            if last:
                self._write_accumulated(params, expected)
        self._micro = (self._micro + 1) % k
        if last:
            if not self.non_private:
                self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            self.dp_steps += 1
            if self.budget_steps is not None and self.dp_steps >= self.budget_steps:
                self.control.should_training_stop = True
        seen = torch.cat([t.float().reshape(-1) for t in losses]) if losses else torch.zeros(0)
        loss = seen.mean() if seen.numel() else torch.zeros(())   # all physical chunks' examples
        return (loss / k).to(self.args.device)

    def _write_accumulated(self, params: dict, expected: float) -> None:
        """p.grad = (sum over the micro-batches of the clipped sums + ONE noise draw) / expected batch
        size; the draw: one flat draw over the parameters in name order (secure or seeded)."""
        from .api import _add_noise, gaussian_noise
        from .noise import secure_gaussian_like

        acc, self._acc = self._acc, None
        std = self.noise_multiplier * self.clip_norm
        device = acc[0].device
        distributed = self.args.world_size > 1
        if distributed and self.args.process_index != 0:
            std = 0.0   # rank 0 alone adds the noise, before the reduction (as dp_gradient(distributed=True))
        if std > 0 and self.secure:
            acc = [a + z for a, z in zip(acc, secure_gaussian_like([a.shape for a in acc], std, device, acc[0].dtype))]
        elif std > 0:
            acc = _add_noise(acc, gaussian_noise([a.shape for a in acc], std, self._noise_gen, device), std)
        if distributed:   # the micro-batches' clipped sums were local: one all-reduce of (sums + rank 0's noise)
            sizes = [a.numel() for a in acc]
            flat = torch.cat([a.reshape(-1) for a in acc])
            torch.distributed.all_reduce(flat)
            acc = [part.view(a.shape) for part, a in zip(flat.split(sizes), acc)]
        for p, a in zip(params.values(), acc):
            p.grad = (a / float(expected)).to(dtype=p.dtype, device=p.device)

    def log(self, logs: dict, *args, **kwargs) -> None:
        logs = dict(logs)
        if self.non_private:
            logs["privacy"] = "NON-PRIVATE (non_private=True: noise_multiplier 0, no DP guarantee)"
        elif self.dp_steps:
            logs["epsilon"] = self.epsilon_spent()
        if self.dp_steps:
            logs["dp_steps"] = self.dp_steps
        super().log(logs, *args, **kwargs)


def _rows(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("the batch holds no tensor: cannot tell its number of examples")
