"""/api/…: the registry's REST API; the OpenAPI schema is at /api/schema/."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import AllowAny
from rest_framework.routers import DefaultRouter

from . import optimisations, schema, views

_ = schema  # registers the token scheme with drf-spectacular

PROMPT = rf"prompts/(?P<prompt_name>{views.NAME_RE})"

router = DefaultRouter(trailing_slash=True)
router.register("prompts", views.PromptViewSet, basename="prompt")
router.register(rf"{PROMPT}/versions", views.PromptVersionViewSet, basename="prompt-version")
router.register(rf"{PROMPT}/labels", views.LabelViewSet, basename="prompt-label")
router.register("label-moves", views.LabelMoveViewSet, basename="label-move")
router.register("label-policies", views.LabelPolicyViewSet, basename="label-policy")
router.register("artifacts", views.ArtifactViewSet, basename="artifact")
router.register("fine-tunes", views.FineTuneViewSet, basename="fine-tune")
router.register("fine-tune-jobs", views.FineTuneJobViewSet, basename="fine-tune-job")
router.register("scaling-configs", views.ScalingConfigViewSet, basename="scaling-config")
router.register("stacks", views.StackViewSet, basename="stack")
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("runs", views.RunViewSet, basename="run")
router.register("optimisations", optimisations.OptimisationViewSet, basename="optimisation")
router.register("tokens", views.TokenViewSet, basename="token")
router.register("audit", views.AuditViewSet, basename="audit")
router.register("tags", views.TagViewSet, basename="tag")

app_name = "api"
urlpatterns = [
    # The schema describes the API, not its data: anyone may read it.
    path(
        "schema/",
        SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[AllowAny]),
        name="schema",
    ),
    path("me/", views.MeView.as_view(), name="me"),
    path("serve/<slug:name>/", views.ServeView.as_view(), name="serve"),
    path("", include("registry.api.experiments")),  # lever reports, schedules, regressions (read-only)
    path("", include(router.urls)),
]
