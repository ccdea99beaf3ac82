"""One error body for every 4xx: {"status", "code", "message", "errors": [{"field", "message"}]}."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.db.models import ProtectedError, RestrictedError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from registry.datasets import DatasetImportError
from registry.models import LabelConflict, PromptLabel
from registry.promotion import GateFailed
from registry.prompting import PromptTemplateError


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "the request conflicts with the registry's current state"
    default_code = "conflict"


class Gone(exceptions.APIException):
    status_code = status.HTTP_410_GONE
    default_detail = "this resource was deleted"
    default_code = "gone"


def _flatten(detail: Any, field: str | None, out: list[dict[str, Any]]) -> None:
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = None if key in ("non_field_errors", "__all__") else (f"{field}.{key}" if field else str(key))
            _flatten(value, name if name is not None else field, out)
    elif isinstance(detail, list):
        for index, value in enumerate(detail):
            nested = isinstance(value, dict | list)
            _flatten(value, f"{field}[{index}]" if nested and field else field, out)
    else:
        out.append({"field": field, "message": str(detail)})


def _django_validation(exc: DjangoValidationError) -> exceptions.ValidationError:
    if hasattr(exc, "error_dict"):
        return exceptions.ValidationError(
            {k: [str(m) for e in v for m in e.messages] for k, v in exc.error_dict.items()}
        )
    return exceptions.ValidationError({"non_field_errors": exc.messages})


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, DjangoValidationError):
        return _django_validation(exc)
    if isinstance(exc, PromptTemplateError | DatasetImportError):
        return exceptions.ValidationError({"non_field_errors": [str(exc)]})
    if isinstance(exc, ProtectedError | RestrictedError):
        blocking = getattr(exc, "protected_objects", None) or getattr(exc, "restricted_objects", [])
        users = sorted({str(obj) for obj in list(blocking)[:5]})
        return Conflict(f"still in use by {', '.join(users)}; remove those first", code="in_use")
    if isinstance(exc, IntegrityError):
        # A unique constraint that a concurrent request satisfied first.
        return Conflict("the record conflicts with one stored meanwhile; fetch it and retry", code="conflict")
    if isinstance(exc, LabelConflict):
        return Conflict(str(exc), code="label_moved")
    if isinstance(exc, GateFailed):
        return Conflict(str(exc), code="gate_failed")
    if isinstance(exc, PromptLabel.DoesNotExist):
        return exceptions.NotFound(str(exc))
    if isinstance(exc, DjangoPermissionDenied) and not isinstance(exc, exceptions.PermissionDenied):
        return exceptions.PermissionDenied(str(exc) or None)
    return exc


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    gate = exc.result.as_dict() if isinstance(exc, GateFailed) and exc.result is not None else None
    exc = _translate(exc)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or None)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    assert isinstance(exc, exceptions.APIException)
    errors: list[dict[str, Any]] = []
    _flatten(exc.detail, None, errors)
    codes = exc.get_codes()
    code = (
        codes
        if isinstance(codes, str)
        else ("invalid" if isinstance(exc, exceptions.ValidationError) else exc.default_code)
    )
    message = (
        errors[0]["message"]
        if len(errors) == 1
        else ("; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors[:5]))
    )
    body: dict[str, Any] = {"status": response.status_code, "code": code, "message": message, "errors": errors}
    if gate is not None:
        body["gate"] = gate
    response.data = body
    return response
