"""The Flower side of the server: a Strategy that is our aggregator, and the ServerApp around it.

:class:`LaLoraStrategy` keeps the global LoRA state as torch tensors and delegates every decision
to the in-process engine, so the two engines cannot drift apart:

- who trains in round t: exactly ``Simulator.sampled_clients(t)`` -- the seeded, data-independent
  schedule for which σ was calibrated (Flower's own random node sampling is never used);
- what goes down: ``encoding.downlink_groups``; what comes back: the client's
  ``ClientUpdate.state`` = ``Simulator.aggregated_groups(t)`` (RoLoRA's round parity, FFA-LoRA's B,
  FedSA-LoRA's A);
- how it is combined: ``Simulator.server_aggregate`` (float64 mean, keys nobody sent unchanged),
  over the replies sorted by client id, as the in-process loop does;
- privacy: the server's ledger records each reply's K steps (idempotent per (client, round)) and
  must agree with the step count the client's own ledger reports;
- evaluation: centralized on the common test set, except FedSA-LoRA, whose model is global A with
  each client's local B and head: every node evaluates its own (federated evaluation).

A missing or failed reply aborts the run: averaging over fewer clients than scheduled would change
both the aggregate and the accounting assumptions. The one exception is a SuperNode that left (killed,
restarted) and rejoins within ``rejoin_timeout``: its client is asked again, for training (a node that
already served the round refuses it) and for FedSA-LoRA's federated evaluation alike.

``make_server_app(cfg)`` wraps it in a ServerApp that first sends every node a setup query (the
run config; the node answers with its partition id, i.e. its client id).
"""
from __future__ import annotations

import json
import threading
import time

import numpy as np

from lalora.federated.simulation import Simulator, plan_run
from lalora.flower.encoding import (KEYS, downlink_groups, payload_bytes, record_to_state,
                                    state_to_record)

__all__ = ["LaLoraStrategy", "discover_clients", "make_server_app", "PRIVATE_METRICS"]

# computed on a client's private batches without noise: only simulated clients send them
PRIVATE_METRICS = ("train_loss", "mean_batch_size")


def _check_replies(replies, expected: int, what: str) -> list:
    replies = list(replies)
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors:   # e.g. a node refusing a round (lalora.flower.node.RequestRefused): logged, not hidden
        from logging import ERROR

        from flwr.common.logger import log

        for reason in errors:
            log(ERROR, "lalora: a client refused or failed %s: %s", what, reason)
        raise RuntimeError(f"{len(errors)} client(s) failed during {what}: {errors[0]}")
    if len(replies) != expected:
        raise RuntimeError(f"{what}: got {len(replies)} replies, expected {expected} "
                           "(a client timed out or left; refusing to aggregate a partial cohort)")
    return replies


def discover_clients(grid, cfg, noise_multiplier: float, *, timeout: float = 600.0) -> dict[int, int]:
    """Send the setup query (resolved ``cfg``, the plan's σ) to every node; return {client id: node
    id}. Waits for all ``cfg.clients`` nodes to connect (a deployment's SuperNodes may come up late)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < cfg.clients:
        if getattr(grid, "_stop", None) is not None and grid._stop.is_set():
            raise RuntimeError("Flower run aborted while waiting for SuperNodes")
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {cfg.clients} "
                               f"SuperNodes connected within {timeout:.0f}s")
        time.sleep(0.5)
    node_of = setup_nodes(grid, cfg, noise_multiplier, sorted(grid.get_node_ids()), timeout=timeout)
    missing = sorted(set(range(cfg.clients)) - set(node_of))
    if missing:
        raise ValueError(f"no SuperNode serves partition-id(s) {missing}")
    return node_of


def setup_nodes(grid, cfg, noise_multiplier: float, node_ids, *, timeout: float) -> dict[int, int]:
    """Send the setup query (run config, σ) to ``node_ids``; return {partition id: node id}."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    setup = ConfigRecord({"config": json.dumps(cfg.to_dict()),
                          "noise_multiplier": float(noise_multiplier)})
    messages = [Message(RecordDict({KEYS.CONFIG: setup}), dst_node_id=n,
                        message_type=MessageType.QUERY, group_id="setup") for n in node_ids]
    replies = _check_replies(grid.send_and_receive(messages, timeout=timeout), len(node_ids), "setup")
    node_of: dict[int, int] = {}
    for r in replies:
        cid = int(r.content[KEYS.CONFIG]["partition-id"])
        if not 0 <= cid < cfg.clients or cid in node_of:
            raise ValueError(f"partition-id {cid} is out of range 0..{cfg.clients - 1} or used "
                             "by two SuperNodes")
        node_of[cid] = r.metadata.src_node_id
    return node_of


