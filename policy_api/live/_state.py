"""The live state's values and their pure update rules (no I/O).

Engagement decays with a half-life ``h``: an event of ``units`` at time ``ts`` is worth
``units * 2**(-(t - ts) / h)`` at time ``t``; so do examined impressions (an impression of ``units``
examination weight). A user's state keeps the decayed sums per category *as of* its newest event
``updated``, so bringing it to any later time is one multiplication, and an event that
arrives late (older than ``updated``) adds its exactly decayed term: the state after any sequence of
batches equals the closed-form sum over all events, whatever their arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np
import orjson

from rankers import EVENT_TYPES

from ..errors import InvalidInput

__all__ = [
    "IMPRESSION",
    "NEGATIVE_TYPES",
    "POSITIVE_TYPES",
    "Forget",
    "ItemStats",
    "LiveEvent",
    "UserState",
    "apply_events",
    "before_vectors",
    "category_vector",
    "check_store_params",
    "decay",
    "decode_item",
    "decode_state",
    "encode_item",
    "encode_state",
    "forget_factor",
    "item_increments",
    "item_stats_at",
    "live_sequences",
    "merge_item",
]

#: event types that count as engagement with the item (``n_positive``, item trends)
POSITIVE_TYPES: tuple[str, ...] = ("play", "full_play", "favorite", "share")
#: event types that count against it (``n_negative``)
NEGATIVE_TYPES: tuple[str, ...] = ("skip",)
#: an item shown to the user: its ``units`` are the examination weight of where it was shown; it adds to
#: the category's examined impressions only (not to the sequences, the counts or the engagement)
IMPRESSION = "impression"
_TYPES = frozenset((*POSITIVE_TYPES, *NEGATIVE_TYPES, IMPRESSION))
_CODE = {t: k for k, t in enumerate(EVENT_TYPES)}  # the ranker's behaviour-type codes
_FORMAT = 2  # version of the stored JSON; 1 (without impressions) still reads


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One accepted feedback event of one user on one item, or an impression (:data:`IMPRESSION`).

    Parameters
    ----------
    user_id, item_id, category
        Who, on what, and the item's category.
    type
        One of :data:`POSITIVE_TYPES`, :data:`NEGATIVE_TYPES` or :data:`IMPRESSION`.
    units
        The config's weight of this event type (a skip's is negative); for an impression, its
        examination weight (>= 0). Finite.
    ts
        Event time, epoch seconds. Finite.
    head
        Whether the item is in its category's head. Only head items count in the state's category
        sums: every user skips most long-tail items, so a rate over whatever mix of head and tail a
        user was shown would say more about the mix (a page tilted to meet a long-tail floor) than
        about the user. The sequences and counts take every event.
    """

    user_id: str
    item_id: str
    category: str
    type: str
    units: float
    ts: float
    head: bool = True

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            allowed = ", ".join((*POSITIVE_TYPES, *NEGATIVE_TYPES, IMPRESSION))
            raise InvalidInput(f"type must be one of {allowed}; got {self.type!r}", field="type")
        for name in ("units", "ts"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise InvalidInput(f"{name} must be a finite number; got {value!r}", field=name)
        if self.type == IMPRESSION and self.units < 0:
            raise InvalidInput(f"units of an impression (its examination weight) must be >= 0; got {self.units!r}",
                               field="units")


@dataclass(frozen=True, slots=True)
class UserState:
    """A user's live state.

    Attributes
    ----------
    items, types, ts
        The most recent events (at most ``max_events``), newest first; ties in ``ts`` newest arrival first.
    category_engagement
        Per category, ``sum_e units_e * 2**(-(updated - ts_e) / half_life_s)`` over every event ever
        applied (skips subtract), as of ``updated``.
    category_impressions
        Per category, the same decayed sum of the examination weights of the user's impressions.
    n_positive, n_negative
        Counts of positive and negative events ever applied.
    updated
        Time of the newest event applied, epoch seconds.
    epoch
        The newest population shift the category sums have forgotten (its time, epoch seconds; 0:
        none): see :func:`forget_factor`.
    before_engagement, before_impressions
        The category sums as they stood when the state forgot that shift (empty before any): what the
        user took before it, which the plan's :class:`ShiftMap` turns into a prior for now.
    """

    user_id: str
    items: tuple[str, ...]
    types: tuple[str, ...]
    ts: tuple[float, ...]
    category_engagement: dict[str, float]
    n_positive: int
    n_negative: int
    updated: float
    category_impressions: dict[str, float] = field(default_factory=dict)
    epoch: float = 0.0
    before_engagement: dict[str, float] = field(default_factory=dict)
    before_impressions: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.items) == len(self.types) == len(self.ts):
            raise InvalidInput(
                f"items, types and ts must have one entry per event; got lengths "
                f"{len(self.items)}, {len(self.types)}, {len(self.ts)}", field="items")

    def positives(self) -> list[str]:
        """Item ids of the recent positive events, newest first."""
        return [i for i, t in zip(self.items, self.types, strict=True) if t in POSITIVE_TYPES]

    def negatives(self) -> list[str]:
        """Item ids of the recent negative events, newest first."""
        return [i for i, t in zip(self.items, self.types, strict=True) if t in NEGATIVE_TYPES]


