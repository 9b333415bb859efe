"""A Ray-free Flower Grid: the ServerApp's messages are handed to ClientApp objects in this process.

Why: Flower's only simulation backend is Ray (a process per worker, seconds to start). This grid
runs the *same* ClientApp and Strategy code -- message routing, ArrayRecord encoding, Context.state
persistence per node -- with no Ray, for fast tests and debugging on one core. Client errors
propagate as Python exceptions instead of error replies.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

__all__ = ["InProcessGrid", "task_identity"]


@contextlib.contextmanager
def task_identity(run_id: int = 0, node_id: int = 0):
    """Flower's ``Message(...)`` reads the run and node id of "the task running in this process",
    which Flower's runtimes set; set them for the duration of an in-process run, then restore."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 0, run_id, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class InProcessGrid:
    """Implements the part of ``flwr.serverapp.Grid`` the lalora ServerApp uses."""

    def __init__(self, client_app, num_nodes: int, *, first_node_id: int = 1000):
        from flwr.app import Context, RecordDict

        self.client_app = client_app
        # node ids deliberately differ from partition ids, as in Flower
        self.contexts = {first_node_id + 7 * i: Context(run_id=0, node_id=first_node_id + 7 * i,
                                                        node_config={"partition-id": i,
                                                                     "num-partitions": num_nodes},
                                                        state=RecordDict(), run_config={})
                         for i in range(num_nodes)}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:
        return [self.client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
