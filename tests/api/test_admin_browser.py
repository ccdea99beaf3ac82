"""The admin in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium).

A person's path: log in, open a prompt, read the side-by-side diff, roll production back from the label's
history with one click, look at a stack's four layers, compare two runs. Screenshots land in test-artifacts/.
Skipped when Chromium is not installed, unless FULCRUM_REQUIRE_BROWSER=1 (make test sets it after
deploy/test-browser.sh installed it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from registry.models import Prompt, PromptLabel, Stack

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), ""
)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM and Path(CHROMEDRIVER).exists()):
        if os.environ.get("FULCRUM_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromium-driver are required (deploy/test-browser.sh installs them)")
        pytest.skip("chromium / chromium-driver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="fulcrum-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    return path


@pytest.mark.django_db(transaction=True)
def test_a_person_diffs_rolls_back_and_compares_in_the_admin(
    browser: Any, live_server: Any, evaluated: dict[str, Any], qa: Prompt
) -> None:
    from selenium.webdriver.common.by import By

    User.objects.create_superuser("root", "root@example.com", "a-long-password-1")
    qa.move_label("production", qa.versions.get(number=2), reason="v2 scores better")
    label = PromptLabel.objects.get(prompt=qa, name="production")
    run1, run2 = evaluated["runs"][1], evaluated["runs"][2]

    browser.get(f"{live_server.url}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("root")
    browser.find_element(By.NAME, "password").send_keys("a-long-password-1")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert "Site administration" in browser.title or "administration" in browser.page_source

    # The prompt page: version history, then the side-by-side diff.
    browser.get(f"{live_server.url}/admin/registry/prompt/{qa.pk}/change/")
    assert "v1 → v2" in browser.page_source
    browser.find_element(By.LINK_TEXT, "side-by-side diff").click()
    changed = browser.find_elements(By.CSS_SELECTOR, "table.fulcrum-diff tr.insert, table.fulcrum-diff tr.replace")
    assert changed, "the diff shows no changed line"
    assert "Answer briefly." in browser.page_source
    shot(browser, "admin-prompt-diff")

    # The label's history: one click rolls production back to v1.
    browser.get(f"{live_server.url}/admin/registry/promptlabel/{label.pk}/history/")
    browser.find_element(By.CSS_SELECTOR, "button.rollback[data-version='1']").click()
    assert "Rolled qa:production back to v1" in browser.page_source
    label.refresh_from_db()
    assert label.version.number == 1
    rows = browser.find_elements(By.CSS_SELECTOR, "#label-history tbody tr")
    assert len(rows) == 3
    shot(browser, "admin-label-history")

    # A stack's four layers.
    stack = Stack.objects.get(name="qa-v2")
    browser.get(f"{live_server.url}/admin/registry/stack/{stack.pk}/change/")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".fulcrum-layer")) == 4
    shot(browser, "admin-stack-layers")

    # A run page, then the comparison of two runs on the same dataset.
    browser.get(f"{live_server.url}/admin/registry/evaluationrun/{run2.pk}/change/")
    assert browser.find_elements(By.CSS_SELECTOR, "progress")
    browser.get(f"{live_server.url}/admin/registry/evaluationrun/compare/?a={run1.pk}&b={run2.pk}")
    assert browser.find_element(By.ID, "disagreement-count").text == "1"
    assert browser.find_elements(By.CSS_SELECTOR, "svg.fulcrum-chart rect.bar-b")
    assert browser.find_element(By.CSS_SELECTOR, "#disagreements tbody tr td").text == "q2"
    path = shot(browser, "admin-run-comparison")
    assert path.exists()
