"""The offline jobs the demo runs between phases, as production would: each publishes a version and
the serving workers swap to it (the demo waits until they have)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["between_phases", "JOBS"]

#: (name, job) pairs run in order between phases; each job returns a dict for the report and may
#: return "wait_versions" naming the versions the server must load before traffic resumes.
def _plan(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from ._jobs_plan import plan_job

    return plan_job(phase, ctx)


JOBS: list[tuple[str, Callable[[str, dict[str, Any]], dict[str, Any]]]] = [("plan", _plan)]


def between_phases(phase: str, ctx: dict[str, Any]) -> None:
    want: dict[str, Any] = {}
    for name, job in JOBS:
        out = job(phase, ctx)
        out.setdefault("job", name)
        out.setdefault("before_phase", phase)
        want.update(out.pop("wait_versions", {}) or {})
        ctx["jobs"].append(out)
    if want:
        ctx["server"].wait_versions(want)