@dataclass(frozen=True, slots=True)
class ItemStats:
    """What is trending now: decayed positive units per item, most engaged first.

    Attributes
    ----------
    item_ids
        Shape (n,), str.
    engagement
        Shape (n,). ``sum_e units_e * 2**(-(updated - ts_e) / half_life_s)`` over the item's positive
        events (negative events never add), as of ``updated``.
    updated
        The newest positive event of any item, epoch seconds.
    """

    item_ids: np.ndarray
    engagement: np.ndarray
    updated: float


def check_store_params(half_life_s: float, max_events: int) -> None:
    """Raise :class:`~policy_api.errors.InvalidInput` unless ``half_life_s > 0`` (finite) and ``max_events >= 1``."""
    if not (isinstance(half_life_s, int | float) and math.isfinite(half_life_s) and half_life_s > 0):
        raise InvalidInput(f"half_life_s must be a finite number > 0; got {half_life_s!r}", field="half_life_s")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise InvalidInput(f"max_events must be an integer >= 1; got {max_events!r}", field="max_events")


def decay(age_s: float, half_life_s: float) -> float:
    """``2**(-age_s / half_life_s)``; ``age_s >= 0`` (underflows to 0.0, never overflows)."""
    return float(2.0 ** (-age_s / half_life_s))


@dataclass(frozen=True, slots=True)
class Forget:
    """A population shift the live states forget: each state's category sums from before ``epoch``
    (epoch seconds, the shift's detection) keep ``keep`` (in [0, 1]) of their weight, once. A user's
    own evidence says what the user took from each category; when what everyone takes changed at
    once, that evidence misleads the engine until the user's new pages outweigh it."""

    epoch: float
    keep: float

    def __post_init__(self) -> None:
        if not (isinstance(self.epoch, int | float) and math.isfinite(self.epoch)):
            raise InvalidInput(f"epoch must be a finite number; got {self.epoch!r}", field="epoch")
        if not (isinstance(self.keep, int | float) and 0.0 <= self.keep <= 1.0):
            raise InvalidInput(f"keep must be a number in [0, 1]; got {self.keep!r}", field="keep")


def forget_factor(state: UserState, forget: Forget | None) -> float:
    """What ``state``'s category sums keep under ``forget``: ``forget.keep`` when they predate its epoch
    (``state.epoch < forget.epoch``), else 1."""
    return forget.keep if forget is not None and state.epoch < forget.epoch else 1.0


