from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from . import metrics as fulcrum_metrics


def metrics(request: HttpRequest) -> HttpResponse:
    body, content_type = fulcrum_metrics.render_latest()
    return HttpResponse(body, content_type=content_type)


def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"status": "ok"})
