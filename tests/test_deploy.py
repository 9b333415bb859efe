"""Deployed Flower nodes under attack (issue 16): each test replays one attack of the issue against
the ClientApp in deployment mode (the ``lalora.flower.client_app:app`` a SuperNode runs), over the
tiny MLP task of test_federated.py.

- predictable noise: with seeded streams the attacker reproduces a node's release exactly; a
  deployed node's release differs from that reproduction by as much as its noise (nothing recovered);
  two simulated runs that differ only in ε draw different noise (and the same batches);
- replays, unscheduled and out-of-order rounds are refused; so is a config outside the operator's
  terms and a round over the node's ε budget (composed over runs);
- a restarted node (new process, new Context) continues its ledger from its state folder and
  refuses what it already served; a corrupted state file is refused, not reset;
- replies carry no metric computed on private data; the run records where noise came from.
"""
from __future__ import annotations

import json

import pytest
import torch

from lalora.federated.simulation import Simulator
from lalora.flower.client_app import LaLoraClient, make_client_app
from lalora.flower.encoding import KEYS, state_to_record
from lalora.flower.inprocess import InProcessGrid, task_identity
from lalora.flower.node import RequestRefused
from lalora.results import CheckpointCorruptedError

from test_federated import tiny_config, tiny_task

PUBLIC_METRICS = {"num_steps", "ledger_steps"}   # schedule-derived only (issue 27: no |D_i|, no ε of q)


def _context(node_config):
    from flwr.app import Context, RecordDict

    return Context(run_id=0, node_id=5, node_config=dict(node_config), state=RecordDict(), run_config={})


def _node_config(cid, state_dir, **terms):
    return {"partition-id": cid, "num-partitions": 4, "state-dir": str(state_dir), "epsilon": 3.0,
            "delta": 1e-5, "client-app": "custom-task", **terms}


class Node:
    """One deployed client: a LaLoraClient (a process) and its Context, set up for ``sim.cfg``."""

    def __init__(self, sim, cid, state_dir, *, task=None, **terms):
        self.sim, self.cid = sim, cid
        self.client = LaLoraClient(task=task or tiny_task(dropout=0.0), deployment=True)
        self.context = _context(_node_config(cid, state_dir, **terms))
        self.query()

    def query(self):
        from flwr.app import ConfigRecord, Message, RecordDict

        with task_identity():
            msg = Message(RecordDict({KEYS.CONFIG: ConfigRecord({
                "config": json.dumps(self.sim.cfg.to_dict()),
                "noise_multiplier": float(self.sim.noise_multiplier)})}),
                dst_node_id=5, message_type="query", group_id="setup")
            return self.client.query(msg, self.context)

    def train(self, t):
        """The node's reply to round ``t`` from the initial global state."""
        from flwr.app import ConfigRecord, Message, RecordDict

        down = {k: v for k, v in self.sim.initial_global_state().items()}
        with task_identity():
            msg = Message(RecordDict({KEYS.ARRAYS: state_to_record(down),
                                      KEYS.CONFIG: ConfigRecord({"round": int(t)})}),
                          dst_node_id=5, message_type="train", group_id=str(t))
            return self.client.train(msg, self.context)


def _release(reply) -> torch.Tensor:
    arrays = reply.content[KEYS.ARRAYS]
    return torch.cat([torch.from_numpy(arrays[k].numpy().copy()).reshape(-1) for k in sorted(arrays)])


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


def _sim(**kw):
    return Simulator(tiny_config("dp-lora", rounds=3, **kw), task=tiny_task(dropout=0.0))


def _first_round(sim, cid):
    return next(t for t in range(1, sim.cfg.rounds + 1) if cid in sim.sampled_clients(t))


