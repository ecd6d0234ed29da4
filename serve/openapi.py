"""The published OpenAPI schema says what the server accepts from a multipart form.

FastAPI describes an optional form field (``UploadFile | None = File(None)``, ``int | None =
Form(None)``) as ``anyOf: [<type>, {"type": "null"}]``. A multipart form has no null: a field is
sent or left out, and the text ``null`` sent for a file field is a string the server must refuse
(``422 Expected UploadFile``). A client generated from such a schema, or a fuzzer
(schemathesis ``--checks all``: "ST202 schema-valid request rejected"), sends exactly that. Here
each optional field of a form body keeps its one real type and stays optional by being left out
of ``required``; a file field is ``format: binary``, which tells OpenAPI 3.1 tools to send it as a
file part.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

FILE = "application/octet-stream"
"""``contentMediaType`` FastAPI gives an ``UploadFile`` field."""


def form_field_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """One form field's schema without its null alternative; a file field marked binary."""
    options = prop.get("anyOf")
    if options is not None:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) == 1:
            prop = {k: v for k, v in prop.items() if k != "anyOf"} | kept[0]
    if prop.get("contentMediaType") == FILE:
        prop = prop | {"type": "string", "format": "binary"}
    return prop


def form_bodies_without_null(app: FastAPI) -> None:
    """Make ``app``'s schema describe its form bodies as a multipart client can send them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # FastAPI's, kept in app.openapi_schema: edited once, in place
            bodies = {ref.rsplit("/", 1)[-1]
                      for path in schema.get("paths", {}).values() for op in path.values()
                      for media, content in op.get("requestBody", {}).get("content", {}).items()
                      if media in ("multipart/form-data", "application/x-www-form-urlencoded")
                      for ref in [content.get("schema", {}).get("$ref", "")] if ref}
            for name in bodies:
                body = schema["components"]["schemas"][name]
                body["properties"] = {k: form_field_schema(v) for k, v in body.get("properties", {}).items()}
        return app.openapi_schema

    app.openapi = openapi


ERROR = {"type": "object", "required": ["error", "field"],
         "properties": {"error": {"type": "string", "description": "What is wrong and what to do"},
                        "field": {"type": ["string", "null"], "description": "The field, header or part to fix"},
                        "details": {"type": "array", "items": {"type": "object"},
                                    "description": "400: every field that does not match the schema"}}}
"""The body of every refusal (``serve.app.error``): JSON with ``error`` and ``field``."""


def document_errors(app: FastAPI, errors_of) -> None:
    """Add to ``app``'s schema, on each operation, the refusals it can answer with:
    ``errors_of(path, method) -> {status: description}``, each with the :data:`ERROR` body. A client
    generated from the schema then knows every status it can get (schemathesis' "ST103
    undocumented status code" found 404 and 429 missing)."""
    generate, done = app.openapi, []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not done:
            schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
            for path, ops in schema.get("paths", {}).items():
                for method, op in ops.items():
                    for status, why in errors_of(path, method.upper()).items():
                        op.setdefault("responses", {})[str(status)] = {
                            "description": why,
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            done.append(True)
        return schema

    app.openapi = openapi
