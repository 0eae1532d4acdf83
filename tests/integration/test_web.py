"""The radiologists' web page against a real migrated database (PostgreSQL and SQLite):
sign-in, sessions, the worklist, the study page with its images, labels, models, audit,
and that no patient id or name reaches a URL, a log line or a metric."""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from tests.db_fixtures import fresh_sqlite_url, migrated_engine
from tests.integration import web_data
from tests.integration.web_data import (
    ACCESSION,
    CLASSES,
    INPUT_SIZE,
    OLD_VERSION,
    PATIENT_ID,
    PATIENT_NAME,
    VERSION,
    Seeded,
)
from thyrocad.cli import app as cli_app
from thyrocad.db import repository as repo
from thyrocad.db.engine import make_session_factory
from thyrocad.db.repository import users, worklist
from thyrocad.db.roles import create_readonly_role
from thyrocad.db.schema import AuditEventRow, Label
from thyrocad.settings import Settings, load_settings
from thyrocad.web.app import create_app
from thyrocad.web.auth import COOKIE_NAME, Passwords
from thyrocad.web.reading import READ_TABLES

FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "correct horse battery"
PAGE = 5
PHI = (PATIENT_ID, "Quokkafeld", "Wilhelmina", ACCESSION)


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_780_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> None:
        self.now += minutes * 60


@dataclass
class Site:
    engine: Engine
    url: str
    settings: Settings
    data: Seeded
    clock: Clock
    passwords: Passwords
    tmp: Path

    def app(self, **kwargs: Any) -> Any:
        return create_app(
            self.settings,
            sessions=make_session_factory(self.engine),
            clock=self.clock,
            passwords=self.passwords,
            secret=b"s" * 32,
            page_size=PAGE,
            **kwargs,
        )

    def client(self, username: str | None = None, **kwargs: Any) -> TestClient:
        client = TestClient(self.app(**kwargs), follow_redirects=False)
        if username is not None:
            answer = sign_in(client, username)
            assert answer.status_code == 303, answer.text
        return client

    def rows(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(text(query), params))


def sign_in(client: TestClient, username: str, password: str = PASSWORD) -> Any:
    return client.post("/login", data={"username": username, "password": password})