# ----------------------------------------------------------------------------- attack 1: predictable noise
def test_deployed_noise_cannot_be_removed_with_the_seed(tmp_path):
    """The attacker knows the config (seed included: the server sends it) and replays the client's
    seeded streams. Against a seeded node that reproduces the release exactly (the attack works);
    against a deployed node the reproduction misses by the size of the noise itself."""
    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    attacker = _sim()
    guess = _flat(attacker.client_update(cid, 1, attacker.initial_global_state()).state)
    noiseless = _sim()
    noiseless.local.noise_multiplier = 0.0     # same (full) batches, no noise
    clean = _flat(noiseless.client_update(cid, 1, noiseless.initial_global_state()).state)
    noise_size = float((guess - clean).norm())
    assert noise_size > 0.1

    seeded = Node(sim, cid, tmp_path / "seeded", noise="seeded")
    assert float((_release(seeded.train(1)) - guess).norm()) < 1e-5        # de-noised exactly
    deployed = Node(sim, cid, tmp_path / "deployed")
    reply = deployed.train(1)
    assert reply.content[KEYS.CONFIG]["noise_source"] == "os-entropy"
    miss = float((_release(reply) - guess).norm())
    assert miss > 0.5 * noise_size                     # the seeded guess of the noise is worthless
    other = Node(sim, cid, tmp_path / "deployed-2")     # same config, same data, fresh entropy
    assert float((_release(other.train(1)) - _release(reply)).norm()) > 0.5 * noise_size


def test_runs_differing_only_in_epsilon_draw_different_noise_same_batches():
    """Simulation: the noise seed covers the resolved config, so ε=3 and ε=4 runs cannot be
    subtracted to the clipped sum; Poisson sampling stays paired by (seed, client)."""
    a, b = _sim(epsilon=3.0), _sim(epsilon=4.0)
    for c in range(a.cfg.clients):
        assert torch.equal(a.sampling_generators[c].get_state(), b.sampling_generators[c].get_state())
        za = torch.randn(1000, generator=a.noise_generators[c])
        zb = torch.randn(1000, generator=b.noise_generators[c])
        assert abs(float(torch.corrcoef(torch.stack([za, zb]))[0, 1])) < 0.15
    same = _sim(epsilon=3.0)        # ... and a rerun of the same config is reproducible
    assert torch.equal(same.noise_generators[0].get_state(), _sim(epsilon=3.0).noise_generators[0].get_state())


# ----------------------------------------------------------------------------- attack 2: replays
def test_replays_unscheduled_and_out_of_order_rounds_are_refused(tmp_path):
    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    node = Node(sim, cid, tmp_path)
    node.train(1)
    for _ in range(3):
        with pytest.raises(RequestRefused, match="already served"):
            node.train(1)
    with pytest.raises(RequestRefused, match="outside the agreed schedule"):
        node.train(99)
    idle = [t for t in (2, 3) if cid not in sim.sampled_clients(t)]
    for t in idle:
        with pytest.raises(RequestRefused, match="not scheduled"):
            node.train(t)
    later = [t for t in (2, 3) if cid in sim.sampled_clients(t)]
    if len(later) == 2:
        node.train(3)
        with pytest.raises(RequestRefused, match="out of order"):
            node.train(2)
    # the node's ledger counts exactly the released rounds
    from lalora.flower.node import NodeStore, run_key

    state = NodeStore(None, str(tmp_path)).load()
    served = state.served(run_key(sim.cfg))
    assert state.steps(run_key(sim.cfg)) == sim.cfg.local_steps * len(served)


def test_restarted_node_continues_its_ledger(tmp_path):
    """A new process and a new Context (Flower's in-memory state is gone): the node reloads its
    state folder, refuses the round it served before the restart and counts on from there."""
    sim = _sim()
    cid = next(c for c in range(4) if sum(c in s for s in sim.schedule) >= 2)
    t1, t2 = [t for t in (1, 2, 3) if cid in sim.sampled_clients(t)][:2]
    first = Node(sim, cid, tmp_path).train(t1)
    k = sim.cfg.local_steps
    assert int(first.content[KEYS.METRICS]["ledger_steps"]) == k
    restarted = Node(sim, cid, tmp_path)
    with pytest.raises(RequestRefused, match="already served"):
        restarted.train(t1)
    reply = restarted.train(t2)
    assert int(reply.content[KEYS.METRICS]["ledger_steps"]) == 2 * k
    # a damaged state file is refused loudly, never silently reset to an empty ledger
    path = tmp_path / "node-state.pt"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptedError):
        Node(sim, cid, tmp_path).train(3)


