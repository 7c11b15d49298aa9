"""Request and response models of the HTTP API (pydantic v2); the OpenAPI spec is built from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["LayoutItem", "LayoutModule", "LayoutResponse", "FeedbackEvent", "FeedbackRequest",
           "FeedbackResponse", "ErrorBody", "ErrorResponse", "openapi_spec"]

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
    event_id: str = Field(min_length=1, max_length=200, description="client id; feedback is idempotent by it")
    # JSON Schema's integer admits 3.0; a boolean or 3.5 is still refused
    slot: Annotated[int, BeforeValidator(_integral)] = Field(ge=0, le=1000, strict=False)
    item_id: str = Field(min_length=1, max_length=200)
    type: EventType
    value: float | None = Field(default=None, allow_inf_nan=False, description="revenue, if any")
    ts: float | None = Field(default=None, ge=0, le=1e11, allow_inf_nan=False,
                             description="event time, epoch seconds (default: arrival)")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str = Field(min_length=1, max_length=100)
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


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(model)}}


def openapi_spec(extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 document of the API."""
    models: list[type[BaseModel]] = [LayoutItem, LayoutModule, LayoutResponse, FeedbackEvent, FeedbackRequest, FeedbackResponse,
              ErrorBody, ErrorResponse]
    schemas: dict[str, Any] = {}
    for m in models:
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(s.pop("$defs", {}))
        schemas[m.__name__] = s
    err = {"description": "bad input", "content": _json(ErrorResponse)}
    paths: dict[str, Any] = {
        "/layout": {"get": {
            "summary": "Decide the homepage layout for a user",
            "parameters": [{"name": "user_id", "in": "query", "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"}}],
            "responses": {"200": {"description": "the layout", "content": _json(LayoutResponse)},
                          "400": err, "414": {"description": "request line longer than the server accepts"},
                          "503": {"description": "no catalog loaded", "content": _json(ErrorResponse)}},
        }},
        "/feedback": {"post": {
            "summary": "Report what the user did with a layout",
            "requestBody": {"required": True, "content": _json(FeedbackRequest)},
            "responses": {"202": {"description": "accepted", "content": _json(FeedbackResponse)},
                          "400": err, "404": {"description": "request_id not issued by this engine",
                                              "content": _json(ErrorResponse)}},
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (catalog loaded, database reachable)",
                            "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format"}}}},
    }
    paths.update(extra_paths or {})
    return {
        "openapi": "3.1.0",
        "info": {"title": "homepage engine policy API", "version": "1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
