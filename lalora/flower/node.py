"""What a lalora node remembers and refuses: its privacy ledger, its streams, its operator's terms.

A node's data is private to the node, so the node -- not the server -- must decide what it releases.
Each train request is admitted only if (:meth:`NodeGuard.admit`):

- the round is in the agreed schedule: 1 ≤ t ≤ rounds, this client is sampled in round t
  (the seeded, data-independent ``Simulator.sampled_clients``), and t is after every round this
  node already served in this run (no replay, no going back);
- the run's configuration is one the node operator agreed to (``NodePolicy``: ε and δ at most the
  operator's, the clip norm C if the operator fixed it, σ at least the operator's floor);
- the node's whole ledger -- every run it ever served, composed -- stays within the operator's ε
  budget after this round's K steps.

The ledger is a :class:`PrivacyLedger` whose "clients" are the node's runs (key: hash of the
resolved run config), each round recorded with its (K, σ, q). It is persisted *before* the reply
leaves the node, so a crash can lose a round that was never released but never forget one that
was. A restarted node therefore continues its ledger and refuses what it already served.

Streams. ``noise="os-entropy"`` (the deployment default): the Poisson-sampling and noise generators
are re-seeded every round with 64 bits from ``secrets`` (the OS CSPRNG); their states are never
written anywhere (an MT19937 state can be run backwards to the noise it drew). ``noise="seeded"``:
the generators are seeded from the run config and their states are persisted, so a restarted
node continues them; anyone who knows the config (the server sends it, seed included) can predict
the noise -- simulation only, and a warning is logged when a real node is configured so.

Persistence (:class:`NodeStore`): deployment nodes write ``<state-dir>/node-state.pt`` atomically,
sealed by an HMAC keyed by the node's secret and a sequence number (lalora.flower.ledger: an edited,
damaged or rolled-back file is refused, never silently reset), under an exclusive cross-process
lock held from reading the ledger to writing the round; simulated nodes keep the same payload in
Flower's per-node ``Context.state``.
"""
from __future__ import annotations

import io
import logging
import math
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from lalora.flower.errors import RequestRefused   # re-exported: callers name it here

__all__ = ["NodePolicy", "NodeStore", "NodeState", "NodeGuard", "RequestRefused", "NOISE_SOURCES",
           "run_key"]

NOISE_SOURCES = ("os-entropy", "seeded")
STATE_FILE = "node-state.pt"
_STATE_KEY = "lalora.node"        # Context.state record of a simulated node
_log = logging.getLogger("lalora.flower.node")


def run_key(cfg) -> str:
    """The node's key of a run: a hash of the resolved run config (seed included)."""
    from lalora.results import config_hash

    return config_hash(cfg.to_dict(), "node-run")


def _float(node_config, key: str):
    if key not in node_config:
        return None
    try:
        return float(node_config[key])
    except (TypeError, ValueError):
        raise ValueError(f"node config {key}={node_config[key]!r}: expected a number") from None


def _json_object(node_config, key: str):
    import json

    if key not in node_config:
        return None
    try:
        value = json.loads(node_config[key]) if isinstance(node_config[key], str) else node_config[key]
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"node config {key}={node_config[key]!r}: expected a JSON object")
    return value


