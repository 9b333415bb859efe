"""The in-process federated simulation: one run's rounds in memory (SPEC §2–§3).

Stable API (used by the Flower adapter, the run-folder layer and the notebooks; keep it)::

    sim = Simulator(cfg)                       # cfg: RunConfig (resolved here from the task defaults)
    state = sim.initial_global_state()         # dict[name, Tensor]: LoRA A, B and head
    for t in range(1, sim.cfg.rounds + 1):
        updates = [sim.client_update(cid, t, state) for cid in sim.sampled_clients(t)]
        # or, all of the round's clients in lock-step (cfg.client_batching; federated/batched.py):
        # updates = sim.clients_update(sim.sampled_clients(t), t, state)
        state = sim.server_aggregate(updates, t, state)
        metrics = sim.evaluate(state)          # {"accuracy", "loss"[, "per_client_accuracy"]}
    sim.ledger.epsilons()                      # per-client ε spent so far
    sim.plan                                   # lalora.privacy.plan.RunPlan: schedule, q, σ, seeds

Runs on disk (run folders, resume, the final summary) are ``lalora.federated.runs.run_experiment``.

``client_update`` returns a :class:`ClientUpdate` whose ``state`` holds only the keys the server
averages this round (so fedsa-lora's B and head never leave the client; the simulator keeps them in
``sim.client_local``). ``num_samples`` = |D_i|, ``num_steps`` = K.

How a run works
- One frozen base model is built once; each client's LoRA factors and head are copied in and out
  (``ParamGroups.set_state``), never rebuilt.
- Everything privacy needs comes from the run plan (``RunPlan.for_config(cfg, client sizes)``): the
  client-sampling schedule (uniform without replacement, M of N per round, drawn from the seed
  before training: data-independent, so each client's number of DP steps, K × rounds it is sampled,
  is known up front), the one σ with which every client meets the target ε (the binding client is
  the one with the most steps, or largest q) and the derived seeds. Each client's spent ε is kept in
  a ``PrivacyLedger`` (idempotent per (client, round): a resumed round is never counted twice).
- Randomness: the model build is seeded with ``cfg.seed``; each client owns three torch generators:
  Poisson sampling seeded from (seed, client), DP noise from (seed, hash of the resolved config,
  client), and its LoRA dropout masks from (seed, client). (Seeded streams are for simulation:
  deployed Flower nodes draw from OS entropy, lalora.flower.node.)
  ``state_dict``/``load_state_dict`` hold every RNG state (torch, numpy, python, per-client
  generators) with the global state, fedsa's client-local state, the ledger and the round index;
  optimizer state is reset every round, so there is none to keep.
- The global model is evaluated every ``eval_every`` rounds and after the last one (per client, on
  the common test set, for fedsa-lora: global A with the client's own B and head).
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from dplora_kernels.dp import autocast_for
from dplora_kernels.grouped import client_groups

from lalora.config import NOT_DP, RunConfig
from lalora.federated.batched import batched_client_updates, batching_blocker
from lalora.federated.client import ClientData, LocalTraining, local_train, to_device
from lalora.federated.server import ClientUpdate, aggregate
from lalora.federated.state import ParamGroups
from lalora.methods import get_method
from lalora.privacy.accountant import PrivacyLedger
from lalora.privacy.dp_step import per_sample_gradients
from lalora.privacy.plan import RunPlan
from lalora.privacy.unit_probe import verify_clipping_unit
from lalora.tasks import client_partitions, task_for_config
from lalora.tasks.data import use_device

__all__ = ["Simulator", "ClientUpdate", "resolve_config", "plan_run"]


def plan_run(cfg: RunConfig, *, task=None, partitions: list | None = None) -> tuple:
    """What a run's privacy needs, before any model: ``(resolved cfg, task, partitions, RunPlan)``.
    The task is built (its labels give the partition) but not its model: the Flower server sends
    this σ and schedule, and a node checks them, without building a Simulator."""
    task = task if task is not None else task_for_config(cfg)
    cfg = cfg.resolve(getattr(task, "defaults", {}))
    if partitions is None:
        partitions = client_partitions(cfg, task)
    return cfg, task, partitions, RunPlan.for_config(cfg, [len(p) for p in partitions])


def resolve_config(cfg: RunConfig, task=None) -> RunConfig:
    """``cfg`` with every unset field filled from the task defaults (builds the task if needed)."""
    task = task if task is not None else task_for_config(cfg)
    return cfg.resolve(getattr(task, "defaults", {}))


class Simulator:
    """One federated run in memory (see the module docstring for the API)."""

    def __init__(self, cfg: RunConfig, *, task=None, partitions: list | None = None):
        self.task = task if task is not None else task_for_config(cfg)
        self.cfg = cfg = cfg.resolve(getattr(self.task, "defaults", {}))
        self.method = get_method(cfg.method)

        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)   # resolved: "cpu", "cuda" or "cuda:N"
        self.model = self.task.build_model().to(self.device)
        for split in ("train", "test"):   # per-item image datasets: decoding threads + pinned memory on CUDA
            if getattr(self.task, split, None) is not None:
                use_device(getattr(self.task, split), self.device)
        self.groups = ParamGroups.from_model(self.model)
        self.train_head = cfg.head == "train" and bool(self.groups.params["head"])
        self.groups.set_trainable(frozenset(), head=False)
        self._initial_state = self.groups.get_state()

        if partitions is None:
            partitions = client_partitions(cfg, self.task)
        if len(partitions) != cfg.clients:
            raise ValueError(f"partitions has {len(partitions)} parts, clients={cfg.clients}")
        self.client_data = [ClientData(self.task.train, torch.as_tensor(np.asarray(p), dtype=torch.long),
                                       self.task.collate) for p in partitions]
        empty = [i for i, d in enumerate(self.client_data) if len(d) == 0]
        if empty:
            raise ValueError(f"clients {empty} have no training examples; change partition/beta/seed")

        if cfg.private:
            self.verify_clipping_unit()

        # schedule, steps and q per client, the one σ and the derived seeds: the run plan
        self.plan = plan = RunPlan.for_config(cfg, [len(d) for d in self.client_data])
        self.schedule = plan.schedule
        self.planned_steps = plan.planned_steps
        self.sample_rates = plan.sample_rates
        self.private = plan.private
        self.noise_multiplier = plan.noise_multiplier

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
        # Poisson and noise generators live on the run's device: the noise is drawn where it is added.
        # Noise seeds also depend on the whole resolved config (plan.noise_stream_key): runs that
        # differ only in ε never draw the same N(0, 1) vectors. Sampling, partition, LoRA init and
        # schedule stay (seed, client): paired runs.
        self.sampling_generators = [torch.Generator(self.device).manual_seed(s) for s in plan.sampling_seeds]
        self.noise_generators = [torch.Generator(self.device).manual_seed(s) for s in plan.noise_seeds]
        # LoRA dropout: each client's masks come from its own generator (grouped.client_groups), so
        # they never depend on other clients' batches and client batching draws the same masks
        self.dropout_generators = [torch.Generator(self.device).manual_seed(s) for s in plan.dropout_seeds]
        torch.manual_seed(plan.torch_seed)
        local_groups = self.method.local_only & {"A", "B", "head"}
        self.client_local: dict[int, dict[str, torch.Tensor]] = {}
        self._local_groups = frozenset(local_groups)

    # ------------------------------------------------------------------ privacy
    def verify_clipping_unit(self) -> None:
        """Run the clipping-unit probe (lalora.privacy.unit_probe) once, with every LoRA factor and
        the head trainable, on the first examples of the first client that has 2: a model whose
        rows are not one sample each raises before any step. Nothing computed here is released."""
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

    # ------------------------------------------------------------------ the federated API
    def initial_global_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._initial_state.items()}

    def sampled_clients(self, t: int) -> list[int]:
        return self.plan.sampled_clients(t)

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
        return (bool(self.cfg.client_batching) and self.cfg.optimizer_state == "reset"
                and self.cfg.dp_mode == "dp"
                and batching_blocker(self.model, self.groups) is None)

    def clients_update(self, clients: list[int], t: int, global_state: dict[str, torch.Tensor]) -> list[ClientUpdate]:
        """The round's updates: all clients in lock-step through one backbone (client batching), or
        one ``client_update`` after another (the reference)."""
        if self.client_batching and len(clients) > 1:
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
        if steps and self.private and self.not_dp:
            return math.nan   # the released (non-DP) mechanism: no ε exists
        return self.plan.client_epsilon(cid, steps)

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


