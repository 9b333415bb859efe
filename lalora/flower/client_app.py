"""The Flower ClientApp: one SuperNode = one lalora client, running *our* client update.

Every train message is served by ``Simulator.client_update`` -- the same local loop, DP step,
filter and privacy ledger as the in-process engine -- so a Flower run is a change of transport,
not of algorithm. Flower creates ClientApps afresh for every message (and may serve one node from
different worker processes), so nothing a client must remember lives in Python objects:

- ``Context.state`` (kept per node by Flower across rounds) holds this client's Poisson-sampling
  and noise generator states, its privacy ledger, and FedSA-LoRA's local B and head;
- the heavy part (task data, frozen base model, σ calibration) is a per-process cache keyed by the
  run config; it holds no per-client state, and everything client-specific is restored from
  ``Context.state`` before each update.

Message protocol (``lalora.flower.encoding.KEYS``):

- ``query`` (setup, once): ConfigRecord ``{"config": RunConfig JSON, "noise_multiplier": σ}``;
  the node stores the config, checks that its own σ calibration matches the server's, and
  replies with its ``partition-id`` (the client id, from the node config).
- ``train``: ArrayRecord of the downlink state + ``{"round": t}``; replies with the ArrayRecord of
  exactly the groups the server averages this round, and a MetricRecord of diagnostics.
- ``evaluate`` (FedSA-LoRA only: its model is global A + the client's local B and head): the
  client's test accuracy and loss.

LoRA dropout draws from the client's own dropout generator (as in the in-process engine), whose
state travels in ``Context.state`` with the sampling and noise generators, so a Flower run does not
depend on which worker serves which client. Any other use of torch's global RNG is seeded per
(seed, client, round) inside a ``fork_rng``.

For a deployment (``flower-supernode ... --node-config "partition-id=3 num-partitions=8"``) the
app object is ``lalora.flower.client_app:app``.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from lalora.config import RunConfig
from lalora.flower.encoding import KEYS, record_to_state, state_to_record

__all__ = ["LaLoraClient", "make_client_app", "app"]

_TAG_DROPOUT = 101   # derived-seed tag of the per-(client, round) dropout RNG


def _round_seed(seed: int, cid: int, t: int) -> int:
    return int(np.random.SeedSequence([seed, _TAG_DROPOUT, cid, t]).generate_state(1, np.uint64)[0]
               % (2 ** 63 - 1))


def partition_id(context) -> int:
    """The client id of this node: ``partition-id`` of the node config (Flower's convention)."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("node config has no 'partition-id': start the SuperNode with "
                         "--node-config \"partition-id=<i> num-partitions=<N>\"") from None


