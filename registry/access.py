"""Who may do what: roles, API tokens and the audit log.

Roles are Django groups named viewer, editor, deployer and admin; each role includes the ones before it, and a
superuser is an admin. An API token acts as its user, capped by its scope: a read token never writes, whatever
its user may do. Every write through the API or the admin is recorded as an AuditEntry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser, Group, Permission
from django.core.exceptions import PermissionDenied
from django.db import models
from django.utils import timezone

from .models import ApiToken, AuditEntry, Role

ROLE_ORDER: tuple[str, ...] = (Role.VIEWER, Role.EDITOR, Role.DEPLOYER, Role.ADMIN)
TOKEN_PREFIX = "flc_"
# last_used_at is written at most this often per token, so reads do not turn into a write each.
LAST_USED_RESOLUTION = timedelta(minutes=1)

# Django model permissions each role's group gets, so staff users can work in the admin as their role allows.
_ADMIN_PERMISSIONS: dict[str, dict[str, tuple[str, ...]]] = {
    Role.VIEWER: {"registry": ("view",)},
    Role.EDITOR: {
        "registry.prompt": ("add", "change"),
        "registry.promptversion": ("add",),
        "registry.promptlabel": ("add", "change"),
        "registry.dataset": ("add", "change"),
        "registry.stack": ("add", "change"),
        "registry.scalingconfig": ("add", "change"),
        "registry.finetune": ("add", "change"),
        "registry.modelartifact": ("change",),
        "registry.apitoken": ("add",),
    },
    Role.DEPLOYER: {},
    Role.ADMIN: {"registry": ("add", "change", "delete", "view")},
}


class AccessDenied(PermissionDenied):
    """The user (or the token's scope) lacks the role an action needs."""


# --- roles ------------------------------------------------------------------------------------------------------


def role_rank(role: str | None) -> int:
    """0 for no role, then 1 (viewer) to 4 (admin)."""
    return ROLE_ORDER.index(role) + 1 if role in ROLE_ORDER else 0


def role_of(user: AbstractBaseUser | AnonymousUser | None) -> str | None:
    """The highest role the user holds, or None."""
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    if getattr(user, "is_superuser", False):
        return Role.ADMIN
    names = set(user.groups.values_list("name", flat=True))  # type: ignore[union-attr,attr-defined]
    held = [role for role in ROLE_ORDER if role in names]
    return held[-1] if held else None


def has_role(user: Any, role: str, token: ApiToken | None = None) -> bool:
    return role_rank(effective_role(user, token)) >= role_rank(role)


def effective_role(user: Any, token: ApiToken | None = None) -> str | None:
    """The user's role, capped at viewer when the request came with a read-only token."""
    role = role_of(user)
    if token is not None and token.scope == ApiToken.Scope.READ and role_rank(role) > role_rank(Role.VIEWER):
        return Role.VIEWER
    return role


def require_role(user: Any, role: str, token: ApiToken | None = None, *, action: str = "do this") -> None:
    held = effective_role(user, token)
    if role_rank(held) < role_rank(role):
        why = " (the token is read-only)" if token is not None and token.scope == ApiToken.Scope.READ else ""
        raise AccessDenied(f"you need the {role} role to {action}; you have {held or 'no role'}{why}")


def grant_role(user: Any, role: str) -> None:
    """Make `role` the user's only role group."""
    if role not in ROLE_ORDER:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLE_ORDER)}")
    ensure_roles()
    user.groups.remove(*Group.objects.filter(name__in=ROLE_ORDER))
    user.groups.add(Group.objects.get(name=role))


def ensure_roles(**kwargs: Any) -> None:
    """Create the role groups with their admin permissions (idempotent; runs after every migrate)."""
    granted: set[Permission] = set()
    for role in ROLE_ORDER:
        group, _created = Group.objects.get_or_create(name=role)
        for target, actions in _ADMIN_PERMISSIONS[role].items():
            app_label, _, model = target.partition(".")
            perms = Permission.objects.filter(content_type__app_label=app_label)
            if model:
                perms = perms.filter(content_type__model=model)
            query = models.Q()
            for action in actions:
                query |= models.Q(codename__startswith=f"{action}_")
            granted |= set(perms.filter(query))
        group.permissions.add(*granted)


# --- tokens -------------------------------------------------------------------------------------------------------


def _digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def create_token(
    user: Any, name: str, scope: str = ApiToken.Scope.READ, *, expires_at: datetime | None = None
) -> tuple[ApiToken, str]:
    """A new token and its secret text, which is never stored and cannot be shown again."""
    if scope not in ApiToken.Scope.values:
        raise ValueError(f"unknown scope {scope!r}; use one of {', '.join(ApiToken.Scope.values)}")
    prefix = secrets.token_hex(4)
    while ApiToken.objects.filter(prefix=prefix).exists():
        prefix = secrets.token_hex(4)
    raw = f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    token = ApiToken.objects.create(
        user=user, name=name, prefix=prefix, digest=_digest(raw), scope=scope, expires_at=expires_at
    )
    return token, raw


def authenticate_token(raw: str) -> ApiToken | None:
    """The active token whose secret is `raw`, or None."""
    if not raw.startswith(TOKEN_PREFIX):
        return None
    prefix, _, secret = raw[len(TOKEN_PREFIX) :].partition("_")
    if not prefix or not secret or len(prefix) > 16:
        return None
    try:
        token = ApiToken.objects.select_related("user").get(prefix=prefix)
    except ApiToken.DoesNotExist:
        return None
    if not hmac.compare_digest(token.digest, _digest(raw)) or not token.is_active:
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def revoke_token(token: ApiToken) -> bool:
    """Revoke the token; False when it was already revoked."""
    if token.revoked_at is not None:
        return False
    token.revoked_at = timezone.now()
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=token.revoked_at)
    return True


# --- audit ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Actor:
    """Who is writing, and through what."""

    user: Any = None
    token: ApiToken | None = None
    via: str = "api"

    @property
    def role(self) -> str | None:
        return effective_role(self.user, self.token)

    def require(self, role: str, action: str = "do this") -> None:
        require_role(self.user, role, self.token, action=action)


@dataclass(frozen=True)
class OperatorActor(Actor):
    """Whoever runs management commands on the machine: trusted with every role, as `manage.py prompt label` is.

    Used for work a command started without naming a user (an optimisation job's label move); policies' gates
    still apply and everything is audited with `via` (cli).
    """

    via: str = "cli"

    @property
    def role(self) -> str | None:
        return Role.ADMIN

    def require(self, role: str, action: str = "do this") -> None:
        return None


def record(
    actor: Actor,
    action: str,
    obj: models.Model | None = None,
    *,
    object_type: str = "",
    object_id: object = "",
    object_repr: str = "",
    **details: Any,
) -> AuditEntry:
    """Store one audit entry; `obj` fills in the object's type, id and description."""
    user = actor.user if getattr(actor.user, "pk", None) else None
    if obj is not None:
        object_type = object_type or obj._meta.model_name or ""
        object_id = object_id or obj.pk
        object_repr = object_repr or str(obj)
    return AuditEntry.objects.create(
        user=user,
        username=user.get_username() if user is not None else "",
        token=actor.token,
        via=actor.via,
        action=action,
        object_type=object_type,
        object_id="" if object_id is None else str(object_id)[:64],
        object_repr=object_repr[:200],
        details=details,
    )