@dataclass(frozen=True)
class NodePolicy:
    """The node operator's terms (``--node-config "epsilon=3 delta=1e-5 ..."``).

    epsilon: total ε budget of this node's data over every run (also the largest ε a run may target);
    delta: the largest δ a run may use (the ledger composes at this δ);
    clip_norm: if set, a run must use exactly this C;
    min_noise_multiplier: if set, a run's σ must be at least this;
    noise: "os-entropy" or "seeded"; state_dir: where the node state is kept (deployment);
    client_app: the ClientApp the operator installed and allows (deployment: required,
    ``lalora.flower.client_app:app``); task / task_options: the task and its overrides this node
    serves (a run must name exactly these; no options = a run may send none). The checks on a
    request that read no private data are in lalora.flower.terms.
    None everywhere = no terms (simulated nodes)."""
    epsilon: float | None = None
    delta: float | None = None
    clip_norm: float | None = None
    min_noise_multiplier: float | None = None
    noise: str = "os-entropy"
    state_dir: str | None = None
    client_app: str | None = None
    task: str | None = None
    task_options: dict | None = None

    @classmethod
    def from_node_config(cls, node_config, *, deployment: bool) -> "NodePolicy":
        noise = str(node_config.get("noise", "os-entropy" if deployment else "seeded"))
        if noise not in NOISE_SOURCES:
            raise ValueError(f"node config noise={noise!r}: expected one of {', '.join(NOISE_SOURCES)}")
        policy = cls(epsilon=_float(node_config, "epsilon"), delta=_float(node_config, "delta"),
                     clip_norm=_float(node_config, "clip-norm"),
                     min_noise_multiplier=_float(node_config, "min-noise-multiplier"),
                     noise=noise, state_dir=node_config.get("state-dir"),
                     client_app=node_config.get("client-app"), task=node_config.get("task"),
                     task_options=_json_object(node_config, "task-options"))
        if deployment:
            for key, value in (("state-dir", policy.state_dir), ("epsilon", policy.epsilon),
                               ("delta", policy.delta), ("client-app", policy.client_app)):
                if value is None:
                    raise ValueError(f"node config has no {key!r}: a deployed lalora node needs "
                                     "--node-config \"partition-id=<i> num-partitions=<N> "
                                     "state-dir=<folder> epsilon=<budget> delta=<max δ> "
                                     "client-app='lalora.flower.client_app:app'\"")
            if noise == "seeded":
                _log.warning("SEEDED NOISE ON A REAL NODE (node config noise=seeded): the noise and "
                             "the Poisson batches follow the run's seed, which the server sends to "
                             "every node; whoever knows it can remove the noise from this node's "
                             "updates. Use noise=os-entropy (the default) outside of tests.")
        return policy

    def check_config(self, cfg, noise_multiplier: float) -> None:
        """Raise RequestRefused naming the first term the run config breaks."""
        def refuse(what: str) -> None:   # names the rule only: nothing about the node's other runs
            raise RequestRefused(f"node refuses the run config: {what} (node operator's terms)")

        eps = float(cfg.epsilon) if cfg.private else math.inf
        if self.epsilon is not None and eps > self.epsilon:
            refuse(f"epsilon={eps} exceeds the node's {self.epsilon}")
        if self.delta is not None and float(cfg.delta) > self.delta:
            refuse(f"delta={cfg.delta} exceeds the node's {self.delta}")
        if self.clip_norm is not None and cfg.private and not math.isclose(float(cfg.clip_norm),
                                                                           self.clip_norm):
            refuse(f"clip_norm={cfg.clip_norm} differs from the node's {self.clip_norm}")
        if self.min_noise_multiplier is not None and noise_multiplier < self.min_noise_multiplier:
            refuse(f"noise_multiplier={noise_multiplier:.6g} is below the node's floor "
                   f"{self.min_noise_multiplier}")


class NodeState:
    """The persisted payload: the node ledger, and per run its seeded generator states (seeded
    streams only) and FedSA-LoRA's client-local tensors."""

    def __init__(self, ledger=None, runs: dict | None = None):
        self.ledger = ledger
        self.runs: dict[str, dict] = runs or {}

    def ensure_ledger(self, delta: float, accountant: str):
        from lalora.privacy.accountant import PrivacyLedger

        if self.ledger is None:
            self.ledger = PrivacyLedger(delta=delta, accountant=accountant)
        return self.ledger

    def served(self, key: str) -> list[int]:
        if self.ledger is None or key not in self.ledger.clients:
            return []
        return sorted(int(t) for t in self.ledger.rounds(key))

    def steps(self, key: str) -> int:
        return self.ledger.steps(key) if self.ledger is not None and key in self.ledger.clients else 0

    def to_payload(self) -> dict:
        import json

        return {"version": 1, "ledger": json.dumps(self.ledger.to_dict()) if self.ledger else None,
                "runs": self.runs}

    @classmethod
    def from_payload(cls, payload: dict | None) -> "NodeState":
        import json

        from lalora.privacy.accountant import PrivacyLedger

        if payload is None:
            return cls()
        ledger = payload.get("ledger")
        return cls(PrivacyLedger.from_dict(json.loads(ledger)) if ledger else None,
                   dict(payload.get("runs", {})))


