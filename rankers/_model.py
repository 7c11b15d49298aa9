"""Torch modules of the ranker: towers, target attention, CIN / cross interaction, CGC heads, debias
branches and the category-preference head.

Shapes use B = batch rows, L = sequence length, d = embedding size, T = number of tasks (4),
C = number of categories, m = number of feature fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._data import TASKS

__all__ = [
    "INTERACTIONS",
    "TargetAttention",
    "ItemTower",
    "UserTower",
    "CIN",
    "CrossNet",
    "CGC",
    "CategoryRanker",
    "ItemOnlyBranch",
    "UserOnlyBranch",
    "CategoryHead",
    "Ranker",
    "RankerOutput",
    "torch_threads",
    "task_log_probs",
    "task_bce",
]

INTERACTIONS: tuple[str, ...] = ("cin", "cross", "none")
_SKIP_TYPE = 4  # code of "skip" in EVENT_TYPES: the behaviour type of every negative-sequence entry
_N_TYPES = 5


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after.

    On a few shared cores torch's default (one thread per core) is often several times slower than
    one thread for models this small, so every entry point sets it explicitly.
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1; got {threads!r}")
    prev = torch.get_num_threads()
    if prev != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if prev != threads:
            torch.set_num_threads(prev)


class TargetAttention(nn.Module):
    """Scaled dot-product attention of a candidate item over one behaviour sequence (DIN-style).

    ``query`` (B, d), ``keys`` (Bk, L, d) with Bk in {1, B} (Bk = 1 broadcasts one user's sequence
    over B candidates), ``mask`` (Bk, L) bool (True = real entry) -> (B, d).
    ``out = sum_l softmax_l(<W_q q, W_k k_l> / sqrt(d)) W_v k_l``, masked entries get weight 0 and an
    empty sequence gives the zero vector.

    References
    ----------
    Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(query)  # (B, d)
        k, v = self.k(keys), self.v(keys)  # (Bk, L, d)
        if keys.shape[0] == 1:  # one sequence for all candidates: plain matmuls, no broadcast copies
            s = (q @ k[0].T) * self.scale  # (B, L)
        else:
            s = torch.bmm(k, q.unsqueeze(2)).squeeze(2) * self.scale
        s = s.masked_fill(~mask, -1e9)
        w = torch.softmax(s, dim=-1) * mask  # all-masked rows: weights 0
        if keys.shape[0] == 1:
            return w @ v[0]
        return torch.bmm(w.unsqueeze(1), v).squeeze(1)  # (B, d)


