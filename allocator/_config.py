"""The operator config (``homepage.toml``): schema, validation and the derived arrays.

Every error names the key path (``constraints[1].min``), what is allowed and what was found, and all
errors of a file are reported at once so an operator fixes them in one pass.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LOOP_KEYS",
    "Loop",
    "EVENT_TYPES",
    "CONSTRAINT_KINDS",
    "EXPLORATION_ALGORITHMS",
    "Category",
    "Module",
    "Constraint",
    "Tilt",
    "Exploration",
    "Learning",
    "HomepageConfig",
    "ConfigError",
    "FEEDBACK_TYPES",
    "default_item_weights",
    "load_config",
    "parse_config",
    "parse_config_text",
]

def default_item_weights(k: int) -> np.ndarray:
    """Shape (k,). The examination weight of each position inside a module when the config sets none:
    the position discount of DCG, ``1 / log2(j + 2)`` (1, 0.63, 0.5, ...). Attention falls along every
    carousel and list; set ``[homepage] item_position_weights`` to the app's measured curve."""
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


#: Behaviours the engine learns from, in this order everywhere (``impression`` carries no units).
EVENT_TYPES: tuple[str, ...] = ("play", "full_play", "favorite", "share", "skip")
FEEDBACK_TYPES: tuple[str, ...] = ("impression", *EVENT_TYPES)
CONSTRAINT_KINDS: tuple[str, ...] = ("category_share", "long_tail_share", "module_share")
EXPLORATION_ALGORITHMS: tuple[str, ...] = ("epsilon", "squarecb", "bag", "cover")


