"""The role each API request needs; a read-only token never writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rest_framework import exceptions, permissions
from rest_framework.request import Request

from registry import access
from registry.models import ApiToken, Role

if TYPE_CHECKING:
    from rest_framework.views import APIView


def request_token(request: Request) -> ApiToken | None:
    return request.auth if isinstance(request.auth, ApiToken) else None


def actor(request: Request) -> access.Actor:
    return access.Actor(user=request.user, token=request_token(request), via="api")


class RolePermission(permissions.BasePermission):
    """Reads need the viewer role; writes need the view's `write_role` (editor unless it says otherwise),
    deletions its `delete_role` (admin unless it says otherwise). A read-only token never writes."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not request.user or not request.user.is_authenticated:
            raise exceptions.NotAuthenticated("authenticate with a session or 'Authorization: Bearer <token>'")
        token = request_token(request)
        if request.method in permissions.SAFE_METHODS:
            needed = getattr(view, "read_role", Role.VIEWER)
        else:
            if token is not None and token.scope == ApiToken.Scope.READ:
                raise exceptions.PermissionDenied("this token is read-only")
            needed = getattr(view, "action_roles", {}).get(getattr(view, "action", None), "")
            if not needed:
                default = ("delete_role", Role.ADMIN) if request.method == "DELETE" else ("write_role", Role.EDITOR)
                needed = getattr(view, *default)
        held = access.effective_role(request.user, token)
        if access.role_rank(held) < access.role_rank(needed):
            raise exceptions.PermissionDenied(f"this needs the {needed} role; you have {held or 'no role'}")
        return True
