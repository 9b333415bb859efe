"""A hostile server against a deployed node (issue 27): each test replays one attack of the issue on
the tiny MLP task of test_federated.py, against the ClientApp in deployment mode, and checks that
the node refuses it (each fails on the code before the fix).

1. switching DP off or redefining the private data through the request (dp_mode, task_overrides,
   unknown fields) -- refused before any private example is read (the probe included);
2. two runs at once forking the ledger -- one writer per state folder (threads here; real
   processes in the slow test);
3. rolling the state file back or editing it -- MAC keyed by the node secret + sequence number;
4. a DP step that fails on one record as a membership oracle -- counted, fixed refusal text;
5. an app bundle running lalora's ClientApp in simulation mode (or with its own task);
6. a forward that sorts the batch passing the clipping-unit probe;
7. |D_i| and q-dependent ε in replies, and refusals naming the node's other spending.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from lalora.flower.client_app import STEP_FAILED, LaLoraClient
from lalora.flower.encoding import KEYS, state_to_record
from lalora.flower.inprocess import task_identity
from lalora.flower.ledger import SECRET_FILE, StateTamperedError
from lalora.flower.node import NodeStore, RequestRefused, run_key

from test_deploy import Node, _context, _first_round, _node_config, _sim
from test_federated import tiny_task

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parent


def _setup(client, context, config: dict, sigma: float, **extra):
    from flwr.app import ConfigRecord, Message, RecordDict

    with task_identity():
        msg = Message(RecordDict({KEYS.CONFIG: ConfigRecord({"config": json.dumps(config),
                                                             "noise_multiplier": float(sigma), **extra})}),
                      dst_node_id=5, message_type="query", group_id="setup")
        return client.query(msg, context)


def _train(client, context, sim, t, state=None, **extra):
    from flwr.app import ConfigRecord, Message, RecordDict

    down = sim.initial_global_state() if state is None else state
    with task_identity():
        msg = Message(RecordDict({KEYS.ARRAYS: state_to_record(down),
                                  KEYS.CONFIG: ConfigRecord({"round": int(t), **extra})}),
                      dst_node_id=5, message_type="train", group_id=str(t))
        return client.train(msg, context)


def _ledger(state_dir):
    return NodeStore(None, str(state_dir)).load().ledger


# ----------------------------------------------------------------------------- 1. terms first
@pytest.mark.parametrize("change,rule", [
    ({"dp_mode": "as-released"}, "dp_mode"),
    ({"task_overrides": {"public_fraction": 0.5}}, "task_overrides"),
    ({"task_overrides": {"split_seed": 3}}, "task_overrides"),
    ({"debug_release": True}, "debug_release"),           # a field the node does not know
    ({"method": "fedavg-lora"}, "not differentially private"),
    ({"epsilon": "inf"}, "epsilon"),
])
def test_request_outside_the_terms_is_refused_before_private_data_is_read(tmp_path, monkeypatch, change,
                                                                           rule):
    """The server's config may only narrow the operator's terms. Anything else is refused before
    the task is built -- building it reads the private examples and runs the clipping-unit probe on
    them -- so a Simulator that raises when built proves nothing private was touched."""
    from lalora.federated import simulation

    sim = _sim()
    config = {**sim.cfg.to_dict(), **change}
    client = LaLoraClient(task=tiny_task(dropout=0.0), deployment=True)
    context = _context(_node_config(0, tmp_path))

    def touched(*a, **k):
        raise AssertionError("private data read (task built, probe run) before the terms were checked")

    monkeypatch.setattr(simulation.Simulator, "__init__", touched)
    with pytest.raises(RequestRefused, match=rule):
        _setup(client, context, config, sim.noise_multiplier)
    with pytest.raises(RequestRefused, match="does not know"):      # an unknown key of the query itself
        _setup(client, context, sim.cfg.to_dict(), sim.noise_multiplier, dp_mode="as-released")
    assert not (tmp_path / "node-state.pt").exists()


def test_node_task_options_are_the_only_ones_served(tmp_path):
    """The operator names the task options; a run must send exactly those (none if none named)."""
    sim = _sim()
    client = LaLoraClient(task=tiny_task(dropout=0.0), deployment=True)
    terms = {"task-options": json.dumps({"max_train_samples": 96}), "task": "tiny"}
    context = _context(_node_config(0, tmp_path, **terms))
    with pytest.raises(RequestRefused, match="task_overrides must equal"):
        _setup(client, context, sim.cfg.to_dict(), sim.noise_multiplier)      # sends none
    with pytest.raises(RequestRefused, match="serves task 'tiny'"):
        _setup(client, context, {**sim.cfg.to_dict(), "task": "other",
                                 "task_overrides": {"max_train_samples": 96}}, sim.noise_multiplier)
    reply = _setup(client, context, {**sim.cfg.to_dict(), "task_overrides": {"max_train_samples": 96}},
                   sim.noise_multiplier)
    assert int(reply.content[KEYS.CONFIG]["partition-id"]) == 0


def test_train_message_with_unknown_fields_is_refused(tmp_path):
    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    node = Node(sim, cid, tmp_path)
    with pytest.raises(RequestRefused, match="does not know"):
        _train(node.client, node.context, sim, 1, noise_multiplier=0.0)
    crafted = {**sim.initial_global_state(), "fc1.base.weight": torch.zeros(12, 10)}
    with pytest.raises(RequestRefused, match="does not know"):
        _train(node.client, node.context, sim, 1, crafted)
    assert _ledger(tmp_path) is None                      # nothing served, nothing recorded


# ----------------------------------------------------------------------------- 2. one writer
def _slow_updates(monkeypatch, seconds=0.6):
    """Widen the window between reading the ledger and writing it (a real step takes longer)."""
    from lalora.federated import simulation

    real = simulation.Simulator.client_update

    def slow(self, *a, **k):
        time.sleep(seconds)
        return real(self, *a, **k)

    monkeypatch.setattr(simulation.Simulator, "client_update", slow)


def test_two_runs_at_once_do_not_fork_the_ledger(tmp_path, monkeypatch):
    """Two servers' runs served at the same time by one node (two clients, two contexts, one state
    folder). Without a lock both read the same ledger and the last write drops the other run's
    round; with it the second waits and composes on top of the first."""
    runs = [_sim(epsilon=1.0, seed=s) for s in (0, 1)]
    cid = 0
    rounds = [_first_round(sim, cid) for sim in runs]
    nodes = [Node(sim, cid, tmp_path) for sim in runs]
    _slow_updates(monkeypatch)
    barrier, errors = threading.Barrier(2), []

    def serve(node, t):
        barrier.wait()
        try:
            node.train(t)
        except Exception as err:   # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=serve, args=(n, t)) for n, t in zip(nodes, rounds)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    ledger = _ledger(tmp_path)
    assert sorted(ledger.clients) == sorted(run_key(sim.cfg) for sim in runs)
    for sim, t in zip(runs, rounds):
        assert ledger.rounds(run_key(sim.cfg)) == [t]


def test_lock_wait_times_out_into_a_refusal(tmp_path):
    from lalora.flower.ledger import exclusive

    with exclusive(tmp_path):
        with pytest.raises(RequestRefused, match="busy"):
            with exclusive(tmp_path, timeout=0.2):
                pass


def _worker(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent),
                                                       str(TESTS.parent / "kernels" / "src"),
                                                       os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(TESTS / "node_worker.py"), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, err[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_two_processes_share_one_state_folder(tmp_path):
    """Real processes (two ClientApp processes of one node): started together, both step slowly;
    both runs end up in the persisted ledger, each with its round."""
    state = tmp_path / "node"
    procs = [_worker(state, seed, 1.0, "first", 1.5, 2) for seed in (0, 1)]
    results = [_result(p) for p in procs]
    assert all(r["status"] == "served" for r in results), results
    ledger = _ledger(state)
    assert sorted(ledger.clients) == sorted(r["run"] for r in results)
    for r in results:
        assert ledger.rounds(r["run"]) == [r["round"]]


# ----------------------------------------------------------------------------- 3. rollback / tamper
def _two_round_client(sim):
    return next(c for c in range(sim.cfg.clients) if sum(c in s for s in sim.schedule) >= 2)


def test_rolled_back_or_edited_state_is_refused(tmp_path):
    sim = _sim()
    cid = _two_round_client(sim)
    t1, t2 = [t for t in range(1, sim.cfg.rounds + 1) if cid in sim.sampled_clients(t)][:2]
    path = tmp_path / "node-state.pt"
    Node(sim, cid, tmp_path).train(t1)
    secret = tmp_path / SECRET_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    old = path.read_bytes()
    reply = Node(sim, cid, tmp_path).train(t2)
    assert secret.read_bytes().hex() not in repr(reply.content)     # never sent (trivially: not in it)
    # rollback: an older, valid copy would let round t2 be served twice
    path.write_bytes(old)
    with pytest.raises(StateTamperedError, match="rollback"):
        Node(sim, cid, tmp_path).train(t2)
    # edit: lower the step count and recompute an unkeyed sha256 over the new body
    import hashlib
    import io

    from lalora.flower.ledger import MAGIC

    head = len(MAGIC) + 65
    data = torch.load(io.BytesIO(old[head:]), weights_only=True)
    data["seq"] = 10 ** 6
    data["payload"]["ledger"] = None
    buf = io.BytesIO()
    torch.save(data, buf)
    body = buf.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(StateTamperedError, match="MAC"):
        Node(sim, cid, tmp_path).train(t2)
    # deleting only the state file does not reset the ledger either
    path.unlink()
    with pytest.raises(StateTamperedError, match="missing"):
        Node(sim, cid, tmp_path).train(t2)


@pytest.mark.slow
def test_rollback_across_real_processes(tmp_path):
    """Each round in its own process (a node restarted between rounds); the state file is rolled
    back to the copy taken after the first round; the third process refuses the rollback."""
    first = _result(_worker(tmp_path, 0, 3.0, "first"))
    assert first["status"] == "served"
    snapshot = (tmp_path / "node-state.pt").read_bytes()
    second = _result(_worker(tmp_path, 0, 3.0, "second"))
    assert second["status"] == "served" and second["round"] > first["round"]
    (tmp_path / "node-state.pt").write_bytes(snapshot)
    again = _result(_worker(tmp_path, 0, 3.0, "second"))
    assert again["status"] == "refused" and "rollback" in again["error"], again
    loaded = _result(_worker(tmp_path, 0, 3.0, "ledger"))
    assert loaded["status"] == "refused" and loaded["error"] == again["error"]


# ----------------------------------------------------------------------------- 4. failed step
def _canary_task(sim, cid):
    """The tiny task with one record of client ``cid`` turned into a huge-input canary."""
    task = tiny_task(dropout=0.0)
    canary = int(sim.client_data[cid].indices[-1])
    task.train.tensors["x"][canary] = 1e10
    return task


def _crafted_state(sim):
    """A global state whose gradient is NaN on the 1e10 canary and finite on ordinary inputs: fc1's
    A maps the canary to inf (0 · inf in the backward through the saturated tanh); ordinary inputs
    stay finite and saturate fc1 (zero LoRA gradient)."""
    state = sim.initial_global_state()
    state["fc1.lora_A"] = torch.full_like(state["fc1.lora_A"], 1e29)
    state["fc1.lora_B"] = torch.ones_like(state["fc1.lora_B"])
    return state


def test_failed_step_is_counted_and_says_nothing(tmp_path):
    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    k = sim.cfg.local_steps
    plain = Node(sim, cid, tmp_path / "plain")
    reply = _train(plain.client, plain.context, sim, 1, _crafted_state(sim))      # canary absent: served
    assert int(reply.content[KEYS.METRICS]["ledger_steps"]) == k
    with_canary = Node(sim, cid, tmp_path / "canary", task=_canary_task(sim, cid))
    with pytest.raises(RequestRefused) as refused:                                  # canary present
        _train(with_canary.client, with_canary.context, sim, 1, _crafted_state(sim))
    assert str(refused.value) == STEP_FAILED
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert not re.search(r"lora|Floating|NaN|Inf|fc1|param", str(refused.value))
    # charged exactly as the served round, and it cannot be asked again
    for folder in ("plain", "canary"):
        ledger = _ledger(tmp_path / folder)
        assert ledger.steps(run_key(sim.cfg)) == k and ledger.rounds(run_key(sim.cfg)) == [1]
    with pytest.raises(RequestRefused, match="already served"):
        _train(with_canary.client, with_canary.context, sim, 1, _crafted_state(sim))


# ----------------------------------------------------------------------------- 5. app bundle
def test_simulation_mode_app_on_a_deployed_node_is_refused(tmp_path):
    """A bundle whose shim builds ``make_client_app(deployment=False)`` (seeded noise, train_loss in
    replies) on a node whose operator configured a deployment: refused, for setup and for train."""
    from lalora.flower.terms import APP_NAME

    sim = _sim()
    cid = sim.sampled_clients(1)[0]
    context = _context(_node_config(cid, tmp_path, **{"client-app": APP_NAME}))
    sim_mode = LaLoraClient(deployment=False)
    with pytest.raises(RequestRefused, match="simulation mode"):
        _setup(sim_mode, context, sim.cfg.to_dict(), sim.noise_multiplier)
    from flwr.app import ConfigRecord

    context.state[KEYS.SETUP] = ConfigRecord({"config": json.dumps(sim.cfg.to_dict())})   # as if set up
    with pytest.raises(RequestRefused, match="simulation mode"):
        _train(sim_mode, context, sim, 1)
    custom = LaLoraClient(task=tiny_task(dropout=0.0), deployment=True)   # its own task, not the app
    with pytest.raises(RequestRefused, match="custom-task"):
        _setup(custom, context, sim.cfg.to_dict(), sim.noise_multiplier)
    assert LaLoraClient().origin == APP_NAME                 # the installed app is what the node names
    with pytest.raises(ValueError, match="client-app"):     # and a deployed node must name one
        LaLoraClient()._guard(_context({k: v for k, v in _node_config(cid, tmp_path).items()
                                        if k != "client-app"}))
    assert not (tmp_path / "node-state.pt").exists()


# ----------------------------------------------------------------------------- 6. probe bypass
class SortBatch(nn.Module):
    """Reorders the batch by feature 0: per-sample gradients belong to the wrong samples."""

    def forward(self, x):
        return x[x[:, 0].argsort()]


def _sorting_task(sim):
    """The tiny task with a forward that sorts the batch, and client 0's first three examples (the
    kernels probe's) already in order, so that probe passes."""
    task = tiny_task(dropout=0.0)
    first = sim.client_data[0].indices[:3]
    task.train.tensors["x"][first, 0] = torch.tensor([-30.0, -20.0, -10.0])
    honest = task.build_model

    def build_model():
        model = honest()
        return nn.Sequential(OrderedDict([("sort", SortBatch()), *model.named_children()]))

    import dataclasses

    return dataclasses.replace(task, build_model=build_model)