class ConfigError(ValueError):
    """An invalid operator config. ``errors`` lists ``(key, message)`` pairs, one per problem."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        lines = [f"{key}: {msg}" for key, msg in errors]
        super().__init__("invalid config:\n  " + "\n  ".join(lines))

    @property
    def key(self) -> str:
        return self.errors[0][0] if self.errors else ""


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    value_per_engagement: float
    #: a new category may get its own exploration share (see Exploration.new_category_share)
    new: bool = False


@dataclass(frozen=True, slots=True)
class Module:
    id: str
    category: str
    title: str = ""


@dataclass(frozen=True, slots=True)
class Constraint:
    name: str
    kind: str
    min: float | None = None
    max: float | None = None
    category: str | None = None
    module: str | None = None


@dataclass(frozen=True, slots=True)
class Tilt:
    levels: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    head_share: float = 0.8


@dataclass(frozen=True, slots=True)
class Exploration:
    budget: float = 0.05
    max_value_loss: float | None = None
    algorithm: str = "epsilon"
    new_category_share: float = 0.0
    #: layouts are exploited by a softmax of their priced value at ``temperature * max |value|`` (see
    #: :func:`allocator.exploit_pmf`): near-ties are mixed, so each share is a smooth function of its
    #: price and pacing can hold it; 0 serves the argmax
    temperature: float = 0.02
    #: the chance that a served module whose category holds new items (added to the catalog after
    #: serving began, not yet measured) shows one of them in place of its last item of the same kind
    new_item_share: float = 0.5
    #: an item stops being new this many days after it was added, measured or not
    new_item_days: float = 7.0


@dataclass(frozen=True, slots=True)
class Learning:
    reward_window_s: float = 3600.0
    default_reward: float = 0.0
    #: ``POST /feedback`` refuses an event whose ``value`` exceeds this in size (money per event)
    max_event_value: float = 1e6
    #: ... or whose ``ts`` is older than this, or later than the server's clock by more than ``max_clock_skew_s``
    max_event_age_s: float = 7 * 86400.0
    max_clock_skew_s: float = 300.0


@dataclass(frozen=True)
class Loop:
    """The engine's background loop (``[loop]``): what it does by itself while ``homepage serve`` runs.

    Pacing uses :class:`~allocator.ResolvePacer`: prices re-solved on the last ``pace_window`` served
    candidate sets for aims ``pace_margin`` inside each bound, corrected by an integral with
    ``pace_gain`` per ``pace_half_life`` decisions (the realised shares' exponential window).
    A decision is learned by the bandit ``settle_s`` seconds after it was made (its reward counts the
    events that arrived by then); ``learning.reward_window_s`` only bounds how late an event may count.
    """

    enabled: bool = True
    plan_users: int = 2000
    replan_every_s: float = 600.0
    pace_every_s: float = 1.0
    pace_gain: float = 0.25
    pace_window: int = 1000
    #: one pacing step moves a price by at most this times the larger of its size and a quarter of the
    #: served candidates' typical value range (a trust region: the re-solve after a new plan sees only
    #: the few sets served since)
    pace_max_step: float = 1.0
    pace_half_life: float = 300.0
    pace_margin: float = 0.005
    #: the share of decisions that log their block table (what each module of the user's pool would
    #: show, ``context["pace"]``), on which the pacer rebuilds the candidates serving would build at the
    #: prices it tries (see :class:`~allocator.ResolvePacer`). 0: the pacer re-solves on the logged
    #: candidate sets alone
    pace_sample: float = 0.25
    max_price: float = 50.0
    #: the category calibration is measured on at most this many of the most recent feedback events
    #: (and at most the last 6 hours), and the loop plans again when it moves: a shift in what users
    #: engage with reaches the plan within about that many events
    calibration_events: int = 20000
    #: each item's own engagement rate (over what its group's rate and its score predict) is measured on
    #: at most this many of the most recent feedback events (and at most the last 6 hours); serving
    #: multiplies the item's score by it, shrunk toward 1 (``engine.item_lift``). 0 turns it off
    item_events: int = 200000
    learn_every_s: float = 15.0
    learn_min_decisions: int = 100
    settle_s: float = 5.0
    train_every_s: float = 900.0
    train_min_events: int = 2000
    train_max_epochs: int = 8
    state_store: str = "sql"
    state_half_life_s: float = 3600.0
    #: a user's live state also fades with the user's own examined impressions: what the state held
    #: halves every this many (a page is some tens), so a change of taste shows within a few pages
    state_half_life_impressions: float = 300.0
    state_max_events: int = 50
    state_deadline_ms: float = 10.0
    lease_ttl_s: float = 10.0
    #: each worker steers its own last ``serve_window`` decisions' shares back to the pacer's aims: a
    #: price offset of ``serve_gain`` times the miss over the shares' sensitivity to their prices (the
    #: pacer's); a window of a few hundred requests then holds its bounds far more often than independent
    #: draws do. ``serve_gain = 0`` turns it off
    serve_window: int = 100
    serve_gain: float = 2.0
    #: when what users take from a category departs at once from what the engine predicted (the
    #: observed-to-predicted units of the last ``shift_window`` pages against the pages before, see
    #: ``policy_api.loop.ShiftDetector``), every user's live category sums keep this share of their weight
    #: and the calibration restarts from the shift. 1 turns the detection off
    shift_keep: float = 0.0
    shift_window: int = 150


LOOP_KEYS = tuple(Loop.__dataclass_fields__)

#: what a client's ``impression`` events may mean (``[homepage] impressions``)
IMPRESSION_KINDS = ("viewed", "rendered")


@dataclass(frozen=True)
class HomepageConfig:
    """A validated operator config. Build it with :func:`parse_config` or :func:`load_config`."""

    slots: int
    position_weights: tuple[float, ...]
    items_per_module: int
    categories: tuple[Category, ...]
    modules: tuple[Module, ...]
    events: Mapping[str, float]
    tilt: Tilt
    constraints: tuple[Constraint, ...]
    exploration: Exploration
    learning: Learning = Learning()
    loop: Loop = Loop()
    pool_size: int = 600
    #: examination weight of each position inside a module, first item first (() = the default curve,
    #: see :func:`default_item_weights`)
    item_position_weights: tuple[float, ...] = ()
    #: what the client's ``impression`` events mean: ``"viewed"`` (the user saw the item: each is one
    #: examined impression) or ``"rendered"`` (every item on the page: each counts as its slot's
    #: position weight relative to the mean, its expected examination)
    impressions: str = "viewed"
    warnings: tuple[str, ...] = ()
    source: str = field(default="", compare=False, repr=False)

    # ---- derived views (cheap; used on the request path through cached arrays in the engine) ----
    @property
    def category_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def module_ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.modules)

    @property
    def constraint_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.constraints)

    def category_index(self, name: str) -> int:
        return self.category_names.index(name)

    def item_weights(self) -> np.ndarray:
        """Shape (items_per_module,). Examination weight of each position inside a module: the
        config's ``item_position_weights``, else :func:`default_item_weights`."""
        if self.item_position_weights:
            return np.asarray(self.item_position_weights, dtype=np.float64)
        return default_item_weights(self.items_per_module)

    def impression_weights(self) -> np.ndarray:
        """Shape (slots,). How many examined impressions one ``impression`` event in each slot counts as
        (see ``impressions``): 1 everywhere for viewed impressions, the slot's position weight over the
        mean weight for rendered ones. Engagement per examined impression (the plan's calibration,
        item rates, the live state, the shift test) divides by these counts."""
        if self.impressions == "rendered":
            w = np.asarray(self.position_weights, dtype=np.float64)
            return w / w.mean()
        return np.ones(self.slots)

    def category_values(self) -> np.ndarray:
        """Shape (n_categories,). Money per engagement unit."""
        return np.array([c.value_per_engagement for c in self.categories], dtype=np.float64)

    def module_category(self) -> np.ndarray:
        """Shape (n_modules,). Category index of each module."""
        names = self.category_names
        return np.array([names.index(m.category) for m in self.modules], dtype=np.int64)

    def modules_of(self) -> list[list[int]]:
        """Module indices per category, in config order (the r-th module of c shows block r)."""
        out: list[list[int]] = [[] for _ in self.categories]
        for j, c in enumerate(self.module_category()):
            out[int(c)].append(j)
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Shapes (K,), (K,): lower and upper bounds of each constraint (-inf/+inf where absent)."""
        lo = np.array([-np.inf if c.min is None else c.min for c in self.constraints], dtype=np.float64)
        hi = np.array([np.inf if c.max is None else c.max for c in self.constraints], dtype=np.float64)
        return lo, hi

    def event_weight_vector(self) -> np.ndarray:
        """Shape (5,): engagement units of EVENT_TYPES."""
        return np.array([self.events[e] for e in EVENT_TYPES], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (what ``GET /config`` returns)."""
        return {
            "homepage": {
                "slots": self.slots,
                "position_weights": list(self.position_weights),
                "items_per_module": self.items_per_module,
                "pool_size": self.pool_size,
                "item_position_weights": list(self.item_position_weights) or None,
                "impressions": self.impressions,
            },
            "categories": [
                {"name": c.name, "value_per_engagement": c.value_per_engagement, "new": c.new}
                for c in self.categories
            ],
            "modules": [{"id": m.id, "category": m.category, "title": m.title} for m in self.modules],
            "events": dict(self.events),
            "tilt": {"levels": list(self.tilt.levels), "head_share": self.tilt.head_share},
            "constraints": [
                {k: v for k, v in (("name", c.name), ("kind", c.kind), ("category", c.category),
                                   ("module", c.module), ("min", c.min), ("max", c.max)) if v is not None}
                for c in self.constraints
            ],
            "exploration": {
                "budget": self.exploration.budget,
                "max_value_loss": self.exploration.max_value_loss,
                "algorithm": self.exploration.algorithm,
                "new_category_share": self.exploration.new_category_share,
                "temperature": self.exploration.temperature,
                "new_item_share": self.exploration.new_item_share,
                "new_item_days": self.exploration.new_item_days,
            },
            "learning": {
                "reward_window_s": self.learning.reward_window_s,
                "default_reward": self.learning.default_reward,
                "max_event_value": self.learning.max_event_value,
                "max_event_age_s": self.learning.max_event_age_s,
                "max_clock_skew_s": self.learning.max_clock_skew_s,
            },
            "loop": {k: getattr(self.loop, k) for k in LOOP_KEYS},
        }


# ------------------------------------------------------------------------------------------------
class _Checker:
    """Collects errors with their key paths; typed getters return a safe value after an error."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[str] = []

    def err(self, key: str, msg: str) -> None:
        self.errors.append((key, msg))

    def table(self, d: Mapping[str, Any], key: str, path: str, required: bool = True) -> Mapping[str, Any]:
        if key not in d:
            if required:
                self.err(path, "is required (a TOML table); got nothing")
            return {}
        v = d[key]
        if not isinstance(v, Mapping):
            self.err(path, f"must be a TOML table; got {type(v).__name__} {v!r}")
            return {}
        return v

    def array_of_tables(self, d: Mapping[str, Any], key: str, required: bool) -> list[Mapping[str, Any]]:
        if key not in d:
            if required:
                self.err(key, f"is required: one [[{key}]] table or more; got none")
            return []
        v = d[key]
        if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
            self.err(key, f"must be an array of tables ([[{key}]]); got {v!r}")
            return []
        return v

    def number(self, d: Mapping[str, Any], key: str, path: str, *, default: float | None = None,
               low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float | None:
        if key not in d:
            if default is None:
                self.err(path, "is required (a number); got nothing")
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            self.err(path, f"must be a finite number; got {v!r}")
            return default
        ok = (v > low if low_open else v >= low) and v <= high
        if not ok:
            lb = "(" if low_open else "["
            self.err(path, f"must be in {lb}{low:g}, {high:g}]; got {v!r}")
            return default
        return float(v)

    def integer(self, d: Mapping[str, Any], key: str, path: str, *, default: int | None = None,
                low: int = 1, high: int = 10**9) -> int | None:
        if key not in d:
            if default is None:
                self.err(path, "is required (an integer); got nothing")
            return default
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            self.err(path, f"must be an integer in [{low}, {high}]; got {v!r}")
            return default
        return int(v)

    def string(self, d: Mapping[str, Any], key: str, path: str, *, default: str | None = None,
               allowed: tuple[str, ...] | None = None) -> str | None:
        if key not in d:
            if default is None:
                hint = f" (one of {', '.join(allowed)})" if allowed else ""
                self.err(path, f"is required{hint}; got nothing")
            return default
        v = d[key]
        if not isinstance(v, str) or not v.strip():
            self.err(path, f"must be a non-empty string; got {v!r}")
            return default
        if allowed is not None and v not in allowed:
            self.err(path, f"must be one of {', '.join(repr(a) for a in allowed)}; got {v!r}")
            return default
        return v

    def unknown(self, d: Mapping[str, Any], allowed: set[str], path: str) -> None:
        # an error, not a warning: a misspelt optional key (``budjet``) would otherwise leave its
        # setting at the default without anyone noticing
        for k in d:
            if k not in allowed:
                where = f"{path}.{k}" if path else k
                close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.err(where, f"is not a known key{hint} (known: {', '.join(sorted(allowed))})")


def load_config(path: str | Path) -> HomepageConfig:
    """Read and validate a ``homepage.toml``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ConfigError
        The TOML does not parse or does not validate; every problem is listed with its key.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {str(p)!r}")
    return parse_config_text(p.read_text(encoding="utf-8"), source=str(p))


def parse_config_text(text: str, source: str = "<string>") -> HomepageConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("<toml>", f"is not valid TOML ({e})")]) from None
    return parse_config(raw, source=source)


