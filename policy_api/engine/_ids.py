"""Request ids: signed, so any worker recognises an id the engine issued without a database read,
and the seed of the exploration draw, so any decision can be reproduced from its id."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

__all__ = ["RequestIds", "load_secret", "seed_of"]


def load_secret(data_dir: str | Path) -> bytes:
    """The signing key: ``HOMEPAGE_SECRET`` if set, else a key file in the data folder, created once
    (atomically, so workers starting together agree on it)."""
    env = os.environ.get("HOMEPAGE_SECRET")
    if env:
        return env.encode()
    path = Path(data_dir) / "secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".secret.{os.getpid()}.tmp")
        tmp.write_bytes(secrets.token_hex(32).encode())
        try:
            os.link(tmp, path)  # fails if another process won the race; theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


class RequestIds:
    """Issue and verify ids of the form ``<24 hex random>.<16 hex HMAC-SHA256 tag>``."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("secret must be non-empty bytes; got an empty value")
        self._key = secret

    def _tag(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()[:16]

    def issue(self) -> str:
        body = secrets.token_hex(12)
        return f"{body}.{self._tag(body)}"

    def issued(self, request_id: str) -> bool:
        """True when this engine (any worker sharing the key) issued ``request_id``."""
        body, sep, tag = request_id.partition(".")
        if not sep or len(body) != 24 or len(tag) != 16:
            return False
        return hmac.compare_digest(self._tag(body), tag)


def seed_of(request_id: str) -> int:
    """A 64-bit seed derived from the request id (the exploration draw uses it)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")
