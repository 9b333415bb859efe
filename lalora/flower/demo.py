"""A real Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes as separate processes
(the ``flwr`` command-line tools of the installed Flower), each node with its own partition and
its own state folder, running lalora through ``flwr run`` (``make flower-demo``; the slow test
tests/test_deploy_flower.py).

    python -m lalora.flower.demo --workdir runs/flower-demo [--rounds 2] [--nodes 3]

What it does (docs/FLOWER.md, section 2, shows the same commands):

1. writes a Flower App (``<workdir>/app``: a shim module and ``pyproject.toml`` whose
   ``[tool.flwr.app.config]`` is the RunConfig) and a Flower config (``$FLWR_HOME/config.toml``
   with a SuperLink connection "lalora-demo" on a free port);
2. ``flower-superlink --insecure --port P --database <workdir>/link.db
   --disable-runtime-dependency-installation`` (the environment already has lalora);
3. per node i: ``flower-supernode --insecure --superlink 127.0.0.1:P --port Q_i --node-config
   'partition-id=i num-partitions=N state-dir="<workdir>/node<i>" epsilon=E delta=D
   client-app="lalora.flower.client_app:app" task="<task>" task-options='<JSON>'``;
4. ``flwr run <workdir>/app lalora-demo``, then waits for ``final.json`` in ``<workdir>/runs``
   (optionally killing and restarting one SuperNode mid-run: ``restart_node``);
5. stops every process it started (its own process groups), whatever happens.

Returns final.json, the metrics rows and each node's persisted ledger (lalora.flower.node).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo", "free_port"]

_APP_MODULE = '''import lalora.flower.client_app as _client
import lalora.flower.server_app as _server

client_app = _client.app   # Flower resolves plain module attributes
server_app = _server.app
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _toml(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _write_app(app_dir: Path, run_config: dict) -> None:
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "lalora_app.py").write_text(_APP_MODULE)
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in run_config.items())
    (app_dir / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lalora-app"
version = "1.0.0"
description = "lalora on a Flower deployment"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "lalora"

[tool.flwr.app.components]
serverapp = "lalora_app:server_app"
clientapp = "lalora_app:client_app"

[tool.flwr.app.config]
{config}
''')


def _stop(procs: list) -> None:
    for p in procs:                      # each was started in its own session: its group is ours
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_demo(workdir, *, rounds: int = 2, nodes: int = 3, clients_per_round: int = 2, epsilon: float = 3.0,
             delta: float = 1e-5, task: str = "digits-swin", method: str = "la-lora", local_steps: int = 2,
             batch_size: int = 8, task_options: dict | None = None, timeout: float = 1800.0,
             restart_node: int | None = None, restart_at_round: int = 2, noise: str = "os-entropy",
             log=print) -> dict:
    """Run one lalora experiment on a local SuperLink + ``nodes`` SuperNodes (module docstring).

    ``restart_node=i``: once round ``restart_at_round`` has started (another node's log shows it),
    SuperNode i is killed (its whole process group, SIGKILL) and started again with the same node
    config and state folder; it rejoins under a new node id, and the ServerApp finds it.
    ``noise="seeded"``: the nodes use the seeded streams (reproducible; each logs a warning).
    The returned ``run_config`` is the Flower run config (``config_from_run_config`` maps it)."""
    from lalora.flower.node import NodeStore

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs_dir, home = workdir / "runs", workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    task_options = {"dropout": 0.0, "max_train_samples": 150} if task_options is None else task_options
    run_config = {"task": task, "method": method, "epsilon": float(epsilon), "delta": float(delta),
                  "clients": nodes, "clients-per-round": clients_per_round, "rounds": rounds,
                  "local-steps": local_steps, "batch-size": batch_size, "partition": "iid",
                  "eval-batch-size": 128, "task-options": json.dumps(task_options),
                  "runs-dir": str(runs_dir)}
    _write_app(workdir / "app", run_config)
    link_port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "lalora-demo"\n\n[superlink.lalora-demo]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    bindir = Path(sys.executable).parent
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(repo / "kernels" / "src"), str(repo),
                                                      os.environ.get("PYTHONPATH", "")) if p))
    # build the task once here, so the backbone cache is warm for the 1 + N processes below
    from lalora.tasks import get_task

    get_task(task, **task_options).build_model()

    procs: list = []
    node_procs: dict[int, subprocess.Popen] = {}
    t0 = time.perf_counter()

    def start(name: str, cmd: list) -> subprocess.Popen:
        out = open(workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def start_node(i: int) -> None:
        state_dir = workdir / f"node{i}"
        state_dir.mkdir(exist_ok=True)
        node_procs[i] = start(f"node{i}", [
            str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
            "--port", str(free_port()), "--node-config",
            f'partition-id={i} num-partitions={nodes} state-dir="{state_dir}" '
            f'epsilon={float(epsilon)} delta={float(delta)} noise="{noise}" '
            f'client-app="lalora.flower.client_app:app" task="{task}" '
            f"task-options='{json.dumps(task_options)}'"])

    restarted = None

    try:
        start("superlink", [str(bindir / "flower-superlink"), "--insecure", "--port", str(link_port),
                            "--database", str(workdir / "link.db"),
                            "--disable-runtime-dependency-installation"])
        _wait_port(link_port, 120)
        for i in range(nodes):
            start_node(i)
        log(f"[flower-demo] SuperLink on 127.0.0.1:{link_port}, {nodes} SuperNodes; logs in {workdir}")
        with open(workdir / "flwr-run.log", "ab") as out:
            done = subprocess.run([str(bindir / "flwr"), "run", str(workdir / "app"), "lalora-demo"],
                                  env=env, timeout=300, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"flwr run failed (see {workdir}/flwr-run.log)")
        end = time.monotonic() + timeout
        while not list(runs_dir.glob("*/*/*/final.json")):
            if time.monotonic() > end:
                raise TimeoutError(f"no final.json in {runs_dir} after {timeout:.0f}s "
                                   f"(see {workdir}/*.log)")
            if restart_node is not None and restarted is None and any(
                    f"ROUND {restart_at_round}]" in (workdir / f"node{j}.log").read_text(errors="replace")
                    for j in range(nodes) if j != restart_node):
                old = node_procs[restart_node]
                os.killpg(old.pid, signal.SIGKILL)
                old.wait()
                procs.remove(old)
                start_node(restart_node)
                restarted = time.perf_counter() - t0
                log(f"[flower-demo] SuperNode {restart_node} killed and restarted at {restarted:.0f}s "
                    f"(round {restart_at_round} under way)")
            dead = [p.args[0] for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited early (see {workdir}/*.log)")
            time.sleep(2)
    finally:
        _stop(procs)
    run_folder = next(runs_dir.glob("*/*/*/final.json")).parent
    final = json.loads((run_folder / "final.json").read_text())
    metrics = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines() if line]
    ledgers = {}
    for i in range(nodes):
        ledger = NodeStore(None, str(workdir / f"node{i}")).load().ledger
        ledgers[i] = ledger.to_dict() if ledger is not None else None
    wall = time.perf_counter() - t0
    log(f"[flower-demo] finished in {wall:.0f}s: ε spent {final['epsilon_spent']:.3f}, accuracy "
        f"{final['accuracy']}, run folder {run_folder}")
    return {"final": final, "metrics": metrics, "node_ledgers": ledgers, "run_dir": str(run_folder),
            "wall_s": wall, "restarted_at_s": restarted, "run_config": run_config}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/flower-demo")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--restart-node", type=int, default=None,
                   help="kill and restart this SuperNode once round 2 is under way")
    args = p.parse_args(argv)
    run_demo(args.workdir, rounds=args.rounds, nodes=args.nodes, restart_node=args.restart_node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