def apply_events(state: UserState | None, events: Sequence[LiveEvent], *, half_life_s: float,
                 max_events: int, impression_half_life: float | None = None,
                 forget: Forget | None = None) -> UserState:
    """The state after ``events`` (all of one user), in any arrival order.

    ``updated' = max(updated, max ts)``; each category's engagement is brought to ``updated'`` and each
    event adds ``units * 2**(-(updated' - ts) / half_life_s)`` (exact for late events too); the recent
    sequence is the ``max_events`` newest of the old sequence and the events by ``ts``.

    Parameters
    ----------
    state
        The current state, or None for a user without one.
    events
        Events of ``state.user_id`` (of one user when ``state`` is None); may be empty when ``state`` is not.
    impression_half_life
        Examined impressions (> 0; ``inf`` or None: no fading). With it, what the state held before this batch also fades
        with the user's own new impressions: its engagement and impressions are multiplied by
        ``2**(-I / impression_half_life)``, ``I`` the examined impressions in ``events``. A user who
        comes back often is judged on the last few pages, so a change of taste shows within pages,
        not hours; the state then depends on how events were batched (the loop writes each user's
        events of one tick as one batch).
    forget
        A population shift (:class:`Forget`): a state whose sums predate it moves them, brought to
        ``updated``, to ``before_*`` and keeps ``forget.keep`` of them before the events are added; the
        result carries the shift's epoch (forgotten once).

    Raises
    ------
    InvalidInput
        For events of another user, no events and no state, or bad ``half_life_s`` / ``max_events``.
    """
    check_store_params(half_life_s, max_events)
    if impression_half_life is not None and not impression_half_life > 0:  # inf: no fading
        raise InvalidInput(f"impression_half_life must be a number > 0 (inf: none) or None; got "
                           f"{impression_half_life!r}", field="impression_half_life")
    if state is None and not events:
        raise InvalidInput("events must not be empty when there is no state; got 0 events", field="events")
    user_id = state.user_id if state is not None else events[0].user_id
    for e in events:
        if e.user_id != user_id:
            raise InvalidInput(f"events must all be of user {user_id!r}; got an event of {e.user_id!r}",
                               field="user_id")
    ordered = sorted(events, key=attrgetter("ts"))  # stable: equal times keep their arrival order
    times = [e.ts for e in ordered]
    if state is None:
        updated = times[-1]
        engagement: dict[str, float] = {}
        shown: dict[str, float] = {}
        before_eng: dict[str, float] = {}
        before_imp: dict[str, float] = {}
        old: list[tuple[str, str, float]] = []
        n_pos = n_neg = 0
    else:
        updated = max([state.updated, *times[-1:]])
        aged = decay(updated - state.updated, half_life_s)
        before_eng, before_imp = state.before_engagement, state.before_impressions
        if forget is not None and state.epoch < forget.epoch:  # this shift is new to the state
            before_eng = {c: v * aged for c, v in state.category_engagement.items()}
            before_imp = {c: v * aged for c, v in state.category_impressions.items()}
        factor = aged * forget_factor(state, forget)
        if impression_half_life is not None:
            factor *= decay(sum(e.units for e in events if e.type == IMPRESSION and e.head), impression_half_life)
        engagement = {c: v * factor for c, v in state.category_engagement.items()}
        shown = {c: v * factor for c, v in state.category_impressions.items()}
        old = list(zip(state.items, state.types, state.ts, strict=True))[::-1]  # oldest first
        n_pos, n_neg = state.n_positive, state.n_negative
    for e in ordered:
        if e.type == IMPRESSION:
            if e.head:
                shown[e.category] = shown.get(e.category, 0.0) + e.units * decay(updated - e.ts, half_life_s)
            continue
        if e.head:
            engagement[e.category] = engagement.get(e.category, 0.0) + e.units * decay(updated - e.ts, half_life_s)
        if e.type in POSITIVE_TYPES:
            n_pos += 1
        else:
            n_neg += 1
    # the old sequence arrived first; a stable sort by time keeps arrival order among equal times, and the
    # newest max_events of (old kept + new) are the newest max_events of everything ever applied
    merged = old + [(e.item_id, e.type, e.ts) for e in ordered if e.type != IMPRESSION]
    merged.sort(key=lambda r: r[2])
    recent = merged[::-1][:max_events]
    return UserState(
        user_id=user_id,
        items=tuple(r[0] for r in recent),
        types=tuple(r[1] for r in recent),
        ts=tuple(r[2] for r in recent),
        category_engagement=engagement,
        n_positive=n_pos,
        n_negative=n_neg,
        updated=updated,
        category_impressions=shown,
        epoch=max(0.0 if state is None else state.epoch, 0.0 if forget is None else forget.epoch),
        before_engagement=before_eng,
        before_impressions=before_imp,
    )


def category_vector(state: UserState | None, category_names: Sequence[str], now: float,
                    half_life_s: float, *, impressions: bool = False, forget: Forget | None = None) -> np.ndarray:
    """Decayed engagement per category at ``now``: ``engagement[c] * 2**(-(now - updated) / half_life_s)``
    (with ``impressions``, the decayed examined impressions instead), times :func:`forget_factor`.

    Returns
    -------
    np.ndarray
        Shape (C,), float64, in the order of ``category_names``; 0 for categories the user never engaged
        with, all zeros for None. A ``now`` before ``updated`` (a reader's clock behind the writer's)
        reads the state as of ``updated``.
    """
    out = np.zeros(len(category_names), dtype=np.float64)
    if state is None:
        return out
    factor = decay(max(0.0, now - state.updated), half_life_s) * forget_factor(state, forget)
    values = state.category_impressions if impressions else state.category_engagement
    for j, c in enumerate(category_names):
        out[j] = values.get(c, 0.0) * factor
    return out


