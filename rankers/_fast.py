"""The ranker at serving cost: a numpy evaluation of a trained :class:`Ranker` for one user's pool.

Per model version everything that does not depend on the user is computed once: the item tower's
outputs, the attention queries of every item, and each item's part of its category ranker's first
layer (experts and gates), plus the popularity branch. Per request the user side is computed once
(user embedding, keys and values of the positive and skip sequences, the profile for the category
head) and all pool items of all categories are scored in one pass: the attention of every item over
the user's sequences is one matmul, and the per-category part is one slice of the pool per category.
No torch call, so no per-call thread switching. Arithmetic is float64: the scores equal the torch
model's to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ._model import CIN, CrossNet, Ranker

__all__ = ["FastRanker", "UserSide"]

_SKIP_TYPE = 4  # the behaviour code of every skip-sequence entry (as in the torch model)


def _np(t: object) -> np.ndarray:
    return np.asarray(t.detach().cpu().double().numpy())  # type: ignore[attr-defined]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


@dataclass(frozen=True, slots=True)
class UserSide:
    """What one request computes about its user, once, before scoring any item.

    Attributes
    ----------
    u
        Shape (d,): the user's id embedding (the cold-start row for unknown users).
    pos_k, pos_v, neg_k, neg_v
        Shapes (Lp, d) and (Ln, d): keys and values of the real (unpadded) sequence entries.
    profile
        Shape (3d,): the candidate-free summary the category head reads.
    u_first
        Shape (C, H1): the user field's term in each category ranker's first layer.
    user_logit
        Shape (T,): the activity branch (factual score) or its reference (debiased score).
    """

    u: np.ndarray
    pos_k: np.ndarray
    pos_v: np.ndarray
    neg_k: np.ndarray
    neg_v: np.ndarray
    profile: np.ndarray
    u_first: np.ndarray
    user_logit: np.ndarray


class _Category:
    """One category ranker's weights, split by the input columns they read."""

    def __init__(self, ranker: nn.Module, d: int, n_dense: int) -> None:
        cgc: Any = ranker.cgc
        w1 = np.concatenate([_np(cgc.experts.weight), _np(cgc.gates.weight)])  # (H1, in)
        self.b1 = np.concatenate([_np(cgc.experts.bias), _np(cgc.gates.bias)])
        self.w_item = np.concatenate([w1[:, : 2 * d], w1[:, 5 * d : 5 * d + n_dense]], axis=1).T  # (2d+nd, H1)
        self.w_user = w1[:, 2 * d : 3 * d]  # (H1, d)
        self.w_seq = w1[:, 3 * d : 5 * d].T  # (2d, H1): positive and skip attention fields
        self.w_inter = w1[:, 5 * d + n_dense :].T  # (I, H1)
        self.n_experts_out = int(cgc.experts.weight.shape[0])
        self.expert_dim = int(cgc.expert_dim)
        self.n_tasks = int(cgc.n_tasks)
        self.expert_index = np.asarray(cgc.expert_index.cpu().numpy(), dtype=np.int64)  # (T, k)
        self.tower_hidden = _np(cgc.tower_hidden)  # (T, h, k)
        self.tower_bias = _np(cgc.tower_bias)
        self.tower_out = _np(cgc.tower_out)
        self.out_bias = _np(cgc.out_bias)
        inter: Any = ranker.interaction
        self.kind = "cin" if isinstance(inter, CIN) else "cross" if isinstance(inter, CrossNet) else "none"
        if self.kind == "none" and int(getattr(inter, "out_dim", 0)) != 0:
            raise ValueError(f"interaction must be CIN, CrossNet or none; got {type(inter).__name__}")
        self.cin = [_np(w) for w in inter.weights] if self.kind == "cin" else []
        if self.cin:
            # the first layer reads each field pair (i, j) and (j, i) with the same Hadamard product:
            # fold them onto the m(m+1)/2 pairs i <= j
            m = int(round(np.sqrt(self.cin[0].shape[1])))
            iu, ju = np.triu_indices(m)
            w = self.cin[0].reshape(-1, m, m)
            fold = w + w.transpose(0, 2, 1)
            fold[:, np.arange(m), np.arange(m)] = w[:, np.arange(m), np.arange(m)]
            self.pairs = (iu, ju)
            self.cin_first = np.ascontiguousarray(fold[:, iu, ju].T)  # (m(m+1)/2, H1)
            self.cin_rest = [np.ascontiguousarray(w.T) for w in self.cin[1:]]
        self.cross = [(_np(lin.weight).T, _np(lin.bias)) for lin in inter.layers] if self.kind == "cross" else []

    def interaction(self, x0t: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """``x0t`` (n, d, m) fields, ``flat`` (n, m d + n_dense) -> (n, I)."""
        if self.kind == "cin":
            n, d, m = x0t.shape
            iu, ju = self.pairs
            if not self.cin_rest:  # one layer: only its sum over d is needed, i.e. the fields' Gram matrix
                gram = np.matmul(x0t.transpose(0, 2, 1), x0t)[:, iu, ju]  # (n, pairs)
                return gram @ self.cin_first
            z = (x0t[:, :, iu] * x0t[:, :, ju]).reshape(n * d, -1)
            xk = (z @ self.cin_first).reshape(n, d, -1)
            pooled = [xk.sum(axis=1)]
            for k, w in enumerate(self.cin_rest):
                if k == len(self.cin_rest) - 1:
                    # the last layer is only summed over d: sum_d X_k[i] X_0[j] = <X_k[i], X_0[j]>
                    g = np.matmul(xk.transpose(0, 2, 1), x0t).reshape(n, -1)  # (n, H m), column i*m + j
                    pooled.append(g @ w)
                else:
                    z = (xk[:, :, :, None] * x0t[:, :, None, :]).reshape(n * d, -1)  # column i*m + j
                    xk = (z @ w).reshape(n, d, -1)
                    pooled.append(xk.sum(axis=1))
            return np.concatenate(pooled, axis=1)
        if self.kind == "cross":
            x = flat
            for w, b in self.cross:
                x = flat * (x @ w + b) + x
            return x
        return flat[:, :0]

    def logits(self, first: np.ndarray) -> np.ndarray:
        """The first layer's output (n, H1) -> task logits (n, T) (the CGC after its first matmul)."""
        n = first.shape[0]
        e = np.maximum(first[:, : self.n_experts_out], 0.0).reshape(n, -1, self.expert_dim)  # (n, E, h)
        g = first[:, self.n_experts_out :].reshape(n, self.n_tasks, -1)  # (n, T, k)
        g = np.exp(g - g.max(axis=2, keepdims=True))
        g /= g.sum(axis=2, keepdims=True)
        mixed = np.matmul(g[:, :, None, :], e[:, self.expert_index])[:, :, 0, :]  # (n, T, h)
        hidden = np.matmul(mixed.transpose(1, 0, 2), self.tower_hidden) + self.tower_bias[:, None, :]  # (T, n, k)
        np.maximum(hidden, 0.0, out=hidden)
        out: np.ndarray = np.matmul(hidden, self.tower_out[:, :, None])[:, :, 0].T + self.out_bias
        return out


class _Stacked:
    """Every category ranker's weights stacked on a leading category axis (the rankers share one
    shape), so one request evaluates all categories in the same batched matmuls."""

    def __init__(self, cats: list[_Category]) -> None:
        c0 = cats[0]
        for cr in cats[1:]:
            if cr.kind != c0.kind or cr.w_seq.shape != c0.w_seq.shape or cr.w_inter.shape != c0.w_inter.shape:
                raise ValueError("category rankers must share one architecture; got differing shapes")
        self.kind = c0.kind
        self.w_seq = np.stack([cr.w_seq for cr in cats])  # (C, 2d, H1)
        self.w_inter = np.stack([cr.w_inter for cr in cats])  # (C, I, H1)
        self.n_experts_out, self.expert_dim, self.n_tasks = c0.n_experts_out, c0.expert_dim, c0.n_tasks
        self.expert_index = c0.expert_index
        self.tower_hidden = np.stack([cr.tower_hidden for cr in cats])  # (C, T, h, k)
        self.tower_bias = np.stack([cr.tower_bias for cr in cats])[:, :, None, :]  # (C, T, 1, k)
        self.tower_out = np.stack([cr.tower_out for cr in cats])[..., None]  # (C, T, k, 1)
        self.out_bias = np.stack([cr.out_bias for cr in cats])[:, None, :]  # (C, 1, T)
        if self.kind == "cin":
            self.pairs = c0.pairs
            self.cin_first = np.stack([cr.cin_first for cr in cats])  # (C, pairs, H)
            self.cin_rest = [np.stack(ws) for ws in zip(*[cr.cin_rest for cr in cats], strict=True)]
        self.cross = [(np.stack(w), np.stack(b)[:, None, :]) for w, b in
                      (zip(*layer, strict=True) for layer in zip(*[cr.cross for cr in cats], strict=True))]

    def interaction(self, x0t: np.ndarray, flat: np.ndarray, cc: np.ndarray) -> np.ndarray:
        """``x0t`` (G, N, d, m) fields, ``flat`` (G, N, m d + n_dense), ``cc`` (G,) category of each
        group -> (G, N, I)."""
        if self.kind == "cin":
            G, N, d, m = x0t.shape
            iu, ju = self.pairs
            if not self.cin_rest:  # one layer: only its sum over d is needed, i.e. the fields' Gram matrix
                gram = np.matmul(x0t.swapaxes(-1, -2), x0t)[:, :, iu, ju]  # (G, N, pairs)
                return np.matmul(gram, self.cin_first[cc])
            z = (x0t[..., iu] * x0t[..., ju]).reshape(G, N, d, -1)
            w1 = self.cin_first[cc]
            xk = np.matmul(z.reshape(G, N * d, -1), w1).reshape(G, N, d, -1)
            # the first layer summed over d is the fields' Gram pairs times its weights (no sum over xk)
            pooled = [np.matmul(z.sum(axis=2), w1)]
            for k, w in enumerate(self.cin_rest):
                if k == len(self.cin_rest) - 1:
                    # the last layer is only summed over d: sum_d X_k[i] X_0[j] = <X_k[i], X_0[j]>
                    g = np.matmul(xk.swapaxes(-1, -2), x0t).reshape(G, N, -1)  # (G, N, H m), column i*m + j
                    pooled.append(np.matmul(g, w[cc]))
                else:
                    z = (xk[..., :, None] * x0t[..., None, :]).reshape(G, N * d, -1)  # column i*m + j
                    xk = np.matmul(z, w[cc]).reshape(G, N, d, -1)
                    pooled.append(xk.sum(axis=2))
            return np.concatenate(pooled, axis=-1)
        if self.kind == "cross":
            x = flat
            for w, b in self.cross:
                x = flat * (np.matmul(x, w[cc]) + b[cc]) + x
            return x
        return flat[..., :0]

    def logits(self, first: np.ndarray, cc: np.ndarray) -> np.ndarray:
        """The first layer's output (G, N, H1), ``cc`` (G,) categories -> task logits (G, N, T)."""
        C, N = first.shape[:2]
        E = self.n_experts_out
        e = np.maximum(first[..., :E], 0.0).reshape(C, N, -1, self.expert_dim)  # (C, N, E, h)
        g = first[..., E:].reshape(C, N, self.n_tasks, -1)  # (C, N, T, k)
        g = np.exp(g - g.max(axis=-1, keepdims=True))
        g /= g.sum(axis=-1, keepdims=True)
        mixed = np.matmul(g[..., None, :], e[:, :, self.expert_index])[..., 0, :]  # (C, N, T, h)
        hidden = np.matmul(mixed.transpose(0, 2, 1, 3), self.tower_hidden[cc]) + self.tower_bias[cc]  # (G, T, N, k)
        np.maximum(hidden, 0.0, out=hidden)
        return np.matmul(hidden, self.tower_out[cc])[..., 0].swapaxes(1, 2) + self.out_bias[cc]


class FastRanker:
    """A trained :class:`Ranker` evaluated with numpy for one user's candidates at a time.

    ``user_side(...)`` once per request, then ``score(side, items)`` for all pool items (any mix of
    categories) and ``category_preferences(side)`` from the same user pass. Equal to the torch model
    (``Ranker.forward`` then ``probabilities`` and the event weights) to float32 rounding.

    Parameters
    ----------
    model
        A trained :class:`Ranker`; its weights are copied (later training does not change this object).
    task_weights
        Shape (T,): engagement units per task (``task_weights_from_events``).
    debias
        As in :class:`RankerScorer`: True scores with the popularity and activity branches held at
        their reference values.
    """

    def __init__(self, model: Ranker, task_weights: np.ndarray, *, debias: bool = True) -> None:
        it, ut = model.item_tower, model.user_tower
        self.n_users, self.n_items, self.n_categories = model.n_users, model.n_items, model.n_categories
        self.debias = bool(debias)
        self.task_weights = np.asarray(task_weights, dtype=np.float64)
        if self.task_weights.shape != (model.n_tasks,):
            raise ValueError(f"task_weights must have shape ({model.n_tasks},); got {self.task_weights.shape}")
        d = int(it.embedding.weight.shape[1])
        self.d = d
        self.item_embedding = _np(it.embedding.weight)  # (n_items, d)
        dense = _np(it.dense)
        self.item_proj = dense @ _np(it.proj.weight).T + _np(it.proj.bias)
        item_category: Any = model.item_category
        self.item_category = item_category.cpu().numpy().astype(np.int64)
        self.user_embedding = _np(ut.embedding.weight)  # (n_users + 1, d)
        self.type_embedding = _np(ut.type_embedding.weight)
        att = []
        for a in (ut.pos_attention, ut.neg_attention):
            # queries of every item, scaled once: (n_items, d)
            att.append((self.item_embedding @ _np(a.q.weight).T * a.scale, _np(a.k.weight).T, _np(a.k.bias),
                        _np(a.v.weight).T, _np(a.v.bias)))
        self._pos_att, self._neg_att = att
        n_dense = int(dense.shape[1])
        self.categories = [_Category(r, d, n_dense) for r in model.rankers]
        # each item's own part of its category ranker's first layer, bias included: (n_items, H1)
        item_in = np.concatenate([self.item_embedding, self.item_proj, dense], axis=1)
        h1 = self.categories[0].b1.size
        self.item_first = np.empty((self.n_items, h1))
        for c, cr in enumerate(self.categories):
            rows = self.item_category == c
            self.item_first[rows] = item_in[rows] @ cr.w_item + cr.b1
        self.dense = dense
        self.stacked = _Stacked(self.categories)
        head = model.category_head
        self.head = (_np(head.hidden.weight).T, _np(head.hidden.bias), _np(head.out.weight).T, _np(head.out.bias))
        self.item_ref, self.user_ref = _np(model.item_ref), _np(model.user_ref)
        ib, ub = model.item_branch, model.user_branch
        self.item_logit: np.ndarray | None = None
        self.user_bias: np.ndarray | None = None
        if not self.debias and ib is not None and ub is not None:
            pop = _np(model.pop)
            hid = np.maximum(pop @ _np(ib.hidden.weight).T + _np(ib.hidden.bias), 0.0)
            self.item_logit = hid @ _np(ib.out.weight).T + _np(ib.out.bias) + _np(ib.category_bias.weight)[
                self.item_category]
            self.user_bias = _np(ub.bias.weight)
            self.user_activity = (_np(ub.activity.weight).T, _np(ub.activity.bias))

    def user_side(self, user: int, pos_items: np.ndarray, pos_types: np.ndarray, neg_items: np.ndarray,
                  activity: np.ndarray) -> UserSide:
        """The user's side of the model, once per request.

        Parameters
        ----------
        user
            Model user row, -1 for a user unknown to the model.
        pos_items, pos_types, neg_items
            Shape (L,): model item rows and ``EVENT_TYPES`` codes, -1 = padding.
        activity
            Shape (2,): ``log1p`` of the positive and skip counts (used by the factual score only).
        """
        row = self.n_users if user < 0 else int(user)
        d = self.d
        u = self.user_embedding[row]
        pos = np.asarray(pos_items)
        keep = pos >= 0
        pos_seq = self.item_embedding[pos[keep]] + self.type_embedding[np.asarray(pos_types)[keep]]
        neg = np.asarray(neg_items)
        neg_seq = self.item_embedding[neg[neg >= 0]] + self.type_embedding[_SKIP_TYPE]
        _, pk_w, pk_b, pv_w, pv_b = self._pos_att
        _, nk_w, nk_b, nv_w, nv_b = self._neg_att
        profile = np.concatenate([u, pos_seq.mean(0) if pos_seq.shape[0] else np.zeros(d),
                                  neg_seq.mean(0) if neg_seq.shape[0] else np.zeros(d)])
        u_first = np.stack([cr.w_user @ u for cr in self.categories])
        if self.debias:
            user_logit = self.user_ref
        elif self.user_bias is not None:
            aw, ab = self.user_activity
            user_logit = self.user_bias[row] + np.asarray(activity, dtype=np.float64) @ aw + ab
        else:
            user_logit = np.zeros(self.item_ref.size)
        return UserSide(u, pos_seq @ pk_w + pk_b, pos_seq @ pv_w + pv_b, neg_seq @ nk_w + nk_b,
                        neg_seq @ nv_w + nv_b, profile, u_first, user_logit)

    @staticmethod
    def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if k.shape[0] == 0:
            return np.zeros((q.shape[0], v.shape[1]))
        s = q @ k.T
        w = np.exp(s - s.max(axis=1, keepdims=True))
        return (w @ v) / w.sum(axis=1, keepdims=True)

    def logits(self, side: UserSide, items: np.ndarray) -> np.ndarray:
        """Head logits (n, T) for ``items`` (n,) model item rows: factual ``main + item + user`` or the
        debiased ``main + item_ref + user_ref``.

        The items are laid out on a (group, position) grid of groups of equal size, each group within
        one category (a large category fills several), so every category ranker runs in the same batched
        matmuls with little padding.
        """
        items = np.asarray(items, dtype=np.int64)
        n = items.size
        if n == 0:
            return np.empty((0, self.item_ref.size))
        C = self.n_categories
        cat = self.item_category[items]
        pos = self._attend(self._pos_att[0][items], side.pos_k, side.pos_v)  # (n, d)
        neg = self._attend(self._neg_att[0][items], side.neg_k, side.neg_v)
        # grid[g, j]: the j-th item of group g; groups of N items, each in one category (padding repeats
        # item 0 and is dropped at the end)
        counts = np.bincount(cat, minlength=C)
        N = max(-(-n // int((counts > 0).sum())), 1)
        n_groups = -(-counts // N)  # (C,)
        cc = np.repeat(np.arange(C), n_groups)  # category of each group
        order = np.argsort(cat, kind="stable")
        cs = cat[order]
        slot = np.arange(n) - (np.cumsum(counts) - counts)[cs]
        g_of = (np.cumsum(n_groups) - n_groups)[cs] + slot // N
        grid = np.zeros((cc.size, N), dtype=np.int64)
        real = np.zeros((cc.size, N), dtype=bool)
        grid[g_of, slot % N] = order
        real[g_of, slot % N] = True
        it = items[grid]
        st = self.stacked
        G = cc.size
        seq = np.concatenate([pos, neg], axis=1)[grid]  # (G, N, 2d)
        first = self.item_first[it] + side.u_first[cc][:, None, :] + np.matmul(seq, st.w_seq[cc])
        if st.kind != "none":
            emb = self.item_embedding[it]
            x0t = np.stack([emb, self.item_proj[it], np.broadcast_to(side.u, emb.shape), seq[..., : self.d],
                            seq[..., self.d :]], axis=-1)  # (G, N, d, m)
            flat = (np.concatenate([x0t.swapaxes(-1, -2).reshape(G, N, -1), self.dense[it]], axis=-1)
                    if st.kind == "cross" else x0t[:, :, 0, :0])
            first += np.matmul(st.interaction(x0t, flat, cc), st.w_inter[cc])
        res = st.logits(first, cc)  # (G, N, T)
        out = np.empty((n, self.item_ref.size))
        out[grid[real]] = res[real]
        if self.item_logit is not None:
            out += self.item_logit[items]
        elif self.debias:
            out += self.item_ref
        out += side.user_logit
        return out

    def probabilities(self, side: UserSide, items: np.ndarray) -> np.ndarray:
        """Task probabilities (n, 4) in ``TASKS`` order (the ESMM composition of the heads)."""
        h = self.logits(side, items)
        lp0, lq0 = _log_sigmoid(h[:, 0]), _log_sigmoid(-h[:, 0])
        return np.exp(np.stack([lp0, lp0 + _log_sigmoid(h[:, 1]), lp0 + _log_sigmoid(h[:, 2]),
                                lq0 + _log_sigmoid(h[:, 3])], axis=1))

    def score(self, side: UserSide, items: np.ndarray) -> np.ndarray:
        """Expected engagement units per examined impression, shape (n,): ``P(task) @ task_weights``."""
        return self.probabilities(side, items) @ self.task_weights

    def category_preferences(self, side: UserSide) -> np.ndarray:
        """P(category | user), shape (C,), from the same user pass."""
        hw, hb, ow, ob = self.head
        z = np.maximum(side.profile @ hw + hb, 0.0) @ ow + ob
        z = np.exp(z - z.max())
        return z / z.sum()
