"""The Flower ClientApp: one SuperNode = one lalora client, running *our* client update.

Every train message is served by ``Simulator.client_update`` -- the same local loop, DP step,
filter and privacy ledger as the in-process engine -- so a Flower run is a change of transport,
not of algorithm. Flower creates ClientApps afresh for every message (and may serve one node from
different worker processes), so nothing a client must remember lives in Python objects:

- the node state (``lalora.flower.node``: the node's privacy ledger over all its runs, seeded
  generator states in seeded mode, FedSA-LoRA's local B and head) is a sealed file in the
  node's ``state-dir`` (deployment; lalora.flower.ledger) or Flower's per-node ``Context.state``
  (simulation); every request passes the pre-data checks of lalora.flower.terms (the app, the
  fields, the operator's terms) before the task is built, and every train request
  ``NodeGuard.admit`` (schedule, replay, budget) under the state folder's exclusive lock;
- the heavy part (task data, frozen base model) is a per-process cache keyed by the run config;
  it holds no per-client state. The setup query checks the server's σ against this node's own run
  plan (``plan_run``: the task's labels, the partition, schedule and σ) before any model is built.

Two modes (``make_client_app(deployment=...)``):

- deployment (``app``, what SuperNodes run): noise, Poisson batches and LoRA dropout from OS
  entropy, re-seeded every round; replies carry only schedule-derived counts (no metric computed
  on private data, no |D_i|, no ε); a DP step that fails is counted and answered with a fixed
  refusal (``failed_step``);
- simulation (``run_flower``): seeded streams, so a Flower run equals the in-process engine; the
  private diagnostics (train_loss, mean_batch_size) go back to the local server, which marks them.

Message protocol (``lalora.flower.encoding.KEYS``):

- ``query`` (setup, once): ConfigRecord ``{"config": RunConfig JSON, "noise_multiplier": σ}``;
  the node stores the config, checks that its own σ calibration matches the server's and that the
  config meets its operator's terms, and replies with its ``partition-id`` (the client id).
- ``train``: ArrayRecord of the downlink state + ``{"round": t}``; replies with the ArrayRecord of
  exactly the groups the server averages this round, a MetricRecord (``num_steps``,
  ``ledger_steps``; private diagnostics in simulation only) and ``{"noise_source": ...}``.
- ``evaluate`` (FedSA-LoRA only: its model is global A + the client's local B and head): the
  client's test accuracy and loss.

LoRA dropout draws from the client's own dropout generator (as in the in-process engine), whose
state the node persists with the sampling and noise generators (seeded mode; OS entropy in
deployment), so a Flower run does not
depend on which worker serves which client. Any other use of torch's global RNG is seeded per
(seed, client, round) inside a ``fork_rng``.

For a deployment the app object is ``lalora.flower.client_app:app``; the node config is
``"partition-id=3 num-partitions=8 state-dir=/var/lib/lalora epsilon=3 delta=1e-5
client-app='lalora.flower.client_app:app'"`` (docs/FLOWER.md).
"""
from __future__ import annotations

import json
import math
import secrets

import numpy as np
import torch

