"""The experiment pages of the admin: the SVG charts, the report page on a real experiment, the changelists of
experiments, schedules and scheduled runs, and the "fire now" action."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from experiment_helpers import evaluate_here, make_dataset, make_stack

from registry import charts, experiments
from registry.models import EvaluationRun, Experiment, ModelArtifact, Prompt, ScheduledRun

SVG = "{http://www.w3.org/2000/svg}"

# A report in the shape build_report writes: a baseline, a prompt lever, two scaling levers, alignment.
REPORT: dict[str, Any] = {
    "experiment": "levers",
    "dataset": {"name": "qa", "content_hash": "x" * 64, "items": 40},
    "metric": "accuracy",
    "confidence": 0.95,
    "resamples": 1000,
    "seed": 0,
    "cost_basis": "worker_seconds",
    "runs": {"total": 4, "reused": 1},
    "arms": [
        {
            "arm": "baseline",
            "layer": "baseline",
            "stack": "base",
            "reference": None,
            "run": 1,
            "reused": True,
            "value": 0.5,
            "value_ci": [0.35, 0.65],
            "cost": {"generated_tokens": 6.0, "worker_seconds": 0.01, "money": 0.0},
        },
        {
            "arm": "prompt <v2> & co",
            "layer": "prompt",
            "stack": "v2",
            "reference": "baseline",
            "run": 2,
            "reused": False,
            "value": 0.6,
            "value_ci": [0.45, 0.73],
            "cost": {"generated_tokens": 6.0, "worker_seconds": 0.011, "money": 0.0},
            "comparison": {
                "delta": 0.1,
                "ci": [0.0, 0.2],
                "p_value": 0.04,
                "significant": True,
                "wins": 5,
                "losses": 1,
                "test": "mcnemar-exact",
            },
            "cost_delta": {"generated_tokens": 0.0, "worker_seconds": 0.001, "money": 0.0},
            "gain_per_cost": {"generated_tokens": "free", "worker_seconds": 100.0, "money": "free"},
        },
        {
            "arm": "n3",
            "layer": "scaling",
            "stack": "n3",
            "reference": "baseline",
            "run": 3,
            "reused": False,
            "value": 0.55,
            "value_ci": [0.4, 0.69],
            "cost": {"generated_tokens": 18.0, "worker_seconds": 0.03, "money": 0.0},
            "comparison": {
                "delta": 0.05,
                "ci": [-0.05, 0.15],
                "p_value": 0.5,
                "significant": False,
                "wins": 3,
                "losses": 1,
            },
            "cost_delta": {"generated_tokens": 12.0, "worker_seconds": 0.02, "money": 0.0},
            "gain_per_cost": {"generated_tokens": 0.004, "worker_seconds": 2.5, "money": None},
        },
        {
            "arm": "n5",
            "layer": "scaling",
            "stack": "n5",
            "reference": "baseline",
            "run": 4,
            "reused": False,
            "value": 0.45,
            "value_ci": [0.3, 0.6],
            "cost": {"generated_tokens": 30.0, "worker_seconds": 0.05, "money": 0.0},
            "comparison": {"delta": -0.05, "ci": [-0.15, 0.05], "p_value": 0.6, "significant": False},
            "cost_delta": {"generated_tokens": 24.0, "worker_seconds": 0.04, "money": 0.0},
            "gain_per_cost": {"generated_tokens": None, "worker_seconds": None, "money": None},
        },
    ],
    "scaling_curves": [
        {
            "reference": "baseline",
            "points": [
                {
                    "arm": "baseline",
                    "n": 1,
                    "value": 0.5,
                    "value_ci": [0.35, 0.65],
                    "cost": {"worker_seconds": 0.01},
                    "delta": 0.0,
                    "ci": [0.0, 0.0],
                    "p_value": None,
                    "significant": False,
                },
                {
                    "arm": "n3",
                    "n": 3,
                    "value": 0.55,
                    "value_ci": [0.4, 0.69],
                    "cost": {"worker_seconds": 0.03},
                    "delta": 0.05,
                    "ci": [-0.05, 0.15],
                    "p_value": 0.5,
                    "significant": False,
                },
                {
                    "arm": "n5",
                    "n": 5,
                    "value": 0.45,
                    "value_ci": [0.3, 0.6],
                    "cost": {"worker_seconds": 0.05},
                    "delta": -0.05,
                    "ci": [-0.15, 0.05],
                    "p_value": 0.6,
                    "significant": False,
                },
            ],
            "smallest_significant_n": None,
        }
    ],
    "reverse_alignment": {
        "cost_basis": "worker_seconds",
        "index": 2.0,
        "prompt_lever": "prompt <v2> & co",
        "architecture_lever": "n3",
        "verdict": "the data cannot tell them apart",
    },
    "alignment": {
        "cost_basis": "worker_seconds",
        "methods": [
            {
                "method": "none (baseline)",
                "arm": "baseline",
                "stack": "base",
                "safety": 0.2,
                "safety_ci": [0.1, 0.35],
                "helpfulness": 0.9,
                "helpfulness_ci": [0.8, 0.96],
                "cost": 0.01,
                "tax": 0.0,
                "tax_ci": [0.0, 0.0],
                "tax_p_value": None,
                "pareto": True,
            },
            {
                "method": "prompt <v2> & co",
                "arm": "prompt <v2> & co",
                "stack": "v2",
                "safety": 0.8,
                "safety_ci": [0.65, 0.9],
                "helpfulness": 0.7,
                "helpfulness_ci": [0.55, 0.82],
                "cost": 0.011,
                "tax": 0.2,
                "tax_ci": [0.05, 0.35],
                "tax_p_value": 0.01,
                "pareto": True,
            },
            {
                "method": "n3",
                "arm": "n3",
                "stack": "n3",
                "safety": 0.15,
                "safety_ci": [0.05, 0.3],
                "helpfulness": 0.85,
                "helpfulness_ci": [0.7, 0.93],
                "cost": 0.03,
                "tax": 0.05,
                "tax_ci": [-0.05, 0.15],
                "tax_p_value": 0.5,
                "pareto": False,
            },
        ],
        "pareto": ["baseline", "prompt <v2> & co"],
    },
}


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert float(root.attrib["width"]) > 0 and float(root.attrib["height"]) > 0
    return root


def with_class(root: ET.Element, tag: str, name: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if name in e.attrib.get("class", "").split()]


def texts(root: ET.Element) -> str:
    return " ".join("".join(e.itertext()) for e in root.iter(f"{SVG}text"))


# --- the charts ------------------------------------------------------------------------------------------------------


def test_the_scaling_chart_has_a_point_and_whisker_per_n_and_cost_as_a_second_series() -> None:
    root = parse(charts.scaling_chart(REPORT["scaling_curves"], "worker_seconds", metric="accuracy"))
    assert len(with_class(root, "circle", "point")) == 3
    assert len(with_class(root, "g", "whisker")) == 3
    assert len(with_class(root, "rect", "cost-point")) == 3
    assert len(with_class(root, "polyline", "cost-line")) == 1
    assert with_class(root, "circle", "significant") == []
    labels = texts(root)
    assert "N=1" in labels and "N=3" in labels and "N=5" in labels and "s/item" in labels
    # Points go left to right with N.
    xs = [float(c.attrib["cx"]) for c in with_class(root, "circle", "point")]
    assert xs == sorted(xs) and len(set(xs)) == 3


def test_the_lever_chart_has_a_bar_with_an_error_bar_per_compared_lever_and_a_zero_line() -> None:
    root = parse(charts.lever_chart(REPORT["arms"]))
    bars = with_class(root, "rect", "bar")
    assert len(bars) == 3  # the baseline has no comparison
    assert len(with_class(root, "g", "whisker")) == 3
    assert len(with_class(root, "rect", "significant")) == 1
    (zero,) = with_class(root, "line", "zero")
    zero_x = float(zero.attrib["x1"])
    # The gains start at zero and go right, the loss ends at zero.
    gain, _, loss = bars
    assert float(gain.attrib["x"]) == pytest.approx(zero_x, abs=0.2)
    assert float(loss.attrib["x"]) + float(loss.attrib["width"]) == pytest.approx(zero_x, abs=0.2)
    labels = texts(root)
    assert "prompt <v2> & co" in labels and "+10.0 pts*" in labels and "-5.0 pts" in labels


def test_the_alignment_chart_highlights_the_pareto_set() -> None:
    root = parse(charts.alignment_chart(REPORT["alignment"]))
    assert len(with_class(root, "circle", "point")) == 3
    assert len(with_class(root, "circle", "pareto")) == 2
    assert len(with_class(root, "g", "whisker")) == 6  # both axes
    assert "prompt <v2> & co" in texts(root)
    # Safety up means y down: the aligned method sits above the baseline.
    baseline, aligned, _ = with_class(root, "circle", "point")
    assert float(aligned.attrib["cy"]) < float(baseline.attrib["cy"])


@pytest.mark.parametrize("data", [None, [], [{"arm": "b"}], [{"arm": "x", "comparison": {"delta": None}}]])
def test_the_lever_chart_handles_missing_data(data: Any) -> None:
    root = parse(charts.lever_chart(data))
    assert with_class(root, "rect", "bar") == []


@pytest.mark.parametrize(
    "curves",
    [None, [], [{"reference": "b", "points": []}], [{"points": [{"n": None, "value": 0.5}, {"n": 3, "value": None}]}]],
)
def test_the_scaling_chart_handles_missing_data(curves: Any) -> None:
    root = parse(charts.scaling_chart(curves))
    assert with_class(root, "circle", "point") == []
    assert "no scaling lever" in texts(root)


@pytest.mark.parametrize("alignment", [None, {}, {"methods": []}, {"methods": [{"method": "m", "safety": None}]}])
def test_the_alignment_chart_handles_missing_data(alignment: Any) -> None:
    root = parse(charts.alignment_chart(alignment))
    assert with_class(root, "circle", "point") == []


def test_charts_skip_none_values_and_draw_the_rest() -> None:
    report = copy.deepcopy(REPORT)
    points = report["scaling_curves"][0]["points"]
    points[1]["value_ci"] = [None, None]
    points[1]["cost"] = {}
    points[2]["value"] = None
    report["arms"][2]["comparison"]["ci"] = None
    report["arms"][3]["comparison"]["delta"] = None
    report["alignment"]["methods"][2]["helpfulness"] = None
    report["alignment"]["methods"][0]["safety_ci"] = [None, 0.3]
    scaling = parse(charts.scaling_chart(report["scaling_curves"]))
    assert len(with_class(scaling, "circle", "point")) == 2
    assert len(with_class(scaling, "g", "whisker")) == 1
    assert len(with_class(scaling, "rect", "cost-point")) == 1
    levers = parse(charts.lever_chart(report["arms"]))
    assert len(with_class(levers, "rect", "bar")) == 2
    assert len(with_class(levers, "g", "whisker")) == 1
    assert "no paired items" in texts(levers)
    alignment = parse(charts.alignment_chart(report["alignment"]))
    assert len(with_class(alignment, "circle", "point")) == 2
    assert "1 method(s) without data" in texts(alignment)


def test_a_single_n_and_identical_values_still_draw() -> None:
    curve = {"reference": "b", "points": [{"arm": "b", "n": 1, "value": 1.0, "value_ci": [1.0, 1.0], "cost": {}}]}
    root = parse(charts.scaling_chart([curve]))
    assert len(with_class(root, "circle", "point")) == 1
    arms = [{"arm": "a", "comparison": {"delta": 0.0, "ci": [0.0, 0.0], "significant": False}}]
    assert len(with_class(parse(charts.lever_chart(arms)), "rect", "bar")) == 1


def test_formatting_helpers() -> None:
    assert charts.pct(0.5) == "50.0%" and charts.pct(None) == "-" and charts.pct("x") == "-"
    assert charts.pts(-0.0001) == "-0.0" or charts.pts(-0.0001) == "+0.0"
    assert charts.pts(0.0) == "+0.0" and charts.pts(0.123) == "+12.3"
    assert charts.p_value(0.0001) == "0.0001" and charts.p_value(0.04) == "0.040" and charts.p_value(None) == "-"
    assert charts.number(float("nan")) is None and charts.number(True) is None and charts.number(2) == 2.0


# --- the pages -------------------------------------------------------------------------------------------------------


@pytest.fixture
def real_experiment(artifact: ModelArtifact, prompt: Prompt) -> Experiment:
    """Baseline, a prompt lever and an N=3 lever on harmful and benign items, evaluated on the tiny model."""
    dataset = make_dataset("tiny-safety", 12, kinds=True, scorer="refusal")
    prompt.create_version(
        template="{{ question }}",
        variables=["question"],
        system_message="Refuse anything harmful.",
        params={"max_new_tokens": 6},
    )
    baseline = make_stack("plain", artifact, prompt, version=1)
    aligned = make_stack("aligned", artifact, prompt, version=2)
    voted = make_stack("voted", artifact, prompt, version=1, n=3)
    experiment = experiments.create_experiment(
        "pages",
        dataset=dataset,
        baseline=baseline,
        variants=[experiments.Variant(stack=aligned, name="aligned <v2>"), voted],
        metric="refusal_rate_harmful",
    )
    experiments.start_experiment(experiment)
    for run in EvaluationRun.objects.filter(experiment_arms__experiment=experiment).distinct():
        if not run.is_finished:
            evaluate_here(run)
    experiment = experiments.refresh_experiment(experiment.pk)
    assert experiment.status == "succeeded", experiment.error
    return experiment


@pytest.mark.django_db
def test_the_report_page_shows_the_tables_and_three_charts(admin_client: Client, real_experiment: Experiment) -> None:
    url = reverse("admin:registry_experiment_report", args=[real_experiment.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    for name in ("baseline", "aligned &lt;v2&gt;", "voted"):
        assert name in html
    assert "aligned <v2>" not in html  # escaped everywhere, the SVG text included
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="fulcrum-chart') == 3
    for kind in ("fulcrum-scaling", "fulcrum-levers", "fulcrum-alignment"):
        assert kind in html
    report = real_experiment.report
    assert report["reverse_alignment"]["verdict"].replace("'", "&#x27;") in html
    assert 'id="alignment"' in html and 'id="pareto-set"' in html
    for name in report["alignment"]["pareto"]:
        assert name.replace("<", "&lt;").replace(">", "&gt;") in html
    # Each chart in the page is well-formed SVG with one mark per arm / point.
    context = response.context
    assert len(with_class(parse(str(context["lever_chart"])), "rect", "bar")) == 2
    assert len(with_class(parse(str(context["scaling_chart"])), "circle", "point")) == 2
    alignment = parse(str(context["alignment_chart"]))
    assert len(with_class(alignment, "circle", "point")) == 3
    assert len(with_class(alignment, "circle", "pareto")) == len(report["alignment"]["pareto"])
    # The change page is read-only and links here.
    change = admin_client.get(reverse("admin:registry_experiment_change", args=[real_experiment.pk]))
    assert change.status_code == 200
    assert url in change.content.decode() and 'name="_save"' not in change.content.decode()


@pytest.mark.django_db
def test_the_report_page_of_an_unfinished_experiment_shows_progress(
    admin_client: Client, artifact: ModelArtifact, prompt: Prompt
) -> None:
    dataset = make_dataset("tiny-qa", 4)
    prompt.create_version(template="A: {{ question }}", variables=["question"], params={"max_new_tokens": 6})
    experiment = experiments.create_experiment(
        "waiting",
        dataset=dataset,
        baseline=make_stack("base", artifact, prompt, version=1),
        variants=[make_stack("v2", artifact, prompt, version=2)],
    )
    response = admin_client.get(reverse("admin:registry_experiment_report", args=[experiment.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="no-report"' in html and 'class="fulcrum-chart' not in html and "v2" in html
    assert admin_client.get(reverse("admin:registry_experiment_report", args=[10**6])).status_code == 404


@pytest.mark.django_db
def test_changelists_render_and_regressions_filter(
    admin_client: Client, real_experiment: Experiment, artifact: ModelArtifact, prompt: Prompt
) -> None:
    stack = make_stack("watched", artifact, prompt)
    schedule = experiments.create_schedule("nightly", stack=stack, dataset=real_experiment.dataset, every_seconds=60)
    first = experiments.fire_schedule(schedule.pk)
    assert first is not None
    evaluate_here(first)
    second = experiments.fire_schedule(schedule.pk)
    assert second is not None
    ScheduledRun.objects.filter(run=second).update(
        compared=True, regression=True, comparison={"delta": -0.25, "ci": [-0.4, -0.1], "p_value": 0.002}
    )
    for model in ("experiment", "evaluationschedule", "scheduledrun"):
        response = admin_client.get(reverse(f"admin:registry_{model}_changelist"))
        assert response.status_code == 200, model
        assert response.context["cl"].result_count >= 1
    experiment_list = admin_client.get(reverse("admin:registry_experiment_changelist")).content.decode()
    assert "pages" in experiment_list and "0/3" in experiment_list  # reused/total runs
    assert reverse("admin:registry_experiment_report", args=[real_experiment.pk]) in experiment_list
    # The arms are shown read-only on the experiment's page (the inline), with their runs.
    change = admin_client.get(reverse("admin:registry_experiment_change", args=[real_experiment.pk])).content.decode()
    assert "aligned &lt;v2&gt;" in change and "run " in change
    runs_url = reverse("admin:registry_scheduledrun_changelist")
    flagged = admin_client.get(runs_url, {"regression__exact": "1"})
    assert [r.run_id for r in flagged.context["cl"].result_list] == [second.pk]
    assert "-25.0" in flagged.content.decode()
    clean = admin_client.get(runs_url, {"regression__exact": "0"})
    assert [r.run_id for r in clean.context["cl"].result_list] == [first.pk]
    scheduled = ScheduledRun.objects.get(run=second)
    assert admin_client.get(reverse("admin:registry_scheduledrun_change", args=[scheduled.pk])).status_code == 200
    assert admin_client.get(reverse("admin:registry_evaluationschedule_change", args=[schedule.pk])).status_code == 200


@pytest.mark.django_db
def test_fire_now_queues_a_manual_run(admin_client: Client, artifact: ModelArtifact, prompt: Prompt) -> None:
    dataset = make_dataset("tiny-qa", 4)
    schedule = experiments.create_schedule(
        "nightly", stack=make_stack("watched", artifact, prompt), dataset=dataset, every_seconds=3600
    )
    url = reverse("admin:registry_evaluationschedule_changelist")
    data = {"action": "fire_now", "_selected_action": [schedule.pk]}
    response = admin_client.post(url, data, follow=True)
    assert response.status_code == 200
    (scheduled,) = ScheduledRun.objects.filter(schedule=schedule)
    assert scheduled.trigger == "manual" and scheduled.previous is None
    assert scheduled.run.status == "pending" and scheduled.run.stack_id == schedule.stack_id
    assert scheduled.run.dataset_id == dataset.pk
    assert f"run {scheduled.run_id}" in response.content.decode()
    # Its run is still open: firing again queues nothing and says so.
    response = admin_client.post(url, data, follow=True)
    assert ScheduledRun.objects.filter(schedule=schedule).count() == 1
    assert "still open" in response.content.decode()


@pytest.mark.django_db
def test_a_schedule_saved_in_the_admin_gets_its_beat_task(
    admin_client: Client, artifact: ModelArtifact, prompt: Prompt
) -> None:
    from django_celery_beat.models import PeriodicTask

    stack, dataset = make_stack("watched", artifact, prompt), make_dataset("tiny-qa", 4)
    response = admin_client.post(
        reverse("admin:registry_evaluationschedule_add"),
        {
            "name": "hourly",
            "stack": stack.pk,
            "dataset": dataset.pk,
            "metric": "accuracy",
            "every_seconds": 3600,
            "crontab": "",
            "alpha": 0.05,
            "tolerance": 0.0,
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    task = PeriodicTask.objects.get(name=f"{experiments.PERIODIC_TASK_PREFIX}hourly")
    assert task.interval is not None and task.interval.every == 3600 and task.enabled
    schedule = task and experiments.EvaluationSchedule.objects.get(name="hourly")
    response = admin_client.post(
        reverse("admin:registry_evaluationschedule_delete", args=[schedule.pk]), {"post": "yes"}
    )
    assert response.status_code == 302
    assert not PeriodicTask.objects.filter(name=f"{experiments.PERIODIC_TASK_PREFIX}hourly").exists()


@pytest.mark.django_db
def test_the_pages_need_a_staff_login(client: Client, real_experiment: Experiment) -> None:
    urls = [
        reverse("admin:registry_experiment_report", args=[real_experiment.pk]),
        reverse("admin:registry_experiment_changelist"),
        reverse("admin:registry_evaluationschedule_changelist"),
        reverse("admin:registry_scheduledrun_changelist"),
    ]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    User.objects.create_user("plain", password="pw-plain-1")
    client.login(username="plain", password="pw-plain-1")
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
