"""The OpenAPI 3.1 document of the HTTP/JSON API, its schemas derived from the `matcher.v1`
protos, so that the document and the protobuf JSON mapping cannot drift apart.

Derivation follows the protobuf JSON mapping: lowerCamelCase field names, int64 as a decimal
string, bytes as base64, enums by name, maps as objects; fields without presence are always
sent (the API prints them even at their default), proto3 `optional` ones only when set.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from matcher.v1 import matcher_pb2
from service.converters import VIEWS

TITLE = "Matcher HTTP/JSON API"
#: The messages the API sends or takes; their enums and nested messages come along.
MESSAGES = ("ImageRequest", "MatchResponse", "EmbedResponse", "ModelInfo", "Reference")

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    FieldDescriptor.TYPE_UINT64: {"type": "string", "pattern": "^[0-9]+$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _field_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _value_schema(value, schemas)}
    single = _value_schema(field, schemas)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _value_schema(field: FieldDescriptor, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None:
        _add_message(field.message_type, schemas)
        return _ref(field.message_type.name)
    if field.enum_type is not None:
        _add_enum(field.enum_type, schemas)
        return _ref(field.enum_type.name)
    return dict(_SCALARS[field.type])


def _add_enum(enum: EnumDescriptor, schemas: dict[str, Any]) -> None:
    schemas.setdefault(enum.name, {"type": "string", "enum": [v.name for v in enum.values]})


def _add_message(message: Descriptor, schemas: dict[str, Any]) -> None:
    if message.name in schemas:
        return
    schema: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
    schemas[message.name] = schema  # before the fields: a message may refer to itself
    required = []
    for field in message.fields:
        schema["properties"][field.json_name] = _field_schema(field, schemas)
        if not field.has_presence:
            required.append(field.json_name)
    schema["required"] = required


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": _json(schema)}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {
        400: "Bad image or argument (INVALID_ARGUMENT)",
        401: "No or malformed bearer token (UNAUTHENTICATED)",
        403: "Wrong bearer token (PERMISSION_DENIED)",
        404: "Not found (NOT_FOUND)",
        413: "Request body over --max-receive-bytes",
        415: "Unsupported Content-Type",
        429: "Overloaded (RESOURCE_EXHAUSTED): retry later",
        503: "Models not loaded, or backend unreachable (UNAVAILABLE)",
    }
    return {str(status): _answer(meaning[status], _ref("Error")) for status in statuses}


_OPTION_PROPERTIES = {
    "top_k": {"type": "integer", "minimum": 0, "description": "Labels to return; 0: all."},
    "no_match_threshold": {
        "type": "number",
        "minimum": -1,
        "maximum": 1,
        "description": "This request's no-match threshold (Match only).",
    },
    "min_inliers": {
        "type": "integer",
        "minimum": 0,
        "description": "Inliers that verify a label by geometry; 0: no geometric check "
        "(Match only).",
    },
    "views": {
        "type": "string",
        "enum": list(VIEWS),
        "description": "How thoroughly to look (Match only); VIEWS_* names are accepted too.",
    },
}


def _image_body() -> dict[str, Any]:
    multipart = {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary"}, **_OPTION_PROPERTIES},
    }
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": multipart},
            "application/json": {"schema": _ref("ImageRequest")},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }


def _query_options() -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in _OPTION_PROPERTIES.items()
    ]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document served at /openapi.json (built once)."""
    schemas: dict[str, Any] = {}
    for name in MESSAGES:
        _add_message(matcher_pb2.DESCRIPTOR.message_types_by_name[name], schemas)
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "status", "message"],
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "status": {"type": "string", "description": "The gRPC status code name."},
                    "message": {"type": "string", "description": "What was wrong."},
                },
            }
        },
    }
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }
    feedback_state = {
        "type": "object",
        "required": ["enabled"],
        "properties": {"enabled": {"type": "boolean"}},
    }
    feedback_saved = {
        "type": "object",
        "required": ["saved", "label"],
        "properties": {"saved": {"type": "string"}, "label": {"type": "string"}},
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    image_errors = _errors(400, 401, 403, 413, 415, 429, 503)
    paths = {
        "/v1/match": {
            "post": {
                "summary": "Rank the catalogue labels for one photo (gRPC Match)",
                "operationId": "match",
                "parameters": _query_options(),
                "requestBody": _image_body(),
                "responses": {
                    "200": _answer("Ranked labels", _ref("MatchResponse")),
                    **image_errors,
                },
                "security": secured,
            }
        },
        "/v1/embed": {
            "post": {
                "summary": "The photo's feature vector (gRPC Embed)",
                "operationId": "embed",
                "requestBody": _image_body(),
                "responses": {"200": _answer("Features", _ref("EmbedResponse")), **image_errors},
                "security": secured,
            }
        },
        "/v1/model": {
            "get": {
                "summary": "The loaded models (gRPC GetModelInfo)",
                "operationId": "getModelInfo",
                "responses": {
                    "200": _answer("The models", _ref("ModelInfo")),
                    **_errors(401, 403, 503),
                },
                "security": secured,
            }
        },
        "/v1/references/{reference_id}": {
            "get": {
                "summary": "A reference view's thumbnail (gRPC GetReference)",
                "operationId": "getReference",
                "parameters": [
                    {
                        "name": "reference_id",
                        "in": "path",
                        "required": True,
                        "description": "LabelScore.referenceId; may contain '/'.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The JPEG; the Reference message with "
                        "`Accept: application/json`",
                        "content": {
                            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                            **_json(_ref("Reference")),
                        },
                    },
                    **_errors(401, 403, 404, 503),
                },
                "security": secured,
            }
        },
        "/v1/feedback": {
            "get": {
                "summary": "Whether this server saves feedback (--feedback-dir)",
                "operationId": "getFeedback",
                "responses": {"200": _answer("On or off", feedback_state), **_errors(401, 403)},
                "security": secured,
            },
            "post": {
                "summary": "Save a photo as a new view of a catalogue label",
                "operationId": "postFeedback",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["image", "label"],
                                "properties": {
                                    "image": {"type": "string", "format": "binary"},
                                    "label": {"type": "string"},
                                    "answer": {"type": "string"},
                                    "verdict": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _answer("Saved as <label>/<file>", feedback_saved),
                    **_errors(400, 401, 403, 404, 413, 415),
                },
                "security": secured,
            },
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "operationId": "healthz",
                "responses": {"200": _answer("Live", status)},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: models loaded and feature backend reachable",
                "operationId": "readyz",
                "responses": {"200": _answer("Ready", status), **_errors(503)},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": _json({})}},
            }
        },
        "/": {
            "get": {
                "summary": "The field-testing page",
                "operationId": "page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": "v1",
            "description": "The matcher.v1 gRPC service over HTTP: the same messages in the "
            "protobuf JSON mapping, the same errors, limits and bearer token.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
