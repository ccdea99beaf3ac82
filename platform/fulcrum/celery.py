"""The Celery application, configured from Django settings (CELERY_* names)."""

import os
from pathlib import Path

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fulcrum.settings")

app = Celery("fulcrum")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# kombu's file-system transport expects its folders to exist.
for key in ("data_folder_in", "data_folder_out", "control_folder"):
    folder = app.conf.broker_transport_options.get(key)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
