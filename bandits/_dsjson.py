"""Decision-service JSON (DSJSON) lines: one logged decision per line, the format Vowpal Wabbit reads.

A line of a ``cb_explore_adf`` decision looks like (wrapped here)::

    {"_label_cost": -1.5, "_label_probability": 0.25, "_label_Action": 3, "_labelIndex": 2,
     "o": [{"v": 1.5, "EventId": "r1", "ActionTaken": false}],
     "Timestamp": "2024-01-01T00:00:00.0000000Z", "Version": "1", "EventId": "r1",
     "a": [3, 1, 2],
     "c": {"s": {"0": 1.0, "2": 0.5},
           "_multi": [{"a": {"0": 1.0}}, {"a": {"1": 2.0}}, {"a": {"0": 0.3}}]},
     "p": [0.25, 0.5, 0.25], "VWState": {"m": "bandit/7"}}

- ``c`` is the context: the shared features (namespace ``s``) and ``_multi``, one object per candidate
  (namespace ``a``), in candidate order. Feature names are the column indices of the arrays the engine
  builds (``"0"``, ``"1"``, ...), which is exactly how :class:`bandits.VWLayoutBandit` names them, so
  VW trained on these lines learns the same model as the adapter. Zero-valued features are left out
  (VW drops them too).
- ``a`` lists the 1-based candidate ids with the chosen one first; ``p`` is the pmf in the order of
  ``a`` (so ``p[0]`` is the chosen candidate's propensity).
- ``_labelIndex`` is the 0-based index of the chosen candidate in ``_multi``, ``_label_Action`` the
  same 1-based; ``_label_probability`` its propensity and ``_label_cost`` the cost VW minimises
  (``-(reward + prices . exposure)``). A decision with no cost yet has no ``_label_*`` fields.
- ``o`` lists outcomes (``v``: a reward value), ``Timestamp`` is ISO 8601 UTC with 7 fractional
  digits, ``VWState.m`` the model version that made the decision.

References
----------
Vowpal Wabbit wiki, "Decision Service JSON format" (DSJSON), and VW's parser
``vowpalwabbit/json_parser/src/parse_example_json.cc`` (``read_line_decision_service_json``);
example lines: ``py-vowpal-wabbit-next/docs/source/how_to_guides/example.dsjson``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._num import is_integral, is_real

__all__ = ["ACTION_NAMESPACE", "SHARED_NAMESPACE", "DSJsonDecision", "parse_dsjson_line", "to_dsjson_line"]

#: VW namespaces of the shared (user) features and of each candidate's features.
SHARED_NAMESPACE = "s"
ACTION_NAMESPACE = "a"


def _r(x: object) -> str:
    """repr of a user value, numpy scalars shown as plain numbers."""
    return repr(x.item() if isinstance(x, np.generic) else x)


@dataclass(frozen=True)
class DSJsonDecision:
    """One logged decision, as read back from a DSJSON line (arrays in candidate order)."""

    event_id: str
    timestamp: str
    shared: np.ndarray  # (d_s,)
    actions: np.ndarray  # (n_cand, d_a)
    pmf: np.ndarray  # (n_cand,)
    chosen: int
    cost: float | None
    outcomes: tuple[float, ...] = ()
    model_version: str = "N/A"
    tags: tuple[str, ...] | None = field(default=None)


def _timestamp(ts: float | _dt.datetime | str) -> str:
    if isinstance(ts, str):
        return ts
    if isinstance(ts, _dt.datetime):
        d = ts if ts.tzinfo is not None else ts.replace(tzinfo=_dt.UTC)
    elif is_real(ts) and math.isfinite(float(ts)):
        d = _dt.datetime.fromtimestamp(float(ts), tz=_dt.UTC)
    else:
        raise ValueError(f"timestamp must be unix seconds, a datetime or an ISO string; got {_r(ts)}")
    d = d.astimezone(_dt.UTC)
    # DS writes 100 ns ticks: 7 fractional digits
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond:06d}0Z"


def _features(row: np.ndarray) -> dict[str, float]:
    nz = np.flatnonzero(row)
    return dict(zip(map(str, nz.tolist()), row[nz].tolist(), strict=True))


def to_dsjson_line(*, event_id: str, timestamp: float | _dt.datetime | str, shared: np.ndarray,
                   actions: np.ndarray, pmf: np.ndarray, chosen: int, cost: float | None = None,
                   outcomes: Sequence[float] = (), model_version: str = "N/A",
                   tags: Sequence[str] | None = None) -> str:
    """Format one logged decision as a DSJSON line (no trailing newline).

    Parameters
    ----------
    event_id
        The decision's id (the request id).
    timestamp
        Unix seconds, a datetime (naive = UTC) or an already formatted string.
    shared
        Shape (d_s,): the shared features the bandit saw.
    actions
        Shape (n_cand, d_a): each candidate's features, in candidate order.
    pmf
        Shape (n_cand,): the sampled pmf (its entries are the logged propensities).
    chosen
        Index of the served candidate, in [0, n_cand), with ``pmf[chosen] > 0``.
    cost
        The cost VW learns from, or None when no reward has been joined yet.
    outcomes
        Reward values observed for the decision (each becomes ``{"v": value, ...}`` in ``o``).
    model_version
        Written to ``VWState.m``.
    tags
        Optional ``_tag`` per candidate (e.g. a layout key).

    Returns
    -------
    str
        One JSON object, compact.
    """
    s = np.asarray(shared, dtype=np.float64)
    a = np.asarray(actions, dtype=np.float64)
    p = np.asarray(pmf, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError(f"shared must be a finite array of shape (d_s,); got shape {s.shape}")
    if a.ndim != 2 or a.shape[0] == 0 or not np.isfinite(a).all():
        raise ValueError(f"actions must be a finite array of shape (n_cand, d_a), n_cand >= 1; got {a.shape}")
    n_cand = a.shape[0]
    if p.shape != (n_cand,) or not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > 1e-5:
        raise ValueError(f"pmf must be a distribution of shape ({n_cand},); got {pmf!r}")
    if not is_integral(chosen) or not 0 <= chosen < n_cand:
        raise ValueError(f"chosen must be an integer in [0, {n_cand}); got {_r(chosen)}")
    chosen = int(chosen)
    if p[chosen] <= 0:
        raise ValueError(f"pmf[chosen] must be > 0 (a served candidate has a propensity); got {float(p[chosen])!r}")
    if tags is not None and len(tags) != n_cand:
        raise ValueError(f"tags must have one entry per candidate ({n_cand}); got {len(tags)}")
    order = [chosen] + [j for j in range(n_cand) if j != chosen]
    multi: list[dict[str, Any]] = []
    for j in range(n_cand):
        ex: dict[str, Any] = {"_tag": str(tags[j])} if tags is not None else {}
        ex[ACTION_NAMESPACE] = _features(a[j])
        multi.append(ex)
    line: dict[str, Any] = {}
    if cost is not None:
        if not (is_real(cost, allow_bool=True) and math.isfinite(float(cost))):
            raise ValueError(f"cost must be a finite number or None; got {_r(cost)}")
        line.update({"_label_cost": float(cost), "_label_probability": float(p[chosen]),
                     "_label_Action": chosen + 1, "_labelIndex": chosen})
    line["o"] = [{"v": float(v), "EventId": str(event_id), "ActionTaken": False} for v in outcomes]
    line.update({
        "Timestamp": _timestamp(timestamp),
        "Version": "1",
        "EventId": str(event_id),
        "a": [j + 1 for j in order],
        "c": {SHARED_NAMESPACE: _features(s), "_multi": multi},
        "p": [float(p[j]) for j in order],
        "VWState": {"m": str(model_version)},
    })
    return json.dumps(line, separators=(",", ":"), allow_nan=False)


def _dense(feats: object, d: int | None, key: str) -> tuple[dict[int, float], int]:
    if not isinstance(feats, dict):
        raise ValueError(f"{key} must be an object of feature index -> value; got {feats!r}")
    try:
        out = {int(k): float(v) for k, v in feats.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key} must map integer feature names to numbers; got {feats!r}") from e
    if any(k < 0 for k in out):
        raise ValueError(f"{key} feature names must be >= 0; got {sorted(out)}")
    need = max(out, default=-1) + 1
    if d is not None and need > d:
        raise ValueError(f"{key} has feature {need - 1} but only {d} features were declared")
    return out, need


def parse_dsjson_line(line: str, n_shared_features: int | None = None,
                      n_action_features: int | None = None) -> DSJsonDecision:
    """Read a line written by :func:`to_dsjson_line` back into arrays.

    Zero features are not written, so the widths are ``n_shared_features`` / ``n_action_features``
    when given, else the largest feature index seen + 1.

    Raises
    ------
    ValueError
        The line is not JSON, misses a required field (named), or its ``a``/``p``/label disagree.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"line must be a JSON object; got {type(obj).__name__}")
    for key in ("EventId", "a", "c", "p"):
        if key not in obj:
            raise ValueError(f"DSJSON line misses required field {key!r}")
    ctx = obj["c"]
    if not isinstance(ctx, dict) or not isinstance(ctx.get("_multi"), list) or not ctx["_multi"]:
        raise ValueError("c._multi must be a non-empty list of candidates")
    multi = ctx["_multi"]
    n_cand = len(multi)
    a_ids, p_list = obj["a"], obj["p"]
    if sorted(a_ids) != list(range(1, n_cand + 1)) or len(p_list) != n_cand:
        raise ValueError(f"a must be a permutation of 1..{n_cand} and p must have {n_cand} entries; "
                         f"got a={a_ids!r}, p={p_list!r}")
    shared, d_s = _dense(ctx.get(SHARED_NAMESPACE, {}), n_shared_features, f"c.{SHARED_NAMESPACE}")
    rows = [_dense(m.get(ACTION_NAMESPACE, {}) if isinstance(m, dict) else None, n_action_features,
                   f"c._multi[{j}].{ACTION_NAMESPACE}") for j, m in enumerate(multi)]
    d_s = n_shared_features if n_shared_features is not None else d_s
    d_a = n_action_features if n_action_features is not None else max(r[1] for r in rows)
    s = np.zeros(d_s)
    for k, v in shared.items():
        s[k] = v
    act = np.zeros((n_cand, d_a))
    for j, (feats, _) in enumerate(rows):
        for k, v in feats.items():
            act[j, k] = v
    pmf = np.zeros(n_cand)
    pmf[np.asarray(a_ids) - 1] = np.asarray(p_list, dtype=np.float64)
    chosen = int(a_ids[0]) - 1
    cost = None
    if "_label_cost" in obj:
        cost = float(obj["_label_cost"])
        if int(obj.get("_labelIndex", -1)) != chosen or int(obj.get("_label_Action", -1)) != chosen + 1:
            raise ValueError(f"_labelIndex/_label_Action must name a[0]={a_ids[0]}; got "
                             f"{obj.get('_labelIndex')!r}/{obj.get('_label_Action')!r}")
    tags = tuple(str(m["_tag"]) for m in multi) if all("_tag" in m for m in multi) else None
    return DSJsonDecision(
        event_id=str(obj["EventId"]), timestamp=str(obj.get("Timestamp", "")), shared=s, actions=act,
        pmf=pmf, chosen=chosen, cost=cost, outcomes=tuple(float(o["v"]) for o in obj.get("o", [])),
        model_version=str(obj.get("VWState", {}).get("m", "N/A")), tags=tags,
    )
