"""Training: config, mini-batch Adam with early stopping on validation logloss, batched prediction.

Quiet: nothing is printed; an optional ``progress`` callback gets one call per epoch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ._data import TASKS, Examples, behaviour_grade, dense_item_features, standardize
from ._model import INTERACTIONS, Ranker, RankerOutput, task_bce, task_log_probs, to_numpy, torch_threads

__all__ = [
    "TrainConfig",
    "TrainHistory",
    "DEFAULT_EVENT_WEIGHTS",
    "build_model",
    "fit",
    "predict",
    "predict_categories",
    "task_weights_from_events",
]

#: The simulator's and the default config's event weights (engagement units per event).
DEFAULT_EVENT_WEIGHTS: Mapping[str, float] = {
    "play": 1.0,
    "full_play": 2.0,
    "favorite": 4.0,
    "share": 5.0,
    "skip": -0.5,
}


def task_weights_from_events(event_weights: Mapping[str, float]) -> np.ndarray:
    """Units per task probability, shape (4,) in ``TASKS`` order.

    ``play``, ``full_play`` and ``skip`` map one to one; ``collect`` takes ``event_weights["collect"]``
    when given, else ``(favorite + share) / 2`` (P(collect) = P(favorite or share)).
    """
    for key in ("play", "full_play", "skip"):
        if key not in event_weights:
            raise ValueError(f"event_weights must have key {key!r}; got keys {sorted(event_weights)!r}")
    if "collect" in event_weights:
        collect = float(event_weights["collect"])
    elif "favorite" in event_weights and "share" in event_weights:
        collect = (float(event_weights["favorite"]) + float(event_weights["share"])) / 2.0
    else:
        raise ValueError(
            f"event_weights must have 'collect' or both 'favorite' and 'share'; got keys {sorted(event_weights)!r}"
        )
    w = np.array(
        [
            float(event_weights["play"]),
            float(event_weights["full_play"]),
            collect,
            float(event_weights["skip"]),
        ]
    )
    if not np.isfinite(w).all():
        raise ValueError(f"event_weights must be finite; got {dict(event_weights)!r}")
    return w


@dataclass(frozen=True)
class TrainConfig:
    """Model size and training settings, checked once when built.

    Attributes
    ----------
    interaction
        ``"cin"`` (xDeepFM CIN), ``"cross"`` (DCN-v2 cross layers, cheaper) or ``"none"``.
    pairwise_weight
        Weight of the pairwise logistic term on the behaviour order (collect > full_play > play >
        no event > skip) between items of the same decision.
    branch_weight
        Weight of the item-only and user-only branches' own BCE losses (MACR's auxiliary losses).
    decorrelation_weight
        Weight of the squared in-batch regression slope of the main logits on the popularity
        features. Without it the main branch learns much of the popularity effect through item ids
        and priors, and removing the item-only branch at inference removes only part of it.
    category_weight
        Weight of the category-preference cross-entropy (rows with a play).
    user_dropout
        Probability of replacing a known user by the unknown row during training, so the cold-start
        row learns.
    threads
        ``torch.set_num_threads`` during training (restored after). 1 is fastest for these model sizes
        on a 2-core machine (see bench/ranker.py).
    """

    embed_dim: int = 16
    interaction: str = "cin"
    cin_layers: tuple[int, ...] = (16, 16)
    cross_layers: int = 2
    n_shared_experts: int = 2
    n_task_experts: int = 1
    expert_dim: int = 32
    tower_dim: int = 16
    debias_branches: bool = True
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_epochs: int = 20
    patience: int = 2
    min_delta: float = 1e-4
    pairwise_weight: float = 0.1
    branch_weight: float = 1.0
    decorrelation_weight: float = 1.0
    category_weight: float = 0.1
    user_dropout: float = 0.05
    event_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}; got {self.interaction!r}")
        for name in ("embed_dim", "expert_dim", "tower_dim", "batch_size", "max_epochs", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        for name in ("cross_layers", "n_shared_experts", "n_task_experts", "patience", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0; got {v!r}")
        if self.n_shared_experts + self.n_task_experts < 1:
            raise ValueError("n_shared_experts + n_task_experts must be >= 1; got 0")
        if not self.cin_layers or any(not isinstance(h, int) or h < 1 for h in self.cin_layers):
            raise ValueError(f"cin_layers must be a non-empty tuple of ints >= 1; got {self.cin_layers!r}")
        object.__setattr__(self, "cin_layers", tuple(self.cin_layers))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0; got {self.lr!r}")
        for name in (
            "weight_decay",
            "min_delta",
            "pairwise_weight",
            "branch_weight",
            "decorrelation_weight",
            "category_weight",
        ):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be >= 0; got {v!r}")
        if not 0.0 <= self.user_dropout < 1.0:
            raise ValueError(f"user_dropout must be in [0, 1); got {self.user_dropout!r}")
        task_weights_from_events(self.event_weights)
        object.__setattr__(self, "event_weights", dict(self.event_weights))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cin_layers"] = list(self.cin_layers)
        return d


@dataclass(frozen=True)
class TrainHistory:
    """What :func:`fit` did. Per-epoch tuples have one entry per epoch run."""

    train_loss: tuple[float, ...]
    valid_logloss: tuple[float, ...]
    best_epoch: int
    best_valid_logloss: float
    stopped_early: bool
    examples_per_s: float
    train_seconds: float
    n_params: int
    threads: int


def _pop_features(ex: Examples) -> np.ndarray:
    """Popularity inputs of the item-only branch, standardised: log1p(train impressions) and, when the
    catalog has it, log(1 + popularity / mean popularity). Shape (n_items, 1 or 2)."""
    assert ex.item_priors is not None
    cols = [ex.item_priors[:, -1]]
    if ex.popularity is not None:
        cols.append(np.log1p(ex.popularity / max(float(ex.popularity.mean()), 1e-12)))
    return standardize(np.stack(cols, axis=1))


def build_model(examples: Examples, config: TrainConfig) -> Ranker:
    """An untrained :class:`Ranker` sized for ``examples`` (which must carry item priors)."""
    if examples.item_priors is None:
        raise ValueError(
            "examples.item_priors must be set (use split_by_time or Examples.with_priors); got None"
        )
    torch.manual_seed(config.seed)
    return Ranker(
        n_users=examples.n_users,
        n_items=examples.n_items,
        n_categories=examples.n_categories,
        item_category=torch.from_numpy(examples.item_category),
        dense=torch.from_numpy(dense_item_features(examples)),
        pop=torch.from_numpy(_pop_features(examples)),
        embed_dim=config.embed_dim,
        interaction=config.interaction,
        cin_layers=config.cin_layers,
        cross_layers=config.cross_layers,
        n_shared_experts=config.n_shared_experts,
        n_task_experts=config.n_task_experts,
        expert_dim=config.expert_dim,
        tower_dim=config.tower_dim,
        debias_branches=config.debias_branches,
    )


class _Tensors:
    """Examples as torch tensors, gathered per batch."""

    def __init__(self, ex: Examples) -> None:
        self.user = torch.from_numpy(ex.user)
        self.item = torch.from_numpy(ex.item)
        self.pos_items = torch.from_numpy(ex.seq.pos_items)
        self.pos_types = torch.from_numpy(ex.seq.pos_types)
        self.neg_items = torch.from_numpy(ex.seq.neg_items)
        self.activity = torch.from_numpy(
            np.log1p(np.stack([ex.seq.pos_count, ex.seq.neg_count], axis=1)).astype(np.float32)
        )
        self.labels = torch.from_numpy(ex.labels)
        self.category = torch.from_numpy(ex.category)
        self.grade = torch.from_numpy(behaviour_grade(ex.labels))
        self.decision = torch.from_numpy(ex.decision)

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "user": self.user[idx],
            "item": self.item[idx],
            "pos_items": self.pos_items[idx],
            "pos_types": self.pos_types[idx],
            "neg_items": self.neg_items[idx],
            "activity": self.activity[idx],
        }


def _pairwise_loss(units: torch.Tensor, grade: torch.Tensor, decision: torch.Tensor) -> torch.Tensor:
    """Mean ``log(1 + exp(-(s_i - s_j)))`` over pairs of the same decision with grade_i > grade_j.

    Rows of one decision are contiguous in a batch (see ``_decision_order``), so each run of equal
    ``decision`` is padded into a (n_runs, K) matrix and compared as (n_runs, K, K): O(B K) work.
    """
    b = decision.shape[0]
    new_run = torch.ones(b, dtype=torch.bool)
    new_run[1:] = decision[1:] != decision[:-1]
    run = torch.cumsum(new_run.long(), 0) - 1
    starts = torch.nonzero(new_run).squeeze(1)
    pos = torch.arange(b) - starts[run]
    n_runs, k = int(starts.shape[0]), int(pos.max()) + 1
    if k < 2:
        return units.new_zeros(())
    s = units.new_zeros(n_runs, k).index_put((run, pos), units)
    g = torch.full((n_runs, k), -1, dtype=torch.long).index_put((run, pos), grade)
    pairs = (g.unsqueeze(2) > g.unsqueeze(1)) & (g.unsqueeze(1) >= 0)  # padding has grade -1
    n = pairs.sum()
    if int(n) == 0:
        return units.new_zeros(())
    diff = s.unsqueeze(2) - s.unsqueeze(1)
    return (F.softplus(-diff) * pairs).sum() / n


def _decorrelation(main: torch.Tensor, pop: torch.Tensor) -> torch.Tensor:
    """Sum over tasks t and popularity features k of the squared in-batch regression slope of
    ``main_t`` on ``pop_k``: ``(cov(main_t, pop_k) / var(pop_k))^2``.

    A slope, not a correlation: a correlation penalty is beaten by inflating the variance of the main
    logits (a few absurd logits make every correlation small), a slope is not.
    """
    a = main - main.mean(0)
    b = pop - pop.mean(0)
    cov = a.T @ b / main.shape[0]  # (T, K)
    return (cov / b.pow(2).mean(0).clamp_min(1e-6)).pow(2).sum()


def _decision_order(decision: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row order that shuffles decisions but keeps each decision's rows together (for the pairwise term)."""
    _, inv = np.unique(decision, return_inverse=True)
    perm = rng.permutation(int(inv.max()) + 1 if inv.size else 0)
    return np.argsort(perm[inv], kind="stable")