def test_operator_terms_and_budget(tmp_path):
    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    for terms, match in (({"epsilon": 2.0}, "epsilon"), ({"delta": 1e-6}, "delta"),
                         ({"clip-norm": 0.5}, "clip_norm"),
                         ({"min-noise-multiplier": sim.noise_multiplier * 2}, "floor")):
        with pytest.raises(RequestRefused, match=match):
            Node(sim, cid, tmp_path / match, **terms)
    with pytest.raises(ValueError, match="state-dir"):
        LaLoraClient(task=tiny_task(), deployment=True)._guard(_context({"partition-id": 0}))
    # budget over runs: every client in every round, so each spends (almost) all of ε = 3 in run 1;
    # a second run (another seed) on the same data would exceed the node's budget of 3
    full = dict(clients_per_round=4)
    run1 = _sim(**full)
    node = Node(run1, 0, tmp_path / "budget")
    for t in (1, 2, 3):
        node.train(t)
    from lalora.flower.node import NodeStore, run_key

    spent = NodeStore(None, str(tmp_path / "budget")).load().ledger.epsilon(run_key(run1.cfg))
    assert 2.9 < spent <= 3.0
    run2 = _sim(seed=1, **full)
    with pytest.raises(RequestRefused, match="budget"):
        Node(run2, 0, tmp_path / "budget").train(1)


# ----------------------------------------------------------------------------- attack 3: private metrics
def test_deployed_replies_carry_no_private_metric(tmp_path):
    """A whole run with deployed ClientApps: every reply's metrics are public counts; the server's
    records have no train_loss/mean_batch_size; final.json records the noise source."""
    from flwr.app import Context, RecordDict

    from lalora.flower.server_app import make_server_app

    cfg = tiny_config("la-lora", rounds=2)
    task = tiny_task(dropout=0.0)
    replies = []
    app = make_client_app(task=task, deployment=True)

    def recording(msg, ctx):
        reply = app(msg, ctx)
        replies.append(reply)
        return reply

    grid = InProcessGrid(recording, 4)
    for ctx in grid.contexts.values():
        cid = ctx.node_config["partition-id"]
        ctx.node_config = _node_config(cid, tmp_path / f"node{cid}")
    holder: dict = {}
    with task_identity():
        make_server_app(cfg, holder=holder, task=task)(grid, Context(run_id=0, node_id=0, node_config={},
                                                                     state=RecordDict(), run_config={}))
    strategy = holder["strategy"]
    trains = [r for r in replies if KEYS.ARRAYS in r.content]
    assert len(trains) == 2 * strategy.sim.cfg.clients_per_round
    for r in trains:
        assert set(r.content[KEYS.METRICS]) == PUBLIC_METRICS
    for rec in strategy.records:
        assert "train_loss" not in rec and "mean_batch_size" not in rec and "private_metrics" not in rec
    from lalora.flower.rundir import final_summary

    assert final_summary(strategy, 0.0)["noise_sources"] == ["os-entropy"]


def test_simulation_marks_its_private_metrics():
    from lalora.flower.run import run_flower

    res = run_flower(tiny_config("la-lora", rounds=1), runs_dir=None, backend="inprocess",
                     task=tiny_task(dropout=0.0), progress=False)
    assert res.metrics[0]["private_metrics"] == ["train_loss", "mean_batch_size"]
    assert res.final["noise_sources"] == ["seeded"]


def test_server_logs_a_refusal(monkeypatch):
    from types import SimpleNamespace

    import flwr.common.logger as flog

    from lalora.flower import server_app

    logged = []
    monkeypatch.setattr(flog, "log", lambda level, fmt, *args: logged.append(fmt % args))
    bad = SimpleNamespace(has_error=lambda: True,
                          error=SimpleNamespace(reason="RequestRefused: round 1 was already served"))
    with pytest.raises(RuntimeError, match="already served"):
        server_app._check_replies([bad], 1, "round 1")
    assert any("already served" in line for line in logged)