class NodeStore:
    """Where a node's state lives: a checksummed file in ``state_dir`` (deployment), else the
    node's Flower ``Context.state`` (simulation: Flower keeps it per node, in memory)."""

    def __init__(self, context, state_dir: str | None):
        self.context = context
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self._seq: int | None = None     # sequence number of the sealed file last read or written

    def load(self) -> NodeState:
        if self.path is not None:
            return self._load_sealed()
        if _STATE_KEY not in self.context.state:
            return NodeState()
        body = bytes(self.context.state[_STATE_KEY]["payload"])
        return NodeState.from_payload(torch.load(io.BytesIO(body), map_location="cpu",
                                                 weights_only=True))

    def save(self, state: NodeState) -> None:
        if self.path is not None:
            self._save_sealed(state)
            return
        from flwr.app import ConfigRecord

        buf = io.BytesIO()
        torch.save(state.to_payload(), buf)
        self.context.state[_STATE_KEY] = ConfigRecord({"payload": buf.getvalue()})

    def locked(self):
        """The node's exclusive cross-process lock (lalora.flower.ledger.exclusive) on a deployed
        node; nothing to lock in simulation (Flower serves one simulated node at a time)."""
        import contextlib

        from lalora.flower.ledger import exclusive

        return exclusive(self.path.parent) if self.path is not None else contextlib.nullcontext()

    # sealed file (lalora.flower.ledger): MAC keyed by the node secret, sequence number, rollback check
    def _load_sealed(self) -> NodeState:
        from lalora.flower.ledger import SEEN_FILE, StateTamperedError, node_secret, read_seen, unseal

        folder = self.path.parent
        if not self.path.exists():
            if (folder / SEEN_FILE).exists() and read_seen(node_secret(folder, create=False), folder) > 0:
                raise StateTamperedError(f"{self.path} is missing but this node has written its state "
                                         "before: refusing to start over from an empty ledger")
            self._seq = 0
            return NodeState()
        key = node_secret(folder, create=False)
        seq, payload = unseal(key, self.path.read_bytes(), self.path)
        seen = read_seen(key, folder)
        if seq < seen:
            raise StateTamperedError(f"{self.path} is an older copy of the node state (write #{seq}; "
                                     f"the node has written #{seen}): rollback refused")
        self._seq = seq
        return NodeState.from_payload(payload)

    def _save_sealed(self, state: NodeState) -> None:
        from lalora.flower.ledger import node_secret, seal, write_seen
        from lalora.results import atomic_write_bytes

        if self._seq is None:
            self._load_sealed()
        folder = self.path.parent
        key = node_secret(folder, create=not self.path.exists())
        seq = self._seq + 1
        atomic_write_bytes(self.path, seal(key, seq, state.to_payload()))
        write_seen(key, folder, seq)     # after the state: a crash in between looks like seq > seen
        self._seq = seq