class LaLoraClient:
    """Serves query/train/evaluate messages for any lalora config (see the module docstring).

    ``task``/``partitions`` override the task registry (tests with an unregistered task)."""

    def __init__(self, task=None, partitions=None):
        self.task = task
        self.partitions = partitions
        self._cache: dict[str, tuple] = {}   # config JSON -> (Simulator, initial generator states)

    # ------------------------------------------------------------------ per-process simulator cache
    def simulator(self, config_json: str):
        hit = self._cache.get(config_json)
        if hit is None:
            from lalora.federated.simulation import Simulator

            sim = Simulator(RunConfig.from_dict(json.loads(config_json)), task=self.task,
                            partitions=self.partitions)
            initial = ([g.get_state() for g in sim.sampling_generators],
                       [g.get_state() for g in sim.noise_generators],
                       [g.get_state() for g in sim.dropout_generators])
            self._cache.clear()   # one run per process at a time: free the previous model
            hit = self._cache[config_json] = (sim, initial)
        return hit

    def _restore(self, sim, initial, cid: int, context) -> None:
        """Load client ``cid``'s persistent state from ``context.state`` into the cached simulator."""
        from lalora.privacy.accountant import PrivacyLedger

        rng = record_to_state(context.state[KEYS.RNG]) if KEYS.RNG in context.state else None
        sim.sampling_generators[cid].set_state(rng["sampling"] if rng else initial[0][cid])
        sim.noise_generators[cid].set_state(rng["noise"] if rng else initial[1][cid])
        sim.dropout_generators[cid].set_state(rng["dropout"] if rng and "dropout" in rng else initial[2][cid])
        sim.client_local = ({cid: record_to_state(context.state[KEYS.LOCAL])}
                            if KEYS.LOCAL in context.state else {})
        if KEYS.LEDGER in context.state:
            sim.ledger = PrivacyLedger.from_dict(json.loads(str(context.state[KEYS.LEDGER]["json"])))
        else:
            sim.ledger = PrivacyLedger(delta=sim.cfg.delta, accountant=sim.cfg.accountant)
            sim.ledger.set_client(cid, sample_rate=sim.sample_rates[cid],
                                  noise_multiplier=sim.noise_multiplier)

    def _save(self, sim, cid: int, context) -> None:
        from flwr.app import ConfigRecord

        context.state[KEYS.RNG] = state_to_record({"sampling": sim.sampling_generators[cid].get_state(),
                                                   "noise": sim.noise_generators[cid].get_state(),
                                                   "dropout": sim.dropout_generators[cid].get_state()})
        if cid in sim.client_local:
            context.state[KEYS.LOCAL] = state_to_record(sim.client_local[cid])
        context.state[KEYS.LEDGER] = ConfigRecord({"json": json.dumps(sim.ledger.to_dict())})

    def _setup(self, context):
        if KEYS.SETUP not in context.state:
            raise RuntimeError("this node got a train/evaluate message before the setup query")
        return self.simulator(str(context.state[KEYS.SETUP]["config"]))

    # ------------------------------------------------------------------ message handlers
    def query(self, msg, context):
        from flwr.app import ConfigRecord, Message, RecordDict

        setup = msg.content[KEYS.CONFIG]
        sim, _ = self.simulator(str(setup["config"]))
        sigma = float(setup["noise_multiplier"])
        if not math.isclose(sim.noise_multiplier, sigma, rel_tol=1e-9, abs_tol=0.0):
            raise RuntimeError(f"noise_multiplier calibrated here ({sim.noise_multiplier!r}) differs "
                               f"from the server's ({sigma!r}): different lalora/opacus versions?")
        cid = partition_id(context)
        n = context.node_config.get("num-partitions")
        if n is not None and int(n) != sim.cfg.clients:
            raise ValueError(f"num-partitions={n} but the config has clients={sim.cfg.clients}")
        context.state[KEYS.SETUP] = ConfigRecord({"config": str(setup["config"])})
        return Message(RecordDict({KEYS.CONFIG: ConfigRecord({"partition-id": cid})}), reply_to=msg)

    def train(self, msg, context):
        from flwr.app import Message, MetricRecord, RecordDict

        sim, initial = self._setup(context)
        cid = partition_id(context)
        t = int(msg.content[KEYS.CONFIG]["round"])
        self._restore(sim, initial, cid, context)
        global_state = sim.initial_global_state()      # frozen/local groups: shared seeded init
        global_state.update(record_to_state(msg.content[KEYS.ARRAYS]))
        with torch.random.fork_rng():
            torch.manual_seed(_round_seed(sim.cfg.seed, cid, t))
            update = sim.client_update(cid, t, global_state)
        self._save(sim, cid, context)
        metrics = MetricRecord({
            "num_samples": int(update.num_samples), "num_steps": int(update.num_steps),
            "train_loss": float(update.metrics["train_loss"]),
            "mean_batch_size": float(np.mean(update.metrics["batch_sizes"])),
            "ledger_steps": int(sim.ledger.steps(cid)),
            "epsilon": float(sim.client_epsilon(cid)),
        })
        return Message(RecordDict({KEYS.ARRAYS: state_to_record(update.state), KEYS.METRICS: metrics}),
                       reply_to=msg)

    def evaluate(self, msg, context):
        from flwr.app import Message, MetricRecord, RecordDict

        sim, initial = self._setup(context)
        cid = partition_id(context)
        self._restore(sim, initial, cid, context)
        global_state = sim.initial_global_state()
        global_state.update(record_to_state(msg.content[KEYS.ARRAYS]))
        # the simulator's per-client evaluation (global A + this client's local B and head)
        sim._load_client(cid, global_state)
        acc, loss = sim._accuracy()
        return Message(RecordDict({KEYS.METRICS: MetricRecord({"accuracy": float(acc),
                                                               "loss": float(loss)})}),
                       reply_to=msg)


def make_client_app(task=None, partitions=None):
    """A ``flwr.clientapp.ClientApp`` serving lalora's query/train/evaluate messages."""
    from flwr.clientapp import ClientApp

    client = LaLoraClient(task=task, partitions=partitions)
    client_app = ClientApp()
    client_app.query()(client.query)
    client_app.train()(client.train)
    client_app.evaluate()(client.evaluate)
    return client_app


app = make_client_app()