class Page(HTMLParser):
    """Tags with their attributes and the text inside each element id'd or classed."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)
        self.text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        def matches(found: dict[str, str]) -> bool:
            for key, value in attrs.items():
                key = key.rstrip("_").replace("_", "-")
                if key == "class":
                    if value not in found.get("class", "").split():
                        return False
                elif found.get(key) != value:
                    return False
            return True

        return [a for t, a in self.tags if t == tag and matches(a)]

    def urls(self) -> list[str]:
        return [a[k] for _, a in self.tags for k in ("href", "src", "action") if k in a]


def section(html: str, element_id: str) -> str:
    """The HTML of the ``<section id=...>`` (sections do not nest on these pages)."""
    found = re.search(rf'<section id="{element_id}".*?</section>', html, re.S)
    assert found, f"no section {element_id}"
    return found.group(0)


@pytest.fixture(params=["postgresql", "sqlite"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = fresh_sqlite_url(tmp_path)
    with migrated_engine(url) as engine:
        data = web_data.seed(engine, tmp_path / "spool", tmp_path / "models")
        passwords = Passwords(FAST)
        with make_session_factory(engine).begin() as session:
            users.create_user(session, "dr-lab", passwords.hash(PASSWORD), "labeller", actor="t")
            users.create_user(session, "dr-read", passwords.hash(PASSWORD), "reader", actor="t")
            users.create_user(session, "dr-gone", passwords.hash(PASSWORD), "labeller", actor="t")
            users.disable_user(session, "dr-gone", actor="t")
        settings = load_settings(
            data_dir=tmp_path, database_url=url, classes=list(CLASSES), positive_class=CLASSES[0]
        )
        yield Site(engine, url, settings, data, Clock(), passwords, tmp_path)


# --------------------------------------------------------------------------- sign-in


def test_sign_in_sets_a_private_cookie_and_goes_to_the_worklist(site: Site) -> None:
    client = site.client()
    form = Page(client.get("/login").text)
    assert form.find("input", name="username") and form.find("input", name="password")
    assert "Sign in" in form.text
    answer = sign_in(client, "dr-lab")
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    page = client.get("/")
    assert page.status_code == 200
    header = Page(page.text)
    assert "dr-lab" in header.text and "labeller" in header.text
    assert header.find("form", action="/logout", method="post")
    assert "Sign out" in header.text
    (last,) = site.rows("SELECT last_login_at FROM web_users WHERE username = 'dr-lab'")
    assert last[0] is not None


def test_over_https_the_cookie_is_secure(site: Site) -> None:
    plain = sign_in(site.client(), "dr-lab").headers["set-cookie"].lower()
    assert "secure" not in plain
    client = TestClient(site.app(), base_url="https://testserver", follow_redirects=False)
    answer = sign_in(client, "dr-lab")
    assert "; secure" in answer.headers["set-cookie"].lower()
    assert "; secure" in client.get("/").headers["set-cookie"].lower()  # renewed: still


@pytest.mark.parametrize(
    ("username", "password", "reason"),
    [
        ("dr-lab", "wrong password!", "wrong password"),
        ("nobody-here", PASSWORD, "no such user"),
        ("dr-gone", PASSWORD, "disabled"),
    ],
)
def test_failed_sign_ins_all_look_the_same_and_are_audited(
    site: Site, username: str, password: str, reason: str
) -> None:
    client = site.client()
    answer = sign_in(client, username, password)
    assert answer.status_code == 401
    assert "Wrong user name or password" in answer.text
    assert COOKIE_NAME not in answer.headers.get("set-cookie", "")
    assert client.get("/").status_code == 303
    with make_session_factory(site.engine)() as session:
        (event,) = repo.audit_events(session, kind="web_sign_in")
    assert event.outcome == "refused"
    assert event.details["reason"] == reason
    # A name that is nobody's (perhaps a password typed in the wrong box) is not kept.
    assert event.actor == ("unknown user" if reason == "no such user" else username)


def test_unauthenticated_pages_redirect_and_images_answer_401(site: Site) -> None:
    client = site.client()
    pid = site.data.prediction_ids[0]
    for path in ("/", f"/studies/{site.data.study_id}", "/models"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/login", path
    for path in (
        f"/images/{pid}/thumbnail.png",
        f"/images/{pid}/evidence.png",
        f"/models/{VERSION}/plots/roc.png",
    ):
        assert client.get(path).status_code == 401, path
    answer = client.post(f"/studies/{site.data.study_id}/label", data={"diagnosis": "normal"})
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert not site.rows("SELECT id FROM labels WHERE source = 'web'")


def test_a_session_ends_after_the_idle_time_and_lives_while_used(site: Site) -> None:
    client = site.client("dr-read")
    site.clock.advance(50)
    assert client.get("/").status_code == 200  # used: the idle timer starts again
    site.clock.advance(50)
    assert client.get("/").status_code == 200
    site.clock.advance(61)
    answer = client.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    pid = site.data.prediction_ids[0]
    assert client.get(f"/images/{pid}/thumbnail.png").status_code == 401


def test_disabling_a_signed_in_user_ends_their_session_at_once(site: Site) -> None:
    client = site.client("dr-lab")
    assert client.get("/").status_code == 200
    with make_session_factory(site.engine).begin() as session:
        users.disable_user(session, "dr-lab", actor="admin")
    assert client.get("/").status_code == 303
    assert sign_in(client, "dr-lab").status_code == 401


def test_sign_out_ends_the_session(site: Site) -> None:
    client = site.client("dr-read")
    answer = client.post("/logout")
    assert answer.status_code == 303 and answer.headers["location"] == "/login"
    assert client.get("/").status_code == 303
    kinds = [r.kind for r in site.rows("SELECT kind FROM audit_events ORDER BY id")]
    assert "web_sign_out" in kinds


# --------------------------------------------------------------------------- worklist


def _study_ids(html: str) -> list[int]:
    return [int(a["data-study-id"]) for a in Page(html).find("tr") if "data-study-id" in a]


def _all_pages(client: TestClient, first: str) -> tuple[list[int], list[str]]:
    ids, urls, url = [], [], first
    while url:
        urls.append(url)
        answer = client.get(url)
        assert answer.status_code == 200
        ids += _study_ids(answer.text)
        following = Page(answer.text).find("a", rel="next")
        url = following[0]["href"] if following else ""
    return ids, urls


def test_worklist_shows_latest_results_newest_first_with_every_column(site: Site) -> None:
    client = site.client("dr-read")
    html = client.get("/").text
    page = Page(html)
    assert page.find("form", id="filters", method="get")
    for name in ("from", "to"):
        assert page.find("input", name=name, type="date")
    for name in ("finding", "model", "labelled"):
        assert page.find("select", name=name)
    assert page.find("table", id="worklist")
    ids, urls = _all_pages(client, "/")
    assert ids == list(site.data.all_study_ids)  # newest result first, each study once
    assert len(urls) == 3  # 13 studies, 5 a page
    assert "13 studies" in page.text
    for study_id in ids[:PAGE]:
        assert page.find("a", href=f"/studies/{study_id}")
    last_page = client.get(urls[-1]).text
    row = re.search(rf'<tr data-study-id="{site.data.study_id}">.*?</tr>', last_page, re.S).group(0)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td.*?</td>", row, re.S)]
    assert cells == [
        PATIENT_ID,
        "Quokkafeld, Wilhelmina",
        "2026-03-01",
        ACCESSION,
        "autoimmune",
        "66.0 %",
        VERSION,
        "2",  # the latest revision, not the first
        "no",
        "no",
    ]
    assert site.data.study_id not in _study_ids(client.get(f"/?model={OLD_VERSION}").text)


def test_worklist_pages_back_and_forth(site: Site) -> None:
    client = site.client("dr-read")
    first = client.get("/").text
    assert not Page(first).find("a", rel="prev")
    second_url = Page(first).find("a", rel="next")[0]["href"]
    second = client.get(second_url).text
    back = Page(second).find("a", rel="prev")[0]["href"]
    assert _study_ids(client.get(back).text) == _study_ids(first)
    ids = list(site.data.all_study_ids)
    assert _study_ids(second) == ids[PAGE : 2 * PAGE]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("finding=none", lambda d: [d.no_finding_study_id]),
        ("labelled=yes", lambda d: [d.other_study_ids[11 - k] for k in (9, 6, 3, 0)]),
        ("from=2026-01-01", lambda d: [s for i, s in enumerate(d.all_study_ids) if (11 - i) % 4]),
        ("from=2025-01-01&to=2025-12-31", lambda d: [d.other_study_ids[11 - k] for k in (8, 4, 0)]),
        (f"model={OLD_VERSION}", lambda d: []),
        ("finding=autoimmune&labelled=no", lambda d: _autoimmune_unlabelled(d)),
    ],
)
def test_worklist_filters(site: Site, query: str, expected: Any) -> None:
    client = site.client("dr-read")
    ids, urls = _all_pages(client, f"/?{query}")
    assert ids == expected(site.data)
    assert all(query.split("&")[0] in url for url in urls)  # links keep the filters
    assert f"{len(ids)} stud" in Page(client.get(f"/?{query}").text).text


def _autoimmune_unlabelled(d: Seeded) -> list[int]:
    # Others: p = 0.2 + 0.05 k is >= 0.5 for k >= 6; k = 6 and 9 are labelled.
    return [d.other_study_ids[11 - k] for k in (11, 10, 8, 7)] + [d.study_id]


def test_labelled_column_shows_the_label_in_force(site: Site) -> None:
    client = site.client("dr-read")
    labelled = site.data.other_study_ids[11]  # k = 0, labelled "normal" by dr-seed
    html = client.get("/?labelled=yes&from=2025-01-01&to=2025-01-01").text
    row = re.search(rf'<tr data-study-id="{labelled}">.*?</tr>', html, re.S).group(0)
    assert "normal" in row and "dr-seed" in row


def test_counting_stops_past_the_cap(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    with make_session_factory(site.engine)() as session:
        assert worklist.worklist_count(session) == 13
        assert worklist.worklist_count(session, cap=20) == 13
        assert worklist.worklist_count(session, cap=5) == 6  # "more than 5"
        labelled = worklist.WorklistFilters(labelled=True)
        assert worklist.worklist_count(session, labelled, cap=3) == 4
        assert worklist.worklist_count(session, labelled, cap=4) == 4
    monkeypatch.setattr(worklist, "COUNT_CAP", 10)
    text = Page(site.client("dr-read").get("/").text).text
    assert "more than 10 studies" in text


def test_a_bad_filter_is_said_not_guessed(site: Site) -> None:
    answer = site.client("dr-read").get("/?from=yesterday")
    assert answer.status_code == 400
    assert "The from date is not a date" in answer.text


# --------------------------------------------------------------------------- study page


def test_study_page_shows_images_evidence_aggregate_revisions_and_labels(site: Site) -> None:
    client = site.client("dr-read")
    html = client.get(f"/studies/{site.data.study_id}").text
    page = Page(html)
    figures = re.findall(r'<figure class="image".*?</figure>', html, re.S)
    assert len(figures) == 3
    for pid, figure in zip(site.data.prediction_ids, figures, strict=True):
        assert f'<img class="thumbnail" src="/images/{pid}/thumbnail.png"' in figure
        has_evidence = pid in site.data.evidence_prediction_ids
        assert (f'<img class="evidence" src="/images/{pid}/evidence.png"' in figure) == (
            has_evidence
        )
    assert "91.0 %" in figures[0] and "35.0 %" in figures[2]
    aggregate = section(html, "aggregate")
    assert "mean" in aggregate and "autoimmune" in aggregate and VERSION in aggregate
    assert "Patient" in aggregate
    revisions = section(html, "revisions")
    assert revisions.count("<tr>") == 1 + 2  # the header and both revisions
    assert OLD_VERSION in revisions
    assert "Not labelled yet" in section(html, "labels")
    assert not page.find("form", id="label-form")  # a reader


def test_thumbnails_are_the_model_input_and_evidence_is_drawn_over_it(site: Site) -> None:
    client = site.client("dr-read")
    with_map, without = site.data.evidence_prediction_ids[0], site.data.prediction_ids[2]
    thumb = client.get(f"/images/{with_map}/thumbnail.png")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    grey = Image.open(io.BytesIO(thumb.content))
    assert grey.mode == "L" and grey.size == (INPUT_SIZE, INPUT_SIZE)
    evidence = client.get(f"/images/{with_map}/evidence.png")
    assert evidence.status_code == 200
    drawn = Image.open(io.BytesIO(evidence.content))
    assert drawn.mode == "RGB" and drawn.size == grey.size
    # The seeded map peaks at cell (3, 4) of 14: the tint is strongest there.
    import numpy as np

    tint = np.abs(np.asarray(drawn, dtype=int) - np.asarray(grey, dtype=int)[..., None]).sum(2)
    row, col = np.unravel_index(int(np.argmax(tint)), tint.shape)
    cell = INPUT_SIZE / 14
    assert abs(row - 3.5 * cell) <= 1.5 * cell and abs(col - 4.5 * cell) <= 1.5 * cell
    assert client.get(f"/images/{without}/evidence.png").status_code == 404
    assert client.get("/images/999999/thumbnail.png").status_code == 404


def test_an_image_gone_from_the_spool_is_a_clear_404(site: Site) -> None:
    client = site.client("dr-read")
    pid = site.data.prediction_ids[1]
    (path,) = site.rows(
        "SELECT i.spool_path FROM instances i JOIN predictions p ON p.instance_id = i.id"
        " WHERE p.id = :pid",
        pid=pid,
    )
    Path(path[0]).unlink()
    answer = client.get(f"/images/{pid}/thumbnail.png")
    assert answer.status_code == 404 and "no longer in the spool" in answer.text


def test_unknown_study_is_404(site: Site) -> None:
    answer = site.client("dr-read").get("/studies/987654")
    assert answer.status_code == 404 and "no study 987654" in answer.text


def test_a_malformed_or_unknown_address_is_the_html_404_page(site: Site) -> None:
    client = site.client("dr-read")
    for path in ("/studies/abc", "/no-such-page", "/studies/1/nothing"):
        answer = client.get(path)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert "There is no such page." in answer.text, path


def test_every_study_view_is_audited_by_user_never_by_patient(site: Site) -> None:
    client = site.client("dr-read")
    for _ in range(2):
        assert client.get(f"/studies/{site.data.study_id}").status_code == 200
    with make_session_factory(site.engine)() as session:
        views = repo.audit_events(session, kind="study_viewed")
    assert len(views) == 2
    assert {e.actor for e in views} == {"dr-read"}
    assert views[0].details["study_id"] == site.data.study_id
    assert views[0].details["images"] == 3
    for event in views:
        flat = str(event.details)
        assert site.data.study_uid not in flat and PATIENT_ID not in flat


# --------------------------------------------------------------------------- labels


@pytest.fixture
def cli_runner() -> Iterator[CliRunner]:
    """Runs the CLI in this process; puts back the logging its callback replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield CliRunner()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _csrf(html: str) -> str:
    return Page(html).find("input", name="csrf_token")[0]["value"]