def parse_config(raw: Mapping[str, Any], source: str = "<dict>") -> HomepageConfig:
    """Validate a parsed TOML document and build a :class:`HomepageConfig`."""
    ck = _Checker()
    ck.unknown(raw, {"homepage", "categories", "modules", "events", "tilt", "constraints",
                     "exploration", "learning", "loop"}, "")

    hp = ck.table(raw, "homepage", "homepage")
    ck.unknown(hp, {"slots", "position_weights", "items_per_module", "pool_size", "item_position_weights",
                    "impressions"}, "homepage")
    slots = ck.integer(hp, "slots", "homepage.slots", low=1, high=100) if hp else None
    items_per_module = ck.integer(hp, "items_per_module", "homepage.items_per_module", low=1, high=1000) \
        if hp else None
    pool_size = ck.integer(hp, "pool_size", "homepage.pool_size", default=600, low=1, high=10**6) or 600
    weights: tuple[float, ...] = ()
    if hp:
        pw = hp.get("position_weights")
        if pw is None:
            ck.err("homepage.position_weights", "is required (a list of positive numbers, one per slot); "
                   "got nothing")
        elif (not isinstance(pw, list) or not pw
              or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                         and x > 0 for x in pw)):
            ck.err("homepage.position_weights", f"must be a list of positive numbers; got {pw!r}")
        elif slots is not None and len(pw) != slots:
            ck.err("homepage.position_weights",
                   f"must have one weight per slot ({slots}); got {len(pw)} weights")
        else:
            weights = tuple(float(x) for x in pw)
    item_weights: tuple[float, ...] = ()
    iw = hp.get("item_position_weights") if hp else None
    if iw is not None:
        if (not isinstance(iw, list) or not iw
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                           and x > 0 for x in iw)):
            ck.err("homepage.item_position_weights",
                   f"must be a list of positive numbers, one per position in a module; got {iw!r}")
        elif items_per_module is not None and len(iw) != items_per_module:
            ck.err("homepage.item_position_weights",
                   f"must have one weight per position in a module ({items_per_module}); got {len(iw)} weights")
        else:
            item_weights = tuple(float(x) for x in iw)

    impressions = (ck.string(hp, "impressions", "homepage.impressions", default="viewed", allowed=IMPRESSION_KINDS)
                   if hp else None) or "viewed"

    categories: list[Category] = []
    for i, t in enumerate(ck.array_of_tables(raw, "categories", required=True)):
        p = f"categories[{i}]"
        ck.unknown(t, {"name", "value_per_engagement", "new", "title"}, p)
        name = ck.string(t, "name", f"{p}.name")
        val = ck.number(t, "value_per_engagement", f"{p}.value_per_engagement", low=0.0)
        new = t.get("new", False)
        if not isinstance(new, bool):
            ck.err(f"{p}.new", f"must be true or false; got {new!r}")
            new = False
        if name is not None and name in [c.name for c in categories]:
            ck.err(f"{p}.name", f"must be unique; {name!r} is already defined")
        elif name is not None and val is not None:
            categories.append(Category(name, val, new))
    cat_names = tuple(c.name for c in categories)

    modules: list[Module] = []
    for i, t in enumerate(ck.array_of_tables(raw, "modules", required=True)):
        p = f"modules[{i}]"
        ck.unknown(t, {"id", "category", "title"}, p)
        mid = ck.string(t, "id", f"{p}.id")
        cat = ck.string(t, "category", f"{p}.category", allowed=cat_names if cat_names else None)
        title = t.get("title", "")
        if mid is not None and mid in [m.id for m in modules]:
            ck.err(f"{p}.id", f"must be unique; {mid!r} is already defined")
        elif mid is not None and cat is not None:
            modules.append(Module(mid, cat, str(title)))
    if slots is not None and modules and len(modules) < slots:
        ck.err("modules", f"must define at least as many modules as slots ({slots}); got {len(modules)}")

    ev = ck.table(raw, "events", "events")
    ck.unknown(ev, set(EVENT_TYPES) | {"impression"}, "events")
    events: dict[str, float] = {}
    if ev:
        for e in EVENT_TYPES:
            w = ck.number(ev, e, f"events.{e}")
            if w is not None:
                events[e] = w
        if "impression" in ev:
            w = ck.number(ev, "impression", "events.impression")
            if w is not None:
                events["impression"] = w

    tl = ck.table(raw, "tilt", "tilt", required=False)
    ck.unknown(tl, {"levels", "head_share"}, "tilt")
    levels: tuple[float, ...] = Tilt().levels
    if "levels" in tl:
        lv = tl["levels"]
        if (not isinstance(lv, list) or not lv or len(lv) > 16
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                           and 0 <= x <= 1 for x in lv)):
            ck.err("tilt.levels", "must be a list of 1 to 16 numbers in [0, 1] (the share of each module's "
                   f"items taken from the long tail); got {lv!r}")
        elif len(set(lv)) != len(lv):
            ck.err("tilt.levels", f"must not repeat a level; got {lv!r}")
        else:
            levels = tuple(float(x) for x in lv)
    head_share = ck.number(tl, "head_share", "tilt.head_share", default=0.8, low=0.0, high=1.0,
                           low_open=True)
    tilt = Tilt(levels, 0.8 if head_share is None else head_share)

    module_ids = tuple(m.id for m in modules)
    constraints: list[Constraint] = []
    for i, t in enumerate(ck.array_of_tables(raw, "constraints", required=False)):
        p = f"constraints[{i}]"
        ck.unknown(t, {"name", "kind", "category", "module", "min", "max"}, p)
        name = ck.string(t, "name", f"{p}.name")
        kind = ck.string(t, "kind", f"{p}.kind", allowed=CONSTRAINT_KINDS)
        lo = ck.number(t, "min", f"{p}.min", default=None, low=0.0, high=1.0) if "min" in t else None
        hi = ck.number(t, "max", f"{p}.max", default=None, low=0.0, high=1.0) if "max" in t else None
        if "min" not in t and "max" not in t:
            ck.err(p, "needs `min`, `max` or both (shares in [0, 1]); got neither")
        if lo is not None and hi is not None and lo > hi:
            ck.err(f"{p}.max", f"must be >= min ({lo:g}); got {hi:g}")
        cat = mod = None
        if kind == "category_share":
            cat = ck.string(t, "category", f"{p}.category", allowed=cat_names if cat_names else None)
        elif kind == "module_share":
            mod = ck.string(t, "module", f"{p}.module", allowed=module_ids if module_ids else None)
        if name is not None and name in [c.name for c in constraints]:
            ck.err(f"{p}.name", f"must be unique; {name!r} is already defined")
        elif name is not None and kind is not None:
            constraints.append(Constraint(name, kind, lo, hi, cat, mod))

    ex = ck.table(raw, "exploration", "exploration", required=False)
    ck.unknown(ex, {"budget", "max_value_loss", "algorithm", "new_category_share", "temperature", "new_item_share",
                    "new_item_days"}, "exploration")
    budget = ck.number(ex, "budget", "exploration.budget", default=0.05, low=0.0, high=1.0)
    mvl = (ck.number(ex, "max_value_loss", "exploration.max_value_loss", default=None, low=0.0, high=1.0)
           if "max_value_loss" in ex else None)
    algo = ck.string(ex, "algorithm", "exploration.algorithm", default="epsilon",
                     allowed=EXPLORATION_ALGORITHMS)
    ncs = ck.number(ex, "new_category_share", "exploration.new_category_share", default=0.0,
                    low=0.0, high=1.0)
    temp = ck.number(ex, "temperature", "exploration.temperature", default=0.02, low=0.0, high=1.0)
    dex = Exploration()
    nis = ck.number(ex, "new_item_share", "exploration.new_item_share", default=dex.new_item_share, low=0.0,
                    high=1.0)
    nid = ck.number(ex, "new_item_days", "exploration.new_item_days", default=dex.new_item_days, low=0.0)
    exploration = Exploration(0.05 if budget is None else budget, mvl, algo or "epsilon", ncs or 0.0,
                              0.1 if temp is None else temp, dex.new_item_share if nis is None else nis,
                              dex.new_item_days if nid is None else nid)

    le = ck.table(raw, "learning", "learning", required=False)
    ck.unknown(le, set(Learning.__dataclass_fields__), "learning")
    dl = Learning()
    rw = ck.number(le, "reward_window_s", "learning.reward_window_s", default=dl.reward_window_s, low=0.0,
                   low_open=True)
    dr = ck.number(le, "default_reward", "learning.default_reward", default=dl.default_reward)
    mev = ck.number(le, "max_event_value", "learning.max_event_value", default=dl.max_event_value, low=0.0,
                    low_open=True)
    mea = ck.number(le, "max_event_age_s", "learning.max_event_age_s", default=dl.max_event_age_s, low=0.0,
                    low_open=True)
    mcs = ck.number(le, "max_clock_skew_s", "learning.max_clock_skew_s", default=dl.max_clock_skew_s, low=0.0)
    learning = Learning(dl.reward_window_s if rw is None else rw, dl.default_reward if dr is None else dr,
                        dl.max_event_value if mev is None else mev, dl.max_event_age_s if mea is None else mea,
                        dl.max_clock_skew_s if mcs is None else mcs)
    loop = _loop(ck, raw)

    if ck.errors:
        raise ConfigError(ck.errors)
    assert slots is not None and items_per_module is not None
    return HomepageConfig(
        slots=slots,
        position_weights=weights,
        items_per_module=items_per_module,
        categories=tuple(categories),
        modules=tuple(modules),
        events=dict(events),
        tilt=tilt,
        constraints=tuple(constraints),
        exploration=exploration,
        learning=learning,
        loop=loop,
        pool_size=pool_size,
        item_position_weights=item_weights,
        impressions=impressions,
        warnings=tuple(ck.warnings),
        source=source,
    )


