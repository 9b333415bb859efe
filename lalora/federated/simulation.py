"""The in-process federated simulation and resumable runs (SPEC §2–§3).

Stable API (used by the Flower adapter and the notebooks; keep it)::

    sim = Simulator(cfg)                       # cfg: RunConfig (resolved here from the task defaults)
    state = sim.initial_global_state()         # dict[name, Tensor]: LoRA A, B and head
    for t in range(1, sim.cfg.rounds + 1):
        updates = [sim.client_update(cid, t, state) for cid in sim.sampled_clients(t)]
        # or, all of the round's clients in lock-step (cfg.client_batching; federated/batched.py):
        # updates = sim.clients_update(sim.sampled_clients(t), t, state)
        state = sim.server_aggregate(updates, t, state)
        metrics = sim.evaluate(state)          # {"accuracy", "loss"[, "per_client_accuracy"]}
    sim.ledger.epsilons()                      # per-client ε spent so far

    result = run_experiment(cfg, runs_dir="runs", resume=True, progress=True)
    result.final["accuracy"], result.final["epsilon_spent"], result.final["per_client_epsilon"]
    result.metrics   # one dict per round (as in metrics.jsonl)
    result.run_dir   # runs/<task>/<method>/<hash>/

``client_update`` returns a :class:`ClientUpdate` whose ``state`` holds only the keys the server
averages this round (so fedsa-lora's B and head never leave the client; the simulator keeps them in
``sim.client_local``). ``num_samples`` = |D_i|, ``num_steps`` = K.

How a run works
- One frozen base model is built once; each client's LoRA factors and head are copied in and out
  (``ParamGroups.set_state``), never rebuilt.
- The client-sampling schedule (uniform without replacement, M of N per round) is drawn from the
  seed before training: it is data-independent, so each client's number of DP steps
  (K × rounds it is sampled) is known up front. One σ is calibrated with the accountant so that every
  client meets the target ε (the binding client is the one with the most steps, or largest q), and
  each client's spent ε is kept in a ``PrivacyLedger`` (idempotent per (client, round): a resumed
  round is never counted twice).
- Randomness: the model build is seeded with ``cfg.seed``; each client owns three torch generators:
  Poisson sampling seeded from (seed, client), DP noise from (seed, hash of the resolved config,
  client), and its LoRA dropout masks from (seed, client). (Seeded streams are for simulation:
  deployed Flower nodes draw from OS entropy, lalora.flower.node.)
  Every RNG state (torch, numpy, python, per-client generators) is checkpointed after every round,
  with the global state, fedsa's client-local state, the ledger and the round index; optimizer state
  is reset every round, so there is none to keep.
- The global model is evaluated every ``eval_every`` rounds and after the last one (per client, on
  the common test set, for fedsa-lora: global A with the client's own B and head).

Run folders (``lalora.results``): ``<runs_dir>/<task>/<method>/<hash>/``, the hash covering the
resolved config, the package version and a fingerprint of ``Task.info`` (data split, backbone key).
A folder with ``final.json`` is served from disk; one with a checkpoint continues from it when
``resume=True`` (metrics of rounds after the checkpoint are dropped and re-run).
Test hook: env ``LALORA_KILL_AFTER_ROUND=N`` makes the process SIGKILL itself right after writing the
checkpoint of round N (used to test crash + resume).
"""
from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from dplora_kernels.dp import autocast_for

import lalora
from lalora.announce import note
from lalora.config import NOT_DP, RunConfig, check_against_task
from lalora.federated.client import ClientData, LocalTraining, local_train, to_device
from lalora.federated.methods import get_method
from lalora.federated.server import ClientUpdate, aggregate
from lalora.federated.state import ParamGroups
from lalora.privacy.accountant import binding_pairs as _binding_pairs
from lalora.privacy.accountant import cached_epsilon_for as _epsilon_for
from lalora.privacy.accountant import sigma_for_pairs as _sigma_for
from lalora.provenance import run_provenance
from lalora.results import RunDir, config_hash

