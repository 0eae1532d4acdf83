"""The web page's passwords, signing key, session cookies and pictures, without a server."""

from __future__ import annotations

import io
import stat

import numpy as np
import pytest
from argon2 import PasswordHasher
from PIL import Image

from thyrocad.errors import UserError
from thyrocad.settings import load_settings
from thyrocad.web.app import person_name
from thyrocad.web.auth import (
    PasswordRefused,
    Passwords,
    SessionCookies,
    check_new_password,
    same_token,
    secret_key,
)
from thyrocad.web.images import overlay
from thyrocad.web.observability import route_template

# Cheap parameters: these tests are about behaviour, not the cost of a guess.
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
KEY = b"k" * 32


def test_hash_is_argon2id_salted_and_verifies_only_the_password() -> None:
    passwords = Passwords(FAST)
    first, second = passwords.hash("correct horse"), passwords.hash("correct horse")
    assert first.startswith("$argon2id$")
    assert first != second  # a salt per hash
    assert "correct horse" not in first
    assert passwords.matcher("correct horse")(first)
    assert not passwords.matcher("correct horsE")(first)
    assert not passwords.matcher("")(first)


def test_no_stored_hash_never_matches_whatever_the_password() -> None:
    passwords = Passwords(FAST)
    for password in ("", "anything", "correct horse"):
        assert passwords.matcher(password)("") is False
    assert passwords.matcher("x")("not a hash at all") is False


def test_rehash_only_when_the_parameters_changed() -> None:
    old = Passwords(FAST).hash("correct horse")
    assert Passwords(FAST).rehasher("correct horse")(old) is None
    stronger = Passwords(PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    renewed = stronger.rehasher("correct horse")(old)
    assert renewed is not None and renewed != old
    assert stronger.matcher("correct horse")(renewed)


@pytest.mark.parametrize(
    ("password", "message"),
    [("", "the password is empty"), ("short7!", "too weak: it has 7 characters")],
)
def test_weak_and_empty_passwords_are_refused(password: str, message: str) -> None:
    with pytest.raises(PasswordRefused, match=message):
        check_new_password(password)
    with pytest.raises(PasswordRefused):
        Passwords(FAST).hash(password)
    assert check_new_password("eight ch") == "eight ch"


def test_session_cookie_round_trip_and_idle_expiry() -> None:
    cookies = SessionCookies(KEY, idle_minutes=60)
    data = cookies.new(7, now=1000.0)
    cookie = cookies.dump(data)
    assert cookies.load(cookie, now=1000.0 + 3599) == data
    assert cookies.load(cookie, now=1000.0 + 3601) is None  # idle too long
    assert cookies.load(cookie, now=1000.0 - 3600) is None  # from the future
    assert cookies.load(None, now=1000.0) is None


def test_a_forged_or_foreign_cookie_is_no_session() -> None:
    cookies = SessionCookies(KEY, idle_minutes=60)
    cookie = cookies.dump(cookies.new(7, now=1000.0))
    other = SessionCookies(b"o" * 32, idle_minutes=60)
    assert other.load(cookie, now=1000.0) is None
    payload, signature = cookie.rsplit(".", 1)
    assert cookies.load(payload + "." + signature[::-1], now=1000.0) is None
    assert cookies.load("garbage", now=1000.0) is None
    # A validly signed value that is not a session.
    assert cookies.load(cookies._serializer.dumps([1, 2]), now=1000.0) is None


def test_each_session_has_its_own_csrf_token_compared_in_constant_time() -> None:
    cookies = SessionCookies(KEY, idle_minutes=60)
    a, b = cookies.new(1, 0.0), cookies.new(1, 0.0)
    assert a.csrf_token != b.csrf_token and len(a.csrf_token) >= 24
    assert same_token(a.csrf_token, a.csrf_token)
    assert not same_token(a.csrf_token, b.csrf_token)
    assert not same_token(a.csrf_token, None)
    assert not same_token(a.csrf_token, "")


def test_secret_key_is_made_once_private_and_kept(tmp_path) -> None:
    settings = load_settings(data_dir=tmp_path)
    key = secret_key(settings)
    path = tmp_path / "web-secret"
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key(settings) == key  # the same key across restarts


def test_a_configured_secret_file_must_exist_and_be_long_enough(tmp_path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    with pytest.raises(UserError, match="holds 8 bytes"):
        secret_key(load_settings(data_dir=tmp_path, web_secret_file=short))
    with pytest.raises(UserError, match="cannot read THYROCAD_WEB_SECRET_FILE"):
        secret_key(load_settings(data_dir=tmp_path, web_secret_file=tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_bytes(b"0123456789abcdef" * 4 + b"\n")
    assert secret_key(load_settings(data_dir=tmp_path, web_secret_file=good)) == (
        b"0123456789abcdef" * 4
    )


def _map_png(peak: tuple[int, int], grid: int = 14) -> bytes:
    heat = np.zeros((grid, grid), dtype=np.uint8)
    heat[peak] = 255
    buffer = io.BytesIO()
    Image.fromarray(heat, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_overlay_tints_where_the_map_peaks_and_leaves_the_rest_grey() -> None:
    grey = np.full((112, 112), 100, dtype=np.uint8)
    drawn = overlay(grey, _map_png((2, 11)))  # row 2, column 11 of 14: upper right
    assert drawn.shape == (112, 112, 3)
    tint = np.abs(drawn.astype(int) - 100).sum(axis=2)
    row, col = np.unravel_index(int(np.argmax(tint)), tint.shape)
    # The cell (2, 11) covers rows 16-24 and columns 88-96 of 112.
    assert 12 <= row <= 28 and 84 <= col <= 100
    assert tint[100, 10] == 0  # far from the peak: the image as it was
    assert not np.array_equal(drawn[..., 0], drawn[..., 2])  # colour, not grey


def test_person_names_read_as_written() -> None:
    assert person_name("Quokkafeld^Wilhelmina") == "Quokkafeld, Wilhelmina"
    assert person_name("Doe^John^Q") == "Doe, John Q"
    assert person_name("Doe") == "Doe"
    assert person_name("^Jane") == "Jane"
    assert person_name(None) == ""


def test_route_labels_are_templates_never_raw_paths() -> None:
    class Route:
        path = "/studies/{study_id}"

    assert route_template({"route": Route(), "path": "/studies/42"}) == "/studies/{study_id}"
    assert route_template({"path": "/static/style.css"}) == "/static"
    assert route_template({"path": "/PIDZQX4417"}) == "unmatched"
