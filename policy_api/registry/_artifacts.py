"""The ranker's registry artifact: the scorer's own bytes plus the id mappings it was trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput

__all__ = ["RankerArtifact", "pack_ranker", "unpack_ranker"]

_MAGIC = b"HPRANKER1\n"


@dataclass(frozen=True, slots=True)
class RankerArtifact:
    """A ranker as stored: ``scorer`` (``rankers.RankerScorer.save()`` bytes) and its id spaces."""

    scorer: bytes
    user_ids: list[str]
    item_ids: list[str]
    categories: list[str]


def pack_ranker(artifact: RankerArtifact) -> bytes:
    """A magic line, the length of the JSON metadata (8 bytes, little endian), the JSON, the scorer."""
    meta = json.dumps({"user_ids": artifact.user_ids, "item_ids": artifact.item_ids,
                       "categories": artifact.categories}).encode()
    return _MAGIC + len(meta).to_bytes(8, "little") + meta + artifact.scorer


def unpack_ranker(data: bytes) -> RankerArtifact:
    """Inverse of :func:`pack_ranker`."""
    if not data.startswith(_MAGIC):
        raise InvalidInput(f"ranker artifact must start with the {_MAGIC.strip().decode()} header; "
                           f"got {data[:len(_MAGIC)]!r}", field="artifact")
    k = len(_MAGIC)
    n = int.from_bytes(data[k:k + 8], "little")
    meta: dict[str, Any] = json.loads(data[k + 8:k + 8 + n])
    return RankerArtifact(scorer=data[k + 8 + n:], user_ids=list(meta.get("user_ids") or []),
                          item_ids=list(meta.get("item_ids") or []), categories=list(meta.get("categories") or []))
