"""OpenAPI extensions for drf-spectacular (imported by registry/api/urls.py)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class TokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "registry.api.authentication.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "an API token from /api/tokens/"}


# Path parameters get an example naming a record a fresh demo or test registry holds, so that example-based
# clients (and fuzzers) reach real records instead of only 404s.
PATH_EXAMPLES = {"prompt_name": "qa", "name": "production", "number": 1, "id": 1}


def add_path_examples(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("in") == "path" and parameter.get("name") in PATH_EXAMPLES:
                    name = parameter["name"]
                    if name == "name" and "/tags/" in str(operation.get("operationId", "")):
                        continue
                    parameter.setdefault("example", PATH_EXAMPLES[name])
    return result
