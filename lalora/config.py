"""RunConfig: the one serialisable, validated config of a federated run.

Why one object: the run folder's name is a hash of the *resolved* config plus the package version
(`lalora.results.config_hash`), so two runs share a folder exactly when every setting that can
change a number is equal. Fields left as ``None`` are filled by :meth:`RunConfig.resolve` from the
task's experiment defaults (``Task.defaults``, same key names) and then from the fallbacks below;
only a resolved config is hashed and written to ``config.json``.

Validation raises ``ValueError`` naming the field. ``epsilon = inf`` means no clipping and no noise
(the non-DP reference); ``fedavg-lora`` is always non-private whatever ``epsilon`` says.
JSON stores infinity as the string "inf" (strict JSON).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from lalora.methods import METHODS, get_method
from lalora.privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT

# torch, lalora.lora and lalora.tasks are imported inside the functions that need them: heavy
# (torch; importing lalora.tasks registers every task) and a config must be cheap to build and check.

# Fallbacks for fields that neither the user nor the task set (the paper's vision setting, SPEC §4).
FALLBACKS: dict[str, Any] = {
    "rounds": 100,
    "local_steps": 20,
    "batch_size": 16,
    "clients": 8,
    "clients_per_round": 4,
    "lr": 0.1,
    "optimizer": "sgd",
    "momentum": 0.0,
    "weight_decay": 1e-3,
    "lr_decay": 0.99,
    "r": 16,
    "alpha": 16.0,
    "partition": "dirichlet-released",
    "beta": 0.1,
    "samples_per_client": None,
    "eval_every": 1,
    "eval_batch_size": 256,
}

OPTIMIZERS = ("sgd", "adamw")
PARTITIONS = ("dirichlet-released", "dirichlet-per-class", "iid")
CLIPPINGS = ("flat", "per_layer")
HEAD_POLICIES = ("train", "freeze")
OPTIMIZER_STATE_POLICIES = ("reset",)   # optimizer re-created every round (as the released code)
# "dp": per-sample clipping + accounted Gaussian noise (SPEC §3). "as-released": the authors' released
# step (lalora.privacy.dp_step.as_released_gradient), NOT differentially private; epsilon then only
# picks sigma (the sigma real DP would use at that epsilon) and no epsilon is claimed.
DP_MODES = ("dp", "as-released")
NOT_DP = "NOT differentially private"
PRECISIONS = ("fp32", "bf16")   # bf16: autocast forward, fp32 LoRA weights and per-sample gradients


def _parse_float(value: Any, name: str) -> float:
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "infinity", "+inf"):
            return math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class RunConfig:
    task: str
    method: str
    epsilon: float = 3.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    clipping: str = "flat"
    accountant: str = DEFAULT_ACCOUNTANT   # "prv" (tighter, Opacus' default) or "rdp"
    seed: int = 0
    # federation and local training (None -> task default -> FALLBACKS)
    rounds: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None
    clients: int | None = None
    clients_per_round: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_decay: float | None = None
    r: int | None = None
    alpha: float | None = None
    partition: str | None = None
    beta: float | None = None
    samples_per_client: int | None = None
    eval_every: int | None = None
    eval_batch_size: int | None = None
    # method knobs (None -> the method's default)
    filter: bool | None = None
    lr_B_ratio: float = 1.0
    alternation_period: int = 1
    weighted_aggregation: bool = False
    head: str = "train"
    optimizer_state: str = "reset"
    dp_mode: str = "dp"
    # extra keyword overrides passed to get_task (e.g. {"max_train_samples": 500})
    task_overrides: dict = field(default_factory=dict)
    # where and how the run computes: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N";
    # resolve() replaces "auto" by the device it picks, so the hash names the device type used
    device: str = "auto"
    precision: str = "fp32"
    # all sampled clients of a round through one backbone in lock-step (federated/batched.py);
    # False: one client after another (the reference; Flower serves clients one at a time)
    client_batching: bool = True

    # ------------------------------------------------------------------ construction / resolution
    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _parse_float(self.epsilon, "epsilon"))
        object.__setattr__(self, "task_overrides", dict(self.task_overrides or {}))
        self.validate()

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def resolve(self, task_defaults: dict | None = None) -> "RunConfig":
        """Fill every ``None`` field from the task defaults, then the fallbacks, then the method
        (``filter``). The result is what gets hashed and stored."""
        task_defaults = dict(task_defaults or {})
        changes: dict[str, Any] = {}
        for name, fallback in FALLBACKS.items():
            if getattr(self, name) is None:
                changes[name] = task_defaults.get(name, fallback)
        if (self.partition or changes.get("partition")) != "dirichlet-released":
            # samples_per_client is the released scheme's parameter; the others split every sample. The
            # task's default is dropped; one the caller set is an error (validate names it).
            changes["samples_per_client"] = self.samples_per_client
        if self.filter is None:
            changes["filter"] = get_method(self.method).filter_default
        changes["device"] = resolve_device(self.device, self.precision)
        cfg = dataclasses.replace(self, **changes)
        cfg.validate(resolved=True)
        return cfg

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, n) is not None for n in FALLBACKS if n != "samples_per_client") \
            and self.filter is not None

    @property
    def private(self) -> bool:
        """True when the run clips and noises (a private method and a finite epsilon)."""
        return get_method(self.method).private and math.isfinite(self.epsilon)

    # ------------------------------------------------------------------ validation
    def validate(self, resolved: bool = False) -> None:
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a non-empty string, got {self.task!r}")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choices: {', '.join(METHODS)}")
        if not (self.epsilon > 0):
            raise ValueError(f"epsilon must be > 0 (use inf for no DP), got {self.epsilon}")
        for name in ("delta", "clip_norm", "lr_B_ratio", "lr", "alpha", "beta", "weight_decay",
                     "momentum", "lr_decay"):
            _check_finite_number(name, getattr(self, name))
        if isinstance(self.seed, bool):
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        _choice(self.clipping, CLIPPINGS, "clipping")
        _choice(self.accountant, ACCOUNTANTS, "accountant")
        _choice(self.head, HEAD_POLICIES, "head")
        _choice(self.optimizer_state, OPTIMIZER_STATE_POLICIES, "optimizer_state")
        _choice(self.dp_mode, DP_MODES, "dp_mode")
        if self.dp_mode == "as-released" and not self.private:
            raise ValueError(f"dp_mode 'as-released' needs a private method and a finite epsilon "
                             f"(got method {self.method!r}, epsilon {self.epsilon})")
        _check_device_name(self.device)
        _choice(self.precision, PRECISIONS, "precision")
        if not isinstance(self.client_batching, bool):
            raise ValueError(f"client_batching must be true or false; got {self.client_batching!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not (self.lr_B_ratio > 0):
            raise ValueError(f"lr_B_ratio must be > 0, got {self.lr_B_ratio}")
        if not isinstance(self.alternation_period, int) or self.alternation_period < 1:
            raise ValueError(f"alternation_period must be an int >= 1, got {self.alternation_period!r}")
        for name in ("rounds", "local_steps", "batch_size", "clients", "clients_per_round",
                     "r", "eval_every", "eval_batch_size", "samples_per_client"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("lr", "alpha", "beta"):
            v = getattr(self, name)
            if v is not None and not (v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        for name in ("weight_decay", "momentum"):
            v = getattr(self, name)
            if v is not None and not (v >= 0):
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if self.lr_decay is not None and not (0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if self.optimizer is not None:
            _choice(self.optimizer, OPTIMIZERS, "optimizer")
        if self.partition is not None:
            _choice(self.partition, PARTITIONS, "partition")
            if self.samples_per_client is not None:
                from lalora.tasks.partition import check_samples_per_client

                check_samples_per_client(self.partition, self.samples_per_client, "partition")
        if self.clients is not None and self.clients_per_round is not None \
                and self.clients_per_round > self.clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be <= clients "
                             f"({self.clients})")
        if resolved and not self.is_resolved:
            missing = [n for n in FALLBACKS if getattr(self, n) is None and n != "samples_per_client"]
            raise ValueError(f"config is not resolved: {missing} still None")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["task_overrides"] = dict(self.task_overrides)
        if math.isinf(d["epsilon"]):
            d["epsilon"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s): {unknown}")
        return cls(**d)


_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_device_name(device: Any) -> None:
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


def resolve_device(device: str, precision: str = "fp32") -> str:
    """The device a run uses: "auto" -> "cuda" when CUDA is available, else "cpu". A CUDA device
    that is not there, or bf16 on a GPU without bf16 support, raises ValueError naming the field."""
    import torch

    _check_device_name(device)
    _choice(precision, PRECISIONS, "precision")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine; use device='cpu' "
                             "or 'auto'")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision='bf16' but {torch.cuda.get_device_name(index)} has no bf16 support; "
                             "use precision='fp32'")
    return device


def _check_finite_number(name: str, value: Any) -> None:
    """None (= task default) or a finite real number; bools and strings are refused by name."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


