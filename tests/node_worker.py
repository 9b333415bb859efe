"""One deployed-node process for tests/test_node_attacks.py (real processes sharing a state folder).

    python node_worker.py STATE_DIR SEED RUN_EPSILON WHICH [SLEEP_S] [PEERS]

WHICH: "first" / "second" -- serve the client's first or second scheduled round of the run (client
0 when PEERS is given, else a client sampled twice); "ledger" -- only load the node state.
SLEEP_S: extra seconds inside the DP step (widens the read-to-write window). PEERS: wait until that
many workers have reached their round (a file barrier in STATE_DIR/../barrier), so they overlap.
Prints one line ``RESULT {json}``: status served/refused, round, run key, error text.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv) -> None:
    state_dir, seed, run_eps, which = argv[:4]
    sleep_s = float(argv[4]) if len(argv) > 4 else 0.0
    peers = int(argv[5]) if len(argv) > 5 else 0

    from lalora.federated import simulation
    from lalora.flower.node import NodeStore, RequestRefused, run_key
    from lalora.results import CheckpointCorruptedError
    from test_deploy import Node, _sim

    sim = _sim(epsilon=float(run_eps), seed=int(seed))
    result = {"run": run_key(sim.cfg)}
    try:
        if which == "ledger":
            NodeStore(None, state_dir).load()
            result["status"] = "loaded"
        else:
            cid = 0 if peers else next(c for c in range(sim.cfg.clients)
                                       if sum(c in s for s in sim.schedule) >= 2)
            rounds = [t for t in range(1, sim.cfg.rounds + 1) if cid in sim.sampled_clients(t)]
            t = rounds[0] if which == "first" else rounds[1]
            result["round"] = t
            real = simulation.Simulator.client_update

            def slow(self, *a, **k):
                time.sleep(sleep_s)
                return real(self, *a, **k)

            simulation.Simulator.client_update = slow
            node = Node(sim, cid, state_dir)
            if peers:
                barrier = Path(state_dir).parent / "barrier"
                barrier.mkdir(exist_ok=True)
                (barrier / f"{seed}").touch()
                end = time.monotonic() + 300
                while len(list(barrier.iterdir())) < peers and time.monotonic() < end:
                    time.sleep(0.02)
            node.train(t)
            result["status"] = "served"
    except (RequestRefused, CheckpointCorruptedError) as err:
        result.update(status="refused", error=str(err))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
