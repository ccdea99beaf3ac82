import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fulcrum.settings")
application = get_wsgi_application()

# The web process group's metrics files (fulcrum/multiproc.py): the first web process on this root removes stale
# files; gunicorn's workers and a second server join it.
from fulcrum import multiproc  # noqa: E402

multiproc.claim("web")