__all__ = ["Simulator", "ClientUpdate", "RunResult", "run_experiment", "client_schedule",
           "resolve_config"]

KILL_ENV = "LALORA_KILL_AFTER_ROUND"
_TAG_SCHEDULE, _TAG_SAMPLING, _TAG_NOISE, _TAG_TORCH, _TAG_DROPOUT = 1, 2, 3, 4, 5


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
               % (2 ** 63 - 1))


def client_schedule(num_clients: int, per_round: int, rounds: int, seed: int) -> list[list[int]]:
    """Sampled clients of each round (index t-1), uniform without replacement, from the seed only."""
    rng = np.random.default_rng(_derived_seed(seed, _TAG_SCHEDULE))
    return [sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
            for _ in range(rounds)]


def _load_task(cfg: RunConfig):
    """Build ``cfg.task``; the run's seed and an explicit r/alpha go to the task factory when it
    takes them (the LoRA init and head init then follow the run seed), unless task_overrides
    sets them."""
    import inspect

    from lalora.tasks import TASKS, get_task

    overrides = dict(cfg.task_overrides)
    factory = TASKS.get(cfg.task)
    if factory is not None:
        params = inspect.signature(factory).parameters
        for name, value in (("seed", cfg.seed), ("r", cfg.r), ("alpha", cfg.alpha)):
            if value is not None and name in params and name not in overrides:
                overrides[name] = value
    return get_task(cfg.task, **overrides)


def resolve_config(cfg: RunConfig, task=None) -> RunConfig:
    """``cfg`` with every unset field filled from the task defaults (builds the task if needed)."""
    task = task if task is not None else _load_task(cfg)
    return cfg.resolve(getattr(task, "defaults", {}))


