from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"
    verbose_name = "Fulcrum workers"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (connects the worker signal handlers)