def _loop(ck: _Checker, raw: Mapping[str, Any]) -> Loop:
    t = ck.table(raw, "loop", "loop", required=False)
    ck.unknown(t, set(LOOP_KEYS), "loop")
    d = Loop()
    out: dict[str, Any] = {}
    if "enabled" in t:
        if not isinstance(t["enabled"], bool):
            ck.err("loop.enabled", f"must be true or false; got {t['enabled']!r}")
        else:
            out["enabled"] = t["enabled"]
    for k in ("plan_users", "learn_min_decisions", "train_min_events", "train_max_epochs", "state_max_events",
              "pace_window", "calibration_events", "serve_window", "shift_window"):
        n = ck.integer(t, k, f"loop.{k}", default=getattr(d, k), low=1)
        if n is not None:
            out[k] = n
    for k in ("replan_every_s", "pace_every_s", "pace_gain", "pace_half_life", "pace_max_step", "max_price",
              "learn_every_s",
              "train_every_s", "state_half_life_s", "state_half_life_impressions", "state_deadline_ms",
              "lease_ttl_s"):
        v = ck.number(t, k, f"loop.{k}", default=getattr(d, k), low=0.0, low_open=True)
        if v is not None:
            out[k] = v
    n = ck.integer(t, "item_events", "loop.item_events", default=d.item_events, low=0)
    if n is not None:
        out["item_events"] = n
    for k, hi in (("pace_margin", 0.5), ("settle_s", math.inf), ("serve_gain", 10.0), ("shift_keep", 1.0),
                  ("pace_sample", 1.0)):
        v = ck.number(t, k, f"loop.{k}", default=getattr(d, k), low=0.0, high=hi)
        if v is not None:
            out[k] = v
    store = ck.string(t, "state_store", "loop.state_store", default=d.state_store)
    if store is not None:
        if store != "sql" and not store.startswith(("redis://", "rediss://")):
            ck.err("loop.state_store", f"must be 'sql' or a redis:// URL; got {store!r}")
        else:
            out["state_store"] = store
    return Loop(**out)
