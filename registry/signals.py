"""Every admin write lands in the audit log too: each admin LogEntry is mirrored as an AuditEntry.

Label moves are left out here: the admin moves labels through registry.promotion, which records them itself
with their from/to versions and reason.
"""

from __future__ import annotations

from typing import Any

from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.db.models.signals import post_save
from django.dispatch import receiver

from . import access

_VERBS = {ADDITION: "create", CHANGE: "update", DELETION: "delete"}
_RECORDED_ELSEWHERE = {("registry", "promptlabel")}


@receiver(post_save, sender=LogEntry, dispatch_uid="registry-admin-audit")
def _mirror_admin_log(sender: type[LogEntry], instance: LogEntry, created: bool, **_: Any) -> None:
    if not created or instance.content_type is None:
        return
    content_type = instance.content_type
    if (content_type.app_label, content_type.model) in _RECORDED_ELSEWHERE:
        return
    message = instance.get_change_message()
    details: dict[str, Any] = {"message": message} if message else {}
    access.record(
        access.Actor(user=instance.user, via="admin"),
        f"{content_type.model}.{_VERBS.get(instance.action_flag, 'change')}",
        object_type=content_type.model,
        object_id=instance.object_id or "",
        object_repr=instance.object_repr,
        **details,
    )
