from django.apps import AppConfig
from django.db.models.signals import post_migrate


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Fulcrum registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import access, experiments, signals
        from .optimisation import jobs

        # Connect the admin-to-audit-log handler and the run-finished/label-moved hooks.
        _ = signals, experiments, jobs
        post_migrate.connect(access.ensure_roles, sender=self, dispatch_uid="registry-ensure-roles")
