"""Off-policy evaluation of slates (layouts: an item or module per slot), and a logistic reward model.

A slate log has, per round ``i`` and position ``k = 0..len_list-1``, the reward ``r_ik`` observed at
that position. The slate estimators differ in which importance weight multiplies ``r_ik``:

- :class:`SlateStandardIPS`: the whole slate's ``w_i = pi_e(s_i | x_i) / pi_b(s_i | x_i)``; unbiased
  whatever the reward structure, with the largest variance;
- :class:`SlateIndependentIPS` (IIPS): the position's marginal ``w_ik = pi_e(a_ik at k) / pi_b(a_ik at k)``;
  unbiased when ``r_ik`` depends only on the item at ``k``;
- :class:`SlateRewardInteractionIPS` (RIPS): the prefix's ``w_ik = pi_e(a_i0..a_ik) / pi_b(a_i0..a_ik)``;
  unbiased when ``r_ik`` depends on the items at positions ``0..k`` only (the cascade assumption).

:func:`slate_pscores` computes the three kinds of propensity from a distribution over explicit
candidate slates (how this engine logs its layouts: candidates, their pmf and the chosen one).
The estimators' inputs have shape ``(n_rounds, len_list)``: obp's long format (one row per slate
and position, sorted by slate id then position) reshapes to it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar, NamedTuple

import numpy as np

from ._num import is_real
from ._ope import Estimate, _as_1d, _check_alpha, _overlap, _r

__all__ = [
    "LogisticRewardModel",
    "SlateIndependentIPS",
    "SlatePscores",
    "SlateRewardInteractionIPS",
    "SlateStandardIPS",
    "slate_pscores",
]


class SlatePscores(NamedTuple):
    """The logged slate's propensities under one policy.

    ``slate (n,)``: of the whole slate; ``item_position (n, len_list)``: of the slate's item at each
    position (the position's marginal); ``cascade (n, len_list)``: of the slate's prefix up to each
    position.
    """

    slate: np.ndarray
    item_position: np.ndarray
    cascade: np.ndarray


def slate_pscores(pmf: np.ndarray, slot_items: np.ndarray, chosen: np.ndarray) -> SlatePscores:
    """Propensities of each round's chosen slate under a distribution over its candidate slates.

    Parameters
    ----------
    pmf
        Shape (n_rounds, n_cand): the policy over each round's candidate slates (0 on padding).
    slot_items
        Shape (n_rounds, n_cand, len_list): integer id of the item (module) in each slot of each candidate.
    chosen
        Shape (n_rounds,): index of the logged slate among the candidates.

    Examples
    --------
    >>> items = np.array([[[0, 1], [0, 2], [1, 0]]])  # three candidate slates of two slots
    >>> ps = slate_pscores(np.array([[0.5, 0.3, 0.2]]), items, np.array([0]))
    >>> ps.slate.tolist(), ps.item_position.round(6).tolist(), ps.cascade.round(6).tolist()
    ([0.5], [[0.8, 0.5]], [[0.8, 0.5]])
    """
    p = np.asarray(pmf, dtype=np.float64)
    items = np.asarray(slot_items)
    if p.ndim != 2:
        raise ValueError(f"pmf must have shape (n_rounds, n_cand); got {p.shape}")
    n, c = p.shape
    if items.ndim != 3 or items.shape[:2] != (n, c) or items.shape[2] == 0:
        raise ValueError(f"slot_items must have shape ({n}, {c}, len_list); got {items.shape}")
    if items.dtype.kind not in "iu":
        raise ValueError(f"slot_items must be integer item ids; got dtype {items.dtype}")
    ch = _as_1d("chosen", chosen, n)
    if ch.dtype.kind not in "iu" or (n and (ch.min() < 0 or ch.max() >= c)):
        raise ValueError(f"chosen must be integer indices in [0, {c}); got {ch.dtype} values in "
                         f"[{int(ch.min()) if n else 0}, {int(ch.max()) if n else 0}]")
    logged = items[np.arange(n), ch]  # (n, L)
    eq = items == logged[:, None, :]  # (n, C, L)
    prefix = np.logical_and.accumulate(eq, axis=2)
    return SlatePscores(slate=p[np.arange(n), ch], item_position=np.einsum("nc,ncl->nl", p, eq),
                        cascade=np.einsum("nc,ncl->nl", p, prefix))


def _check_pair(name: str, pscore: object, target: object, shape: tuple[int, ...]) -> np.ndarray:
    p = np.asarray(pscore, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    for nm, x in ((name, p), (f"target_{name}", t)):
        if x.shape != shape:
            raise ValueError(f"{nm} must have shape {shape}; got {x.shape}")
    if not ((p > 0) & (p <= 1)).all():
        i = tuple(int(j) for j in np.argwhere(~((p > 0) & (p <= 1)))[0])
        raise ValueError(f"{name} must be in (0, 1] at every position; got {float(p[i])!r} at (round, position) {i}")
    if not ((t >= 0) & (t <= 1)).all():
        i = tuple(int(j) for j in np.argwhere(~((t >= 0) & (t <= 1)))[0])
        raise ValueError(f"target_{name} must be in [0, 1] at every position; got {float(t[i])!r} at "
                         f"(round, position) {i}")
    return t / p


class _SlateEstimator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def _weights(self, pscore: object, target_pscore: object, shape: tuple[int, int]) -> np.ndarray:
        """(n, len_list) importance weights."""

    def estimate(self, reward: np.ndarray, pscore: np.ndarray, target_pscore: np.ndarray, *,
                 alpha: float = 0.05) -> Estimate:
        """``V = mean_i sum_k w_ik r_ik``; ``se`` from the per-round sums (see the class docstring).

        Parameters
        ----------
        reward
            Shape (n_rounds, len_list): the reward observed at each position.
        pscore, target_pscore
            The logging and target policies' propensities of the logged slate, of the kind the
            estimator uses (:func:`slate_pscores` computes all three).
        alpha
            Miscoverage of the normal CI, in (0, 1).

        Returns
        -------
        Estimate
            The overlap diagnostics are of the weights at every (round, position).
        """
        alpha = _check_alpha(alpha)
        r = np.asarray(reward, dtype=np.float64)
        if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] == 0:
            raise ValueError(f"reward must have shape (n_rounds >= 2, len_list); got {r.shape}")
        if not np.isfinite(r).all():
            raise ValueError("reward must be finite; got non-finite entries")
        n, L = r.shape
        w = self._weights(pscore, target_pscore, (n, L))
        psi = (w * r).sum(axis=1)
        value = float(psi.mean())
        se = float(psi.std(ddof=1)) / math.sqrt(n)
        z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
        return Estimate(estimator=self.name, value=value, se=se, ci_low=value - z * se, ci_high=value + z * se,
                        alpha=alpha, n_rounds=n, overlap=_overlap(w.reshape(-1)))


@dataclass(frozen=True, slots=True)
class SlateStandardIPS(_SlateEstimator):
    """Standard slate IPS: ``V = mean_i w_i sum_k r_ik``, ``w_i = pi_e(s_i) / pi_b(s_i)``.

    ``pscore`` and ``target_pscore`` have shape (n_rounds,): the whole slate's propensities.

    References
    ----------
    Y. Saito et al. "Open Bandit Dataset and Pipeline." NeurIPS 2021 Datasets and Benchmarks
    (``SlateStandardIPS``).
    """

    name: ClassVar[str] = "slate-IPS"

    def _weights(self, pscore: object, target_pscore: object, shape: tuple[int, int]) -> np.ndarray:
        w = _check_pair("pscore", pscore, target_pscore, shape[:1])
        return np.repeat(w[:, None], shape[1], axis=1)


@dataclass(frozen=True, slots=True)
class SlateIndependentIPS(_SlateEstimator):
    """Independent IPS: ``V = mean_i sum_k r_ik pi_e(a_ik at k) / pi_b(a_ik at k)``.

    ``pscore`` and ``target_pscore`` have shape (n_rounds, len_list): the item-position marginals.

    References
    ----------
    S. Li, Y. Abbasi-Yadkori, B. Kveton, S. Muthukrishnan, V. Vinay, Z. Wen. "Offline evaluation of
    ranking policies with click models." KDD 2018.
    """

    name: ClassVar[str] = "slate-IIPS"

    def _weights(self, pscore: object, target_pscore: object, shape: tuple[int, int]) -> np.ndarray:
        return _check_pair("pscore", pscore, target_pscore, shape)


@dataclass(frozen=True, slots=True)
class SlateRewardInteractionIPS(_SlateEstimator):
    """Reward-interaction IPS: ``V = mean_i sum_k r_ik pi_e(a_i0..a_ik) / pi_b(a_i0..a_ik)``.

    ``pscore`` and ``target_pscore`` have shape (n_rounds, len_list): the prefix (cascade) propensities.

    References
    ----------
    J. McInerney, B. Brost, P. Chandar, R. Mehrotra, B. Carterette. "Counterfactual evaluation of
    slate recommendations with sequential reward interactions." KDD 2020.
    """

    name: ClassVar[str] = "slate-RIPS"

    def _weights(self, pscore: object, target_pscore: object, shape: tuple[int, int]) -> np.ndarray:
        return _check_pair("pscore", pscore, target_pscore, shape)


# -- logistic reward model ------------------------------------------------------------------------
class LogisticRewardModel:
    """Logistic regression of a binary reward on the round's context and the action's features.

    ``P(r = 1 | x, a, k) = sigmoid(b + x @ beta_x + f_a @ beta_f + x @ W @ f_a + gamma_k)`` with context
    ``x`` (n_rounds, d_x), action features ``f_a`` (n_actions, d_f) and, with positions, an offset per
    position ``k`` (gamma_0 = 0). The ``(n, A, d)`` tensor of per-candidate features is never built:
    fitting uses the logged rows only and prediction is ``x @ W @ F.T``. L2 penalty ``alpha`` on every
    coefficient but the intercept; fitted by L-BFGS on the exact log-loss.

    Parameters
    ----------
    alpha
        L2 penalty, >= 0.
    interactions
        Include ``x @ W @ f_a`` (personalised action effects).

    Attributes
    ----------
    coef_ : np.ndarray
        All coefficients, ``[b, beta_x, beta_f, vec(W), gamma_1..]``.

    Examples
    --------
    >>> x = np.zeros((8, 1)); f = np.array([[0.0], [1.0]])
    >>> m = LogisticRewardModel(alpha=0.0, interactions=False).fit(
    ...     x, f, np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([1, 0, 0, 0, 1, 1, 1, 0]))
    >>> m.predict(x[:1], f).round(6).tolist()  # the click rates: action 0 1/4, action 1 3/4
    [[0.25, 0.75]]
    """

    def __init__(self, alpha: float = 1.0, interactions: bool = True) -> None:
        if not is_real(alpha) or not 0 <= float(alpha) < math.inf:
            raise ValueError(f"alpha must be a finite number >= 0; got {_r(alpha)}")
        self.alpha = float(alpha)
        self.interactions = bool(interactions)

    @staticmethod
    def _arrays(context: object, action_features: object) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(context, dtype=np.float64)
        f = np.asarray(action_features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"context must have shape (n_rounds, d_x); got {x.shape}")
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"action_features must have shape (n_actions, d_f); got {f.shape}")
        if not (np.isfinite(x).all() and np.isfinite(f).all()):
            raise ValueError("context and action_features must be finite; got non-finite entries")
        return x, f

    def _design(self, x: np.ndarray, fa: np.ndarray, pos: np.ndarray | None) -> np.ndarray:
        cols = [np.ones((x.shape[0], 1)), x, fa]
        if self.interactions:
            cols.append((x[:, :, None] * fa[:, None, :]).reshape(x.shape[0], -1))
        if self.len_list_ > 1:
            onehot = np.zeros((x.shape[0], self.len_list_ - 1))
            if pos is not None:
                rows = np.flatnonzero(pos > 0)
                onehot[rows, pos[rows] - 1] = 1.0
            cols.append(onehot)
        return np.concatenate(cols, axis=1)

    def fit(self, context: np.ndarray, action_features: np.ndarray, action: np.ndarray, reward: np.ndarray,
            position: np.ndarray | None = None, len_list: int | None = None) -> LogisticRewardModel:
        """Fit on the logged rows.

        Parameters
        ----------
        context
            Shape (n_rounds, d_x).
        action_features
            Shape (n_actions, d_f).
        action, reward
            Shape (n_rounds,): the logged action and its binary reward (0 or 1).
        position, len_list
            Shape (n_rounds,): the logged position in ``[0, len_list)`` (default ``len_list``:
            ``max(position) + 1``); None fits no position offsets.
        """
        from scipy.optimize import minimize
        from scipy.special import expit, log_expit

        x, f = self._arrays(context, action_features)
        n = x.shape[0]
        a = _as_1d("action", action, n)
        if a.dtype.kind not in "iu" or (n and (a.min() < 0 or a.max() >= f.shape[0])):
            raise ValueError(f"action must be integers in [0, n_actions={f.shape[0]}); got {a.dtype} values in "
                             f"[{int(a.min()) if n else 0}, {int(a.max()) if n else 0}]")
        r = _as_1d("reward", reward, n).astype(np.float64)
        if n < 1 or not np.isin(r, (0.0, 1.0)).all():
            bad = r[~np.isin(r, (0.0, 1.0))]
            raise ValueError(f"reward must be binary (0 or 1) with at least one round; got {bad[:3].tolist()} "
                             f"among {n} rounds (use RidgeRewardModel for real-valued rewards)")
        pos = None
        self.len_list_ = 1
        if position is not None:
            pos = _as_1d("position", position, n)
            if pos.dtype.kind not in "iu" or pos.min(initial=0) < 0:
                raise ValueError(f"position must be integers >= 0; got {pos.dtype} min {pos.min(initial=0)}")
            self.len_list_ = int(len_list) if len_list is not None else int(pos.max(initial=0)) + 1
            if pos.max(initial=0) >= self.len_list_:
                raise ValueError(f"position must be in [0, len_list={self.len_list_}); got max {int(pos.max())}")
        self.n_context_, self.n_features_ = x.shape[1], f.shape[1]
        z = self._design(x, f[a], pos)
        pen = np.full(z.shape[1], self.alpha)
        pen[0] = 0.0
        y = r

        def loss(c: np.ndarray) -> tuple[float, np.ndarray]:
            t = z @ c
            # -sum y log s(t) + (1 - y) log s(-t), stable for large |t|
            val = -float(y @ log_expit(t) + (1.0 - y) @ log_expit(-t)) + 0.5 * float(pen @ (c * c))
            return val, z.T @ (expit(t) - y) + pen * c

        res = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B",
                       options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
        self.coef_ = np.asarray(res.x)
        return self

    def predict(self, context: np.ndarray, action_features: np.ndarray) -> np.ndarray:
        """``P(r = 1)`` for every round and action: shape (n_rounds, n_actions), or with positions
        (n_rounds, n_actions, len_list) (obp's ``estimated_rewards_by_reg_model`` layout)."""
        from scipy.special import expit

        if not hasattr(self, "coef_"):
            raise ValueError("LogisticRewardModel is not fitted; call fit() first")
        x, f = self._arrays(context, action_features)
        if x.shape[1] != self.n_context_ or f.shape[1] != self.n_features_:
            raise ValueError(f"context and action_features must have {self.n_context_} and {self.n_features_} "
                             f"columns (as fitted); got {x.shape[1]} and {f.shape[1]}")
        dx, df = self.n_context_, self.n_features_
        c = self.coef_
        b, bx, bf = c[0], c[1:1 + dx], c[1 + dx:1 + dx + df]
        o = 1 + dx + df
        t = b + (x @ bx)[:, None] + (f @ bf)[None, :]
        if self.interactions:
            w = c[o:o + dx * df].reshape(dx, df)
            t = t + x @ w @ f.T
            o += dx * df
        if self.len_list_ == 1:
            return expit(t)
        gamma = np.concatenate([[0.0], c[o:o + self.len_list_ - 1]])
        return expit(t[:, :, None] + gamma[None, None, :])