def _valid_logloss(model: Ranker, data: _Tensors, batch_size: int) -> float:
    total = 0.0
    n = data.item.shape[0]
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            out = model(data.batch(idx))
            total += float(task_bce(model.heads(out, debias=False), data.labels[idx], reduction="sum"))
    return total / max(n * len(TASKS), 1)


def fit(
    examples_train: Examples,
    examples_valid: Examples,
    config: TrainConfig | None = None,
    *,
    progress: Callable[[int, int, Mapping[str, float]], None] | None = None,
) -> tuple[Ranker, TrainHistory]:
    """Train a :class:`Ranker` with Adam; early stopping on validation logloss.

    Loss per batch (means over rows; ``BCE(y, h)`` is the cross-entropy of the task probabilities
    composed from head logits h by :func:`task_log_probs`):
    ``sum_t BCE(y_t, main + item + user)``
    ``+ branch_weight * sum_t [BCE(y_t, item) + BCE(y_t, user)]`` (MACR's branch losses: each branch
    alone must explain what it can),
    ``+ decorrelation_weight * sum_{t,k} slope_batch(main_t ~ pop_k)^2`` (the main score carries no
    linear popularity signal, so the popularity effect has to go through the item-only branch),
    ``+ pairwise_weight * pairwise(units)`` with ``units = sum_t w_t P_t`` (event weights),
    ``+ category_weight * CE(category of played item | user profile)``.
    The validation logloss is the mean BCE of the factual prediction over rows and tasks; the best
    epoch's weights are restored. Then the reference logits ``item_ref``/``user_ref`` (means of the
    branches over the training rows) are stored for the counterfactual score.

    Parameters
    ----------
    examples_train, examples_valid
        From :func:`split_by_time` (item priors attached).
    config
        :class:`TrainConfig`; defaults if None.
    progress
        Called after each epoch as ``progress(epoch, max_epochs, {"train_loss": .., "valid_logloss": ..})``.

    Returns
    -------
    (model in eval mode, :class:`TrainHistory`)
    """
    config = config or TrainConfig()
    if len(examples_train) == 0:
        raise ValueError("examples_train must have at least one row; got 0")
    if len(examples_valid) == 0:
        raise ValueError("examples_valid must have at least one row; got 0")
    if examples_train.item_priors is None:
        raise ValueError("examples_train.item_priors must be set (use split_by_time); got None")
    if examples_valid.item_priors is None or not np.array_equal(
        examples_valid.item_priors, examples_train.item_priors
    ):
        raise ValueError(
            "examples_valid.item_priors must equal examples_train.item_priors (from split_by_time)"
        )
    with torch_threads(config.threads):
        return _fit(examples_train, examples_valid, config, progress)


