"""``thyrocad demo`` picks its base weights without trying a download it was not asked for,
and ends with a web login that works (the whole demo: tests/integration/test_demo.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import sqlalchemy as sa

from thyrocad.db.engine import make_engine, make_session_factory, upgrade
from thyrocad.db.repository import users
from thyrocad.demo import (
    DEMO_LOGIN_FILE,
    DEMO_USER,
    choose_weights,
    local_imagenet_weights,
    make_demo_login,
    serve_again_command,
    web_address,
)
from thyrocad.settings import Settings
from thyrocad.web.auth import Passwords


@pytest.fixture
def keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "keras"


def test_no_local_weights_means_a_random_base_at_once(keras_home: Path) -> None:
    said: list[str] = []
    assert local_imagenet_weights("vgg19") is None
    assert choose_weights("auto", said.append) == "none"
    assert len(said) == 1 and "ImageNet weights are not installed here" in said[0]


def test_local_weights_are_used(keras_home: Path) -> None:
    weights = keras_home / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"h5")
    said: list[str] = []
    assert local_imagenet_weights("vgg19") == weights
    assert choose_weights("auto", said.append) == "imagenet" and not said


def test_an_explicit_choice_is_kept(keras_home: Path) -> None:
    for asked in ("imagenet", "none", "/weights/vgg19.h5"):
        assert choose_weights(asked, lambda _: None) == asked


@pytest.fixture
def demo_settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "demo data", database_url="", web_port=8099)
    s.data_dir.mkdir()
    upgrade(s.db_url)
    return s


def signs_in(s: Settings, username: str, password: str) -> str | None:
    """The role of ``username`` if ``password`` matches their stored hash, else None
    (the web page's own sign-in: tests/integration/test_demo.py)."""
    engine = make_engine(s.db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text("SELECT password_hash, role FROM web_users WHERE username = :u"),
                {"u": username},
            ).one_or_none()
    finally:
        engine.dispose()
    if row is None or not Passwords().matcher(password)(row.password_hash):
        return None
    return str(row.role)


def test_the_demo_login_signs_in_as_a_labeller_and_a_rerun_prints_the_same(
    demo_settings: Settings,
) -> None:
    first = make_demo_login(demo_settings)
    assert first.username == DEMO_USER and len(first.password) >= 12
    assert signs_in(demo_settings, first.username, first.password) == "labeller"
    assert signs_in(demo_settings, first.username, first.password + "x") is None
    kept = demo_settings.data_dir / DEMO_LOGIN_FILE
    assert kept.stat().st_mode & 0o777 == 0o600
    assert make_demo_login(demo_settings) == first
    # Without the kept password the demo cannot tell the login: it says so.
    kept.unlink()
    with pytest.raises(RuntimeError, match="password is not in"):
        make_demo_login(demo_settings)


def test_a_disabled_demo_user_is_left_disabled(demo_settings: Settings) -> None:
    make_demo_login(demo_settings)
    engine = make_engine(demo_settings.db_url)
    with make_session_factory(engine).begin() as session:
        users.disable_user(session, DEMO_USER)
    engine.dispose()
    with pytest.raises(RuntimeError, match="disabled"):
        make_demo_login(demo_settings)


def test_the_address_and_the_command_to_serve_again(demo_settings: Settings) -> None:
    assert web_address(demo_settings) == "http://127.0.0.1:8099/"
    opened = demo_settings.model_copy(update={"web_host": "0.0.0.0"})
    assert web_address(opened) == "http://127.0.0.1:8099/"
    words = shlex.split(serve_again_command(demo_settings))
    assert words[0] == f"THYROCAD_DATA_DIR={demo_settings.data_dir.resolve()}"
    assert words[-5:] == ["web", "--host", "127.0.0.1", "--port", "8099"]
