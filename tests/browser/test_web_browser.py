"""The radiologists' web page in a real browser, over a real site.

Debian's chromium, driven by Playwright, signs in to ``thyrocad web`` as a labeller
and as a reader: the worklist lists the study the listener received, the study page
loads every thumbnail and Grad-CAM evidence image, a label recorded on the page is
the label ``thyrocad label history`` shows, and a reader can neither see the form nor
post a label. Screenshots go to $THYROCAD_ARTIFACTS (else test-artifacts/browser/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import Account, Site
from tests.integration.conftest import cli

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOTE = "hypoechoic, heterogeneous; checked in the browser test"


@pytest.fixture
def page(browser: Browser, site: Site) -> Iterator[Page]:
    """A fresh browser context (no cookies) per test."""
    context = browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def sign_in(page: Page, account: Account) -> None:
    page.goto("/login")
    page.fill("input[name=username]", account.username)
    page.fill("input[name=password]", account.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/$"))
    # Rendered text: the page may show the role in capitals.
    header = page.locator("body").inner_text().lower()
    assert account.username in header and account.role in header, header[:500]


def loaded_widths(page: Page, selector: str) -> list[int]:
    """``naturalWidth`` of each image matching ``selector`` once it has finished loading
    (0 for one that failed)."""
    page.wait_for_function(
        "s => [...document.querySelectorAll(s)].every(img => img.complete)", arg=selector
    )
    widths: list[int] = page.eval_on_selector_all(selector, "els => els.map(e => e.naturalWidth)")
    return widths


# The share of an image's pixels in colour (channels more than 30 apart): 0 for the
# grey model input, more where the evidence map tints it.
COLOURED = """img => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 30) n++;
  }
  return n / (canvas.width * canvas.height);
}"""


def filter_worklist(page: Page, **choices: str) -> None:
    """Choose options of the worklist's filter form by their visible text; submit it."""
    form = page.locator("form#filters")
    for name, label in choices.items():
        form.locator(f"select[name={name}]").select_option(label=label)
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()


def label_history(site: Site) -> list[dict[str, object]]:
    out = cli("label", "history", "--study", site.study_uid, "--json", env=site.env).stdout
    rows: list[dict[str, object]] = json.loads(out)
    return rows


def test_a_wrong_password_is_refused(page: Page, site: Site) -> None:
    page.goto("/login")
    page.fill("input[name=username]", site.labeller.username)
    page.fill("input[name=password]", site.labeller.password + "x")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    assert "Wrong user name or password" in page.locator("body").inner_text()
    # Still signed out: the worklist sends us back to the sign-in page.
    page.goto("/")
    assert page.locator("input[name=password]").count() == 1, page.url


