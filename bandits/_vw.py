"""The layout bandit on Vowpal Wabbit's ``cb_explore_adf``: the only module that imports
``vowpal_wabbit_next`` (pinned to 0.7.0: its API is experimental).

Examples are built straight from arrays, without text: each feature's VW index is worked out once
(by parsing a template line with VW's own parser), then every call truncates and refills the feature
groups of a pool of reused examples with ``push_many_features``. Zero-valued features are skipped, as
VW's text and DSJSON parsers skip them, so a model trained here equals one trained by VW on the
DSJSON export (:mod:`bandits._dsjson`).
"""

from __future__ import annotations

import json
import numbers
import struct
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import vowpal_wabbit_next as vw

from ._dsjson import ACTION_NAMESPACE, SHARED_NAMESPACE

__all__ = ["ALGORITHMS", "VWLayoutBandit"]

ALGORITHMS: tuple[str, ...] = ("epsilon", "squarecb", "bag", "cover")
_MAGIC = b"HPVWB\x01"
_SHARED_LABEL = vw.CBLabel(shared=True)
_NO_LABEL = vw.CBLabel()
#: Decisions whose sparse features are extracted in one numpy pass (bounds the temporaries).
_CHUNK = 4096


def _r(x: object) -> str:
    """repr of a user value, numpy scalars shown as plain numbers."""
    return repr(x.item() if isinstance(x, np.generic) else x)


def _check_real(name: str, x: object, low: float, high: float, *, low_open: bool = False) -> float:
    v = float(x) if not isinstance(x, bool) and isinstance(x, numbers.Real) else float("nan")
    if not (np.isfinite(v) and (low < v if low_open else low <= v) and v <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}]; got {_r(x)}")
    return v


