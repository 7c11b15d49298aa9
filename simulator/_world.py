"""A seeded synthetic homepage world with known ground truth.

Users have latent tastes, per-category affinities and an activity level; items have a category, a
Zipf popularity, a latent quality and a few observable features. A user who examines an item plays
it with probability

    P(play | examined) = sigmoid(bias_c + taste_u . taste_i + affinity_u[c] + quality_i + conformity * z_i)

where ``z_i`` is the item's standardised log popularity within its category (clipped to [-3, 3]): the
popularity conformity bias that rankers must learn to remove. ``true_preference`` is the same logit
without the conformity term. Given a play, full play, favourite and share follow with probabilities
that rise with the true preference; an examined item that is not played is skipped with probability
``skip_rate``. Examination is a cascade-free position model: slot s is examined with probability
``slot_examination[s]`` and, given that, the item in position j with probability ``item_examination[j]``.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

from ._config import config_toml, modules_for
from ._oracle import assign_blocks, top_sorted

__all__ = [
    "CATEGORIES",
    "EVENT_TYPES",
    "FEEDBACK_TYPES",
    "DEFAULT_EVENT_WEIGHTS",
    "DEFAULT_SLOT_EXAMINATION",
    "ITEM_FEATURE_NAMES",
    "Feedback",
    "World",
    "make_world",
]

CATEGORIES: tuple[str, ...] = ("songs", "videos", "audio", "live")
EVENT_TYPES: tuple[str, ...] = ("play", "full_play", "favorite", "share", "skip")
FEEDBACK_TYPES: tuple[str, ...] = ("impression", *EVENT_TYPES)
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "play": 1.0, "full_play": 2.0, "favorite": 4.0, "share": 5.0, "skip": -0.5,
}
DEFAULT_SLOT_EXAMINATION: tuple[float, ...] = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3)
ITEM_FEATURE_NAMES: tuple[str, ...] = ("duration_min", "age_days", "rating")


@dataclass(frozen=True)
class _CategoryDefaults:
    item_share: float  # share of the catalog
    value: float  # money per engagement unit
    bias: float  # click logit intercept
    never: float  # share of users who never engage with the category
    fan: float  # share of users who love it
    duration_min: float  # median item duration (minutes)


# Live is worth the most per unit but half the users never watch it: the allocation is interesting.
_DEFAULTS: dict[str, _CategoryDefaults] = {
    "songs": _CategoryDefaults(0.45, 1.0, -4.1, 0.03, 0.25, 3.5),
    "videos": _CategoryDefaults(0.25, 1.4, -4.5, 0.15, 0.20, 6.0),
    "audio": _CategoryDefaults(0.20, 1.2, -4.7, 0.35, 0.15, 35.0),
    "live": _CategoryDefaults(0.10, 2.0, -5.2, 0.55, 0.12, 60.0),
}
_GENERIC = _CategoryDefaults(0.25, 1.0, -4.5, 0.20, 0.20, 5.0)

_NEVER_AFFINITY = -6.0  # makes plays all but impossible
_FAN_BOOST = 1.5
_Z_CLIP = 3.0
_FOLLOWUP_INTERCEPT = (0.0, -2.5, -4.0)  # full_play, favorite, share | play, at true preference 0
_FOLLOWUP_SLOPE = 0.5


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| only: no overflow warning (the suite turns warnings into errors) and full relative
    # precision for tiny probabilities
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    num = np.where(x >= 0, 1.0, e)
    e += 1.0
    num /= e
    return num


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@dataclass(frozen=True)
class Feedback:
    """Sampled feedback of a batch of impressions, one row per event, ordered by
    (row, slot, position, event type in ``FEEDBACK_TYPES`` order).

    Attributes
    ----------
    row : (n_events,) int64
        Index into the batch's ``user_idx``.
    slot : (n_events,) int64
    position : (n_events,) int64
        Position j of the item inside its module.
    item_idx : (n_events,) int64
    event : (n_events,) str
        One of ``FEEDBACK_TYPES``; every examined item has exactly one ``"impression"``.
    """

    row: np.ndarray
    slot: np.ndarray
    position: np.ndarray
    item_idx: np.ndarray
    event: np.ndarray


@dataclass(frozen=True, eq=False)
class World:
    """A synthetic homepage world; build it with :func:`make_world`.

    All arrays are read-only. Shapes: ``item_*`` (n_items, ...), ``user_*`` (n_users, ...),
    ``slot_examination`` (n_slots,), ``item_examination`` (items_per_module,), ``category_*``
    (n_categories,).

    Attributes
    ----------
    categories
        Category names, in config order.
    item_ids, item_category, popularity, item_features, item_feature_names
        The catalog. ``popularity`` is Zipf within each category (plays in a period, >= 0).
    user_ids, user_taste, user_affinity, user_activity
        Users: latent taste (n_users, d), per-category affinity logit (n_users, n_categories) and
        traffic share (n_users,), summing to 1.
    item_taste, item_quality, popularity_z, full_play_offset
        Latent item parameters of the click model: taste (n_items, d), quality logit, standardised
        log popularity (the conformity covariate) and a duration effect on full plays.
    conformity
        Weight of ``popularity_z`` in the click logit (>= 0).
    slot_examination, item_examination
        Examination probabilities of slots and of positions within a module.
    category_value
        Money per engagement unit.
    event_weight_values
        Engagement units of ``EVENT_TYPES`` (see ``event_weights``).
    category_bias, followup_intercept, followup_slope, skip_rate
        Click intercepts per category; full_play/favorite/share given play are
        ``sigmoid(followup_intercept[k] + followup_slope * true_preference (+ full_play_offset))``;
        skip given no play has probability ``skip_rate``.
    """

    categories: tuple[str, ...]
    item_ids: np.ndarray
    item_category: np.ndarray
    popularity: np.ndarray
    item_features: np.ndarray
    item_feature_names: tuple[str, ...]
    user_ids: np.ndarray
    user_taste: np.ndarray
    item_taste: np.ndarray
    user_affinity: np.ndarray
    user_activity: np.ndarray
    conformity: float
    slot_examination: np.ndarray
    item_examination: np.ndarray
    category_value: np.ndarray
    event_weight_values: np.ndarray
    category_bias: np.ndarray
    item_quality: np.ndarray
    popularity_z: np.ndarray
    full_play_offset: np.ndarray
    followup_intercept: np.ndarray
    followup_slope: float
    skip_rate: float

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                object.__setattr__(self, f.name, _frozen(v))
        n_items, n_users, n_cat = self.item_ids.shape[0], self.user_ids.shape[0], len(self.categories)
        expected = {
            "item_category": (n_items,), "popularity": (n_items,), "item_quality": (n_items,),
            "popularity_z": (n_items,), "full_play_offset": (n_items,),
            "item_features": (n_items, len(self.item_feature_names)),
            "item_taste": (n_items, self.user_taste.shape[1]),
            "user_affinity": (n_users, n_cat), "user_activity": (n_users,),
            "category_value": (n_cat,), "category_bias": (n_cat,),
            "event_weight_values": (len(EVENT_TYPES),), "followup_intercept": (3,),
        }
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"{name} must have shape {shape}; got {got}")

    # ---- sizes ----------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_slots(self) -> int:
        return int(self.slot_examination.shape[0])

    @property
    def items_per_module(self) -> int:
        return int(self.item_examination.shape[0])

    @property
    def event_weights(self) -> dict[str, float]:
        """Engagement units per event (a fresh dict; the world itself is immutable)."""
        return {e: float(w) for e, w in zip(EVENT_TYPES, self.event_weight_values, strict=True)}

    @cached_property
    def category_items(self) -> tuple[np.ndarray, ...]:
        """Item indices of each category, ascending (read-only arrays)."""
        return tuple(_frozen(np.flatnonzero(self.item_category == c)) for c in range(self.n_categories))

    @property
    def default_modules_per_category(self) -> np.ndarray:
        """Shape (n_categories,): modules per category in :meth:`default_config_toml`."""
        counts = [sum(1 for _, c in modules_for(self.categories) if c == name) for name in self.categories]
        return np.array(counts, dtype=np.int64)

    # ---- the click and engagement model ---------------------------------------------------------
    def true_preference(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """True preference logit of (user, item) pairs: the click logit without conformity.

        ``t = bias_c + taste_u . taste_i + affinity_u[c] + quality_i``, with ``c`` the item's category.

        Parameters
        ----------
        user_idx, item_idx
            Int arrays broadcastable to one shape (n,).

        Returns
        -------
        (n,) float64
        """
        u, i = self._pairs(user_idx, item_idx)
        return self._true_logit(u, i)

    def event_probs(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """P(event | examined) of (user, item) pairs, columns in ``EVENT_TYPES`` order.

        With ``p = sigmoid(t + conformity * z_i)`` (t the true preference), ``q_k = sigmoid(a_k +
        b t (+ full_play_offset_i for full_play))``: play = p, full_play = p q_0, favorite = p q_1,
        share = p q_2, skip = skip_rate (1 - p).

        Parameters
        ----------
        user_idx, item_idx
            Int arrays broadcastable to one shape (n,).

        Returns
        -------
        (n, 5) float64
        """
        u, i = self._pairs(user_idx, item_idx)
        t = self._true_logit(u, i)
        return np.stack(self._probs(t, i), axis=-1)

    def expected_units(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Expected engagement units per examined impression, ``event_probs @ event_weight_values``.

        Returns
        -------
        (n,) float64
        """
        return self.event_probs(user_idx, item_idx) @ self.event_weight_values

    def expected_units_matrix(self, user_idx: np.ndarray) -> np.ndarray:
        """Expected units per examined impression of every item for each user (the ideal scorer).

        Parameters
        ----------
        user_idx
            Shape (n,) int.

        Returns
        -------
        (n, n_items) float64
        """
        u = self._users(user_idx)
        return self._units_matrix(u)

    def true_preference_matrix(self, user_idx: np.ndarray) -> np.ndarray:
        """True preference logit of every item for each user, shape (n, n_items)."""
        u = self._users(user_idx)
        return self._true_matrix(u)

    # ---- layouts --------------------------------------------------------------------------------
    def expected_reward(self, user_idx: int, slot_items: np.ndarray) -> float:
        """Expected money of one page for one user under the true model.

        ``sum_s slot_examination[s] sum_j item_examination[j] expected_units(u, i_sj) category_value[c(i_sj)]``
        over the non-empty entries.

        Parameters
        ----------
        user_idx
            A user index.
        slot_items
            Shape (n_slots, items_per_module) int, -1 = empty.
        """
        u = self._user(user_idx)
        items = self._slot_items(slot_items, batch=False)
        return float(self._reward(np.array([u]), items[None])[0])

    def expected_reward_batch(self, user_idx: np.ndarray, slot_items: np.ndarray) -> np.ndarray:
        """:meth:`expected_reward` for n (user, page) pairs at once.

        Parameters
        ----------
        user_idx
            Shape (n,) int.
        slot_items
            Shape (n, n_slots, items_per_module) int, -1 = empty.

        Returns
        -------
        (n,) float64
        """
        u = self._users(user_idx)
        items = self._slot_items(slot_items, batch=True)
        if items.shape[0] != u.shape[0]:
            raise ValueError(f"slot_items must have one page per user ({u.shape[0]}); got {items.shape[0]}")
        return self._reward(u, items)

    def sample_feedback(self, user_idx: int, slot_items: np.ndarray, rng: np.random.Generator
                        ) -> list[tuple[int, int, str]]:
        """Sample what one user does on one page.

        Slot s is examined with probability ``slot_examination[s]``; given that, position j with
        ``item_examination[j]``. Every examined item yields ``"impression"``, then its behaviours drawn
        as in :meth:`event_probs` (play; given play, full_play / favorite / share independently;
        given no play, skip), so the expected units of the sample equal the expected reward's.

        Returns
        -------
        list of (slot, item_idx, event_type)
        """
        u = self._user(user_idx)
        items = self._slot_items(slot_items, batch=False)
        fb = self._sample(np.array([u]), items[None], rng)
        return [(int(s), int(i), str(e)) for s, i, e in zip(fb.slot, fb.item_idx, fb.event, strict=True)]

    def sample_feedback_batch(self, user_idx: np.ndarray, slot_items: np.ndarray,
                              rng: np.random.Generator) -> Feedback:
        """:meth:`sample_feedback` for n (user, page) pairs at once, as flat event arrays.

        Parameters
        ----------
        user_idx
            Shape (n,) int.
        slot_items
            Shape (n, n_slots, items_per_module) int, -1 = empty.
        rng
            Source of randomness.
        """
        u = self._users(user_idx)
        items = self._slot_items(slot_items, batch=True)
        if items.shape[0] != u.shape[0]:
            raise ValueError(f"slot_items must have one page per user ({u.shape[0]}); got {items.shape[0]}")
        return self._sample(u, items, rng)

    def oracle(self, user_idx: int, modules_per_category: np.ndarray) -> tuple[np.ndarray, float]:
        """Best page for one user under the true model (no operator constraints).

        Items of each category are ordered by true expected units (ties: item index); the r-th module
        of category c on the page shows ranks ``[r*K, (r+1)*K)`` (a block). Block values
        ``B(c, r) = category_value[c] sum_j item_examination[j] units(block item j)`` are assigned to
        slots to maximise ``sum_s slot_examination[s] B(c_s, r_s)`` with at most
        ``modules_per_category[c]`` modules of c: by rearrangement (largest block in the most examined
        slot) when block values fall with r, else by an exact dynamic programme. Blocks with no item
        (a category with fewer than ``r*K + 1`` items) are never shown; if fewer than ``n_slots``
        blocks exist, the remaining slots are empty (-1).

        Parameters
        ----------
        user_idx
            A user index.
        modules_per_category
            Shape (n_categories,) int >= 0.

        Returns
        -------
        slot_items : (n_slots, items_per_module) int64, -1 = empty
        value : float
            ``expected_reward(user_idx, slot_items)``.
        """
        u = self._user(user_idx)
        items, value = self.oracle_batch(np.array([u]), modules_per_category)
        return items[0], float(value[0])

    def oracle_batch(self, user_idx: np.ndarray, modules_per_category: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`oracle` for n users at once.

        Returns
        -------
        slot_items : (n, n_slots, items_per_module) int64
        value : (n,) float64
        """
        u = self._users(user_idx)
        mpc = self._modules_per_category(modules_per_category)
        n, S, K, C = u.shape[0], self.n_slots, self.items_per_module, self.n_categories
        sizes = np.array([c.size for c in self.category_items], dtype=np.int64)
        n_blocks = np.minimum(mpc, -(-sizes // K))
        n_r = max(int(n_blocks.max()), 1)
        slot_items = np.full((n, S, K), -1, dtype=np.int64)
        value = np.zeros(n, dtype=np.float64)
        e = self.item_examination
        for lo in range(0, n, _CHUNK):
            uc = u[lo:lo + _CHUNK]
            m = uc.shape[0]
            rows = np.arange(m)[:, None]
            units = self._units_matrix(uc)
            b_items = np.full((m, C, n_r, K), -1, dtype=np.int64)
            b_value = np.zeros((m, C, n_r), dtype=np.float64)
            for c in range(C):
                n_top = min(int(n_blocks[c]) * K, int(sizes[c]))
                if n_top == 0:
                    continue
                cols = self.category_items[c]
                top = cols[top_sorted(units[:, cols], n_top)]  # (m, n_top) item indices
                pad = int(n_blocks[c]) * K - n_top
                flat_items = np.concatenate([top, np.full((m, pad), -1, dtype=np.int64)], axis=1)
                flat_units = np.concatenate([units[rows, top], np.zeros((m, pad))], axis=1)
                kb = int(n_blocks[c])
                b_items[:, c, :kb] = flat_items.reshape(m, kb, K)
                b_value[:, c, :kb] = self.category_value[c] * (flat_units.reshape(m, kb, K) @ e)
            cat, blk = assign_blocks(b_value, n_blocks, self.slot_examination)
            shown = cat >= 0
            cs, bs = np.where(shown, cat, 0), np.where(shown, blk, 0)
            chosen = b_items[rows, cs, bs]  # (m, S, K)
            slot_items[lo:lo + m] = np.where(shown[:, :, None], chosen, -1)
            value[lo:lo + m] = (np.where(shown, b_value[rows, cs, bs], 0.0) * self.slot_examination).sum(1)
        return slot_items, value

    # ---- traffic and export ---------------------------------------------------------------------
    def sample_users(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw n requests' users, with replacement, in proportion to ``user_activity``.

        Returns
        -------
        (n,) int64
        """
        n = _check_int("n", n, low=0)
        _check_rng(rng)
        return rng.choice(self.n_users, size=n, p=self.user_activity).astype(np.int64)

    def to_catalog_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the catalog as ``item_id,category,popularity,<item_feature_names...>`` (one row per item)."""
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["item_id", "category", "popularity", *self.item_feature_names])
            for k in range(self.n_items):
                w.writerow([str(self.item_ids[k]), self.categories[int(self.item_category[k])],
                            repr(float(self.popularity[k])),
                            *(repr(float(x)) for x in self.item_features[k])])

    def default_config_toml(self) -> str:
        """A valid ``homepage.toml`` for this world.

        Slots and position weights = ``slot_examination``, one ``[[categories]]`` per category with
        ``value_per_engagement = category_value``, several modules per category, ``[events]`` = the
        event weights, tilt levels from 0 (no tilt) up, with head share 0.8, a live floor
        (``category_share`` of live >= 0.10, when the world has live) and a long-tail floor
        (``long_tail_share`` >= 0.25), and an exploration budget of 0.05.
        """
        return config_toml(self.categories, [float(v) for v in self.category_value],
                           [float(w) for w in self.slot_examination], self.items_per_module,
                           self.event_weights)

    # ---- internals ------------------------------------------------------------------------------
    # The pair and matrix paths add the same terms in the same order, element by element, so a user's
    # scores do not depend on the batch they are computed in (BLAS kernels differ with the shape);
    # the oracle's choice among exactly tied pages is then the same in oracle() and oracle_batch().
    def _true_logit(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        c = self.item_category[i]
        ut, it = self.user_taste[u], self.item_taste[i]
        t = ut[:, 0] * it[:, 0]
        for k in range(1, ut.shape[1]):
            t += ut[:, k] * it[:, k]
        t += self.user_affinity[u, c]
        t += self.category_bias[c] + self.item_quality[i]
        return t

    def _true_matrix(self, u: np.ndarray) -> np.ndarray:
        out = np.empty((u.shape[0], self.n_items), dtype=np.float64)
        for lo, t in self._true_blocks(u):
            out[lo:lo + t.shape[0]] = t
        return out

    def _true_blocks(self, u: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first row, true logits of a block of rows): ~1 MB blocks keep the work in cache."""
        c = self.item_category
        item_term = self.category_bias[c] + self.item_quality
        it = self.item_taste
        step = max(1, 131072 // max(self.n_items, 1))
        for lo in range(0, u.shape[0], step):
            ub = u[lo:lo + step]
            ut = self.user_taste[ub]
            t = ut[:, :1] * it[:, 0]
            for k in range(1, ut.shape[1]):
                t += ut[:, k:k + 1] * it[:, k]
            t += self.user_affinity[ub][:, c]
            t += item_term
            yield lo, t

    def _probs(self, t: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, ...]:
        p = _sigmoid(t + self.conformity * self.popularity_z[i])
        a, b = self.followup_intercept, self.followup_slope
        full = p * _sigmoid(a[0] + b * t + self.full_play_offset[i])
        fav = p * _sigmoid(a[1] + b * t)
        share = p * _sigmoid(a[2] + b * t)
        skip = self.skip_rate * (1.0 - p)
        return p, full, fav, share, skip

    def _units_matrix(self, u: np.ndarray) -> np.ndarray:
        out = np.empty((u.shape[0], self.n_items), dtype=np.float64)
        w = self.event_weight_values
        a, b = self.followup_intercept, self.followup_slope
        conf = self.conformity * self.popularity_z
        for lo, t in self._true_blocks(u):
            p = _sigmoid(t + conf)
            # units = p (w_play - w_skip skip_rate + sum_k w_k q_k) + w_skip skip_rate
            per_play = w[1] * _sigmoid(a[0] + b * t + self.full_play_offset)
            per_play += w[2] * _sigmoid(a[1] + b * t)
            per_play += w[3] * _sigmoid(a[2] + b * t)
            per_play += w[0] - w[4] * self.skip_rate
            per_play *= p
            per_play += w[4] * self.skip_rate
            out[lo:lo + t.shape[0]] = per_play
        return out

    def _reward(self, u: np.ndarray, items: np.ndarray) -> np.ndarray:
        n = u.shape[0]
        shown = items >= 0
        uu = np.broadcast_to(u[:, None, None], items.shape)[shown]
        ii = items[shown]
        money = np.zeros(items.shape, dtype=np.float64)
        t = self._true_logit(uu, ii)
        units = np.stack(self._probs(t, ii), axis=-1) @ self.event_weight_values
        money[shown] = units * self.category_value[self.item_category[ii]]
        weight = self.slot_examination[:, None] * self.item_examination[None, :]
        return (money * weight).sum(axis=(1, 2)) if n else np.zeros(0)

    def _sample(self, u: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> Feedback:
        _check_rng(rng)
        n, S, K = items.shape
        slot_seen = rng.random((n, S)) < self.slot_examination
        pos_seen = rng.random((n, S, K)) < self.item_examination
        examined = slot_seen[:, :, None] & pos_seen & (items >= 0)
        row, slot, pos = np.nonzero(examined)
        ii = items[row, slot, pos]
        t = self._true_logit(u[row], ii)
        p, full, fav, share, _ = self._probs(t, ii)
        m = ii.shape[0]
        draws = rng.random((m, 5))
        play = draws[:, 0] < p
        # given play: each follow-up with its conditional probability (marginals match event_probs)
        flags = np.empty((m, len(FEEDBACK_TYPES)), dtype=bool)
        flags[:, 0] = True
        flags[:, 1] = play
        with np.errstate(divide="ignore", invalid="ignore"):
            for k, joint in enumerate((full, fav, share)):
                cond = np.where(p > 0, joint / p, 0.0)
                flags[:, 2 + k] = play & (draws[:, 1 + k] < cond)
        flags[:, 5] = ~play & (draws[:, 4] < self.skip_rate)
        r, kind = np.nonzero(flags)
        names = np.array(FEEDBACK_TYPES)
        return Feedback(row=row[r].astype(np.int64), slot=slot[r].astype(np.int64),
                        position=pos[r].astype(np.int64), item_idx=ii[r].astype(np.int64),
                        event=names[kind])

    # ---- argument checks ------------------------------------------------------------------------
    def _user(self, user_idx: object) -> int:
        # callers pass ints, numpy integers or 0-d arrays; anything else is refused with its value
        if isinstance(user_idx, np.ndarray) and user_idx.ndim == 0:
            user_idx = user_idx.item()
        if isinstance(user_idx, bool) or not isinstance(user_idx, numbers.Integral):
            raise TypeError(f"user_idx must be an int; got {user_idx!r}")
        if not 0 <= int(user_idx) < self.n_users:
            raise ValueError(f"user_idx must be in [0, {self.n_users}); got {user_idx!r}")
        return int(user_idx)

    def _users(self, user_idx: np.ndarray) -> np.ndarray:
        return _check_index_array("user_idx", user_idx, self.n_users, ndim=1)

    def _pairs(self, user_idx: np.ndarray, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = _check_index_array("user_idx", user_idx, self.n_users, ndim=None)
        i = _check_index_array("item_idx", item_idx, self.n_items, ndim=None)
        try:
            u, i = np.broadcast_arrays(u, i)
        except ValueError:
            raise ValueError(f"user_idx and item_idx must broadcast to one shape; got shapes "
                             f"{u.shape} and {i.shape}") from None
        return u.reshape(-1), i.reshape(-1)

    def _slot_items(self, slot_items: np.ndarray, batch: bool) -> np.ndarray:
        shape = (self.n_slots, self.items_per_module)
        a = np.asarray(slot_items)
        want = ("n",) + shape if batch else shape
        if a.ndim != len(want) or a.shape[-2:] != shape:
            raise ValueError(f"slot_items must have shape {want}; got {a.shape}")
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"slot_items must hold integer item indices (-1 = empty); got dtype {a.dtype}")
        a = a.astype(np.int64, copy=False)
        if a.size and (a.min() < -1 or a.max() >= self.n_items):
            raise ValueError(f"slot_items must be in [-1, {self.n_items}); got values in "
                             f"[{a.min()}, {a.max()}]")
        return a

    def _modules_per_category(self, modules_per_category: np.ndarray) -> np.ndarray:
        a = np.asarray(modules_per_category)
        if a.shape != (self.n_categories,) or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"modules_per_category must be {self.n_categories} integers (one per "
                             f"category); got {modules_per_category!r}")
        if (a < 0).any():
            raise ValueError(f"modules_per_category must be >= 0; got {modules_per_category!r}")
        return a.astype(np.int64)


_CHUNK = 1024  # users per block of the (n, n_items) score matrix: bounds memory in oracle_batch


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        rng_txt = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{rng_txt}; got {value!r}")
    return v


def _check_float(name: str, value: object, low: float, high: float = math.inf,
                 low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    v = float(value)
    if (v <= low if low_open else v < low) or v > high:
        lb = "(" if low_open else "["
        hb = ")" if math.isinf(high) else "]"
        raise ValueError(f"{name} must be in {lb}{low:g}, {high:g}{hb}; got {value!r}")
    return v


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {rng!r}")


def _check_index_array(name: str, value: object, n: int, ndim: int | None) -> np.ndarray:
    a = np.asarray(value)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d integer array; got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer indices; got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"{name} must be in [0, {n}); got values in [{a.min()}, {a.max()}]")
    return a


def _per_category(name: str, value: Sequence[float] | None, categories: tuple[str, ...],
                  default: list[float], low: float, low_open: bool) -> np.ndarray:
    if value is None:
        return np.array(default, dtype=np.float64)
    vals = list(value)
    if len(vals) != len(categories):
        raise ValueError(f"{name} must have one entry per category ({len(categories)}); got {value!r}")
    return np.array([_check_float(f"{name}[{k}]", v, low, low_open=low_open) for k, v in enumerate(vals)])


def _split_counts(n_items: int, share: np.ndarray) -> np.ndarray:
    """Items per category: one each, the rest by largest remainder of ``share``."""
    n_cat = share.size
    rest = n_items - n_cat
    exact = share / share.sum() * rest
    counts = np.floor(exact).astype(np.int64)
    left = rest - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:left]] += 1
    return counts + 1