def test_labeller_finds_the_study_sees_its_evidence_and_labels_it(
    page: Page, site: Site, artifacts: Path
) -> None:
    sign_in(page, site.labeller)
    row = page.locator(f'#worklist tr[data-study-id="{site.study_id}"]')
    assert row.count() == 1, page.locator("#worklist").inner_text()
    assert site.patient_id in row.inner_text()
    # Opaque integer ids only: no patient id, no UID in any link of the worklist.
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    assert not [h for h in hrefs if site.patient_id in h or site.study_uid in h], hrefs
    page.screenshot(path=str(artifacts / "worklist.png"), full_page=True)
    filter_worklist(page, labelled="yes")
    assert row.count() == 0, "an unlabelled study is listed as labelled"
    filter_worklist(page, labelled="no")
    assert row.count() == 1, page.locator("#worklist").inner_text()

    row.locator(f'a[href="/studies/{site.study_id}"]').click()
    page.wait_for_url(re.compile(rf"/studies/{site.study_id}$"))
    assert page.locator("#aggregate").count() == 1
    figures = page.locator("figure.image")
    assert figures.count() == site.images, page.content()[:2000]
    for i in range(site.images):
        text = figures.nth(i).inner_text()
        assert re.search(r"\d\.\d\d|\d+(\.\d+)? ?%", text), f"no probability in {text!r}"
    thumbnails = loaded_widths(page, "figure.image img.thumbnail")
    evidence = loaded_widths(page, "figure.image img.evidence")
    assert len(thumbnails) == site.images and all(w > 0 for w in thumbnails), thumbnails
    assert len(evidence) == site.images and all(w > 0 for w in evidence), evidence
    sources = page.eval_on_selector_all(
        "figure.image img", "els => els.map(e => e.getAttribute('src'))"
    )
    assert all(re.fullmatch(r"/images/\d+/(thumbnail|evidence)\.png", s) for s in sources), sources
    # The evidence is drawn: each evidence image is its grey thumbnail tinted where its
    # stored map is above zero (and the fixture's model has maps that are).
    assert sorted(site.evidence_peaks) == sorted(
        int(s.split("/")[2]) for s in sources if s.endswith("evidence.png")
    )
    assert any(site.evidence_peaks.values()), site.evidence_peaks
    for i in range(site.images):
        figure = figures.nth(i)
        evidence_img = figure.locator("img.evidence")
        prediction_id = int((evidence_img.get_attribute("src") or "").split("/")[2])
        grey = figure.locator("img.thumbnail").evaluate(COLOURED)
        tinted = evidence_img.evaluate(COLOURED)
        assert grey == 0, f"thumbnail {prediction_id} is not the grey model input ({grey:.1%})"
        if site.evidence_peaks[prediction_id] > 0:
            assert tinted > 0.05, f"evidence {prediction_id} shows no map ({tinted:.1%} coloured)"
        else:
            assert tinted == 0, f"evidence {prediction_id} is tinted by an all-zero map"
    page.screenshot(path=str(artifacts / "study-page.png"), full_page=True)

    form = page.locator("#label-form")
    assert form.count() == 1
    assert form.get_attribute("action") == f"/studies/{site.study_id}/label"
    form.locator("select[name=diagnosis]").select_option("autoimmune")
    form.locator("textarea[name=note]").fill(NOTE)
    form.get_by_role("button", name="Record label").click()
    page.wait_for_load_state()
    labels = page.locator("#labels").inner_text()
    assert "autoimmune" in labels and NOTE in labels and site.labeller.username in labels, labels
    page.screenshot(path=str(artifacts / "study-page-labelled.png"), full_page=True)

    mine = [r for r in label_history(site) if r["labelled_by"] == site.labeller.username]
    assert len(mine) == 1, mine
    assert mine[0]["diagnosis"] == "autoimmune" and mine[0]["note"] == NOTE
    assert mine[0]["level"] == "study" and mine[0]["in_force"] is True
    # The worklist knows it is labelled now.
    page.goto("/")
    filter_worklist(page, labelled="yes")
    assert page.locator(f'#worklist tr[data-study-id="{site.study_id}"]').count() == 1


def test_a_reader_sees_no_label_form_and_cannot_post_one(page: Page, site: Site) -> None:
    sign_in(page, site.reader)
    page.goto(f"/studies/{site.study_id}")
    assert page.locator("#aggregate").count() == 1, page.content()[:2000]
    assert page.locator("#label-form").count() == 0
    assert page.get_by_role("button", name="Record label").count() == 0
    # The session's CSRF token, where a page carries one (the sign-out form), so the
    # refusal below is for the role, not for a missing token.
    tokens = page.eval_on_selector_all("input[name=csrf_token]", "els => els.map(e => e.value)")
    form = {"diagnosis": "normal", "note": "a reader tries"}
    if tokens:
        form["csrf_token"] = tokens[0]
    before = label_history(site)
    answer = page.request.post(f"/studies/{site.study_id}/label", form=form, max_redirects=0)
    assert answer.status == 403, (answer.status, answer.text()[:500])
    after = label_history(site)
    assert after == before
    assert site.reader.username not in {r["labelled_by"] for r in after}


def test_models_page_shows_the_active_version_and_its_plots(
    page: Page, site: Site, artifacts: Path
) -> None:
    sign_in(page, site.labeller)
    page.goto("/models")
    active = page.locator("#active-model").inner_text()
    assert site.model_version in active, active
    plots = loaded_widths(page, "#active-model img")
    assert len(plots) >= 2 and all(w > 0 for w in plots), plots  # ROC and precision-recall
    assert site.model_version in page.locator("#promotions").inner_text()
    page.screenshot(path=str(artifacts / "models.png"), full_page=True)


def test_sign_out_ends_the_session(page: Page, site: Site) -> None:
    sign_in(page, site.reader)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    page.goto(f"/studies/{site.study_id}")
    assert page.locator("input[name=password]").count() == 1, page.url
    assert page.locator("#aggregate").count() == 0