def _check_int(name: str, x: object, low: int, high: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not low <= int(x) <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {_r(x)}")
    return int(x)


class VWLayoutBandit:
    """Contextual bandit over candidate layouts: VW ``cb_explore_adf`` with one example per candidate.

    VW minimises cost; the engine passes ``cost = -(reward + prices . exposure)`` (the Lagrangian
    reward, negated). ``predict`` returns VW's exploration pmf, which the engine then fits to the
    exploration budget with :func:`bandits.budget_pmf` before sampling.

    Parameters
    ----------
    algorithm
        ``"squarecb"`` (SquareCB, Foster & Rakhlin 2020: inverse-gap weighting, ``gamma_scale``),
        ``"epsilon"`` (epsilon-greedy, ``epsilon``), ``"bag"`` (bootstrap Thompson-like bagging over
        ``bag`` policies, plus ``epsilon``), ``"cover"`` (online cover, Agarwal et al. 2014, ``cover``
        policies, plus ``epsilon``).
    epsilon
        In [0, 1]: uniform exploration for epsilon / bag / cover.
    gamma_scale
        > 0: SquareCB's exploration scale (larger = greedier).
    bag
        Number of bootstrapped policies (``bag``), >= 1.
    cover
        Number of cover policies (``cover``), >= 1.
    learning_rate
        > 0: VW's ``-l``.
    interactions
        VW ``--interactions`` over the namespaces ``s`` (shared) and ``a`` (candidate), e.g.
        ``("sa",)`` crosses every shared feature with every candidate feature.
    bits
        Hash table size ``2**bits`` (VW ``-b``), in [8, 28].
    seed
        VW ``--random_seed`` (bagging's bootstrap weights).

    Attributes
    ----------
    n_shared_features_, n_action_features_
        Widths fixed by the first ``predict``/``learn`` call (None before).
    n_learned_
        Decisions learned from.

    Notes
    -----
    Thread-safe: every call takes an internal lock (a VW workspace is not re-entrant); each gunicorn
    worker holds its own copy. VW computes in float32: features are cast to float32 and the pmf is
    renormalised in float64. ``save``/``load`` (and pickle) round-trip predictions exactly; learning
    further after ``load`` continues exactly for ``epsilon``/``squarecb``, while ``bag``/``cover``
    re-seed their bootstrap.

    References
    ----------
    D. Foster, A. Rakhlin. "Beyond UCB: optimal and efficient contextual bandits with regression
    oracles." ICML 2020. A. Agarwal et al. "Taming the monster: a fast and simple algorithm for
    contextual bandits." ICML 2014. A. Bietti, A. Agarwal, J. Langford. "A contextual bandit bake-off."
    JMLR 2021.

    Examples
    --------
    >>> b = VWLayoutBandit("epsilon", epsilon=0.2, seed=1)
    >>> b.predict(np.ones(3), np.eye(4)).tolist()  # nothing learned yet: all candidates tie
    [0.25, 0.25, 0.25, 0.25]
    >>> b.learn(np.ones(3), np.eye(4), chosen=2, cost=-1.0, pscore=0.25)
    >>> b.predict(np.ones(3), np.eye(4)).round(2).tolist()
    [0.05, 0.05, 0.85, 0.05]
    """

    def __init__(self, algorithm: str = "squarecb", *, epsilon: float = 0.05, gamma_scale: float = 10.0,
                 bag: int = 5, cover: int = 4, learning_rate: float = 0.5,
                 interactions: Sequence[str] = ("sa",), bits: int = 18, seed: int = 0) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
        self.algorithm = algorithm
        self.epsilon = _check_real("epsilon", epsilon, 0.0, 1.0)
        self.gamma_scale = _check_real("gamma_scale", gamma_scale, 0.0, 1e9, low_open=True)
        self.bag = _check_int("bag", bag, 1, 1000)
        self.cover = _check_int("cover", cover, 1, 1000)
        self.learning_rate = _check_real("learning_rate", learning_rate, 0.0, 1e6, low_open=True)
        if isinstance(interactions, str) or not all(
                isinstance(t, str) and len(t) >= 2 and set(t) <= {SHARED_NAMESPACE, ACTION_NAMESPACE}
                for t in interactions):
            raise ValueError(f"interactions must be a sequence of strings over 's' and 'a' of length >= 2 "
                             f"(e.g. ('sa',)); got {interactions!r}")
        self.interactions = tuple(interactions)
        self.bits = _check_int("bits", bits, 8, 28)
        self.seed = _check_int("seed", seed, 0, 2**31 - 1)
        self._ws = vw.Workspace(self._vw_args())
        self._reset_state()

    # -- construction ---------------------------------------------------------------------------
    def _vw_args(self) -> list[str]:
        args = ["--cb_explore_adf", "--quiet", "--random_seed", str(self.seed), "-b", str(self.bits),
                "-l", repr(self.learning_rate)]
        for t in self.interactions:
            args += ["--interactions", t]
        if self.algorithm == "epsilon":
            args += ["--epsilon", repr(self.epsilon)]
        elif self.algorithm == "squarecb":
            args += ["--squarecb", "--gamma_scale", repr(self.gamma_scale)]
        elif self.algorithm == "bag":
            args += ["--bag", str(self.bag), "--epsilon", repr(self.epsilon)]
        else:
            # cover trains its extra policies with DR whatever cb_type says; asking for dr for all
            # of them avoids VW's mixed-mode warning
            args += ["--cover", str(self.cover), "--epsilon", repr(self.epsilon), "--cb_type", "dr"]
        return args

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._core = self._ws._workspace  # see _predict_raw
        self._examples: list[Any] = []
        self._groups: list[Any] = []
        self._shared_idx = np.empty(0, dtype=np.uint64)
        self._action_idx = np.empty((0, 0), dtype=np.uint64)
        self.n_shared_features_: int | None = None
        self.n_action_features_: int | None = None
        self.n_learned_ = 0

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (``type(b)(**b.get_params())`` is an unfitted clone)."""
        return {"algorithm": self.algorithm, "epsilon": self.epsilon, "gamma_scale": self.gamma_scale,
                "bag": self.bag, "cover": self.cover, "learning_rate": self.learning_rate,
                "interactions": self.interactions, "bits": self.bits, "seed": self.seed}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"VWLayoutBandit({params})"

    def _feature_indices(self, namespace: str, d: int) -> np.ndarray:
        """VW's parser index of features ``0..d-1`` of a namespace (parsed once, then reused)."""
        if d == 0:
            return np.empty(0, dtype=np.uint64)
        parser = vw.TextFormatParser(self._ws)
        ex = parser.parse_line(f"|{namespace} " + " ".join(f"{j}:1" for j in range(d)))
        idx = np.asarray(ex[namespace].indices, dtype=np.uint64)
        if idx.shape != (d,):  # would mean VW merged names: never expected, but fail loudly
            raise RuntimeError(f"VW parsed {idx.size} features from {d} names in namespace {namespace!r}")
        return idx

    def _check_dims(self, d_s: int, d_a: int) -> None:
        if self.n_shared_features_ is None:
            self._shared_idx = self._feature_indices(SHARED_NAMESPACE, d_s)
            self._action_idx = self._feature_indices(ACTION_NAMESPACE, d_a)
            self.n_shared_features_, self.n_action_features_ = d_s, d_a
        elif (d_s, d_a) != (self.n_shared_features_, self.n_action_features_):
            raise ValueError(f"shared/actions must have {self.n_shared_features_}/{self.n_action_features_} "
                             f"features (fixed by the first call); got {d_s}/{d_a}")

    def _pool(self, n_cand: int) -> list[Any]:
        """Reused examples: [shared, action_0, ..., action_{n_cand-1}]."""
        while len(self._examples) < n_cand + 1:
            ex = vw.Example()._example
            first = not self._examples
            ex._set_label(_SHARED_LABEL if first else _NO_LABEL)
            self._groups.append(ex[ord(SHARED_NAMESPACE if first else ACTION_NAMESPACE)])
            self._examples.append(ex)
        return self._examples[: n_cand + 1]

    # -- array checks ---------------------------------------------------------------------------
    @staticmethod
    def _as_f32(name: str, x: object, ndim: int) -> np.ndarray:
        a = np.asarray(x)
        if a.ndim != ndim or a.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be a numeric array with {ndim} dimensions; got "
                             f"{a.dtype} array of shape {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite (and fit in float32); got non-finite entries")
        return a

    # -- filling examples -----------------------------------------------------------------------
    def _sparse(self, shared: np.ndarray, actions: np.ndarray, n_act: np.ndarray) -> tuple[Any, ...]:
        """Non-zero features of a batch, flat, with offsets: one numpy pass for the whole batch.

        Returns ``(s_idx, s_val, s_off, a_idx, a_val, a_off)``; decision ``i``'s shared features are
        ``s_*[s_off[i]:s_off[i+1]]`` and candidate ``j``'s are ``a_*[a_off[i*n_cand+j]:...]``.
        Padding candidates (``j >= n_act[i]``) come out empty.
        """
        ms = shared != 0
        s_idx = np.broadcast_to(self._shared_idx, shared.shape)[ms]
        s_off = np.concatenate([[0], np.cumsum(ms.sum(axis=1))]).tolist()
        ma = actions != 0
        if (n_act < actions.shape[1]).any():
            ma &= (np.arange(actions.shape[1])[None, :] < n_act[:, None])[:, :, None]
        a_idx = np.broadcast_to(self._action_idx, actions.shape)[ma]
        a_off = np.concatenate([[0], np.cumsum(ma.sum(axis=2).ravel())]).tolist()
        return s_idx, shared[ms], s_off, a_idx, actions[ma], a_off

    def _load(self, sp: tuple[Any, ...], i: int, n_cand: int, width: int) -> list[Any]:
        """Put decision ``i`` of a :meth:`_sparse` batch into the pooled examples. Caller holds the lock."""
        s_idx, s_val, s_off, a_idx, a_val, a_off = sp
        exs = self._pool(n_cand)
        groups = self._groups
        g = groups[0]
        g.truncate_to(0)
        lo, hi = s_off[i], s_off[i + 1]
        g.push_many_features(s_idx[lo:hi], s_val[lo:hi])
        base = i * width
        for j in range(n_cand):
            g = groups[j + 1]
            g.truncate_to(0)
            lo, hi = a_off[base + j], a_off[base + j + 1]
            g.push_many_features(a_idx[lo:hi], a_val[lo:hi])
        return exs

    def _to_pmf(self, pred: list[tuple[int, float]], n_cand: int) -> np.ndarray:
        pmf = np.zeros(n_cand)
        for j, p in pred:
            pmf[j] = p
        total = pmf.sum()
        if not total > 0:
            raise RuntimeError(f"VW returned a pmf with total mass {total!r}")
        return pmf / total

    def _predict_raw(self, exs: list[Any]) -> Any:
        # The pinned 0.7.0 Workspace.predict_one re-reads every example's label in Python to check its
        # type (~30 us for 17 examples); the labels here are set by this class, so call the bound
        # workspace directly.
        return self._core.predict_multi_ex_one(exs)

    def _learn_raw(self, exs: list[Any], chosen: int, cost: float, pscore: float) -> None:
        ex = exs[chosen + 1]
        # action id chosen+1 (1-based), as VW's DSJSON parser writes it
        ex._set_label(vw.CBLabel(label=(chosen + 1, cost, pscore)))
        try:
            self._core.learn_multi_ex_one(exs)
        finally:
            ex._set_label(_NO_LABEL)

    # -- public API -----------------------------------------------------------------------------
    def predict(self, shared: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Exploration pmf over the candidates.

        Parameters
        ----------
        shared
            Shape (d_s,): user context and category preferences.
        actions
            Shape (n_cand, d_a), n_cand >= 1: each candidate layout's features.

        Returns
        -------
        np.ndarray
            Shape (n_cand,), float64, sums to 1.
        """
        s = self._as_f32("shared", shared, 1)
        a = self._as_f32("actions", actions, 2)
        if a.shape[0] == 0:
            raise ValueError("actions must have at least one candidate row; got shape (0, d_a)")
        with self._lock:
            self._check_dims(s.shape[0], a.shape[1])
            sp = self._sparse(s[None], a[None], np.array([a.shape[0]]))
            pred = self._predict_raw(self._load(sp, 0, a.shape[0], a.shape[0]))
        return self._to_pmf(pred, a.shape[0])

    def predict_batch(self, shared: np.ndarray, actions: np.ndarray,
                      n_actions: np.ndarray | None = None) -> np.ndarray:
        """The pmf of many decisions (e.g. the target policy of a replay over logged candidates).

        Parameters
        ----------
        shared
            Shape (n_rounds, d_s).
        actions
            Shape (n_rounds, n_cand, d_a); rows past ``n_actions[i]`` are padding.
        n_actions
            Shape (n_rounds,) ints in [1, n_cand], or None (all rows real).

        Returns
        -------
        np.ndarray
            Shape (n_rounds, n_cand): pmfs, padded with 0.
        """
        s, a, n_act = self._check_batch(shared, actions, n_actions)
        out = np.zeros(a.shape[:2])
        with self._lock:
            self._check_dims(s.shape[1], a.shape[2])
            width = a.shape[1]
            for lo in range(0, s.shape[0], _CHUNK):
                hi = min(s.shape[0], lo + _CHUNK)
                sp = self._sparse(s[lo:hi], a[lo:hi], n_act[lo:hi])
                for i in range(hi - lo):
                    k = int(n_act[lo + i])
                    out[lo + i, :k] = self._to_pmf(self._predict_raw(self._load(sp, i, k, width)), k)
        return out

    def learn(self, shared: np.ndarray, actions: np.ndarray, chosen: int, cost: float,
              pscore: float) -> None:
        """Learn from one logged decision.

        Parameters
        ----------
        shared, actions
            As in :meth:`predict`, for the decision as it was made.
        chosen
            Index of the served candidate.
        cost
            ``-(reward + prices . exposure)``: VW minimises it.
        pscore
            In (0, 1]: the served candidate's logged propensity.
        """
        self.learn_batch(np.asarray(shared)[None], np.asarray(actions)[None], np.array([chosen]),
                         np.array([cost], dtype=np.float64), np.array([pscore], dtype=np.float64))

    def learn_batch(self, shared: np.ndarray, actions: np.ndarray, chosen: np.ndarray, cost: np.ndarray,
                    pscore: np.ndarray, n_actions: np.ndarray | None = None) -> None:
        """Learn from many logged decisions, in order.

        Parameters
        ----------
        shared
            Shape (n_rounds, d_s).
        actions
            Shape (n_rounds, n_cand, d_a); rows past ``n_actions[i]`` are padding.
        chosen
            Shape (n_rounds,) ints: the served candidate, ``< n_actions[i]``.
        cost
            Shape (n_rounds,), finite.
        pscore
            Shape (n_rounds,) in (0, 1].
        n_actions
            Shape (n_rounds,) ints in [1, n_cand], or None (all rows real).
        """
        s, a, n_act = self._check_batch(shared, actions, n_actions)
        n = s.shape[0]
        ch = np.asarray(chosen)
        if ch.shape != (n,) or ch.dtype.kind not in "iu":
            raise ValueError(f"chosen must be integers of shape ({n},); got {ch.dtype} {ch.shape}")
        if ((ch < 0) | (ch >= n_act)).any():
            bad = int(np.flatnonzero((ch < 0) | (ch >= n_act))[0])
            raise ValueError(f"chosen must be in [0, n_actions); got {int(ch[bad])} at row {bad} with "
                             f"{int(n_act[bad])} candidates")
        c = np.asarray(cost, dtype=np.float64)
        if c.shape != (n,) or not np.isfinite(c).all():
            raise ValueError(f"cost must be finite with shape ({n},); got shape {c.shape} "
                             f"with {int((~np.isfinite(c)).sum())} non-finite entries")
        p = np.asarray(pscore, dtype=np.float64)
        if p.shape != (n,):
            raise ValueError(f"pscore must have shape ({n},); got {p.shape}")
        if not ((p > 0) & (p <= 1)).all():
            bad = int(np.flatnonzero(~((p > 0) & (p <= 1)))[0])
            raise ValueError(f"pscore must be in (0, 1]; got {float(p[bad])!r} at row {bad}")
        ch_l, c_l, p_l, k_l = ch.tolist(), c.tolist(), p.tolist(), n_act.tolist()
        with self._lock:
            self._check_dims(s.shape[1], a.shape[2])
            width = a.shape[1]
            for lo in range(0, n, _CHUNK):
                hi = min(n, lo + _CHUNK)
                sp = self._sparse(s[lo:hi], a[lo:hi], n_act[lo:hi])
                for i in range(lo, hi):
                    self._learn_raw(self._load(sp, i - lo, k_l[i], width), ch_l[i], c_l[i], p_l[i])
            self.n_learned_ += n

    def learn_dsjson(self, lines: Iterable[str]) -> int:
        """Learn from DSJSON lines with VW's own parser (e.g. an exported log); returns the count.

        Lines must use this adapter's namespaces and feature names, as
        :func:`bandits.to_dsjson_line` writes them; unlabeled lines (no ``_label_cost``) are skipped.
        """
        parser = vw.DSJsonFormatParser(self._ws)
        count = 0
        with self._lock:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    exs = parser.parse_json(line)
                except RuntimeError as e:
                    raise ValueError(f"VW could not parse DSJSON line {count + 1}: {e}") from e
                # the workspace is always cb_explore_adf, so every label is a CBLabel
                if not any(isinstance(lbl := e.get_label(), vw.CBLabel) and lbl.label is not None
                           for e in exs[1:]):
                    continue
                self._core.learn_multi_ex_one([e._example for e in exs])
                count += 1
            self.n_learned_ += count
        return count

    def _check_batch(self, shared: object, actions: object,
                     n_actions: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self._as_f32("shared", shared, 2)
        a = self._as_f32("actions", actions, 3)
        if a.shape[0] != s.shape[0] or a.shape[1] == 0:
            raise ValueError(f"actions must have shape (n_rounds={s.shape[0]}, n_cand >= 1, d_a); got {a.shape}")
        if n_actions is None:
            n_act = np.full(s.shape[0], a.shape[1], dtype=np.int64)
        else:
            n_act = np.asarray(n_actions)
            if n_act.shape != (s.shape[0],) or n_act.dtype.kind not in "iu" \
                    or ((n_act < 1) | (n_act > a.shape[1])).any():
                raise ValueError(f"n_actions must be integers in [1, {a.shape[1]}] of shape ({s.shape[0]},); "
                                 f"got {n_actions!r}"[:300])
        return s, a, n_act

    # -- persistence ----------------------------------------------------------------------------
    def save(self) -> bytes:
        """Serialise parameters, widths and the VW model (no version: the registry assigns it)."""
        header = json.dumps({
            "params": {**self.get_params(), "interactions": list(self.interactions)},
            "n_shared_features_": self.n_shared_features_,
            "n_action_features_": self.n_action_features_,
            "n_learned_": self.n_learned_,
        }).encode()
        with self._lock:
            model = self._ws.serialize()
        return _MAGIC + struct.pack("<I", len(header)) + header + model

    @classmethod
    def load(cls, data: bytes) -> VWLayoutBandit:
        """Rebuild a bandit saved with :meth:`save`; it predicts exactly as the saved one did."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"data must be bytes from VWLayoutBandit.save(); got {type(data).__name__}")
        data = bytes(data)
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
            raise ValueError("data is not a VWLayoutBandit model (bad magic header)")
        (n,) = struct.unpack_from("<I", data, len(_MAGIC))
        start = len(_MAGIC) + 4
        try:
            header = json.loads(data[start:start + n])
            params = dict(header["params"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"data is not a VWLayoutBandit model (bad header: {e})") from e
        params["interactions"] = tuple(params["interactions"])
        obj = cls(**params)
        try:
            obj._ws = vw.Workspace(["--quiet"], model_data=data[start + n:])
        except Exception as e:  # VW raises its own error types for corrupt models
            raise ValueError(f"data is not a VWLayoutBandit model (VW could not load it: {e})") from e
        obj._reset_state()
        if header["n_shared_features_"] is not None:
            obj._check_dims(int(header["n_shared_features_"]), int(header["n_action_features_"]))
        obj.n_learned_ = int(header["n_learned_"])
        return obj

    def __getstate__(self) -> dict[str, bytes]:
        return {"model": self.save()}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        other = type(self).load(state["model"])
        self.__dict__.update(other.__dict__)