def test_a_labeller_records_a_label_as_the_cli_would(site: Site, cli_runner: CliRunner) -> None:
    client = site.client("dr-lab")
    study_url = f"/studies/{site.data.study_id}"
    html = client.get(study_url).text
    page = Page(html)
    assert page.find("form", id="label-form", method="post", action=f"{study_url}/label")
    options = [o["value"] for o in page.find("option") if o.get("value")]
    assert set(CLASSES) <= set(options)
    assert page.find("textarea", name="note") and "Record label" in page.text
    answer = client.post(
        f"{study_url}/label",
        data={
            "diagnosis": "normal",
            "note": "heterogeneous, but normal",
            "csrf_token": _csrf(html),
        },
    )
    assert answer.status_code == 303 and answer.headers["location"] == study_url
    labels = section(client.get(study_url).text, "labels")
    assert "normal" in labels and "dr-lab" in labels and "heterogeneous, but normal" in labels

    # The same label from the CLI, on another study: both rows have the same form.
    other_uid = site.rows(
        "SELECT study_instance_uid FROM studies WHERE id = :id", id=site.data.other_study_ids[0]
    )[0][0]
    env = {"DATABASE_URL": site.url, "THYROCAD_DATA_DIR": str(site.tmp)}
    done = cli_runner.invoke(
        cli_app,
        ["label", "--study", other_uid, "--diagnosis", "normal", "--by", "dr-cli", "--note", "x"],
        env=env,
    )
    assert done.exit_code == 0, done.output
    with make_session_factory(site.engine)() as session:
        web, cli = session.execute(
            select(Label).where(Label.labelled_by.in_(["dr-lab", "dr-cli"])).order_by(Label.id)
        ).scalars()
        written = repo.audit_events(session, kind="label_written")
    assert (web.source, cli.source) == ("web", "cli")
    assert web.study_id == site.data.study_id and web.patient_id is None
    assert cli.patient_id is None and cli.study_id is not None
    assert web.note == "heterogeneous, but normal" and web.diagnosis == "normal"
    assert web.created_at is not None
    web_event, cli_event = [e for e in written if e.actor in ("dr-lab", "dr-cli")]
    assert web_event.details == {
        "label_id": web.id,
        "level": "study",
        "diagnosis": "normal",
        "source": "web",
    }
    assert set(web_event.details) == set(cli_event.details)

    history = cli_runner.invoke(
        cli_app,
        ["label", "history", "--study", site.data.study_uid, "--json"],
        env=env,
    )
    assert history.exit_code == 0, history.output
    assert '"labelled_by": "dr-lab"' in history.output and '"source": "web"' in history.output