def test_sorting_forward_is_caught_by_the_node_probe(tmp_path):
    from lalora.federated.simulation import Simulator
    from lalora.privacy.unit_probe import ClippingUnitError

    sim = _sim()
    task = _sorting_task(sim)
    Simulator(sim.cfg, task=task)        # the kernels probe alone lets this model through
    cid = sim.sampled_clients(1)[0]
    with pytest.raises(ClippingUnitError, match="permut|alone|changing sample"):
        Node(sim, cid, tmp_path, task=task)
    assert not (tmp_path / "node-state.pt").exists()


def test_batch_equivariance_probe_on_sorted_and_honest_batches():
    """Direct: the sorting model is caught even on a batch that is already sorted (the
    permutations do it); the honest model passes (no false alarm)."""
    from lalora.privacy.dp_step import per_sample_gradients
    from lalora.privacy.unit_probe import ClippingUnitError, verify_batch_equivariance

    task = tiny_task(dropout=0.0)
    x, y = task.train.tensors["x"][:8].clone(), task.train.tensors["labels"][:8]
    x[:, 0] = torch.arange(8.0)                                   # sorted by the sorting feature
    batch = {"x": x, "labels": y}

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(m(b["x"]), b["labels"], reduction="none")

    honest = task.build_model()
    for p in honest.parameters():
        p.requires_grad_(True)
    verify_batch_equivariance(honest, loss_fn, batch, per_sample_gradients,
                              generator=torch.Generator().manual_seed(0))
    sorting = nn.Sequential(OrderedDict([("sort", SortBatch()), *task.build_model().named_children()]))
    for seed in range(5):
        with pytest.raises(ClippingUnitError):
            verify_batch_equivariance(sorting, loss_fn, batch, per_sample_gradients,
                                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- 7. what leaves the node
def test_replies_and_refusals_carry_only_public_numbers(tmp_path):
    full = dict(clients_per_round=4)
    run1 = _sim(**full)
    node = Node(run1, 0, tmp_path)
    for t in (1, 2, 3):
        reply = node.train(t)
        assert set(reply.content[KEYS.METRICS]) == {"num_steps", "ledger_steps"}   # no |D_i|, no ε(q)
    with pytest.raises(RequestRefused) as refused:
        Node(_sim(seed=1, **full), 0, tmp_path).train(1)
    text = str(refused.value)
    assert "budget" in text and not re.search(r"\d\.\d", text), text    # the rule, not the ε spent
    with pytest.raises(RequestRefused) as terms:
        Node(_sim(epsilon=5.0, **full), 0, tmp_path / "other")
    assert "epsilon" in str(terms.value) and "delta=" not in str(terms.value)