def before_vectors(state: UserState, category_names: Sequence[str], now: float, half_life_s: float,
                   forget: Forget | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The user's category sums before the last population shift, engagement and examined impressions
    (shapes (C,)): the sums the state forgot (``before_*``), or, for a state that predates ``forget``,
    its sums now (its next write moves them there). None when there are none."""
    if forget is not None and state.epoch < forget.epoch:
        eng = category_vector(state, category_names, now, half_life_s)
        imp = category_vector(state, category_names, now, half_life_s, impressions=True)
    elif state.before_impressions:
        eng = np.array([state.before_engagement.get(c, 0.0) for c in category_names], dtype=np.float64)
        imp = np.array([state.before_impressions.get(c, 0.0) for c in category_names], dtype=np.float64)
    else:
        return None
    return (eng, imp) if imp.sum() > 0 else None


def live_sequences(state: UserState, index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The state's recent behaviour as the ranker reads it, newest first.

    Returns
    -------
    positives, positive_types, negatives
        Catalog rows (``index``: item id -> row) of the recent positive events, their
        ``rankers.EVENT_TYPES`` codes, and the rows of the recently skipped items; items not in
        ``index`` are left out. int64 arrays.
    """
    pos: list[int] = []
    codes: list[int] = []
    neg: list[int] = []
    for item, t in zip(state.items, state.types, strict=True):  # at most max_events entries
        row = index.get(item)
        if row is None:
            continue
        if t in NEGATIVE_TYPES:
            neg.append(row)
        else:
            pos.append(row)
            codes.append(_CODE[t])
    return np.array(pos, dtype=np.int64), np.array(codes, dtype=np.int64), np.array(neg, dtype=np.int64)


# ----------------------------------------------------------------------------------------- item trends


def item_increments(events: Iterable[LiveEvent], half_life_s: float) -> dict[str, tuple[float, float]]:
    """Per item, ``(engagement, updated)`` of the positive events: positive types with ``units > 0``.

    ``updated`` is the item's newest such event and ``engagement = sum units * 2**(-(updated - ts) / h)``.
    """
    by_item: dict[str, list[LiveEvent]] = {}
    for e in events:
        if e.type in POSITIVE_TYPES and e.units > 0:
            by_item.setdefault(e.item_id, []).append(e)
    out: dict[str, tuple[float, float]] = {}
    for item_id, evs in by_item.items():
        updated = max(e.ts for e in evs)
        out[item_id] = (sum(e.units * decay(updated - e.ts, half_life_s) for e in evs), updated)
    return out


def merge_item(old: tuple[float, float] | None, new: tuple[float, float], half_life_s: float) -> tuple[float, float]:
    """Two ``(engagement, updated)`` of one item as one, as of the later ``updated``."""
    if old is None:
        return new
    updated = max(old[1], new[1])
    return (old[0] * decay(updated - old[1], half_life_s) + new[0] * decay(updated - new[1], half_life_s),
            updated)


def item_stats_at(rows: Mapping[str, tuple[float, float]], half_life_s: float) -> ItemStats | None:
    """Rows ``item_id -> (engagement, updated)`` as one :class:`ItemStats` as of the newest ``updated``.

    Sorted by engagement, most engaged first (ties by item id). None when there are no rows.
    """
    if not rows:
        return None
    updated = max(u for _, u in rows.values())
    scored = sorted(((-e * decay(updated - u, half_life_s), i) for i, (e, u) in rows.items()))
    return ItemStats(
        item_ids=np.array([i for _, i in scored], dtype=str),
        engagement=np.array([-s for s, _ in scored], dtype=np.float64),
        updated=updated,
    )


# -------------------------------------------------------------------------------------------- encoding


def encode_state(state: UserState) -> bytes:
    """The state as JSON (orjson: floats are written shortest-round-trip, so they read back exactly)."""
    return orjson.dumps({
        "v": _FORMAT,
        "user_id": state.user_id,
        "items": state.items,
        "types": state.types,
        "ts": state.ts,
        "category_engagement": state.category_engagement,
        "n_positive": state.n_positive,
        "n_negative": state.n_negative,
        "updated": state.updated,
        "category_impressions": state.category_impressions,
        "epoch": state.epoch,
        "before_engagement": state.before_engagement,
        "before_impressions": state.before_impressions,
    })


def decode_state(raw: str | bytes | None) -> UserState | None:
    """The state from :func:`encode_state`'s JSON; None for None or JSON ``null``.

    Raises
    ------
    ValueError
        For JSON of another format version.
    """
    if raw is None:
        return None
    d: Any = orjson.loads(raw)
    if d is None:
        return None
    if d.get("v") not in (1, _FORMAT):
        raise ValueError(f"live state format must be 1 or {_FORMAT}; got {d.get('v')!r}")
    return UserState(
        user_id=d["user_id"],
        items=tuple(d["items"]),
        types=tuple(d["types"]),
        ts=tuple(float(t) for t in d["ts"]),
        category_engagement={c: float(v) for c, v in d["category_engagement"].items()},
        n_positive=int(d["n_positive"]),
        n_negative=int(d["n_negative"]),
        updated=float(d["updated"]),
        category_impressions={c: float(v) for c, v in d.get("category_impressions", {}).items()},
        epoch=float(d.get("epoch", 0.0)),
        before_engagement={c: float(v) for c, v in d.get("before_engagement", {}).items()},
        before_impressions={c: float(v) for c, v in d.get("before_impressions", {}).items()},
    )


def encode_item(value: tuple[float, float]) -> bytes:
    return orjson.dumps(value)


def decode_item(raw: str | bytes) -> tuple[float, float]:
    engagement, updated = orjson.loads(raw)
    return float(engagement), float(updated)