def test_a_label_post_without_the_pages_token_is_refused(site: Site) -> None:
    client = site.client("dr-lab")
    url = f"/studies/{site.data.study_id}/label"
    assert client.post(url, data={"diagnosis": "normal"}).status_code == 403
    other = site.client("dr-lab")  # another session: another token
    token = _csrf(other.get(f"/studies/{site.data.study_id}").text)
    assert client.post(url, data={"diagnosis": "normal", "csrf_token": token}).status_code == 403
    assert not site.rows("SELECT id FROM labels WHERE source = 'web'")


def test_an_unknown_diagnosis_is_refused_with_the_choices(site: Site) -> None:
    client = site.client("dr-lab")
    html = client.get(f"/studies/{site.data.study_id}").text
    answer = client.post(
        f"/studies/{site.data.study_id}/label",
        data={"diagnosis": "hashimoto", "csrf_token": _csrf(html)},
    )
    assert answer.status_code == 400
    assert "Unknown diagnosis" in answer.text and "autoimmune" in answer.text
    assert not site.rows("SELECT id FROM labels WHERE source = 'web'")


def test_a_reader_sees_no_form_and_cannot_post_a_label(site: Site) -> None:
    reader, labeller = site.client("dr-read"), site.client("dr-lab")
    html = reader.get(f"/studies/{site.data.study_id}").text
    assert 'id="label-form"' not in html and "csrf_token" not in html
    token = _csrf(labeller.get(f"/studies/{site.data.study_id}").text)
    answer = reader.post(
        f"/studies/{site.data.study_id}/label", data={"diagnosis": "normal", "csrf_token": token}
    )
    assert answer.status_code == 403
    assert not site.rows("SELECT id FROM labels WHERE source = 'web'")