_GONE = ("Node Unavailable", "Message Unavailable")   # Flower's error reasons for a node that left


class StoppableGrid:
    """A Grid whose ``send_and_receive`` gives up when ``stop`` is set. Flower's simulation runs the
    ServerApp in a thread; if the Ray runtime dies, the stock grid would wait for replies until the
    timeout (an hour), keeping the process alive. ``run_flower`` sets ``stop`` on such a failure."""

    def __init__(self, grid, stop: threading.Event, poll_s: float = 0.05):
        self._grid, self._stop, self._poll_s = grid, stop, poll_s

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        if not hasattr(self._grid, "push_messages"):     # InProcessGrid: synchronous already
            return self._grid.send_and_receive(messages, timeout=timeout)
        pending = set(self._grid.push_messages(list(messages)))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while pending:
            if self._stop.is_set():
                raise RuntimeError("Flower run aborted (the simulation runtime stopped)")
            if end is not None and time.monotonic() > end:
                break
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(self._poll_s)
        return replies


def _strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


class LaLoraStrategy(_strategy_base()):
    """Flower Strategy running one lalora config (see the module docstring). After ``start``,
    ``records`` holds one metrics dict per round (the in-process ``metrics.jsonl`` fields plus
    message sizes) and ``global_state`` the final global LoRA/head state."""

    def __init__(self, sim, node_of: dict[int, int], *, timeout: float = 3600.0, progress=None,
                 rejoin_timeout: float = 600.0):
        self.sim = sim
        self.node_of = node_of
        self.timeout = timeout
        self.rejoin_timeout = rejoin_timeout
        self.progress = progress
        self.global_state = sim.initial_global_state()
        self.down_groups = downlink_groups(sim.method, sim.train_head)
        self.down_names = set(sim.groups.names(self.down_groups))
        self.records: list[dict] = []
        self._round: dict = {}
        self.noise_sources: dict[int, str] = {}   # client -> "os-entropy" | "seeded" (run metadata)

    # ------------------------------------------------------------------ train
    # ------------------------------------------------------------------ SuperNodes that rejoin
    def _refresh_nodes(self, grid, clients, *, wait: bool) -> None:
        """A restarted SuperNode registers under a new node id: ask every node we do not know for
        its partition id (setup query) and remap. With ``wait``, wait (up to ``rejoin_timeout``)
        until each of ``clients`` maps to a connected node."""
        if not hasattr(grid, "get_node_ids") or not hasattr(grid, "push_messages"):
            return                                    # in-process grid: nodes never leave
        deadline = time.monotonic() + self.rejoin_timeout
        while True:
            live = set(grid.get_node_ids())
            new = sorted(live - set(self.node_of.values()))
            if new:
                for cid, node in setup_nodes(grid, self.sim.cfg, self.sim.noise_multiplier, new,
                                             timeout=self.timeout).items():
                    self.node_of[cid] = node          # the latest registration serves the partition
            stale = [c for c in clients if self.node_of[c] not in live]
            if not stale or not wait:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperNodes of clients {stale} left and did not rejoin within "
                                   f"{self.rejoin_timeout:.0f}s")
            time.sleep(1.0)

    def _train_messages(self, t: int, clients) -> list:
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        return [Message(RecordDict({KEYS.ARRAYS: self._round["record"],
                                    KEYS.CONFIG: ConfigRecord({"round": t})}),
                        dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN,
                        group_id=str(t)) for cid in clients]

    def configure_train(self, server_round, arrays, config, grid):
        t = server_round
        clients = self.sim.sampled_clients(t)
        self._grid = grid
        self._refresh_nodes(grid, clients, wait=True)
        down = {k: v for k, v in self.global_state.items() if k in self.down_names}
        record = state_to_record(down)
        self._round = {"round": t, "clients": clients, "lr": self.sim.local.lr_at(t),
                       "t0": time.perf_counter(), "record": record,
                       "downlink_payload_bytes_per_client": payload_bytes(down),
                       "downlink_record_bytes_per_client": record.count_bytes()}
        return self._train_messages(t, clients)

    def _resend_to_rejoined(self, t: int, replies: list, clients, make_messages, what: str) -> list:
        """Replies saying the node left (killed, restarted) are replaced by the reply of the same
        client's rejoined SuperNode. A node that did serve the round before leaving refuses it
        again (lalora.flower.node), and the round fails: nothing is released twice. FedSA-LoRA's
        federated evaluation uses it too. ``clients``: who was asked; ``make_messages(t, clients)``:
        the messages that ask them again; ``what``: for the log line."""
        cid_of = {node: cid for cid, node in self.node_of.items()}
        gone = [r for r in replies if r.has_error() and any(g in r.error.reason for g in _GONE)]
        if not gone or not hasattr(self, "_grid"):
            return replies
        # Flower's error replies come "from the SuperLink": the lost clients are those without a reply
        answered = {cid_of.get(r.metadata.src_node_id) for r in replies if not r.has_error()}
        lost = sorted(set(clients) - answered)
        if len(lost) != len(gone) or len(gone) != sum(r.has_error() for r in replies):
            return replies
        from logging import WARNING

        from flwr.common.logger import log

        log(WARNING, "lalora: %s %d: the SuperNodes of clients %s left; waiting for them to rejoin",
            what, t, lost)
        old = {self.node_of[c] for c in lost}
        self._refresh_nodes(self._grid, [], wait=False)
        end = time.monotonic() + self.rejoin_timeout
        while any(self.node_of[c] in old for c in lost):
            if time.monotonic() > end:
                return replies                        # _check_replies reports the original errors
            time.sleep(1.0)
            self._refresh_nodes(self._grid, [], wait=False)
        again = list(self._grid.send_and_receive(make_messages(t, lost), timeout=self.timeout))
        return [r for r in replies if r not in gone] + again

    def aggregate_train(self, server_round, replies):
        from lalora.federated.server import ClientUpdate

        t = server_round
        clients = self._round["clients"]
        replies = _check_replies(self._resend_to_rejoined(t, list(replies), clients, self._train_messages, "round"),
                                 len(clients), f"round {t}")
        cid_of = {node: cid for cid, node in self.node_of.items()}
        by_cid = {cid_of[r.metadata.src_node_id]: r for r in replies}
        if sorted(by_cid) != clients:
            raise RuntimeError(f"round {t}: replies from clients {sorted(by_cid)}, scheduled {clients}")
        expected = set(self.sim.groups.names(self.sim.aggregated_groups(t)))
        updates, up_payload, up_record, ledger = [], 0, 0, self.sim.ledger
        for cid in clients:    # sorted, as in the in-process loop
            r = by_cid[cid]
            arrays, m = r.content[KEYS.ARRAYS], r.content[KEYS.METRICS]
            if set(arrays) != expected:
                raise RuntimeError(f"round {t}: client {cid} sent {sorted(set(arrays) ^ expected)[:3]}"
                                   " beyond/short of what the method aggregates")
            up_payload += payload_bytes(arrays)
            up_record += arrays.count_bytes()
            ledger.record_steps(cid, int(m["num_steps"]), round=t)
            if int(m["ledger_steps"]) != ledger.steps(cid):
                raise RuntimeError(f"client {cid} reports {int(m['ledger_steps'])} DP steps, the "
                                   f"server's ledger {ledger.steps(cid)}")
            private = {k: float(m[k]) for k in PRIVATE_METRICS if k in m}
            # |D_i| is never sent by a node: the server has it from its own (seeded) partition
            updates.append(ClientUpdate(state=record_to_state(arrays),
                                        num_samples=len(self.sim.client_data[cid]),
                                        num_steps=int(m["num_steps"]), client_id=cid, metrics=private))
            self.noise_sources[cid] = str(r.content[KEYS.CONFIG]["noise_source"])
        self.global_state = self.sim.server_aggregate(updates, t, self.global_state)
        privacy = self.sim.privacy_summary()
        # Simulated clients send their un-noised diagnostics; they stay in the local run folder,
        # listed under "private_metrics". Deployed clients never send them.
        private = [k for k in PRIVATE_METRICS if all(k in u.metrics for u in updates)]
        self._round.update({k: float(np.mean([u.metrics[k] for u in updates])) for k in private})
        if private:
            self._round["private_metrics"] = private
        self._round.update({
            "epsilon_spent": privacy["epsilon_spent"],
            "uplink_payload_bytes": up_payload, "uplink_record_bytes": up_record,
            "downlink_payload_bytes": self._round["downlink_payload_bytes_per_client"] * len(clients),
            "downlink_record_bytes": self._round["downlink_record_bytes_per_client"] * len(clients),
        })
        return state_to_record(self.global_state), None

    # ------------------------------------------------------------------ evaluate
    def _eval_round(self, t: int) -> bool:
        return t >= 1 and (t % self.sim.cfg.eval_every == 0 or t == self.sim.cfg.rounds)

    def _federated_eval(self) -> bool:
        return bool(self.sim.method.local_only)   # the model differs per client (FedSA-LoRA)

    def _eval_messages(self, t: int, clients) -> list:
        from flwr.app import Message, MessageType, RecordDict

        record = state_to_record({k: v for k, v in self.global_state.items() if k in self.down_names})
        return [Message(RecordDict({KEYS.ARRAYS: record}), dst_node_id=self.node_of[cid],
                        message_type=MessageType.EVALUATE, group_id=f"eval-{t}") for cid in clients]

    def configure_evaluate(self, server_round, arrays, config, grid):
        if not (self._federated_eval() and self._eval_round(server_round)):
            return []
        everyone = list(range(self.sim.cfg.clients))
        self._grid = grid
        self._refresh_nodes(grid, everyone, wait=True)   # a node that left since training: its new id
        return self._eval_messages(server_round, everyone)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        if not (self._federated_eval() and self._eval_round(server_round)):
            return None
        everyone = list(range(self.sim.cfg.clients))
        replies = _check_replies(self._resend_to_rejoined(server_round, replies, everyone, self._eval_messages,
                                                          "evaluation of round"),
                                 self.sim.cfg.clients, f"evaluation of round {server_round}")
        cid_of = {node: cid for cid, node in self.node_of.items()}
        by_cid = {cid_of[r.metadata.src_node_id]: r.content[KEYS.METRICS] for r in replies}
        accs = [float(by_cid[c]["accuracy"]) for c in range(self.sim.cfg.clients)]
        losses = [float(by_cid[c]["loss"]) for c in range(self.sim.cfg.clients)]
        # as Simulator.evaluate: FedSA-LoRA is scored over the clients that have trained so far
        scored = sorted({c for s in self.sim.schedule[:server_round] for c in s})
        self._round.update({"test_accuracy": float(np.mean([accs[c] for c in scored])),
                            "test_loss": float(np.mean([losses[c] for c in scored])),
                            "test_per_client_accuracy": accs, "test_scored_clients": scored,
                            "test_fedsa_scoring": "trained-clients"})
        return None

    def evaluate_fn(self, server_round, arrays):
        """Centralized evaluation (Strategy.start calls it last in every round): closes the round."""
        if server_round == 0:
            return None
        if self._eval_round(server_round) and not self._federated_eval():
            ev = self.sim.evaluate(self.global_state)
            self._round.update({f"test_{k}": v for k, v in ev.items()})
        record = {k: v for k, v in self._round.items()
                  if k not in ("t0", "record", "downlink_payload_bytes_per_client",
                               "downlink_record_bytes_per_client")}
        record["round_s"] = time.perf_counter() - self._round["t0"]
        record["elapsed_s"] = record["round_s"] + (self.records[-1]["elapsed_s"] if self.records else 0.0)
        self.records.append(record)
        if self.progress is not None:
            self.progress(record)
        return None

    def summary(self) -> None:
        from flwr.common.logger import log
        from logging import INFO

        log(INFO, "LaLoraStrategy: method=%s, %d of %d clients per round, downlink %s",
            self.sim.cfg.method, self.sim.cfg.clients_per_round, self.sim.cfg.clients,
            sorted(self.down_groups))

    def run(self, grid):
        """Strategy.start with our round count, centralized evaluation and no Flower sampling."""
        return self.start(grid, state_to_record(self.global_state), num_rounds=self.sim.cfg.rounds,
                          timeout=self.timeout, evaluate_fn=self.evaluate_fn)


