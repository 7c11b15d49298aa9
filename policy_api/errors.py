"""The errors every room of ``policy_api`` raises, and how the edges show them.

One hierarchy, rooted at :class:`HomepageError`. Each class carries what a user needs to act: the
field or key at fault, what is allowed, what was found. The edges map the class, never the message:

================== =================== ===========  ====================================================
class              ``error.code``      HTTP status  ``homepage`` exit status
================== =================== ===========  ====================================================
InvalidInput       ``invalid``         400          2
InvalidConfig      ``invalid_config``  400          2
Unauthorized       ``unauthorized``    401          2
Forbidden          ``forbidden``       403          2
NotFound           ``not_found``       404          2
Conflict           ``conflict``        409          2
Infeasible         ``infeasible``      409          3
NotReady           ``not_ready``       503          2
Unavailable        ``unavailable``     503          2
================== =================== ===========  ====================================================

The API answers every one of them as ``{"error": {"code", "message", "field"}}`` (plus the error's
``details``, e.g. an infeasible config's relaxations); the CLI prints ``homepage: error: <message>``
without a traceback. Errors of the numeric core (``ValueError`` with the same naming rule,
``allocator.ConfigError``, ``allocator.InfeasiblePlan``) are converted where they cross into
``policy_api``: :func:`from_config_error` and :func:`from_infeasible`.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "Conflict",
    "Forbidden",
    "HomepageError",
    "Infeasible",
    "InvalidConfig",
    "InvalidInput",
    "NotFound",
    "NotReady",
    "Unauthorized",
    "Unavailable",
    "from_config_error",
    "from_infeasible",
]


class HomepageError(Exception):
    """Base of every error ``policy_api`` raises on purpose.

    Parameters
    ----------
    message
        The whole sentence shown to the user: names the field, what is allowed and what was found.
    field
        The request field, config key, CLI option or file column at fault, if any.
    details
        Extra JSON-serialisable facts for API clients (e.g. ``relaxations`` of an infeasible plan).
    """

    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500
    exit_status: ClassVar[int] = 1

    def __init__(self, message: str, *, field: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details

    def body(self) -> dict[str, Any]:
        """The API's JSON body for this error."""
        out: dict[str, Any] = {"error": {"code": self.code, "message": self.message, "field": self.field}}
        out.update(self.details)
        return out


class InvalidInput(HomepageError, ValueError):
    """A request, file, config or option that breaks its contract."""

    code, http_status, exit_status = "invalid", 400, 2


class InvalidConfig(InvalidInput):
    """An operator config that fails validation; ``details["errors"]`` lists every bad key."""

    code = "invalid_config"


class Unauthorized(HomepageError):
    """An operator call without the right bearer token."""

    code, http_status, exit_status = "unauthorized", 401, 2


class Forbidden(HomepageError):
    """An operator call that this deployment does not allow (e.g. no token configured)."""

    code, http_status, exit_status = "forbidden", 403, 2


class NotFound(HomepageError, LookupError):
    """A request id, version or file that does not exist."""

    code, http_status, exit_status = "not_found", 404, 2


class Conflict(HomepageError):
    """A change that clashes with the current state (e.g. a config that is not the active one)."""

    code, http_status, exit_status = "conflict", 409, 2


class Infeasible(HomepageError):
    """Exposure constraints that cannot all hold; ``details`` name what to relax. Never applied."""

    code, http_status, exit_status = "infeasible", 409, 3


class NotReady(HomepageError):
    """Something the engine needs has not been set up yet (no active config, empty catalog)."""

    code, http_status, exit_status = "not_ready", 503, 2


class Unavailable(HomepageError):
    """A dependency (the database) cannot be reached."""

    code, http_status, exit_status = "unavailable", 503, 2


def from_config_error(e: Exception, source: str = "") -> InvalidConfig:
    """An :class:`InvalidConfig` from ``allocator.ConfigError`` (keeps its key and every error)."""
    errors = [{"field": k, "message": m} for k, m in getattr(e, "errors", [])]
    prefix = f"{source}: " if source and not str(e).startswith(source) else ""
    return InvalidConfig(f"{prefix}{e}", field=getattr(e, "key", None), errors=errors)


def from_infeasible(e: Exception, what: str) -> Infeasible:
    """An :class:`Infeasible` from ``allocator.InfeasiblePlan``, naming the constraints to relax."""
    diagnosis = getattr(e, "diagnosis", e)
    return Infeasible(f"{what}: its constraints cannot all hold; nothing applied.\n{diagnosis}",
                      field="constraints",
                      conflicting=list(getattr(diagnosis, "conflicting", ())),
                      relaxations=[str(r) for r in getattr(diagnosis, "relaxations", ())])