def make_world(
    n_users: int = 2000,
    n_items: int = 3000,
    seed: int = 0,
    *,
    conformity: float = 0.8,
    n_slots: int = 6,
    items_per_module: int = 10,
    categories: Sequence[str] = CATEGORIES,
    taste_dim: int = 8,
    zipf_exponent: float = 1.0,
    slot_examination: Sequence[float] | None = None,
    item_examination_decay: float = 0.85,
    category_value: Sequence[float] | None = None,
    category_item_share: Sequence[float] | None = None,
    popularity_quality_corr: float = 0.5,
    activity_sigma: float = 1.2,
    skip_rate: float = 0.3,
) -> World:
    """Build a seeded synthetic homepage world.

    Parameters
    ----------
    n_users, n_items
        Sizes; ``n_items >= len(categories)`` (every category gets at least one item).
    seed
        Seed of ``np.random.default_rng``; the same arguments give the same world.
    conformity
        Weight (>= 0) of standardised log popularity in the click logit.
    n_slots, items_per_module
        Page geometry S and K.
    categories
        Category names; per-category defaults exist for songs, videos, audio and live.
    taste_dim
        Dimension d of the latent tastes; ``taste_u . taste_i`` has unit variance.
    zipf_exponent
        Popularity of the item of rank r (from 0) in its category is proportional to ``(r + 1) ** -a``;
        ``a = 1`` puts about 80 % of the popularity on the top 20 % of items.
    slot_examination
        S probabilities in (0, 1]; default ``[1.0, 0.8, 0.65, 0.5, 0.4, 0.3]`` (truncated, or extended
        by a factor 0.8 per slot).
    item_examination_decay
        Position j within a module is examined with probability ``decay ** j``; in (0, 1].
    category_value
        Money per engagement unit per category (>= 0); default songs 1.0, videos 1.4, audio 1.2,
        live 2.0.
    category_item_share
        Catalog share per category (> 0, normalised); default 0.45 / 0.25 / 0.20 / 0.10.
    popularity_quality_corr
        In [0, 1): correlation between an item's quality and its popularity rank score (popular
        items are somewhat better, so popularity is a useful but biased signal).
    activity_sigma
        Log-normal spread (>= 0) of user activity; larger = a few heavy users dominate traffic.
    skip_rate
        P(skip | examined, not played), in [0, 1].

    Returns
    -------
    World

    Examples
    --------
    >>> w = make_world(n_users=50, n_items=200, seed=1)
    >>> w.categories, w.item_ids[:2].tolist(), w.expected_units([0, 1], [3, 4]).shape
    (('songs', 'videos', 'audio', 'live'), ['i00001', 'i00002'], (2,))
    """
    n_users = _check_int("n_users", n_users, low=1)
    seed = _check_int("seed", seed, low=0)
    conformity = _check_float("conformity", conformity, 0.0)
    n_slots = _check_int("n_slots", n_slots, low=1)
    items_per_module = _check_int("items_per_module", items_per_module, low=1)
    if isinstance(categories, str) or not isinstance(categories, Sequence):
        raise ValueError(f"categories must be a sequence of names; got {categories!r}")
    cats = tuple(categories)
    if not cats or not all(isinstance(c, str) and c.strip() for c in cats) or len(set(cats)) != len(cats):
        raise ValueError(f"categories must be one or more distinct non-empty names; got {categories!r}")
    n_items = _check_int("n_items", n_items, low=len(cats))
    taste_dim = _check_int("taste_dim", taste_dim, low=1)
    zipf_exponent = _check_float("zipf_exponent", zipf_exponent, 0.0)
    decay = _check_float("item_examination_decay", item_examination_decay, 0.0, 1.0, low_open=True)
    rho = _check_float("popularity_quality_corr", popularity_quality_corr, 0.0, 1.0)
    if rho >= 1.0:
        raise ValueError(f"popularity_quality_corr must be in [0, 1); got {popularity_quality_corr!r}")
    activity_sigma = _check_float("activity_sigma", activity_sigma, 0.0)
    skip_rate = _check_float("skip_rate", skip_rate, 0.0, 1.0)

    if slot_examination is None:
        base = list(DEFAULT_SLOT_EXAMINATION)
        while len(base) < n_slots:
            base.append(base[-1] * 0.8)
        w_slot = np.array(base[:n_slots], dtype=np.float64)
    else:
        vals = list(slot_examination)
        if len(vals) != n_slots:
            raise ValueError(f"slot_examination must have n_slots ({n_slots}) entries; got {slot_examination!r}")
        w_slot = np.array([_check_float(f"slot_examination[{k}]", v, 0.0, 1.0, low_open=True)
                           for k, v in enumerate(vals)])
    defaults = [_DEFAULTS.get(c, _GENERIC) for c in cats]
    value = _per_category("category_value", category_value, cats, [d.value for d in defaults],
                          low=0.0, low_open=False)
    share = _per_category("category_item_share", category_item_share, cats,
                          [d.item_share for d in defaults], low=0.0, low_open=True)

    rng = np.random.default_rng(seed)
    n_cat = len(cats)
    scale = taste_dim ** -0.25  # so that taste_u . taste_i has unit variance

    # ---- items ----
    counts = _split_counts(n_items, share)
    item_category = rng.permutation(np.repeat(np.arange(n_cat), counts))
    item_taste = rng.normal(0.0, scale, size=(n_items, taste_dim))
    base_quality = rng.normal(0.0, 0.5, size=n_items)
    age_days = rng.exponential(365.0, size=n_items)
    freshness = np.exp(-age_days / 120.0)
    quality = base_quality + 0.4 * (freshness - freshness.mean())  # fresh items engage a little more
    rating = np.clip(3.5 + 1.2 * base_quality + rng.normal(0.0, 0.5, size=n_items), 1.0, 5.0)
    median_duration = np.array([d.duration_min for d in defaults])[item_category]
    duration = median_duration * np.exp(rng.normal(0.0, 0.4, size=n_items))
    full_play_offset = -0.5 * np.log(duration / median_duration)  # long items are finished less often

    popularity = np.zeros(n_items)
    popularity_z = np.zeros(n_items)
    rank_noise = rng.normal(size=n_items)
    for c in range(n_cat):
        idx = np.flatnonzero(item_category == c)
        key = rho * base_quality[idx] / 0.5 + math.sqrt(1.0 - rho * rho) * rank_noise[idx]
        rank = np.empty(idx.size, dtype=np.int64)
        rank[np.argsort(-key, kind="stable")] = np.arange(idx.size)
        zipf = (rank + 1.0) ** -zipf_exponent
        popularity[idx] = 1000.0 * idx.size * zipf / zipf.sum()  # mean 1000 plays per item
        logp = np.log(popularity[idx])
        sd = logp.std()
        popularity_z[idx] = np.clip((logp - logp.mean()) / sd, -_Z_CLIP, _Z_CLIP) if sd > 0 else 0.0

    # ---- users ----
    user_taste = rng.normal(0.0, scale, size=(n_users, taste_dim))
    affinity = rng.normal(0.0, 0.5, size=(n_users, n_cat))
    kind = rng.random((n_users, n_cat))
    never = np.array([d.never for d in defaults])
    fan = np.array([d.fan for d in defaults])
    affinity = np.where(kind < never, _NEVER_AFFINITY, affinity)
    affinity = np.where((kind >= never) & (kind < never + fan), affinity + _FAN_BOOST, affinity)
    activity = rng.lognormal(0.0, activity_sigma, size=n_users) if activity_sigma > 0 else np.ones(n_users)
    activity = activity / activity.sum()

    width_i, width_u = max(5, len(str(n_items))), max(5, len(str(n_users)))
    return World(
        categories=cats,
        item_ids=np.array([f"i{k:0{width_i}d}" for k in range(1, n_items + 1)]),
        item_category=item_category.astype(np.int64),
        popularity=popularity,
        item_features=np.column_stack([duration, age_days, rating]),
        item_feature_names=ITEM_FEATURE_NAMES,
        user_ids=np.array([f"u{k:0{width_u}d}" for k in range(1, n_users + 1)]),
        user_taste=user_taste,
        item_taste=item_taste,
        user_affinity=affinity,
        user_activity=activity,
        conformity=conformity,
        slot_examination=w_slot,
        item_examination=decay ** np.arange(items_per_module, dtype=np.float64),
        category_value=value,
        event_weight_values=np.array([DEFAULT_EVENT_WEIGHTS[e] for e in EVENT_TYPES]),
        category_bias=np.array([d.bias for d in defaults]),
        item_quality=quality,
        popularity_z=popularity_z,
        full_play_offset=full_play_offset,
        followup_intercept=np.array(_FOLLOWUP_INTERCEPT),
        followup_slope=_FOLLOWUP_SLOPE,
        skip_rate=skip_rate,
    )