def make_server_app(cfg, *, holder: dict | None = None, task=None, partitions=None,
                    timeout: float = 3600.0, progress=None):
    """A ServerApp running ``cfg`` (a RunConfig). The finished strategy is put in
    ``holder["strategy"]`` (the simulation runs the ServerApp in a thread of this process); setting
    the event ``holder["stop"]`` aborts a run waiting for replies."""
    from flwr.serverapp import ServerApp

    server_app = ServerApp()
    holder = holder if holder is not None else {}
    stop = holder.setdefault("stop", threading.Event())

    @server_app.main()
    def main(grid, context) -> None:
        grid = StoppableGrid(grid, stop)
        # schedule and σ from the run plan (labels only); the model is built once the nodes agreed
        run_cfg, run_task, parts, plan = plan_run(cfg, task=task, partitions=partitions)
        node_of = discover_clients(grid, run_cfg, plan.noise_multiplier, timeout=timeout)
        sim = Simulator(run_cfg, task=run_task, partitions=parts)
        strategy = LaLoraStrategy(sim, node_of, timeout=timeout, progress=progress)
        strategy.run(grid)
        holder["strategy"] = strategy

    return server_app



# ---------------------------------------------------------------------- deployment entry point
def config_from_run_config(run_config) -> tuple:
    """RunConfig from a Flower run config (``[tool.flwr.app.config]`` / ``flwr run --run-config``):
    keys are RunConfig field names with ``-`` or ``_``; ``task-options`` is a JSON object
    (RunConfig.task_overrides); ``runs-dir`` (not a RunConfig field) is where the run folder goes.
    Returns (RunConfig, runs_dir or None)."""
    from dataclasses import fields

    from lalora.config import RunConfig

    known = {f.name for f in fields(RunConfig)}
    values, runs_dir = {}, None
    for key, value in dict(run_config).items():
        name = key.replace("-", "_")
        if name == "runs_dir":
            runs_dir = str(value)
        elif name in ("task_options", "task_overrides"):
            values["task_overrides"] = json.loads(value) if isinstance(value, str) else dict(value)
        elif name in known:
            values[name] = value
        else:
            raise ValueError(f"run config key {key!r} is not a RunConfig field (nor runs-dir/task-options)")
    for name in ("task", "method"):
        if name not in values:
            raise ValueError(f"run config must set {name!r}")
    if values.get("dp_mode", "dp") != "dp":   # a deployment never runs the released (non-DP) step
        raise ValueError("dp_mode 'as-released' is not allowed in a Flower deployment (not differentially private)")
    return RunConfig(**values), runs_dir


def _make_deployment_app():
    from flwr.serverapp import ServerApp

    deployment_app = ServerApp()

    @deployment_app.main()
    def main(grid, context) -> None:
        from lalora.flower.rundir import final_summary, write_run_folder

        cfg, runs_dir = config_from_run_config(context.run_config)
        t0 = time.perf_counter()
        run_cfg, task, parts, plan = plan_run(cfg)   # σ and schedule before the model
        node_of = discover_clients(grid, run_cfg, plan.noise_multiplier)
        strategy = LaLoraStrategy(Simulator(run_cfg, task=task, partitions=parts), node_of)
        strategy.run(grid)
        if runs_dir:
            write_run_folder(runs_dir, strategy, final_summary(strategy, time.perf_counter() - t0))

    return deployment_app


app = _make_deployment_app()   # `flwr run` component: lalora.flower.server_app:app