def _fit(
    train_ex: Examples,
    valid_ex: Examples,
    config: TrainConfig,
    progress: Callable[[int, int, Mapping[str, float]], None] | None,
) -> tuple[Ranker, TrainHistory]:
    rng = np.random.default_rng(config.seed)
    model = build_model(train_ex, config)
    train, valid = _Tensors(train_ex), _Tensors(valid_ex)
    unit_w = torch.tensor(task_weights_from_events(config.event_weights), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    n = len(train_ex)
    bs = config.batch_size
    cold = model.n_users
    best = math.inf
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, bad = 0, 0
    losses: list[float] = []
    vlosses: list[float] = []
    train_time = 0.0
    seen = 0
    stopped = False
    gen = torch.Generator().manual_seed(config.seed)
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.from_numpy(_decision_order(train_ex.decision, rng))
        t0 = time.perf_counter()
        total = 0.0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            batch = train.batch(idx)
            if config.user_dropout > 0:
                drop = torch.rand(idx.shape[0], generator=gen) < config.user_dropout
                batch["user"] = torch.where(drop, torch.full_like(batch["user"], cold), batch["user"])
            y = train.labels[idx]
            out: RankerOutput = model(batch)
            z = out.main + out.item + out.user
            loss = task_bce(z, y) * len(TASKS)
            if model.debias_branches and config.branch_weight > 0:
                aux = task_bce(out.item, y) + task_bce(out.user, y)
                loss = loss + config.branch_weight * aux * len(TASKS)
            if model.debias_branches and config.decorrelation_weight > 0:
                loss = loss + config.decorrelation_weight * _decorrelation(out.main, model.pop[batch["item"]])
            if config.pairwise_weight > 0:
                units = torch.exp(task_log_probs(z)[0]) @ unit_w
                loss = loss + config.pairwise_weight * _pairwise_loss(
                    units, train.grade[idx], train.decision[idx]
                )
            if config.category_weight > 0:
                played = y[:, 0] > 0.5
                if bool(played.any()):
                    ce = F.cross_entropy(out.category[played], train.category[idx][played])
                    loss = loss + config.category_weight * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.shape[0]
        train_time += time.perf_counter() - t0
        seen += n
        model.eval()
        vl = _valid_logloss(model, valid, 8192)
        losses.append(total / n)
        vlosses.append(vl)
        if vl < best - config.min_delta:
            best, best_epoch, bad = vl, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        if progress is not None:
            progress(epoch, config.max_epochs, {"train_loss": total / n, "valid_logloss": vl})
        if bad > config.patience:
            stopped = True
            break
    model.load_state_dict(best_state)
    model.eval()
    _set_references(model, train, 8192)
    history = TrainHistory(
        train_loss=tuple(losses),
        valid_logloss=tuple(vlosses),
        best_epoch=best_epoch,
        best_valid_logloss=best,
        stopped_early=stopped,
        examples_per_s=seen / max(train_time, 1e-9),
        train_seconds=train_time,
        n_params=sum(p.numel() for p in model.parameters()),
        threads=config.threads,
    )
    return model, history


def _set_references(model: Ranker, data: _Tensors, batch_size: int) -> None:
    """item_ref / user_ref = mean branch logits over the training rows (the counterfactual's reference)."""
    n = data.item.shape[0]
    item_sum = torch.zeros(model.n_tasks)
    user_sum = torch.zeros(model.n_tasks)
    with torch.inference_mode():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            out = model(data.batch(idx))
            item_sum += out.item.sum(0)
            user_sum += out.user.sum(0)
    model.item_ref.copy_(item_sum / n)
    model.user_ref.copy_(user_sum / n)


def predict(
    model: Ranker, examples: Examples, *, debias: bool = True, batch_size: int = 8192, threads: int = 1
) -> np.ndarray:
    """Task probabilities (n, 4) in ``TASKS`` order for each example.

    ``debias=True`` gives the counterfactual prediction (popularity/activity at reference),
    ``False`` the factual one (what the log will show).
    """
    return _predict(model, examples, debias=debias, batch_size=batch_size, threads=threads)[0]


def predict_categories(
    model: Ranker, examples: Examples, *, batch_size: int = 8192, threads: int = 1
) -> np.ndarray:
    """P(category | user's behaviour at decision time), shape (n, n_categories)."""
    return _predict(model, examples, debias=True, batch_size=batch_size, threads=threads)[1]


def _predict(
    model: Ranker, examples: Examples, *, debias: bool, batch_size: int, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    data = _Tensors(examples)
    n = len(examples)
    probs = np.empty((n, model.n_tasks), dtype=np.float64)
    cats = np.empty((n, model.n_categories), dtype=np.float64)
    was_training = model.training
    model.eval()
    with torch_threads(threads), torch.inference_mode():
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(s + batch_size, n))
            out = model(data.batch(idx))
            probs[s : s + idx.shape[0]] = to_numpy(model.probabilities(out, debias))
            cats[s : s + idx.shape[0]] = to_numpy(torch.softmax(out.category, dim=1))
    model.train(was_training)
    return probs, cats