from lalora.config import RunConfig
from lalora.federated.simulation import Simulator, plan_run
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

    ``task``/``partitions`` override the task registry (tests with an unregistered task); such a
    client's origin is ``"custom-task"``, and a deployed node serves it only if its node config
    says ``client-app="custom-task"`` (lalora.flower.terms.check_app)."""

    def __init__(self, task=None, partitions=None, *, deployment: bool = True):
        from lalora.flower.terms import APP_NAME

        self.task = task
        self.partitions = partitions
        self.deployment = deployment
        self.origin = APP_NAME if task is None and partitions is None else "custom-task"
        self._cache: dict[str, tuple] = {}   # config JSON -> (Simulator, initial generator states)
        self._plans: dict[str, tuple] = {}   # config JSON -> plan_run's (cfg, task, partitions, RunPlan)

    # ------------------------------------------------------------------ the run plan (no model)
    def plan(self, config_json: str) -> tuple:
        """(resolved cfg, task, partitions, RunPlan) of a run: schedule and σ from the task's labels
        alone, no model (lalora.privacy.plan). Call only for a config the terms accepted."""
        hit = self._plans.get(config_json)
        if hit is None:
            self._plans.clear()   # one run per process at a time
            hit = self._plans[config_json] = plan_run(RunConfig.from_dict(json.loads(config_json)),
                                                      task=self.task, partitions=self.partitions)
        return hit

    # ------------------------------------------------------------------ per-process simulator cache
    def simulator(self, config_json: str):
        hit = self._cache.get(config_json)
        if hit is None:
            cfg, task, partitions, _ = self.plan(config_json)   # the task and split the plan used
            sim = Simulator(cfg, task=task, partitions=partitions)
            initial = ([g.get_state() for g in sim.sampling_generators],
                       [g.get_state() for g in sim.noise_generators],
                       [g.get_state() for g in sim.dropout_generators])
            self._cache.clear()   # one run per process at a time: free the previous model
            hit = self._cache[config_json] = (sim, initial)
        return hit

    def _accepted(self, config_json: str, context, noise_multiplier=None):
        """The simulator of an accepted config: the app and the terms are checked first (no private
        example read before, lalora.flower.terms); then the task is built (which reads the data and
        runs the kernels' clipping-unit probe) and, on a deployed node, the permutation probe runs
        on the node's own examples (lalora.flower.probe)."""
        from lalora.flower.terms import accept_config, check_app

        check_app(context.node_config, deployment=self.deployment, origin=self.origin)
        policy = self._guard(context).policy
        accept_config(config_json, policy, deployment=self.deployment, noise_multiplier=noise_multiplier)
        fresh = config_json not in self._cache
        sim, initial = self.simulator(config_json)
        if fresh and self.deployment and sim.private:
            from lalora.flower.probe import probe_node_model

            try:
                probe_node_model(sim, partition_id(context))
            except Exception:
                self._cache.clear()      # never serve a model that failed the probe
                raise
        return sim, initial

    def _guard(self, context):
        from lalora.flower.node import NodeGuard, NodePolicy, NodeStore

        policy = NodePolicy.from_node_config(context.node_config, deployment=self.deployment)
        return NodeGuard(policy, NodeStore(context, policy.state_dir))

    def _setup(self, context):
        if KEYS.SETUP not in context.state:
            raise RuntimeError("this node got a train/evaluate message before the setup query")
        return self._accepted(str(context.state[KEYS.SETUP]["config"]), context)

    # ------------------------------------------------------------------ message handlers
    def query(self, msg, context):
        from flwr.app import ConfigRecord, Message, RecordDict

        from lalora.flower.terms import SETUP_KEYS, accept_config, check_app, known_keys

        check_app(context.node_config, deployment=self.deployment, origin=self.origin)
        known_keys(msg.content, frozenset({KEYS.CONFIG}), "setup query")
        setup = msg.content[KEYS.CONFIG]
        known_keys(setup, SETUP_KEYS, "setup query")
        sigma = float(setup["noise_multiplier"])
        cid = partition_id(context)
        # the terms first (no data read), then this node's own run plan (labels only, no model): the
        # server's σ is checked before a model is built or probed
        accept_config(str(setup["config"]), self._guard(context).policy, deployment=self.deployment,
                      noise_multiplier=sigma)
        _, _, _, plan = self.plan(str(setup["config"]))
        if not math.isclose(plan.noise_multiplier, sigma, rel_tol=1e-9, abs_tol=0.0):
            raise RuntimeError(f"noise_multiplier calibrated here ({plan.noise_multiplier!r}) differs "
                               f"from the server's ({sigma!r}): different lalora/opacus versions?")
        sim, _ = self._accepted(str(setup["config"]), context, noise_multiplier=sigma)
        n = context.node_config.get("num-partitions")
        if n is not None and int(n) != sim.cfg.clients:
            raise ValueError(f"num-partitions={n} but the config has clients={sim.cfg.clients}")
        self._guard(context).policy.check_config(sim.cfg, sim.noise_multiplier)   # refuse early
        context.state[KEYS.SETUP] = ConfigRecord({"config": str(setup["config"])})
        return Message(RecordDict({KEYS.CONFIG: ConfigRecord({"partition-id": cid})}), reply_to=msg)

    def train(self, msg, context):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from lalora.flower.terms import TRAIN_KEYS, known_keys

        sim, initial = self._setup(context)
        known_keys(msg.content, frozenset({KEYS.ARRAYS, KEYS.CONFIG}), "train message")
        known_keys(msg.content[KEYS.CONFIG], TRAIN_KEYS, "train message")
        known_keys(msg.content[KEYS.ARRAYS], frozenset(sim.initial_global_state()), "train message's state")
        cid = partition_id(context)
        t = int(msg.content[KEYS.CONFIG]["round"])
        guard = self._guard(context)
        # one writer per state folder: from reading the ledger to writing this round's entry
        with guard.store.locked():
            state = guard.admit(sim, cid, t)          # refuses replays, unscheduled rounds, over budget
            guard.restore(state, sim, cid, initial)
            global_state = sim.initial_global_state()      # frozen/local groups: shared seeded init
            global_state.update(record_to_state(msg.content[KEYS.ARRAYS]))
            try:
                with torch.random.fork_rng():
                    torch.manual_seed(_round_seed(sim.cfg.seed, cid, t) if guard.policy.noise == "seeded"
                                      else secrets.randbits(63))   # LoRA dropout is a private draw too
                    update = sim.client_update(cid, t, global_state)
            except Exception as err:
                if not self.deployment:
                    raise
                failed_step(guard, state, sim, cid, t, err)    # counted; a fixed refusal, no detail
            guard.record(state, sim, cid, t)          # persisted before anything leaves the node
        metrics = {   # public, schedule-derived: K and this run's step count (no |D_i|, no ε of q)
            "num_steps": int(update.num_steps), "ledger_steps": int(sim.ledger.steps(cid)),
        }
        if not self.deployment:   # computed on private batches, un-noised: simulation only
            metrics.update({"train_loss": float(update.metrics["train_loss"]),
                            "mean_batch_size": float(np.mean(update.metrics["batch_sizes"]))})
        return Message(RecordDict({KEYS.ARRAYS: state_to_record(update.state),
                                   KEYS.METRICS: MetricRecord(metrics),
                                   KEYS.CONFIG: ConfigRecord({"noise_source": guard.policy.noise})}),
                       reply_to=msg)

    def evaluate(self, msg, context):
        from flwr.app import Message, MetricRecord, RecordDict

        from lalora.flower.node import run_key

        sim, _ = self._setup(context)
        cid = partition_id(context)
        store = self._guard(context).store
        with store.locked():
            run = store.load().runs.get(run_key(sim.cfg), {})
        sim.client_local = {cid: dict(run["local"])} if run.get("local") else {}
        global_state = sim.initial_global_state()
        global_state.update(record_to_state(msg.content[KEYS.ARRAYS]))
        # the simulator's per-client evaluation (global A + this client's local B and head); its
        # model is a post-processing of DP releases, evaluated on the public test set
        sim._load_client(cid, global_state)
        acc, loss = sim._accuracy()
        return Message(RecordDict({KEYS.METRICS: MetricRecord({"accuracy": float(acc),
                                                               "loss": float(loss)})}),
                       reply_to=msg)


STEP_FAILED = ("the node could not complete this round; it is counted against the node's privacy "
               "budget as if released, and nothing is released")


def failed_step(guard, state, sim, cid: int, t: int, err: BaseException):
    """A deployed node's DP step failed on its private data (e.g. a crafted global state that makes
    one record's gradient overflow). Whether it fails can depend on one record, so the server must
    not learn more than that the round failed: the round is recorded as served (the budget is
    charged, so probing costs what a release costs) and the refusal text is fixed -- no exception
    type, parameter name or message. The detail goes to the node's own log only."""
    import logging

    from lalora.flower.errors import RequestRefused

    logging.getLogger("lalora.flower.node").error("round %d: the DP step failed on private data "
                                                  "(not sent to the server): %r", t, err)
    guard.record(state, sim, cid, t)
    raise RequestRefused(STEP_FAILED) from None


def make_client_app(task=None, partitions=None, *, deployment: bool = True):
    """A ``flwr.clientapp.ClientApp`` serving lalora's query/train/evaluate messages.

    ``deployment=True`` (the default, and ``app``): the node's terms and state folder come from its
    node config, noise from OS entropy, no private metric in replies (lalora.flower.node).
    ``deployment=False``: Flower's simulation (``run_flower``): seeded streams, state in
    ``Context.state``, private diagnostics returned to the (local) server, marked private."""
    from flwr.clientapp import ClientApp

    client = LaLoraClient(task=task, partitions=partitions, deployment=deployment)
    client_app = ClientApp()
    client_app.query()(client.query)
    client_app.train()(client.train)
    client_app.evaluate()(client.evaluate)
    return client_app


app = make_client_app()