MAX_STEPS_PER_CLIENT = 100_000


def check_against_task(cfg: RunConfig, task) -> None:
    """Refuse a resolved ``cfg`` that cannot run on ``task``, before any expensive step.

    Why here and not at the first client step: the model's shapes only need the architecture
    (``Task.build_architecture``, milliseconds), while the first ``build_model()`` may pretrain a
    backbone for minutes. Checks the LoRA rank against every target layer and that the targets
    exist (``inject_lora`` on the bare architecture: the same one-line errors as a real run), the
    head, that no client is empty and the batch size against the private data (a partition is
    cheap: labels only).
    """
    import torch

    from lalora.lora import inject_lora
    from lalora.tasks import partition

    # A client sampled every round takes rounds x local_steps DP steps. The paper's longest schedule
    # is 100 x 20 = 2,000; past MAX_STEPS_PER_CLIENT σ grows past ~22 at ε = 3 (nothing trains) and
    # the PRV calibration alone takes minutes (lalora.announce.calibration_eta).
    if cfg.rounds * cfg.local_steps > MAX_STEPS_PER_CLIENT:
        raise ValueError(f"rounds x local_steps = {cfg.rounds} x {cfg.local_steps} = {cfg.rounds * cfg.local_steps} "
                         f"DP steps per client is more than any task here can use (at most "
                         f"{MAX_STEPS_PER_CLIENT:,}; the paper's runs take 2,000); lower --rounds or --local-steps")
    build = getattr(task, "build_architecture", None)
    if build is not None:
        with torch.random.fork_rng():   # the check must not move the run's random streams
            model = build()
            inject_lora(model, task.lora_targets, r=cfg.r, alpha=cfg.alpha, dropout=0.0)
        if task.head_name not in dict(model.named_modules()):
            raise ValueError(f"head {task.head_name!r} is not a module of the {task.name} model")
    sizes = [len(p) for p in partition(task.train_labels, cfg.clients, cfg.partition, cfg.beta,
                                       cfg.seed, cfg.samples_per_client)]
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise ValueError(f"clients {empty} have no training examples; change partition/beta/seed")
    # A client smaller than the batch samples at q = 1 (documented); a batch larger than the whole
    # private split is a mistake every client would make.
    if cfg.batch_size > sum(sizes):
        raise ValueError(f"batch_size must be <= the task's private training examples ({sum(sizes)}), "
                         f"got {cfg.batch_size}")