# --------------------------------------------------------------------------- models


def test_models_page_shows_the_active_version_metrics_plots_and_promotions(site: Site) -> None:
    plots = site.tmp / "models" / VERSION / "evaluation"
    plots.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(buffer, format="PNG")
    (plots / "roc.png").write_bytes(buffer.getvalue())
    client = site.client("dr-read")
    html = client.get("/models").text
    active = section(html, "active-model")
    assert VERSION in active and "vgg19" in active
    assert "0.912 [0.832, 0.962]" in re.sub(r"<[^>]+>", "", active)  # AUC, its interval
    assert f'src="/models/{VERSION}/plots/roc.png"' in active
    assert "/plots/pr.png" not in active  # not written: not offered
    plot = client.get(f"/models/{VERSION}/plots/roc.png")
    assert plot.status_code == 200 and plot.content == buffer.getvalue()
    for bad in (
        f"/models/{VERSION}/plots/pr.png",
        f"/models/{VERSION}/plots/report.png",
        f"/models/{VERSION}/plots/..%2Fmodel.png",
        "/models/nonexistent/plots/roc.png",
        "/models/..%2F..%2Fetc/plots/roc.png",
    ):
        assert client.get(bad).status_code == 404, bad
    promotions = section(html, "promotions")
    assert promotions.count(VERSION) >= 1 and OLD_VERSION in promotions
    assert "ml-owner" in promotions


