"""Request and response models of the HTTP API (pydantic v2); the OpenAPI spec is built from them.

Identifiers (``user_id``, ``request_id``, ``event_id``, ``item_id``) never contain a control character
(U+0000-U+001F, U+007F-U+009F: NUL included, which PostgreSQL cannot store); a ``user_id`` also has at
least one character that is not white space. The patterns below are what the server applies, with
Python's ``re``, and what the OpenAPI document publishes.
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["LayoutItem", "LayoutModule", "LayoutResponse", "FeedbackEvent", "FeedbackRequest",
           "FeedbackResponse", "ErrorBody", "ErrorResponse", "openapi_spec", "ID_PATTERN", "USER_ID_PATTERN",
           "CONTEXT_PARAMS", "DEVICES", "ConfigJob", "ConfigJobAccepted", "ConfigJobList"]

_ALLOWED = "[^\\x00-\\x1f\\x7f-\\x9f]"
# white space as both Python's str.isspace and ECMAScript's \\s know it, spelled out so that both agree
_VISIBLE = "[^\\x00-\\x20\\x7f-\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff]"
#: an identifier: no control character
ID_PATTERN = f"^{_ALLOWED}+$"
#: a user id: no control character, and something besides white space
USER_ID_PATTERN = f"^{_ALLOWED}*{_VISIBLE}{_ALLOWED}*$"
ID_RE = re.compile(ID_PATTERN)
USER_ID_RE = re.compile(USER_ID_PATTERN)

#: ``GET /layout``'s optional request context: query parameter -> its JSON schema
DEVICES = ("mobile", "tablet", "desktop", "tv", "other")
CONTEXT_PARAMS: dict[str, dict[str, Any]] = {
    "device": {"type": "string", "enum": list(DEVICES), "description": "the client's device class"},
    "locale": {"type": "string", "pattern": "^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$", "maxLength": 35,
               "description": "the user's language tag (BCP 47), e.g. en-US"},
    "surface": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_.-]{0,63}$",
                "description": "which surface asks, e.g. home or home.tab2"},
    "hour": {"type": "integer", "minimum": 0, "maximum": 23, "description": "the user's local hour of day"},
}

def _integral(v: Any) -> Any:
    if isinstance(v, bool | str):
        raise ValueError(f"must be an integer; got a {type(v).__name__}")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


EventType = Literal["impression", "play", "full_play", "favorite", "share", "skip"]


class LayoutItem(BaseModel):
    item_id: str
    long_tail: bool


class LayoutModule(BaseModel):
    slot: int = Field(ge=0)
    module_id: str
    category: str
    tilt: float
    items: list[LayoutItem]


class LayoutResponse(BaseModel):
    request_id: str
    user_id: str
    fallback: bool = Field(description="true when the safe default layout was served")
    propensity: float = Field(gt=0, le=1, description="probability with which this layout was drawn")
    versions: dict[str, Any]
    live_state: Literal["hit", "cold", "timeout", "none"] = Field(
        description="the user's real-time state at decision time: hit (read and used), cold (no events yet), "
                    "timeout (the state store did not answer within its deadline: served as cold), none (no store)")
    modules: list[LayoutModule]


class FeedbackEvent(BaseModel):
    # strict: a boolean is not a number and 1.5 is not a slot (ints are still fine where a float is asked)
    model_config = ConfigDict(extra="forbid", strict=True)
    event_id: str = Field(min_length=1, max_length=200, pattern=ID_PATTERN,
                          description="client id; feedback is idempotent by it")
    # JSON Schema's integer admits 3.0; a boolean or 3.5 is still refused
    slot: Annotated[int, BeforeValidator(_integral)] = Field(ge=0, le=1000, strict=False)
    item_id: str = Field(min_length=1, max_length=200, pattern=ID_PATTERN)
    type: EventType
    value: float | None = Field(default=None, ge=-1e12, le=1e12, allow_inf_nan=False,
                                description="revenue, if any; the active config's "
                                            "learning.max_event_value bounds its size (default 1e6)")
    ts: float | None = Field(default=None, ge=0, le=1e11, allow_inf_nan=False,
                             description="event time, epoch seconds (default: arrival); at most "
                                         "learning.max_event_age_s old and learning.max_clock_skew_s "
                                         "ahead of the server's clock")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str = Field(min_length=1, max_length=100, pattern=ID_PATTERN)
    events: list[FeedbackEvent] = Field(min_length=1, max_length=1000)


class FeedbackResponse(BaseModel):
    accepted: int
    duplicates: int


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


JobStatus = Literal["queued", "running", "done", "failed", "lost"]
JobKind = Literal["dry_run", "apply", "rollback"]


class ConfigJobAccepted(BaseModel):
    job_id: str
    kind: JobKind
    status: JobStatus
    status_url: str = Field(description="GET it (any worker answers) until status is done, failed or lost")


class ConfigJob(BaseModel):
    job_id: str
    kind: JobKind
    status: JobStatus = Field(description="lost: its worker stopped sending heartbeats before it finished")
    status_url: str
    target_version: int | None = Field(description="the version a rollback makes active again")
    author: str
    note: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    owner: str = Field(description="host:pid of the worker that runs it")
    heartbeat_at: str | None
    result: dict[str, Any] | None = Field(
        description="done: apply and rollback give version, plan_version, previous_version, projection, "
                    "prices, warnings (and rolled_back_to); a dry run gives feasible, projection, prices, "
                    "warnings, diff, text_diff and current (the active config's projection on the same users)")
    error: dict[str, Any] | None = Field(description="failed or lost: the API's error body, e.g. code infeasible")
    toml: str | None = Field(default=None, description="the submitted config text (single job only)")


class ConfigJobList(BaseModel):
    jobs: list[ConfigJob]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def openapi_spec(extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 document of the API."""
    models: list[type[BaseModel]] = [LayoutItem, LayoutModule, LayoutResponse, FeedbackEvent, FeedbackRequest, FeedbackResponse,
              ErrorBody, ErrorResponse, ConfigJobAccepted, ConfigJob, ConfigJobList]
    schemas: dict[str, Any] = {}
    for m in models:
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[m.__name__] = s
    err = {"description": "bad input", "content": _json(ErrorResponse)}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": _json(ErrorResponse)}

    front = {  # what the server answers before a route runs (same error shape)
        "408": error("the request's headers or body arrived too slowly"),
        "414": error("request line longer than the server accepts"),
        "431": error("too many or too large header fields"),
    }
    context = [{"name": k, "in": "query", "required": False, "schema": v} for k, v in CONTEXT_PARAMS.items()]
    paths: dict[str, Any] = {
        "/layout": {"get": {
            "summary": "Decide the homepage layout for a user",
            "description": "Optional request context: the documented parameters below, and free-form "
                           "features as f_<name>=<value> (name: a-z, 0-9, _; up to 16; a finite number, else a "
                           "category of up to 64 characters). Any other parameter is refused with 400. The "
                           "context is passed to the engine and logged with the decision.",
            "parameters": [{"name": "user_id", "in": "query", "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                                       "pattern": USER_ID_PATTERN}}, *context],
            "responses": {"200": {"description": "the layout", "content": _json(LayoutResponse)},
                          "400": err, **front,
                          "503": error("no catalog loaded")},
        }},
        "/feedback": {"post": {
            "summary": "Report what the user did with a layout",
            "description": "Each event is checked against the page served: its slot below the page's slot "
                           "count, its item shown in that slot (whenever this server still knows the page, "
                           "which it does for its recent pages even before their decision is written), value "
                           "and ts within the config's learning.max_event_value, max_event_age_s and "
                           "max_clock_skew_s. One event that fails refuses the request (400, naming it); "
                           "nothing of it is stored.",
            "requestBody": {"required": True, "content": _json(FeedbackRequest)},
            "responses": {"202": {"description": "accepted", "content": _json(FeedbackResponse)},
                          "400": error("bad input: a field, or an event that does not match the page served"),
                          "404": error("request_id not issued by this engine"),
                          "413": error("body larger than the server accepts"), **front},
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (catalog loaded, database reachable)",
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format"}}}},
    }
    paths.update(copy.deepcopy(extra_paths or {}))
    for ops in paths.values():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            if op.get("security"):
                responses.setdefault("401", error("missing or wrong operator token"))
                responses.setdefault("403", error("operator routes disabled: no token set on the server"))
                responses.setdefault("429", error("too many wrong tokens from this address; see Retry-After"))
            responses.setdefault("default", error("any other error, in the same shape"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "homepage engine policy API", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"operatorToken": {
            "type": "http", "scheme": "bearer",
            "description": "HOMEPAGE_OPERATOR_TOKEN of the server (Authorization: Bearer <token>)"}}},
    }
