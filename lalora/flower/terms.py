"""What a deployed node checks on a request *before it reads any private example*.

The node operator's terms (``NodePolicy``, from the node config) decide everything that matters
for privacy; a server's request can only narrow them. So, on a deployed node, before the task is
built (which reads the data and runs the clipping-unit probe on it):

- the app serving the request is the operator's installed lalora ClientApp in deployment mode
  (:func:`check_app`): a submitted app bundle whose shim builds a simulation-mode client (seeded
  noise, private metrics in replies) or a client with its own task is refused;
- the setup query and the train message carry only the keys the node knows (:func:`known_keys`);
- the run config parses, names only RunConfig fields, and (:func:`accept_config`): runs the real
  DP step (``dp_mode="dp"``, a private method, a finite ε), on the task and with exactly the task
  options the operator named (none unless named: ``public_fraction`` or ``split_seed`` would
  redefine which examples are private), within ε, δ, C and the σ floor (``NodePolicy.check_config``,
  with the server's σ; the node checks its own σ equals it once the task is built).

Every refusal is a ``RequestRefused`` naming the rule that was broken.
"""
from __future__ import annotations

import json

from lalora.flower.errors import RequestRefused

__all__ = ["APP_NAME", "SETUP_KEYS", "TRAIN_KEYS", "check_app", "known_keys", "accept_config",
           "is_deployed_node"]

APP_NAME = "lalora.flower.client_app:app"     # the ClientApp a deployed node serves (node config client-app)
SETUP_KEYS = frozenset({"config", "noise_multiplier"})
TRAIN_KEYS = frozenset({"round"})
_DEPLOYMENT_KEYS = ("state-dir", "epsilon", "delta", "client-app")


def _refused(msg: str):
    return RequestRefused(msg)


def is_deployed_node(node_config) -> bool:
    """A node config with any of the operator's deployment terms belongs to a deployed node."""
    return any(k in node_config for k in _DEPLOYMENT_KEYS)


def check_app(node_config, *, deployment: bool, origin: str) -> None:
    """Refuse unless this ClientApp is the one the operator's node config names, in deployment mode.

    ``origin`` is what the client is: ``APP_NAME`` for lalora's own app (no task of its own),
    ``"custom-task"`` for a client built around a task object (tests, own-data sites). This guards
    against a wrong or altered shim in a submitted app bundle; it is no defence against arbitrary
    code in a bundle -- pin the app with Flower's mechanisms for that (docs/FLOWER.md, section 7)."""
    if not is_deployed_node(node_config):
        return                                   # a simulated node (run_flower): no operator terms
    if not deployment:
        raise _refused("this node is a deployed node (its node config has the operator's terms): it "
                       f"serves only the installed lalora ClientApp in deployment mode ({APP_NAME}); "
                       "this app bundle runs it in simulation mode")
    named = node_config.get("client-app")
    if named != origin:
        raise _refused(f"this node serves the ClientApp {named!r} (node config client-app); the app "
                       f"bundle runs {origin!r}")


def known_keys(record, allowed: frozenset, what: str) -> None:
    unknown = sorted(set(record.keys()) - allowed)
    if unknown:
        raise _refused(f"the {what} carries field(s) {unknown} this node does not know; refused")


def accept_config(config_json: str, policy, *, deployment: bool, noise_multiplier: float | None = None):
    """The RunConfig of ``config_json`` if the node's terms allow it, else RequestRefused.
    Reads no private data. ``noise_multiplier``: the server's σ (checked against the floor)."""
    from lalora.config import RunConfig

    try:
        values = json.loads(config_json)
    except ValueError:
        raise _refused("the run config is not valid JSON") from None
    if not isinstance(values, dict):
        raise _refused("the run config must be a JSON object")
    try:
        cfg = RunConfig.from_dict(values)   # unknown fields and invalid values refused here
    except (TypeError, ValueError) as err:
        raise _refused(f"node refuses the run config: {err}") from None
    if not deployment:
        return cfg
    if cfg.dp_mode != "dp":
        raise _refused(f"node refuses the run config: dp_mode={cfg.dp_mode!r}; a deployed node runs "
                       "only the differentially private step (dp_mode='dp')")
    if not cfg.private:
        raise _refused(f"node refuses the run config: method={cfg.method!r} with epsilon={cfg.epsilon} "
                       "is not differentially private; a deployed node serves DP runs only")
    if policy.task is not None and cfg.task != policy.task:
        raise _refused(f"node refuses the run config: task={cfg.task!r}; this node serves "
                       f"task {policy.task!r} (node config task)")
    if dict(cfg.task_overrides) != dict(policy.task_options or {}):
        raise _refused("node refuses the run config: task_overrides must equal the node's task-options "
                       "(the operator decides which examples are private and how the task is built)")
    policy.check_config(cfg, float(noise_multiplier) if noise_multiplier is not None else float("inf"))
    return cfg