# --------------------------------------------------------------------------- operations


def test_health_and_metrics_by_route_template(site: Site) -> None:
    client = site.client("dr-read")
    client.get(f"/studies/{site.data.study_id}")
    client.get(f"/images/{site.data.prediction_ids[0]}/thumbnail.png")
    client.get(f"/{PATIENT_ID}")  # nothing there: counted as unmatched, not by its path
    assert client.get("/healthz").json()["status"] == "alive"
    assert client.get("/readyz").json()["ready"] is True
    body = client.get("/metrics").text
    assert 'route="/studies/{study_id}"' in body
    assert 'route="/images/{prediction_id}/thumbnail.png"' in body
    assert 'route="unmatched"' in body
    assert 'thyrocad_web_sign_ins_total{outcome="success"} 1.0' in body
    assert f"/studies/{site.data.study_id}" not in body
    for word in PHI:
        assert word not in body


def test_no_patient_data_in_any_url_or_log_line(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lab = site.client("dr-lab")
    seen: list[str] = []
    pages = ["/", "/?finding=autoimmune", f"/studies/{site.data.study_id}", "/models"]
    pages += [f"/studies/{s}" for s in site.data.other_study_ids[:3]]
    for url in pages:
        answer = lab.get(url)
        assert answer.status_code == 200
        seen += Page(answer.text).urls()
        assert PATIENT_ID in answer.text or url != f"/studies/{site.data.study_id}"
    html = lab.get(f"/studies/{site.data.study_id}").text
    answer = lab.post(
        f"/studies/{site.data.study_id}/label",
        data={"diagnosis": "autoimmune", "note": "", "csrf_token": _csrf(html)},
    )
    seen.append(answer.headers["location"])
    for pid in site.data.prediction_ids:
        lab.get(f"/images/{pid}/thumbnail.png")
        lab.get(f"/images/{pid}/evidence.png")
    sign_in(site.client(), "dr-lab", "wrong password!")
    assert len(seen) > 30
    words = (*PHI, site.data.study_uid, PATIENT_NAME)
    for url in seen:
        for word in words:
            assert word not in url, url
    assert caplog.records, "nothing was logged"
    for record in caplog.records:
        line = f"{record.getMessage()} {record.__dict__}"
        for word in words:
            assert word not in line, line
    with site.engine.connect() as connection:
        trail = [str(r) for r in connection.execute(select(AuditEventRow))]
    assert any("study_viewed" in r for r in trail) and any("label_written" in r for r in trail)
    for row in trail:
        for word in words:
            assert word not in row, row


# --------------------------------------------------------------------------- read-only role


def test_pages_read_through_a_read_only_role_that_can_read_their_tables(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    if not site.url.startswith("postgresql"):
        pytest.skip("roles are PostgreSQL's")
    # Roles belong to the whole server: names of this test's own, dropped at the end.
    suffix = uuid.uuid4().hex[:8]
    views_only, pages = f"web_views_{suffix}", f"web_pages_{suffix}"
    create_readonly_role(site.engine, views_only, password="views-only-pw")
    # What "thyrocad db reader-role --web" makes.
    create_readonly_role(site.engine, pages, password="pages-pw", tables=READ_TABLES)
    try:
        _read_through_roles(site, caplog, views_only, pages)
    finally:
        with site.engine.begin() as connection:
            for role in (views_only, pages):
                connection.exec_driver_sql(f"DROP OWNED BY {role}")
                connection.exec_driver_sql(f"DROP ROLE {role}")


def _read_through_roles(
    site: Site, caplog: pytest.LogCaptureFixture, views_only: str, pages: str
) -> None:
    def role_url(role: str, password: str) -> str:
        return (
            make_url(site.url)
            .set(username=role, password=password)
            .render_as_string(hide_password=False)
        )

    def app_for(read_url: str) -> Any:
        return create_app(
            site.settings.model_copy(update={"web_read_database_url": read_url}),
            sessions=make_session_factory(site.engine),
            passwords=site.passwords,
            secret=b"s" * 32,
            clock=site.clock,
        )

    # Views only: the page says why it cannot use the role, and reads through the main URL.
    caplog.set_level(logging.WARNING)
    app = app_for(role_url(views_only, "views-only-pw"))
    assert "cannot read patients" in caplog.text and "views-only-pw" not in caplog.text
    assert app.state.ctx.read_sessions.kw["bind"].url.username != views_only

    app = app_for(role_url(pages, "pages-pw"))
    assert app.state.ctx.read_sessions.kw["bind"].url.username == pages
    client = TestClient(app, follow_redirects=False)
    assert sign_in(client, "dr-lab").status_code == 303
    html = client.get(f"/studies/{site.data.study_id}").text
    assert "Quokkafeld" in html
    assert client.get(f"/images/{site.data.prediction_ids[0]}/thumbnail.png").status_code == 200
    answer = client.post(
        f"/studies/{site.data.study_id}/label",
        data={"diagnosis": "normal", "csrf_token": _csrf(html)},
    )
    assert answer.status_code == 303  # labels and audit go through the main URL
    assert site.rows("SELECT id FROM labels WHERE source = 'web'")
    # The read role really is read-only.
    reader = create_engine(role_url(pages, "pages-pw"))
    try:
        with pytest.raises(Exception, match="permission denied"), reader.begin() as c:
            c.execute(text("DELETE FROM labels"))
    finally:
        reader.dispose()