class NodeGuard:
    """Admits, runs and records one train request of client ``cid`` (see the module docstring)."""

    def __init__(self, policy: NodePolicy, store: NodeStore):
        self.policy, self.store = policy, store

    def admit(self, sim, cid: int, t: int) -> NodeState:
        """The node state, if round ``t`` may be served; else RequestRefused (nothing released)."""
        self.policy.check_config(sim.cfg, sim.noise_multiplier)
        if not 1 <= t <= sim.cfg.rounds:
            raise RequestRefused(f"round {t} is outside the agreed schedule (rounds 1..{sim.cfg.rounds})")
        if cid not in sim.sampled_clients(t):
            raise RequestRefused(f"client {cid} is not scheduled in round {t} (the seeded schedule "
                                 f"samples {sim.sampled_clients(t)})")
        state = self.store.load()
        key = run_key(sim.cfg)
        served = state.served(key)
        if t in served:
            raise RequestRefused(f"round {t} was already served by this node (replay refused)")
        if served and t < served[-1]:
            raise RequestRefused(f"round {t} comes after round {served[-1]} was served (out of order)")
        if sim.private and self.policy.epsilon is not None:
            budget_eps = self._epsilon_after(state, sim, cid, key)
            if budget_eps > self.policy.epsilon * (1 + 1e-9):
                # the composed ε depends on the node's other runs and on |D_i|: not named
                raise RequestRefused(f"round {t} would exceed this node's ε budget (all its runs "
                                     "composed)")
        return state

    def _epsilon_after(self, state: NodeState, sim, cid: int, key: str) -> float:
        from lalora.privacy.accountant import epsilon_for_history

        history = []
        if state.ledger is not None:
            for c in state.ledger.clients:
                history += [tuple(e) for e in state.ledger.summary(c)["history"]]
        history.append((float(sim.noise_multiplier), float(sim.sample_rates[cid]), sim.cfg.local_steps))
        delta = self.policy.delta if self.policy.delta is not None else sim.cfg.delta
        accountant = state.ledger.accountant if state.ledger is not None else sim.cfg.accountant
        return epsilon_for_history(history, delta, accountant)

    # ------------------------------------------------------------------ streams and local state
    def restore(self, state: NodeState, sim, cid: int, initial) -> None:
        """Load this run's streams, client-local tensors and per-run ledger into the simulator."""
        from lalora.privacy.accountant import PrivacyLedger

        key = run_key(sim.cfg)
        run = state.runs.get(key, {})
        if self.policy.noise == "seeded":
            rng = run.get("rng")
            sim.sampling_generators[cid].set_state(rng["sampling"] if rng else initial[0][cid])
            sim.noise_generators[cid].set_state(rng["noise"] if rng else initial[1][cid])
            sim.dropout_generators[cid].set_state(rng["dropout"] if rng and "dropout" in rng else initial[2][cid])
        else:   # fresh OS entropy every round; nothing to restore
            sim.sampling_generators[cid].manual_seed(secrets.randbits(64))
            sim.noise_generators[cid].manual_seed(secrets.randbits(64))
            sim.dropout_generators[cid].manual_seed(secrets.randbits(64))
        sim.client_local = {cid: dict(run["local"])} if run.get("local") else {}
        sim.ledger = PrivacyLedger(delta=sim.cfg.delta, accountant=sim.cfg.accountant)
        sim.ledger.set_client(cid, sample_rate=sim.sample_rates[cid], noise_multiplier=sim.noise_multiplier)
        sim.ledger.record_steps(cid, state.steps(key))

    def record(self, state: NodeState, sim, cid: int, t: int) -> None:
        """Add round ``t`` to the node ledger and persist everything, before the reply is sent."""
        key = run_key(sim.cfg)
        ledger = state.ensure_ledger(self.policy.delta or sim.cfg.delta, sim.cfg.accountant)
        ledger.record_steps(key, sim.cfg.local_steps, round=int(t),
                            sample_rate=float(sim.sample_rates[cid]),
                            noise_multiplier=float(sim.noise_multiplier))
        run = state.runs.setdefault(key, {})
        if self.policy.noise == "seeded":
            run["rng"] = {"sampling": sim.sampling_generators[cid].get_state(),
                          "noise": sim.noise_generators[cid].get_state(),
                          "dropout": sim.dropout_generators[cid].get_state()}
        if cid in sim.client_local:
            run["local"] = {k: v.clone() for k, v in sim.client_local[cid].items()}
        self.store.save(state)