class Simulator:
    """One federated run in memory (see the module docstring for the API)."""

    def __init__(self, cfg: RunConfig, *, task=None, partitions: list | None = None):
        self.task = task if task is not None else _load_task(cfg)
        self.cfg = cfg = cfg.resolve(getattr(self.task, "defaults", {}))
        self.method = get_method(cfg.method)

        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)   # resolved: "cpu", "cuda" or "cuda:N"
        self.model = self.task.build_model().to(self.device)
        from lalora.tasks.data import use_device

        for split in ("train", "test"):   # per-item image datasets: decoding threads + pinned memory on CUDA
            if getattr(self.task, split, None) is not None:
                use_device(getattr(self.task, split), self.device)
        self.groups = ParamGroups.from_model(self.model)
        self.train_head = cfg.head == "train" and bool(self.groups.params["head"])
        self.groups.set_trainable(frozenset(), head=False)
        self._initial_state = self.groups.get_state()

        if partitions is None:
            from lalora.tasks import partition

            partitions = partition(np.asarray(self.task.train_labels), cfg.clients, cfg.partition,
                                   cfg.beta, cfg.seed, cfg.samples_per_client)
        if len(partitions) != cfg.clients:
            raise ValueError(f"partitions has {len(partitions)} parts, clients={cfg.clients}")
        self.client_data = [ClientData(self.task.train, torch.as_tensor(np.asarray(p), dtype=torch.long),
                                       self.task.collate) for p in partitions]
        empty = [i for i, d in enumerate(self.client_data) if len(d) == 0]
        if empty:
            raise ValueError(f"clients {empty} have no training examples; change partition/beta/seed")

        if cfg.private:
            self.verify_clipping_unit()

        self.schedule = client_schedule(cfg.clients, cfg.clients_per_round, cfg.rounds, cfg.seed)
        rounds_of = [sum(cid in s for s in self.schedule) for cid in range(cfg.clients)]
        self.planned_steps = [cfg.local_steps * n for n in rounds_of]
        self.sample_rates = [min(1.0, cfg.batch_size / len(d)) for d in self.client_data]
        self.private = cfg.private
        self.noise_multiplier = self._calibrate_sigma() if self.private else 0.0

        from lalora.privacy.accountant import PrivacyLedger

        self.ledger = PrivacyLedger(delta=cfg.delta, accountant=cfg.accountant)
        for cid in range(cfg.clients):
            self.ledger.set_client(cid, sample_rate=self.sample_rates[cid],
                                   noise_multiplier=self.noise_multiplier)

        self.local = LocalTraining(
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_decay=cfg.lr_decay,
            lr_B_ratio=cfg.lr_B_ratio, optimizer=cfg.optimizer, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            clip_norm=cfg.clip_norm if self.private else math.inf,
            noise_multiplier=self.noise_multiplier, private=self.private, use_filter=bool(cfg.filter),
            alternation_period=cfg.alternation_period, train_head=self.train_head,
            clipping=cfg.clipping, dp_mode=cfg.dp_mode, precision=cfg.precision)
        # Poisson and noise generators live on the run's device: the noise is drawn where it is added
        self.sampling_generators = [torch.Generator(self.device).manual_seed(
            _derived_seed(cfg.seed, _TAG_SAMPLING, c)) for c in range(cfg.clients)]
        # Noise streams also depend on the whole resolved config: two runs that differ only in ε (or
        # any setting) must not draw the same N(0, 1) vectors, or their releases subtract to the
        # clipped sum. Sampling, partition, LoRA init and schedule stay (seed, client): paired runs.
        # (client_batching is left out: it changes how a run is computed, not what it releases --
        # both modes release the same updates to float rounding, so they must draw the same noise)
        noise_cfg = {k: v for k, v in cfg.to_dict().items() if k != "client_batching"}
        noise_key = int(config_hash(noise_cfg, "noise-stream", length=15), 16)
        self.noise_generators = [torch.Generator(self.device).manual_seed(_derived_seed(cfg.seed, _TAG_NOISE,
                                                                                        noise_key, c))
                                 for c in range(cfg.clients)]
        # LoRA dropout: each client's masks come from its own generator (grouped.client_groups), so
        # they never depend on other clients' batches and client batching draws the same masks
        self.dropout_generators = [torch.Generator(self.device).manual_seed(_derived_seed(cfg.seed, _TAG_DROPOUT, c))
                                   for c in range(cfg.clients)]
        torch.manual_seed(_derived_seed(cfg.seed, _TAG_TORCH))
        local_groups = self.method.local_only & {"A", "B", "head"}
        self.client_local: dict[int, dict[str, torch.Tensor]] = {}
        self._local_groups = frozenset(local_groups)

    # ------------------------------------------------------------------ privacy
    def verify_clipping_unit(self) -> None:
        """Run the clipping-unit probe (lalora.privacy.unit_probe) once, with every LoRA factor and
        the head trainable, on the first examples of the first client that has 2: a model whose
        rows are not one sample each raises before any step. Nothing computed here is released."""
        from lalora.privacy.dp_step import per_sample_gradients
        from lalora.privacy.unit_probe import verify_clipping_unit

        data = next((d for d in self.client_data if len(d) >= 2), None)
        if data is None:
            return
        batch = to_device(data.batch(torch.arange(min(3, len(data)))), self.device)

        def loss_fn(model, b):
            return torch.nn.functional.cross_entropy(self.task.forward(model, b), b["labels"],
                                                     reduction="none")

        self.groups.set_trainable(frozenset({"A", "B"}), head=self.train_head)
        try:
            verify_clipping_unit(self.model, loss_fn, batch, per_sample_gradients)
        finally:
            self.groups.set_trainable(frozenset(), head=False)

    def _calibrate_sigma(self) -> float:
        pairs = _binding_pairs((q, s) for q, s in zip(self.sample_rates, self.planned_steps) if s > 0)
        return _sigma_for(float(self.cfg.epsilon), float(self.cfg.delta), pairs, self.cfg.accountant)

    # ------------------------------------------------------------------ the federated API
    def initial_global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._initial_state.items()}

    def sampled_clients(self, t: int) -> list[int]:
        if not 1 <= t <= self.cfg.rounds:
            raise ValueError(f"round t must be in 1..{self.cfg.rounds}, got {t}")
        return list(self.schedule[t - 1])

    def aggregated_groups(self, t: int) -> frozenset:
        return self.method.aggregated(t, self.cfg.local_steps, self.cfg.alternation_period,
                                      head=self.train_head)

    def _load_client(self, cid: int, global_state: dict[str, torch.Tensor]) -> None:
        self.groups.set_state(global_state)
        if self._local_groups:
            local = self.client_local.get(cid)
            if local is None:
                local = {k: v for k, v in self._initial_state.items()
                         if k in set(self.groups.names(self._local_groups))}
            self.groups.set_state(local)

    def client_update(self, cid: int, t: int, global_state: dict[str, torch.Tensor], *,
                      step_hook=None) -> ClientUpdate:
        """Client ``cid`` trains round ``t`` from ``global_state``; the ledger records its K steps."""
        from dplora_kernels.grouped import client_groups

        self._load_client(cid, global_state)
        with client_groups(self.model, dropout_generators=[self.dropout_generators[cid]]):
            stats = local_train(self.model, self.groups, self.method, self.client_data[cid], t, self.local,
                                forward=self.task.forward,
                                sampling_generator=self.sampling_generators[cid],
                                noise_generator=self.noise_generators[cid], step_hook=step_hook)
        if self._local_groups:
            self.client_local[cid] = self.groups.get_state(self._local_groups)
        self.ledger.record_steps(cid, self.cfg.local_steps, round=t)
        return ClientUpdate(state=self.groups.get_state(self.aggregated_groups(t)),
                            num_samples=len(self.client_data[cid]), num_steps=self.cfg.local_steps,
                            client_id=cid, metrics=stats)

    @functools.cached_property
    def client_batching(self) -> bool:
        """Batched rounds (federated/batched.py) when the config asks and they are equivalent to
        sequential ones: real DP or no DP (the as-released step is sequential only), the optimizer is
        re-created every round (no per-client state to carry) and the model has no grouped-incompatible
        head nor randomness beyond LoRA dropout (batched.batching_blocker); otherwise clients run one
        after another."""
        from lalora.federated.batched import batching_blocker

        return (bool(self.cfg.client_batching) and self.cfg.optimizer_state == "reset"
                and self.cfg.dp_mode == "dp"
                and batching_blocker(self.model, self.groups) is None)

    def clients_update(self, clients: list[int], t: int, global_state: dict[str, torch.Tensor]) -> list[ClientUpdate]:
        """The round's updates: all clients in lock-step through one backbone (client batching), or
        one ``client_update`` after another (the reference)."""
        if self.client_batching and len(clients) > 1:
            from lalora.federated.batched import batched_client_updates

            return batched_client_updates(self, clients, t, global_state)
        return [self.client_update(cid, t, global_state) for cid in clients]

    def server_aggregate(self, updates: list[ClientUpdate], t: int,
                         global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return aggregate(updates, global_state, weighted=self.cfg.weighted_aggregation)

    @torch.no_grad()
    def _accuracy(self) -> tuple[float, float]:
        self.model.eval()
        test = self.task.test
        n = len(test)
        correct, loss_sum = 0, 0.0
        for start in range(0, n, self.cfg.eval_batch_size):
            idx = list(range(start, min(n, start + self.cfg.eval_batch_size)))
            batch = test.batch(idx) if hasattr(test, "batch") else self.task.collate([test[i] for i in idx])
            batch = to_device(batch, self.device)
            with autocast_for(self.cfg.precision, self.device):
                logits = self.task.forward(self.model, batch)
            if not torch.isfinite(logits).all():   # NaN logits would score as class 0, silently
                raise FloatingPointError(f"NaN/Inf logits on test examples {idx[0]}..{idx[-1]} of task "
                                         f"{self.cfg.task!r}; check the test data")
            labels = batch["labels"]
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        return correct / n, loss_sum / n

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict:
        """Test accuracy and loss of the global model (fedsa-lora: mean over the clients that have
        trained of the model with the global A and the client's local B and head; per-client values
        of every client included). A client never sampled still holds the initial B = 0 and a fresh
        head, so averaging it in would score the schedule, not the method; before any client has
        trained all are scored. ``fedsa_scoring`` says which."""
        if not self._local_groups:
            self.groups.set_state(global_state)
            acc, loss = self._accuracy()
            return {"accuracy": acc, "loss": loss}
        accs, losses = [], []
        for cid in range(self.cfg.clients):
            self._load_client(cid, global_state)
            acc, loss = self._accuracy()
            accs.append(acc)
            losses.append(loss)
        scored = sorted(self.client_local) or list(range(self.cfg.clients))
        return {"accuracy": float(np.mean([accs[c] for c in scored])),
                "loss": float(np.mean([losses[c] for c in scored])),
                "per_client_accuracy": accs, "scored_clients": scored,
                "fedsa_scoring": "trained-clients" if self.client_local else "all-clients (none trained yet)"}

    # ------------------------------------------------------------------ checkpointable state
    def state_dict(self, round_index: int, global_state: dict[str, torch.Tensor]) -> dict:
        np_state = np.random.get_state()
        return {
            "round": int(round_index),
            "global_state": {k: v.clone() for k, v in global_state.items()},
            "client_local": {int(c): {k: v.clone() for k, v in s.items()} for c, s in self.client_local.items()},
            "ledger": self.ledger.to_dict(),
            "noise_multiplier": float(self.noise_multiplier),
            "schedule": [list(s) for s in self.schedule],
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                          int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": list(random.getstate()),
                "sampling": [g.get_state() for g in self.sampling_generators],
                "noise": [g.get_state() for g in self.noise_generators],
                "dropout": [g.get_state() for g in self.dropout_generators],
            },
        }

    def load_state_dict(self, payload: dict) -> tuple[int, dict[str, torch.Tensor]]:
        """Restore a checkpoint; returns (last finished round, global state)."""
        from lalora.privacy.accountant import PrivacyLedger

        if payload["schedule"] != [list(s) for s in self.schedule]:
            raise ValueError("checkpoint's client schedule differs from this config's: wrong run folder?")
        if float(payload["noise_multiplier"]) != float(self.noise_multiplier):
            raise ValueError("checkpoint's noise_multiplier differs from this config's calibration")
        self.client_local = {int(c): dict(s) for c, s in payload["client_local"].items()}
        self.ledger = PrivacyLedger.from_dict(payload["ledger"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        for g, s in zip(self.sampling_generators, rng["sampling"]):
            g.set_state(s)
        for g, s in zip(self.noise_generators, rng["noise"]):
            g.set_state(s)
        for g, s in zip(self.dropout_generators, rng.get("dropout", [])):
            g.set_state(s)
        return int(payload["round"]), dict(payload["global_state"])

    def client_epsilon(self, cid: int) -> float:
        """ε spent by client ``cid`` so far (its ledger history is one (σ, q) entry)."""
        steps = self.ledger.steps(cid)
        if not steps:
            return 0.0
        if not self.private:
            return math.inf
        if self.not_dp:
            return math.nan
        return _epsilon_for(float(self.noise_multiplier), float(self.cfg.delta),
                            float(self.sample_rates[cid]), int(steps), self.cfg.accountant)

    @property
    def not_dp(self) -> bool:
        """True for the released (non-DP) mechanism: no accountant claim, every output labelled."""
        return self.cfg.dp_mode == "as-released"

    def privacy_summary(self) -> dict:
        eps = [self.client_epsilon(c) for c in range(self.cfg.clients)]
        if self.not_dp:   # steps are still counted, but no ε exists for a non-DP mechanism
            return {"epsilon_spent": math.nan, "per_client_epsilon": [math.nan] * self.cfg.clients,
                    "per_client_steps": [self.ledger.steps(c) for c in range(self.cfg.clients)],
                    "privacy": NOT_DP, "dp_mode": self.cfg.dp_mode}
        return {"epsilon_spent": max(eps) if eps else 0.0, "per_client_epsilon": eps,
                "per_client_steps": [self.ledger.steps(c) for c in range(self.cfg.clients)]}


# ---------------------------------------------------------------------- runs on disk
@dataclass
class RunResult:
    config: RunConfig
    metrics: list[dict]
    final: dict
    run_dir: str
    cached: bool = False


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items()
                if k not in ("cached", "load_seconds", "seconds", "wall_s")}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def task_fingerprint(task) -> str:
    """Short hash of what the task says about its data and pretrained backbone (``Task.info``,
    timings dropped), so a changed backbone or split gets a new run folder instead of a stale
    cached result. Builds the model once to make the task record its backbone key."""
    import hashlib
    import json

    from lalora.results import to_jsonable

    info = getattr(task, "info", None)
    if info is None:
        return "none"
    if isinstance(info, dict) and "pretrain" in info and info["pretrain"] is None:
        task.build_model()   # fills info["pretrain"] (the backbone's content key)
    text = json.dumps(to_jsonable(_drop_volatile(info)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def majority_baseline(task) -> float:
    """Test accuracy of always predicting the most frequent training label: the bar a model must
    beat to count as having trained (the report's "did not train" check)."""
    train = np.asarray(task.train_labels, dtype=np.int64)
    test = getattr(task, "test_labels", None)
    if test is None:   # tasks that do not list their test labels: read them item by item
        test = [int(task.test[i]["labels"]) for i in range(len(task.test))]
    test = np.asarray(test, dtype=np.int64)
    if train.size == 0 or test.size == 0:
        return math.nan
    return float(np.mean(test == np.bincount(train).argmax()))


def _progress_enabled(progress: bool) -> bool:
    env = os.environ.get("LALORA_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(progress) and sys.stderr.isatty()


def run_experiment(cfg: RunConfig, *, runs_dir: str | os.PathLike = "runs", resume: bool = True,
                   progress: bool = True, force: bool = False, task=None,
                   partitions: list | None = None) -> RunResult:
    """Run (or resume, or serve from disk) the experiment ``cfg``; see the module docstring.

    ``resume=False`` discards an unfinished attempt's checkpoint and starts over; ``force=True``
    also recomputes a finished run. ``task``/``partitions`` override the registry (tests)."""
    task = task if task is not None else _load_task(cfg)
    cfg = cfg.resolve(getattr(task, "defaults", {}))
    if partitions is None:
        check_against_task(cfg, task)   # before the fingerprint, which may pretrain a backbone
    fingerprint = task_fingerprint(task)
    digest = config_hash({**cfg.to_dict(), "task_fingerprint": fingerprint}, lalora.__version__)
    not_dp = cfg.dp_mode == "as-released"   # the folder name says it too
    run_dir = RunDir.for_config(runs_dir, cfg.task, cfg.method, digest + ("-NOT-DP" if not_dp else ""))

    def finished() -> RunResult | None:
        if run_dir.is_finished() and not force:
            return RunResult(cfg, run_dir.read_metrics(), run_dir.read_final(), str(run_dir.path), cached=True)
        return None

    # Checked before the lock too: serving a finished run must not write (a read-only runs folder works).
    if (done := finished()) is not None:
        return done
    with run_dir.exclusive():
        # another process may have finished this run while we waited for the lock
        if (done := finished()) is not None:
            return done
        return _train(cfg, task, partitions, run_dir, digest, fingerprint, resume=resume, force=force,
                      progress=progress)


def _train(cfg: RunConfig, task, partitions, run_dir: RunDir, digest: str, fingerprint: str, *, resume: bool,
           force: bool, progress: bool) -> RunResult:
    """Train (or resume) the run in ``run_dir``; the caller holds its lock."""
    not_dp = cfg.dp_mode == "as-released"
    sim = Simulator(cfg, task=task, partitions=partitions)
    global_state = sim.initial_global_state()
    start, elapsed = 1, 0.0
    if resume and run_dir.has_checkpoint() and not force:
        payload = run_dir.load_checkpoint()
        done, global_state = sim.load_state_dict(payload)
        elapsed = float(payload.get("elapsed_s", 0.0))
        run_dir.truncate_metrics(done)
        start = done + 1
        note(f"resuming {run_dir.path} at round {start} of {cfg.rounds} (rounds 1-{done} from its checkpoint)")
    else:
        run_dir.reset()
    run_dir.write_config({**cfg.to_dict(), "hash": digest, "task_fingerprint": fingerprint,
                          "lalora_version": lalora.__version__, **({"privacy": NOT_DP} if not_dp else {})})

    show = _progress_enabled(progress)
    from tqdm.auto import tqdm

    rounds_bar = tqdm(total=cfg.rounds, initial=start - 1, desc=f"{cfg.method} rounds",
                      disable=not show, dynamic_ncols=True, file=sys.stderr)
    last_eval: dict = {}
    if start > 1:
        last_eval = next((r for r in reversed(run_dir.read_metrics()) if "test_accuracy" in r), {})
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    for t in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        clients = sim.sampled_clients(t)
        if sim.client_batching:
            updates = sim.clients_update(clients, t, global_state)
        else:
            updates = [sim.client_update(cid, t, global_state)
                       for cid in tqdm(clients, desc=f"round {t} clients", leave=False, disable=not show,
                                       dynamic_ncols=True, file=sys.stderr)]
        global_state = sim.server_aggregate(updates, t, global_state)
        privacy = sim.privacy_summary()
        record = {
            "round": t, "clients": clients, "lr": sim.local.lr_at(t),
            "train_loss": float(np.mean([u.metrics["train_loss"] for u in updates])),
            "mean_batch_size": float(np.mean([np.mean(u.metrics["batch_sizes"]) for u in updates])),
            "epsilon_spent": privacy["epsilon_spent"],
            **({"privacy": NOT_DP} if not_dp else {}),
        }
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            ev = sim.evaluate(global_state)
            record.update({f"test_{k}": v for k, v in ev.items()})
            last_eval = record
        record["round_s"] = time.perf_counter() - t0
        elapsed += record["round_s"]
        record["elapsed_s"] = elapsed
        run_dir.append_metrics(record)
        run_dir.save_checkpoint({**sim.state_dict(t, global_state), "elapsed_s": elapsed})
        rounds_bar.update(1)
        rounds_bar.set_postfix(acc=f"{last_eval.get('test_accuracy', float('nan')):.3f}",
                               eps=f"{privacy['epsilon_spent']:.2f}")
        if kill_after and t == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    rounds_bar.close()

    privacy = sim.privacy_summary()
    final = {
        "task": cfg.task, "method": cfg.method, "hash": digest, "lalora_version": lalora.__version__,
        "accuracy": last_eval.get("test_accuracy"), "loss": last_eval.get("test_loss"),
        "evaluated_round": last_eval.get("round"),
        **privacy,
        "target_epsilon": cfg.epsilon if sim.private else math.inf,
        "delta": cfg.delta, "noise_multiplier": sim.noise_multiplier, "private": sim.private,
        "clip_norm": cfg.clip_norm if sim.private else math.inf,
        "sample_rates": sim.sample_rates, "rounds": cfg.rounds, "filter": bool(cfg.filter),
        "wall_time_s": elapsed, "dp_mode": cfg.dp_mode,
        "majority_baseline": majority_baseline(task), "accountant": cfg.accountant,
        "provenance": run_provenance(task, accountant=cfg.accountant),
    }
    if not_dp:   # σ was picked as real DP at cfg.epsilon would; nothing here is an ε guarantee
        final.update(private=False, privacy=NOT_DP, target_epsilon=math.nan, clip_norm=math.nan,
                     sigma_from_epsilon=cfg.epsilon)
    if "test_per_client_accuracy" in last_eval:
        final["per_client_accuracy"] = last_eval["test_per_client_accuracy"]
        final["scored_clients"] = last_eval["test_scored_clients"]
        final["fedsa_scoring"] = last_eval["test_fedsa_scoring"]
    run_dir.write_final(final)
    from lalora.results import read_json

    return RunResult(cfg, run_dir.read_metrics(), read_json(run_dir.final_path), str(run_dir.path))
