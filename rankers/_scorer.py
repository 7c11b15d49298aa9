"""Serving scorer: a trained :class:`Ranker`, event weights and the users' behaviour snapshot."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from ._data import UserHistory
from ._fast import FastRanker, UserSide
from ._model import Ranker, torch_threads
from ._train import task_weights_from_events

__all__ = ["RankerScorer", "UserSequences"]

_FORMAT = "homepage-ranker-scorer/1"


class UserSequences(NamedTuple):
    """One user's behaviour as the ranker reads it: model item rows, newest first, -1 padding.

    ``pos_items``, ``pos_types`` (``EVENT_TYPES`` codes), ``neg_items``: shape (seq_len,);
    ``activity``: shape (2,), ``log1p`` of the positive and skip counts.
    """

    pos_items: np.ndarray
    pos_types: np.ndarray
    neg_items: np.ndarray
    activity: np.ndarray


class RankerScorer:
    """Expected engagement units per examined impression from a trained ranker.

    ``units = sum_t P(task t) * w_t`` over ``TASKS`` with ``w`` = (play, full_play, collect, skip)
    weights from ``event_weights`` (see :func:`task_weights_from_events`; skip is negative).
    The users' last behaviour sequences (as of training) live inside the scorer, so serving needs
    no database read; an unknown user (index -1) gets the cold-start row and empty sequences.

    Parameters
    ----------
    model
        A trained :class:`Ranker` (from :func:`fit`).
    event_weights
        Mapping with ``play``, ``full_play``, ``skip`` and ``collect`` or ``favorite`` + ``share``.
    history
        :class:`UserHistory` with one row per user (``Examples.history``).
    debias
        True (default): the counterfactual score with the popularity (item-only) and activity
        (user-only) branches held at their reference values; False keeps them (the factual score).
    threads
        ``torch.set_num_threads`` while scoring (restored after each call).
    """

    def __init__(
        self,
        model: Ranker,
        event_weights: Mapping[str, float],
        history: UserHistory,
        *,
        debias: bool = True,
        threads: int = 1,
    ) -> None:
        if history.pos_items.shape[0] != model.n_users:
            raise ValueError(
                f"history must have one row per user ({model.n_users}); got {history.pos_items.shape[0]} rows"
            )
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1; got {threads!r}")
        self.model = model.eval()
        self.event_weights = {k: float(v) for k, v in event_weights.items()}
        self.history = history
        self.debias = bool(debias)
        self.threads = threads
        self._fast: FastRanker | None = None
        self._w = torch.tensor(task_weights_from_events(self.event_weights), dtype=torch.float32)
        # torch views of the snapshot; a cold row (index n_users) of padding for unknown users
        pad = np.full((1, history.seq_len), -1)
        self._pos_items = torch.from_numpy(np.concatenate([history.pos_items, pad]).astype(np.int64))
        self._pos_types = torch.from_numpy(np.concatenate([history.pos_types, pad]).astype(np.int64))
        self._neg_items = torch.from_numpy(np.concatenate([history.neg_items, pad]).astype(np.int64))
        act = np.log1p(np.stack([history.pos_count, history.neg_count], axis=1))
        self._activity = torch.from_numpy(np.concatenate([act, np.zeros((1, 2))]).astype(np.float32))
        # numpy views of the same rows for the serving path (no torch call per request)
        self._seq_np = (self._pos_items.numpy(), self._pos_types.numpy(), self._neg_items.numpy(),
                        np.concatenate([np.stack([history.pos_count, history.neg_count], axis=1),
                                        np.zeros((1, 2))]).astype(np.float64))

    @property
    def n_users(self) -> int:
        return self.model.n_users

    @property
    def n_items(self) -> int:
        return self.model.n_items

    @property
    def n_categories(self) -> int:
        return self.model.n_categories

    def _rows(self, user: np.ndarray) -> torch.Tensor:
        if user.size and (user.min() < -1 or user.max() >= self.n_users):
            raise ValueError(f"user_idx must be in [-1, {self.n_users}); got {user.min()}..{user.max()}")
        return torch.from_numpy(np.where(user < 0, self.n_users, user).astype(np.int64))

    def _items(self, item_idx: np.ndarray) -> torch.Tensor:
        item = np.asarray(item_idx)
        if item.ndim != 1:
            raise ValueError(f"item_idx must be 1-D; got shape {item.shape}")
        if item.size and (item.min() < 0 or item.max() >= self.n_items):
            raise ValueError(f"item_idx must be in [0, {self.n_items}); got {item.min()}..{item.max()}")
        return torch.from_numpy(item.astype(np.int64, copy=False))

    def _batch(self, rows: torch.Tensor, item: torch.Tensor | None) -> dict[str, torch.Tensor]:
        b = {
            "user": torch.where(rows == self.n_users, torch.full_like(rows, -1), rows),
            "pos_items": self._pos_items[rows],
            "pos_types": self._pos_types[rows],
            "neg_items": self._neg_items[rows],
            "activity": self._activity[rows],
        }
        if item is not None:
            b["item"] = item
        return b

    def probabilities(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        """Task probabilities (n, 4) in ``TASKS`` order for one user's candidates ``item_idx`` (n,)."""
        items = self._items(item_idx)
        rows = self._rows(np.array([int(user_idx)]))
        if items.shape[0] == 0:
            return np.zeros((0, 4))
        with torch_threads(self.threads), torch.inference_mode():
            out = self.model(self._batch(rows, items), branches=not self.debias, category=False)
            return self.model.probabilities(out, self.debias).double().numpy()

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        """Expected engagement units per examined impression, shape (n,), for one user's candidates
        (any mix of categories; each item goes to its category's ranker)."""
        items = self._items(item_idx)
        rows = self._rows(np.array([int(user_idx)]))
        if items.shape[0] == 0:
            return np.zeros(0)
        with torch_threads(self.threads), torch.inference_mode():
            out = self.model(self._batch(rows, items), branches=not self.debias, category=False)
            return (self.model.probabilities(out, self.debias) @ self._w).double().numpy()

    def score_pairs(self, user_idx: np.ndarray, item_idx: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Units for (user, item) pairs, shapes (n,) -> (n,): batched evaluation over many users."""
        users = np.asarray(user_idx, dtype=np.int64)
        items = self._items(item_idx)
        if users.shape != tuple(items.shape):
            raise ValueError(
                f"user_idx and item_idx must have the same shape; got {users.shape} and {tuple(items.shape)}"
            )
        rows = self._rows(users)
        out_units = np.empty(users.shape[0])
        with torch_threads(self.threads), torch.inference_mode():
            for s in range(0, users.shape[0], batch_size):
                batch = self._batch(rows[s : s + batch_size], items[s : s + batch_size])
                out = self.model(batch, branches=not self.debias, category=False)
                p = self.model.probabilities(out, self.debias)
                out_units[s : s + batch_size] = (p @ self._w).double().numpy()
        return out_units

    def category_preferences(self, user_idx: int) -> np.ndarray:
        """P(category | user) from the shared user tower, shape (n_categories,), sums to 1."""
        rows = self._rows(np.array([int(user_idx)]))
        with torch_threads(self.threads), torch.inference_mode():
            b = self._batch(rows, None)
            seq = self.model.user_tower.sequences(
                self.model.item_tower.embedding, b["pos_items"], b["pos_types"], b["neg_items"]
            )
            logits = self.model.category_head(self.model.user_tower.profile(b["user"], seq))
            return torch.softmax(logits, dim=1)[0].double().numpy()

    def top_categories(self, user_idx: int, n: int) -> np.ndarray:
        """The user's ``n`` most preferred categories, best first (ties: lower index), shape (n,)."""
        if not isinstance(n, int) or not 1 <= n <= self.n_categories:
            raise ValueError(f"n must be an int in [1, {self.n_categories}]; got {n!r}")
        return np.argsort(-self.category_preferences(user_idx), kind="stable")[:n]

    # -- serving: live sequences and the numpy fast path -------------------------------------------
    def fast(self) -> FastRanker:
        """The numpy evaluation of this scorer's model (built once, on first use)."""
        got = self._fast
        if got is None:
            got = self._fast = FastRanker(self.model, self._w.double().numpy(), debias=self.debias)
        return got

    def sequences(self, user_idx: int, live_pos_items: np.ndarray | None = None,
                  live_pos_types: np.ndarray | None = None, live_neg_items: np.ndarray | None = None,
                  live_counts: tuple[int, int] = (0, 0)) -> UserSequences:
        """The user's sequences at decision time: the live events (model item rows, newest first)
        ahead of the training snapshot, each sequence cut to ``seq_len``.

        Snapshot entries of an item that is also in the live sequence are dropped (the live entry is the
        newer one). A user unknown to the model (-1) has an empty snapshot, so the live events are the
        whole sequence. ``live_counts`` (positive, skip) events seen live add to the snapshot's counts.
        """
        user = int(user_idx)
        if not -1 <= user < self.n_users:
            raise ValueError(f"user_idx must be in [-1, {self.n_users}); got {user}")
        row = self.n_users if user < 0 else user
        L = self.history.seq_len
        pos_items, pos_types, neg_items, counts = self._seq_np
        snap_pi, snap_pt, snap_ni = pos_items[row], pos_types[row], neg_items[row]
        if live_pos_items is None and live_neg_items is None:
            return UserSequences(snap_pi, snap_pt, snap_ni, np.log1p(counts[row] + np.asarray(live_counts)))

        def merge(live: np.ndarray | None, live_t: np.ndarray | None, snap: np.ndarray, snap_t: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
            live = np.zeros(0, dtype=np.int64) if live is None else np.asarray(live, dtype=np.int64)
            if live.size and (live.min() < 0 or live.max() >= self.n_items):
                raise ValueError(f"live item rows must be in [0, {self.n_items}); got {live.min()}..{live.max()}")
            lt = np.zeros(live.size, dtype=np.int64) if live_t is None else np.asarray(live_t, dtype=np.int64)
            if lt.shape != live.shape:
                raise ValueError(f"live_pos_types must have one code per live item ({live.size}); got {lt.shape}")
            keep = (snap >= 0) & ~np.isin(snap, live)
            items = np.concatenate([live, snap[keep]])[:L]
            types = np.concatenate([lt, (snap_t if snap_t is not None else snap)[keep]])[:L]
            out_i, out_t = np.full(L, -1, dtype=np.int64), np.full(L, -1, dtype=np.int64)
            out_i[: items.size], out_t[: items.size] = items, types
            return out_i, out_t

        pi, pt = merge(live_pos_items, live_pos_types, snap_pi, snap_pt)
        ni, _ = merge(live_neg_items, None, snap_ni, None)
        return UserSequences(pi, pt, ni, np.log1p(counts[row] + np.asarray(live_counts, dtype=np.float64)))

    def _dtype(self) -> torch.dtype:
        pop: torch.Tensor = self.model.pop  # type: ignore[assignment]
        return pop.dtype

    def user_side(self, user_idx: int, seq: UserSequences | None = None) -> UserSide:
        """The fast path's user side for ``user_idx`` with ``seq`` (default: the training snapshot)."""
        s = self.sequences(user_idx) if seq is None else seq
        return self.fast().user_side(int(user_idx), s.pos_items, s.pos_types, s.neg_items, s.activity)

    def score_sequences(self, user_idx: int, item_idx: np.ndarray, seq: UserSequences) -> tuple[np.ndarray, np.ndarray]:
        """Units (n,) and category preferences (C,) from the torch model with explicit sequences (the
        reference the fast path is tested against)."""
        items = self._items(item_idx)
        rows = self._rows(np.array([int(user_idx)]))
        batch = {
            "user": torch.where(rows == self.n_users, torch.full_like(rows, -1), rows),
            "pos_items": torch.from_numpy(np.asarray(seq.pos_items, dtype=np.int64))[None],
            "pos_types": torch.from_numpy(np.asarray(seq.pos_types, dtype=np.int64))[None],
            "neg_items": torch.from_numpy(np.asarray(seq.neg_items, dtype=np.int64))[None],
            "activity": torch.from_numpy(np.asarray(seq.activity)).to(self._dtype())[None],
            "item": items,
        }
        with torch_threads(self.threads), torch.inference_mode():
            out = self.model(batch, branches=not self.debias, category=True)
            p = self.model.probabilities(out, self.debias)
            units = (p @ self._w.to(p.dtype)).double().numpy()
            prefs = torch.softmax(out.category, dim=1)[0].double().numpy()
        return units, prefs

    def save(self) -> bytes:
        """Serialise model, event weights, debias flag and history snapshot (torch format, tensors and
        plain values only, loadable with ``weights_only=True``)."""
        h = self.history
        payload = {
            "format": _FORMAT,
            "spec": self.model.spec,
            "state": self.model.state_dict(),
            "event_weights": self.event_weights,
            "debias": self.debias,
            "history": {
                "pos_items": torch.from_numpy(np.ascontiguousarray(h.pos_items)),
                "pos_types": torch.from_numpy(np.ascontiguousarray(h.pos_types)),
                "neg_items": torch.from_numpy(np.ascontiguousarray(h.neg_items)),
                "pos_count": torch.from_numpy(np.ascontiguousarray(h.pos_count)),
                "neg_count": torch.from_numpy(np.ascontiguousarray(h.neg_count)),
            },
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes, *, threads: int = 1) -> RankerScorer:
        """Inverse of :meth:`save`; scores are identical."""
        payload = torch.load(io.BytesIO(data), weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"data must be a saved RankerScorer ({_FORMAT}); got format {found!r}")
        model = Ranker.from_spec(payload["spec"], payload["state"])
        h = payload["history"]
        history = UserHistory(**{k: v.numpy() for k, v in h.items()})
        return cls(model, payload["event_weights"], history, debias=payload["debias"], threads=threads)
