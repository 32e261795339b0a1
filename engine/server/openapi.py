"""The OpenAPI document of ``POST /v1``, built from :mod:`guideflow.protocol`'s models.

The endpoint reads its raw body itself (so that a bad task gets a per-task
error object instead of FastAPI's whole-request 422), so FastAPI cannot infer
the request and response schemas; they are attached here from the very models
the server validates with.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from guideflow.protocol import (
    TASK_ADAPTER,
    AuthenticationResult,
    ErrorObject,
    ImageUploadResult,
    PongResult,
    PreprocessResult,
)

REF = "#/components/schemas/{model}"
RESULT_MODELS: tuple[type[BaseModel], ...] = (
    PreprocessResult,
    ImageUploadResult,
    PongResult,
    AuthenticationResult,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def component_schemas() -> dict[str, Any]:
    """``components.schemas``: every task model, the ``Task`` union, results and ApiResponse."""
    task = TASK_ADAPTER.json_schema(ref_template=REF)
    schemas: dict[str, Any] = dict(task.pop("$defs", {}))
    schemas["Task"] = task
    _, results = models_json_schema(
        [(m, "serialization") for m in (*RESULT_MODELS, ErrorObject)], ref_template=REF
    )
    schemas.update(results.get("$defs", {}))
    schemas["ApiResponse"] = {
        "title": "ApiResponse",
        "description": "Results and per-task errors side by side; at least one is present.",
        "type": "object",
        "properties": {
            "data": {
                "type": "array",
                "items": {"anyOf": [_ref(m.__name__) for m in RESULT_MODELS]},
            },
            "errors": {"type": "array", "items": _ref("ErrorObject")},
        },
    }
    return schemas


REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "A JSON array of task objects (an optional leading authentication task).",
    "content": {
        "application/json": {
            "schema": {"type": "array", "minItems": 1, "items": _ref("Task")},
        }
    },
}


def _response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("ApiResponse")}},
    }
    if headers:
        out["headers"] = headers
    return out


V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _response("At least one task succeeded (failed ones are in `errors`), or all fine."),
    400: _response("Every task failed: an invalid or missing parameter, or a malformed body."),
    401: _response("Missing or invalid API key."),
    403: _response("Forbidden (for example a URL refused by the network policy)."),
    404: _response("Unknown taskUUID (getResponse) or image UUID."),
    409: _response("conflictTaskUUID: a taskUUID reused in the batch or for another task."),
    413: _response("The request body exceeds the server's limit."),
    429: _response(
        "Queue capacity exceeded; nothing of the request was started.",
        {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    ),
    500: _response("Internal error."),
    502: _response("An outbound call failed (for example uploadFailed)."),
    503: _response("Temporarily unavailable (for example model weights missing)."),
}


def customize(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the protocol schemas and the bearer security scheme to FastAPI's document."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(component_schemas())
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return schema
