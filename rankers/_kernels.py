"""Compiled one-request kernels of the history scorers (numba).

:func:`knn_sums` is the residual ranker's kNN read for one request, the candidates' rows of ``S^T``
times the user's history weights, computed in the order scipy's ``csr_matvecs`` adds (row by row, each
row's entries in storage order, from 0), so the sums equal scipy's bit for bit without its row copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["arg", "knn_sums", "warm"]


def arg(a: np.ndarray, dtype: type) -> np.ndarray:
    """An argument as the kernel is compiled for: C-ordered and writable (numba types a read-only view
    apart, and would compile for it again)."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable:
        return a
    return np.array(a, dtype=dtype, order="C")


@njit(cache=True, nogil=True)
def knn_sums(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, items: np.ndarray, hist: np.ndarray,
             recency: np.ndarray, n_items: int) -> np.ndarray:
    """(n, 2): ``sum_i w_i S[i, j]`` for each candidate ``j`` of ``items`` over the history items ``hist``
    with weights 1 (column 0) and their ``recency`` (column 1); ``S^T`` given by its CSR arrays."""
    w0 = np.zeros(n_items)
    w1 = np.zeros(n_items)
    for h in range(hist.size):
        w0[hist[h]] = 1.0
        w1[hist[h]] = recency[h]
    out = np.empty((items.size, 2))
    for i in range(items.size):
        j = items[i]
        a0 = 0.0
        a1 = 0.0
        for k in range(indptr[j], indptr[j + 1]):
            col = indices[k]
            a0 += data[k] * w0[col]
            a1 += data[k] * w1[col]
        out[i, 0] = a0
        out[i, 1] = a1
    return out


def warm(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
    """Load (or compile) :func:`knn_sums` for these CSR arrays' types, so no request pays for it."""
    one = np.zeros(1, np.int64)
    if indptr.size > 1:
        knn_sums(indptr, indices, data, one, one, np.zeros(1), indptr.size - 1)