class ItemTower(nn.Module):
    """Item side: id embedding + a projection of the dense catalog features and priors.

    ``item`` (B,) -> fields (B, 2, d) and the dense vector (B, n_dense). The dense table
    (n_items, n_dense) is a buffer, already standardised (:func:`dense_item_features`).
    """

    def __init__(self, n_items: int, d: int, dense: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_items, d)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.register_buffer("dense", dense.float())
        self.n_dense = int(dense.shape[1])
        self.proj = nn.Linear(self.n_dense, d)

    def forward(self, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.dense[item]
        return torch.stack([self.embedding(item), self.proj(x)], dim=1), x


class SeqState(NamedTuple):
    """Embedded behaviour sequences: keys (Bk, L, d) and masks (Bk, L) for positives and skips."""

    pos_keys: torch.Tensor
    pos_mask: torch.Tensor
    neg_keys: torch.Tensor
    neg_mask: torch.Tensor


class UserTower(nn.Module):
    """The shared cross-domain user tower (one for all categories).

    Fields for a candidate: user id embedding (row ``n_users`` = unknown / cold-start user), target
    attention of the candidate over the positive sequence (item embedding + behaviour-type
    embedding: play, full_play, favorite, share) and over the skip sequence, kept apart as in
    Taobao Live's positive/negative feedback modelling.
    ``forward(user (Bk,), seq: SeqState, target (B, d)) -> (B, 3, d)``;
    ``profile(user (Bk,), seq) -> (Bk, 3d)`` is the candidate-free summary (masked means) used by the
    category-preference head.
    """

    def __init__(self, n_users: int, d: int) -> None:
        super().__init__()
        self.n_users = n_users
        self.embedding = nn.Embedding(n_users + 1, d)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.type_embedding = nn.Embedding(_N_TYPES, d)
        nn.init.normal_(self.type_embedding.weight, std=0.05)
        self.pos_attention = TargetAttention(d)
        self.neg_attention = TargetAttention(d)

    def user_index(self, user: torch.Tensor) -> torch.Tensor:
        return torch.where(user < 0, torch.full_like(user, self.n_users), user)

    def sequences(
        self,
        item_embedding: nn.Embedding,
        pos_items: torch.Tensor,
        pos_types: torch.Tensor,
        neg_items: torch.Tensor,
    ) -> SeqState:
        """(Bk, L) item / type codes (-1 = padding) -> :class:`SeqState`."""
        pos_mask, neg_mask = pos_items >= 0, neg_items >= 0
        pos = item_embedding(pos_items.clamp_min(0)) + self.type_embedding(pos_types.clamp_min(0).long())
        neg = item_embedding(neg_items.clamp_min(0)) + self.type_embedding.weight[_SKIP_TYPE]
        return SeqState(pos, pos_mask, neg, neg_mask)

    def forward(self, user: torch.Tensor, seq: SeqState, target: torch.Tensor) -> torch.Tensor:
        u = self.embedding(self.user_index(user))
        pos = self.pos_attention(target, seq.pos_keys, seq.pos_mask)
        neg = self.neg_attention(target, seq.neg_keys, seq.neg_mask)
        return torch.stack([u.expand(target.shape[0], -1), pos, neg], dim=1)

    def profile(self, user: torch.Tensor, seq: SeqState) -> torch.Tensor:
        u = self.embedding(self.user_index(user))
        pm = seq.pos_mask.unsqueeze(-1).float()
        nm = seq.neg_mask.unsqueeze(-1).float()
        pos = (seq.pos_keys * pm).sum(1) / pm.sum(1).clamp_min(1.0)
        neg = (seq.neg_keys * nm).sum(1) / nm.sum(1).clamp_min(1.0)
        return torch.cat([u, pos, neg], dim=1)


class CIN(nn.Module):
    """Compressed Interaction Network (xDeepFM): explicit vector-wise high-order interactions.

    ``x0`` (B, m, d) -> (B, sum(layer_sizes)). Layer k: ``X_k[h] = sum_{i,j} W_k[h, i, j] (X_{k-1}[i] * X_0[j])``
    (Hadamard products of field vectors), then each layer's maps are sum-pooled over d.

    References
    ----------
    Lian et al., "xDeepFM: Combining Explicit and Implicit Feature Interactions for Recommender
    Systems", KDD 2018.
    """

    def __init__(self, n_fields: int, layer_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        prev = n_fields
        for h in layer_sizes:
            w = torch.empty(h, prev * n_fields)
            nn.init.xavier_uniform_(w)
            self.weights.append(nn.Parameter(w))
            prev = h
        self.out_dim = int(sum(layer_sizes))

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        b, m, d = x0.shape
        # (B, d, fields) layout: each layer is one (B d, H m) @ (H m, H') matmul, with no copies
        x0t = x0.transpose(1, 2)
        xk = x0t
        pooled = []
        for w in self.weights:
            z = (xk.unsqueeze(3) * x0t.unsqueeze(2)).reshape(b * d, -1)  # column i*m + j
            xk = (z @ w.T).view(b, d, -1)  # (B, d, H')
            pooled.append(xk.sum(dim=1))
        return torch.cat(pooled, dim=1)


class CrossNet(nn.Module):
    """DCN-v2 cross layers: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``. ``flat`` (B, n) -> (B, n).

    A cheaper interaction than CIN (one n x n matmul per layer).

    References
    ----------
    Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning
    to Rank Systems", WWW 2021.
    """

    def __init__(self, in_dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(n_layers))
        for lin in self.layers:
            nn.init.normal_(lin.weight, std=0.3 / math.sqrt(in_dim))
            nn.init.zeros_(lin.bias)
        self.out_dim = in_dim

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        x = flat
        for lin in self.layers:
            x = flat * lin(x) + x
        return x


class _NoInteraction(nn.Module):
    out_dim = 0

    def forward(self, x0: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return flat[:, :0]


class CGC(nn.Module):
    """Customized Gate Control (the single-level PLE): shared + task-specific experts, a softmax gate
    per task over its own and the shared experts, and a tower per task.

    ``x`` (B, in_dim) -> logits (B, n_tasks). Task t:
    ``h_t = sum_e g_te(x) E_e(x)`` over e in (experts of t) + (shared experts); ``logit_t = tower_t(h_t)``.

    References
    ----------
    Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations", RecSys 2020.
    """

    def __init__(
        self, in_dim: int, n_tasks: int, n_shared: int, n_specific: int, expert_dim: int, tower_dim: int
    ) -> None:
        super().__init__()
        if n_shared + n_specific < 1:
            raise ValueError(f"n_shared + n_specific must be >= 1; got {n_shared + n_specific}")
        self.n_tasks, self.n_shared, self.n_specific, self.expert_dim = (
            n_tasks,
            n_shared,
            n_specific,
            expert_dim,
        )
        n_experts = n_shared + n_tasks * n_specific
        self.experts = nn.Linear(in_dim, n_experts * expert_dim)  # all experts as one matmul
        self.gates = nn.Linear(in_dim, n_tasks * (n_shared + n_specific))
        self.tower_hidden = nn.Parameter(torch.empty(n_tasks, expert_dim, tower_dim))
        self.tower_bias = nn.Parameter(torch.zeros(n_tasks, tower_dim))
        self.tower_out = nn.Parameter(torch.empty(n_tasks, tower_dim))
        self.out_bias = nn.Parameter(torch.zeros(n_tasks))
        nn.init.normal_(self.tower_hidden, std=1.0 / math.sqrt(expert_dim))
        nn.init.normal_(self.tower_out, std=1.0 / math.sqrt(tower_dim))
        # expert index table: for task t, its own experts then the shared ones
        idx = [
            [n_shared + t * n_specific + j for j in range(n_specific)] + list(range(n_shared))
            for t in range(n_tasks)
        ]
        self.register_buffer("expert_index", torch.tensor(idx, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        e = torch.relu(self.experts(x)).view(b, -1, self.expert_dim)  # (B, E, h)
        g = torch.softmax(self.gates(x).view(b, self.n_tasks, -1), dim=-1)  # (B, T, k)
        # scatter each task's gate onto its experts: (B, T, E), zero elsewhere; one bmm mixes
        full = g.new_zeros(b, self.n_tasks, e.shape[1]).scatter(2, self.expert_index.expand(b, -1, -1), g)
        mixed = torch.bmm(full, e)  # (B, T, h)
        hidden = torch.relu(torch.einsum("bth,thk->btk", mixed, self.tower_hidden) + self.tower_bias)
        return (hidden * self.tower_out).sum(-1) + self.out_bias  # (B, T)


class CategoryRanker(nn.Module):
    """One category's ranker: interaction block + CGC multi-task heads.

    ``fields`` (B, m, d) and ``dense`` (B, n_dense) -> task logits (B, T). The head input is
    ``[flatten(fields), dense, interaction(fields, ...)]``.
    """

    def __init__(
        self,
        n_fields: int,
        d: int,
        n_dense: int,
        n_tasks: int,
        interaction: str,
        cin_layers: tuple[int, ...],
        cross_layers: int,
        n_shared: int,
        n_specific: int,
        expert_dim: int,
        tower_dim: int,
    ) -> None:
        super().__init__()
        flat_dim = n_fields * d + n_dense
        self.interaction: nn.Module
        if interaction == "cin":
            self.interaction = CIN(n_fields, cin_layers)
        elif interaction == "cross":
            self.interaction = CrossNet(flat_dim, cross_layers)
        elif interaction == "none":
            self.interaction = _NoInteraction()
        else:
            raise ValueError(f"interaction must be one of {INTERACTIONS}; got {interaction!r}")
        self.cgc = CGC(
            flat_dim + int(self.interaction.out_dim), n_tasks, n_shared, n_specific, expert_dim, tower_dim
        )

    def forward(self, fields: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([fields.flatten(1), dense], dim=1)
        return self.cgc(torch.cat([flat, self.interaction(fields, flat)], dim=1))


class ItemOnlyBranch(nn.Module):
    """Popularity branch (MACR's item-only module): task logits from the item's popularity features
    and category alone. ``pop`` (B, n_pop) standardised, ``category`` (B,) -> (B, T)."""

    def __init__(self, n_pop: int, n_categories: int, n_tasks: int, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_pop, hidden)
        self.out = nn.Linear(hidden, n_tasks)
        self.category_bias = nn.Embedding(n_categories, n_tasks)
        nn.init.zeros_(self.category_bias.weight)

    def forward(self, pop: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(pop))) + self.category_bias(category)


class UserOnlyBranch(nn.Module):
    """Activity branch (MACR's user-only module): task logits from the user alone, a per-user bias
    (row ``n_users`` = unknown user) plus a linear term in log activity.
    ``user`` (Bk,) mapped index, ``activity`` (Bk, 2) = log1p(positive, skip counts) -> (Bk, T)."""

    def __init__(self, n_users: int, n_tasks: int) -> None:
        super().__init__()
        self.bias = nn.Embedding(n_users + 1, n_tasks)
        nn.init.zeros_(self.bias.weight)
        self.activity = nn.Linear(2, n_tasks)

    def forward(self, user: torch.Tensor, activity: torch.Tensor) -> torch.Tensor:
        return self.bias(user) + self.activity(activity)


class CategoryHead(nn.Module):
    """P(category | user) from the shared user tower's profile: ``profile`` (B, 3d) -> logits (B, C)."""

    def __init__(self, d: int, n_categories: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(3 * d, d)
        self.out = nn.Linear(d, n_categories)

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(profile)))


class RankerOutput(NamedTuple):
    """Head logits of each branch (B, T) and category-preference logits (Bk, C).

    The factual head is ``main + item + user``; the debiased (counterfactual) head replaces the
    item-only and user-only terms by their reference values ``item_ref``/``user_ref``. Heads become
    task probabilities through :func:`task_log_probs`.
    """

    main: torch.Tensor
    item: torch.Tensor
    user: torch.Tensor
    category: torch.Tensor


class Ranker(nn.Module):
    """Per-category multi-task rankers on one shared cross-domain user tower, with popularity/activity
    branches for debiasing and a category-preference head.

    Inputs (a batch mapping): ``user`` (Bk,), ``item`` (B,), ``pos_items``/``pos_types``/``neg_items``
    (Bk, L), ``activity`` (Bk, 2); Bk is B (training) or 1 (one user's candidates at serving).
    Output: :class:`RankerOutput`. Fields per candidate: item id, item dense projection, user id,
    positive attention, skip attention (m = 5); each category c has its own
    :class:`CategoryRanker`.

    Buffers: ``item_category`` (n_items,), the item dense table in ``item_tower``, ``pop``
    (n_items, n_pop), ``item_ref``/``user_ref`` (T,) reference logits for the counterfactual score.

    References
    ----------
    Wei et al., "Model-Agnostic Counterfactual Reasoning for Eliminating Popularity Bias in
    Recommender System" (MACR), KDD 2021.
    """

    def __init__(
        self,
        *,
        n_users: int,
        n_items: int,
        n_categories: int,
        item_category: torch.Tensor,
        dense: torch.Tensor,
        pop: torch.Tensor,
        embed_dim: int = 16,
        interaction: str = "cin",
        cin_layers: tuple[int, ...] = (16, 16),
        cross_layers: int = 2,
        n_shared_experts: int = 2,
        n_task_experts: int = 1,
        expert_dim: int = 32,
        tower_dim: int = 16,
        debias_branches: bool = True,
    ) -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}; got {interaction!r}")
        self.n_users, self.n_items, self.n_categories = n_users, n_items, n_categories
        #: plain-value constructor arguments: with the state dict they rebuild the model (see from_spec)
        self.spec: dict[str, object] = {
            "n_users": int(n_users),
            "n_items": int(n_items),
            "n_categories": int(n_categories),
            "n_dense": int(dense.shape[1]),
            "n_pop": int(pop.shape[1]),
            "embed_dim": int(embed_dim),
            "interaction": str(interaction),
            "cin_layers": [int(h) for h in cin_layers],
            "cross_layers": int(cross_layers),
            "n_shared_experts": int(n_shared_experts),
            "n_task_experts": int(n_task_experts),
            "expert_dim": int(expert_dim),
            "tower_dim": int(tower_dim),
            "debias_branches": bool(debias_branches),
        }
        self.n_tasks = len(TASKS)
        self.debias_branches = debias_branches
        self.register_buffer("item_category", item_category.long())
        self.item_tower = ItemTower(n_items, embed_dim, dense)
        self.user_tower = UserTower(n_users, embed_dim)
        self.rankers = nn.ModuleList(
            CategoryRanker(
                5,
                embed_dim,
                self.item_tower.n_dense,
                self.n_tasks,
                interaction,
                tuple(cin_layers),
                cross_layers,
                n_shared_experts,
                n_task_experts,
                expert_dim,
                tower_dim,
            )
            for _ in range(n_categories)
        )
        self.category_head = CategoryHead(embed_dim, n_categories)
        self.register_buffer("pop", pop.float())  # standardised popularity features (n_items, n_pop)
        self.register_buffer("item_ref", torch.zeros(self.n_tasks))
        self.register_buffer("user_ref", torch.zeros(self.n_tasks))
        self.item_branch: ItemOnlyBranch | None = None
        self.user_branch: UserOnlyBranch | None = None
        if debias_branches:
            self.item_branch = ItemOnlyBranch(int(pop.shape[1]), n_categories, self.n_tasks)
            self.user_branch = UserOnlyBranch(n_users, self.n_tasks)

    @classmethod
    def from_spec(cls, spec: Mapping[str, object], state: Mapping[str, torch.Tensor]) -> Ranker:
        """Rebuild a model from ``spec`` and a ``state_dict`` (buffers included)."""
        s = dict(spec)
        n_items, n_dense, n_pop = int(s.pop("n_items")), int(s.pop("n_dense")), int(s.pop("n_pop"))
        s["cin_layers"] = tuple(s["cin_layers"])
        model = cls(
            n_items=n_items,
            item_category=torch.zeros(n_items, dtype=torch.long),
            dense=torch.zeros(n_items, n_dense),
            pop=torch.zeros(n_items, n_pop),
            **s,
        )
        model.load_state_dict(state)
        model.eval()
        return model

    def forward(
        self, batch: Mapping[str, torch.Tensor], *, branches: bool = True, category: bool = True
    ) -> RankerOutput:
        """``branches=False`` / ``category=False`` skip the debias branches / the category head (their
        outputs are then zeros), e.g. for the counterfactual score at serving."""
        item = batch["item"]
        b = item.shape[0]
        seq = self.user_tower.sequences(
            self.item_tower.embedding, batch["pos_items"], batch["pos_types"], batch["neg_items"]
        )
        item_fields, dense = self.item_tower(item)
        user_fields = self.user_tower(batch["user"], seq, item_fields[:, 0])
        fields = torch.cat([item_fields, user_fields], dim=1)  # (B, 5, d)
        cat = self.item_category[item]
        main = self._per_category(cat, fields, dense)
        if branches and self.item_branch is not None and self.user_branch is not None:
            uidx = self.user_tower.user_index(batch["user"])
            item_logit = self.item_branch(self.pop[item], cat)
            user_logit = self.user_branch(uidx, batch["activity"]).expand(b, -1)
        else:
            item_logit = user_logit = main.new_zeros(b, self.n_tasks)
        if category:
            cat_logits = self.category_head(self.user_tower.profile(batch["user"], seq))
        else:
            cat_logits = main.new_zeros(batch["user"].shape[0], self.n_categories)
        return RankerOutput(main, item_logit, user_logit, cat_logits)

    def _per_category(
        self, category: torch.Tensor, fields: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        # one sort, one sub-batch per category, one inverse gather: no per-row work in Python
        order = torch.argsort(category, stable=True)
        counts = torch.bincount(category, minlength=self.n_categories).tolist()
        f, x = fields[order], dense[order]
        parts = []
        start = 0
        for c, cnt in enumerate(counts):
            if cnt:
                parts.append(self.rankers[c](f[start : start + cnt], x[start : start + cnt]))
            start += cnt
        out = torch.cat(parts, dim=0)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0], device=order.device)
        return out[inverse]

    def heads(self, out: RankerOutput, debias: bool) -> torch.Tensor:
        """Head logits (B, T): factual ``main + item + user``, or with ``debias`` the counterfactual
        ``main + item_ref + user_ref`` (popularity and activity effects held at their reference)."""
        if debias:
            return out.main + self.item_ref + self.user_ref
        return out.main + out.item + out.user

    def probabilities(self, out: RankerOutput, debias: bool) -> torch.Tensor:
        """Task probabilities (B, T) in ``TASKS`` order (see :func:`task_log_probs`)."""
        return torch.exp(task_log_probs(self.heads(out, debias))[0])


def task_log_probs(heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose the four head logits (B, 4) into ``log P(task)`` and ``log(1 - P(task))``, both (B, 4).

    Entire-space composition (ESMM): ``play = s(h0)``, ``full_play = s(h0) s(h1)``,
    ``collect = s(h0) s(h2)`` (both imply a play, so their heads are conditional on it and the sparse
    tasks borrow the play signal), ``skip = (1 - s(h0)) s(h3)`` (a skip is an examined item that was
    not played); ``s`` is the sigmoid.

    References
    ----------
    Ma et al., "Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
    Conversion Rate", SIGIR 2018.
    """
    lp0 = F.logsigmoid(heads[:, 0])
    lq0 = F.logsigmoid(-heads[:, 0])
    logp = torch.stack(
        [
            lp0,
            lp0 + F.logsigmoid(heads[:, 1]),
            lp0 + F.logsigmoid(heads[:, 2]),
            lq0 + F.logsigmoid(heads[:, 3]),
        ],
        dim=1,
    )
    log1mp = torch.log(-torch.expm1(logp[:, 1:].clamp_max(-1e-7)))
    return logp, torch.cat([lq0.unsqueeze(1), log1mp], dim=1)


def task_bce(heads: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of the composed task probabilities against ``labels`` (B, 4)."""
    logp, log1mp = task_log_probs(heads)
    loss = -(labels * logp + (1.0 - labels) * log1mp)
    return loss.sum() if reduction == "sum" else loss.mean()


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
