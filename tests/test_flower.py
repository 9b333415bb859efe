"""lalora on Flower: the Flower path (ClientApp + LaLoraStrategy) computes exactly what the
in-process simulator computes, sends only what each method aggregates, selects exactly the seeded
schedule, and keeps client state (RNG, ledger, FedSA-LoRA's B and head) in Flower's per-node
``Context.state`` -- so it survives Flower recreating ClientApps.

Fast tests use the tiny MLP task of test_federated.py over ``InProcessGrid`` (same ClientApp and
Strategy code, no Ray). The slow ones run Flower's Ray simulation engine on a shrunken digits-swin.
Tolerance: 1e-6 absolute on every LoRA/head tensor (the in-process runs are bit-identical today;
1e-6 leaves room for float64 summation-order changes in the aggregator).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lalora.methods import METHODS  # noqa: E402
from lalora.federated.simulation import Simulator  # noqa: E402
from lalora.flower.client_app import LaLoraClient, make_client_app  # noqa: E402
from lalora.flower.encoding import KEYS, downlink_groups, payload_bytes  # noqa: E402
from lalora.flower.inprocess import InProcessGrid, task_identity  # noqa: E402
from lalora.flower.node import NodeStore, run_key  # noqa: E402
from lalora.flower.run import run_flower  # noqa: E402
from lalora.flower.server_app import make_server_app  # noqa: E402

from test_federated import tiny_config, tiny_task  # noqa: E402

ATOL = 1e-6


def reference_run(cfg, task):
    """The in-process engine, round by round (Simulator API)."""
    sim = Simulator(cfg, task=task)
    state = sim.initial_global_state()
    for t in range(1, sim.cfg.rounds + 1):
        updates = [sim.client_update(c, t, state) for c in sim.sampled_clients(t)]
        state = sim.server_aggregate(updates, t, state)
    return sim, state, sim.evaluate(state)


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=ATOL), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("method", ["la-lora", "rolora", "ffa-lora", "dp-lora", "fedsa-lora"])
def test_flower_path_equals_inprocess_engine(method):
    # dropout 0: the two engines draw LoRA dropout from different RNG streams (see client_app.py)
    cfg = tiny_config(method, rounds=3)
    sim, state, ev = reference_run(cfg, tiny_task(dropout=0.0))
    res = run_flower(cfg, runs_dir=None, backend="inprocess", task=tiny_task(dropout=0.0),
                     progress=False)
    assert_same_state(res.global_state, state)
    assert res.final["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)
    # the server's ledger (fed by the replies) equals the in-process ledger, client by client
    assert res.final["per_client_steps"] == sim.privacy_summary()["per_client_steps"]
    assert res.final["per_client_epsilon"] == pytest.approx(sim.privacy_summary()["per_client_epsilon"])
    assert [r["clients"] for r in res.metrics] == [sim.sampled_clients(t) for t in (1, 2, 3)]
    if method == "fedsa-lora":   # per-client models: global A + each client's own B and head
        assert res.final["per_client_accuracy"] == pytest.approx(ev["per_client_accuracy"])


class RecordingGrid(InProcessGrid):
    """InProcessGrid that logs every message, and (``fresh_clients``) serves each one with a brand
    new ClientApp, as Flower may: all client memory must then come from Context.state."""

    def __init__(self, task, num_nodes, fresh_clients=False):
        super().__init__(make_client_app(task=task, deployment=False), num_nodes)
        self.task, self.fresh, self.log = task, fresh_clients, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            app = make_client_app(task=self.task, deployment=False) if self.fresh else self.client_app
            reply = app(m, self.contexts[m.metadata.dst_node_id])
            self.log.append((m.metadata.message_type, m.metadata.group_id, m.metadata.dst_node_id,
                             m.content, reply.content))
            replies.append(reply)
        return replies


def run_on(grid, cfg, task):
    holder: dict = {}
    app = make_server_app(cfg, holder=holder, task=task)
    from flwr.app import Context, RecordDict

    with task_identity():
        app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return holder["strategy"]


@pytest.mark.parametrize("method", ["rolora", "fedsa-lora"])
def test_client_state_survives_recreated_client_apps(method):
    """Every message served by a new ClientApp object (empty caches): same result, because the
    generators, the ledger and FedSA's local B/head live in the node's Context.state."""
    cfg = tiny_config(method, rounds=3)
    _, state, _ = reference_run(cfg, tiny_task(dropout=0.0))
    task = tiny_task(dropout=0.0)
    grid = RecordingGrid(task, 4, fresh_clients=True)
    strategy = run_on(grid, cfg, task)
    assert_same_state(strategy.global_state, state)
    states = {ctx.node_config["partition-id"]: NodeStore(ctx, None).load() for ctx in grid.contexts.values()}
    key = run_key(strategy.sim.cfg)
    trained = {c for c, st in states.items() if st.served(key)}
    assert trained == {c for t in (1, 2, 3) for c in strategy.sim.sampled_clients(t)}
    for c, st in states.items():
        assert st.served(key) == [t for t in (1, 2, 3) if c in strategy.sim.sampled_clients(t)]
        assert bool(st.runs.get(key, {}).get("local")) == (method == "fedsa-lora" and c in trained)


@pytest.mark.parametrize("method", sorted(m for m in METHODS))
def test_messages_carry_only_what_the_method_aggregates(method):
    cfg = tiny_config(method, rounds=2)
    task = tiny_task(dropout=0.0)
    grid = RecordingGrid(task, 4)
    strategy = run_on(grid, cfg, task)
    sim = strategy.sim
    names = {g: set(sim.groups.params[g]) for g in ("A", "B", "head")}
    trains = [e for e in grid.log if e[0] == "train"]
    for t in (1, 2):
        sent = [e for e in trains if e[1] == str(t)]
        # exactly the seeded schedule, nobody else
        cid_of = {n: c["partition-id"] for n, c in
                  ((n, ctx.node_config) for n, ctx in grid.contexts.items())}
        assert sorted(cid_of[e[2]] for e in sent) == sim.sampled_clients(t)
        up_groups = set(METHODS[method].aggregated(t, sim.cfg.local_steps))
        down_groups = set(downlink_groups(METHODS[method], sim.train_head))
        for _, _, _, down, up in sent:
            assert set(up[KEYS.ARRAYS]) == set().union(*(names[g] for g in up_groups))
            assert set(down[KEYS.ARRAYS]) == set().union(*(names[g] for g in down_groups))
    # the communication claim, in bytes: FFA-LoRA and RoLoRA send B (or A) + head, not A + B + head
    r1 = strategy.records[0]["uplink_payload_bytes"] / sim.cfg.clients_per_round
    size = {g: payload_bytes({n: sim.groups.params[g][n] for n in names[g]}) for g in names}
    expected = {"ffa-lora": size["B"] + size["head"], "rolora": size["B"] + size["head"],
                "fedsa-lora": size["A"], "la-lora": size["A"] + size["B"] + size["head"],
                "dp-lora": size["A"] + size["B"] + size["head"],
                "fedavg-lora": size["A"] + size["B"] + size["head"]}[method]
    assert r1 == expected
    if method == "fedsa-lora":   # B and head never leave the client, in either direction
        for _, _, _, down, up in trains:
            assert not (set(up[KEYS.ARRAYS]) | set(down[KEYS.ARRAYS])) & (names["B"] | names["head"])


def _setup_message(cfg, sigma):
    import json

    from flwr.app import ConfigRecord, Message, RecordDict

    from lalora.federated.simulation import resolve_config

    rc = resolve_config(cfg, tiny_task())
    return Message(RecordDict({KEYS.CONFIG: ConfigRecord({"config": json.dumps(rc.to_dict()),
                                                          "noise_multiplier": sigma})}),
                   dst_node_id=5, message_type="query", group_id="setup")


def test_bad_node_config_and_sigma_mismatch_are_clear_errors():
    from flwr.app import Context, RecordDict

    client = LaLoraClient(task=tiny_task(), deployment=False)
    cfg = tiny_config("la-lora")
    sigma = Simulator(cfg, task=tiny_task()).noise_multiplier

    def ctx(node_config):
        return Context(run_id=0, node_id=5, node_config=node_config, state=RecordDict(), run_config={})

    with task_identity():
        with pytest.raises(ValueError, match="partition-id"):
            client.query(_setup_message(cfg, sigma), ctx({}))
        with pytest.raises(ValueError, match="num-partitions"):
            client.query(_setup_message(cfg, sigma), ctx({"partition-id": 0, "num-partitions": 9}))
        with pytest.raises(RuntimeError, match="noise_multiplier"):
            client.query(_setup_message(cfg, sigma * 1.01), ctx({"partition-id": 0}))
        reply = client.query(_setup_message(cfg, sigma), ctx({"partition-id": 2, "num-partitions": 4}))
        assert reply.content[KEYS.CONFIG]["partition-id"] == 2


def test_run_flower_writes_its_run_folder(tmp_path):
    from lalora.results import read_json, read_jsonl

    cfg = tiny_config("ffa-lora", rounds=2)
    res = run_flower(cfg, runs_dir=tmp_path, backend="inprocess", task=tiny_task(dropout=0.0),
                     progress=False)
    assert res.run_dir.endswith("-flower")
    final = read_json(f"{res.run_dir}/final.json")
    assert final["engine"] == "flower" and final["rounds"] == 2
    rows = read_jsonl(f"{res.run_dir}/metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["uplink_payload_bytes"] > 0 for r in rows)
    with pytest.raises(ValueError, match="backend"):
        run_flower(cfg, runs_dir=None, backend="grpc", task=tiny_task())


# ----------------------------------------------------------------------------- Flower's Ray engine
def _digits_config(method):
    from lalora.config import RunConfig

    # shrunk: 160 private images, 4 clients (2 per round), 2 rounds of 2 steps; dropout 0 (see above)
    return RunConfig(task="digits-swin", method=method, epsilon=3.0, seed=0, rounds=2, local_steps=2,
                     batch_size=8, clients=4, clients_per_round=2, partition="iid",
                     eval_batch_size=128, task_overrides={"dropout": 0.0, "max_train_samples": 160})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["la-lora", "rolora"])
def test_ray_simulation_equals_inprocess_engine(method):
    cfg = _digits_config(method)
    sim, state, ev = reference_run(cfg, None)
    res = run_flower(cfg, runs_dir=None, backend="ray", progress=False)
    assert_same_state(res.global_state, state)
    assert res.final["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)
    assert res.final["per_client_steps"] == sim.privacy_summary()["per_client_steps"]
    assert np.isfinite(res.final["epsilon_spent"]) and res.final["epsilon_spent"] <= cfg.epsilon + 1e-6


def test_deployment_run_config_maps_to_runconfig():
    from lalora.flower.server_app import config_from_run_config

    cfg, runs_dir = config_from_run_config({"task": "digits-swin", "method": "rolora", "epsilon": 3.0,
                                            "clients-per-round": 2, "task-options": '{"dropout": 0.0}',
                                            "runs-dir": "runs"})
    assert (cfg.method, cfg.clients_per_round, cfg.task_overrides, runs_dir) == \
        ("rolora", 2, {"dropout": 0.0}, "runs")
    with pytest.raises(ValueError, match="bogus"):
        config_from_run_config({"task": "t", "method": "la-lora", "bogus": 1})
    with pytest.raises(ValueError, match="method"):
        config_from_run_config({"task": "t"})


def test_flower_path_equals_inprocess_engine_with_lora_dropout():
    """LoRA dropout on and q < 1: each client's dropout generator travels in Context.state like its
    sampling and noise generators, so Flower still computes exactly what the in-process engine does."""
    cfg = tiny_config("la-lora", rounds=3, batch_size=8)
    _, state, ev = reference_run(cfg, tiny_task(num_train=320))
    res = run_flower(cfg, runs_dir=None, backend="inprocess", task=tiny_task(num_train=320), progress=False)
    assert_same_state(res.global_state, state)
    assert res.final["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-12)


class LeavingGrid(RecordingGrid):
    """A grid whose SuperNode serving partition ``leaver`` leaves at its first message of type
    ``at`` (Flower answers "Node Unavailable" for it) and comes back under a new node id with its
    persisted state (the same Context.state), as a restarted deployed node does."""
    def __init__(self, task, num_nodes, leaver, at):
        super().__init__(task, num_nodes)
        self.leaver, self.at, self.left = leaver, at, False
        self._ready, self._count = [], 0

    # the asynchronous Grid API of a deployment (push, then pull the replies): with it the strategy
    # treats the grid as one whose nodes can leave and rejoin (LaLoraStrategy._refresh_nodes)
    def push_messages(self, messages):
        for m in messages:
            self._count += 1
            m.metadata._message_id = f"m{self._count}"   # the SuperLink assigns ids; Metadata has no setter
        self._ready += self.send_and_receive(messages)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        got = [r for r in self._ready if r.metadata.reply_to_message_id in set(ids)]
        self._ready = [r for r in self._ready if r not in got]
        return got

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context, Error, Message

        keep, gone = [], []
        for m in messages:
            ctx = self.contexts[m.metadata.dst_node_id]
            if (not self.left and m.metadata.message_type == self.at
                    and ctx.node_config["partition-id"] == self.leaver):
                self.left = True
                del self.contexts[m.metadata.dst_node_id]
                new_id = max(self.contexts) + 1
                self.contexts[new_id] = Context(run_id=0, node_id=new_id, node_config=ctx.node_config,
                                                state=ctx.state, run_config={})
                gone.append(Message(error=Error(code=0, reason="Node Unavailable"), reply_to=m))
            else:
                keep.append(m)
        return super().send_and_receive(keep, timeout=timeout) + gone


@pytest.mark.parametrize("at", ["evaluate", "train"])
def test_a_node_that_leaves_and_rejoins_is_asked_again(at):
    # FedSA-LoRA's evaluation is federated (each node scores its own B and head): a node that left
    # mid-evaluation used to abort the run; now, as in training, its rejoined node is asked again
    cfg = tiny_config("fedsa-lora", rounds=2)
    _, state, ev = reference_run(cfg, tiny_task(dropout=0.0))
    task = tiny_task(dropout=0.0)
    leaver = 0 if at == "evaluate" else Simulator(cfg, task=tiny_task(dropout=0.0)).sampled_clients(1)[0]
    grid = LeavingGrid(task, 4, leaver=leaver, at=at)
    strategy = run_on(grid, cfg, task)
    assert grid.left                                    # it did leave, and the run still finished
    assert_same_state(strategy.global_state, state)
    assert strategy.records[-1]["test_per_client_accuracy"] == pytest.approx(ev["per_client_accuracy"])
    assert strategy.records[-1]["test_accuracy"] == pytest.approx(ev["accuracy"])
    assert sum(1 for e in grid.log if e[0] == at and e[2] in strategy.node_of.values()
               and grid.contexts[e[2]].node_config["partition-id"] == leaver) >= 1
