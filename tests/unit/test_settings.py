"""Settings: parsed from the environment, refused when unsafe, and all documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from thyrocad.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


def env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else f"THYROCAD_{name.upper()}"


def test_embedded_default_needs_no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    s = load_settings(data_dir=tmp_path / "d")
    assert s.embedded
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("d/thyrocad.sqlite")
    assert s.broker_url == "filesystem://"
    assert s.port == 11112 and s.study_idle_seconds == 30


def test_lists_come_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THYROCAD_ALLOWED_AETS", "MODALITY1, PACS ,")
    monkeypatch.setenv("THYROCAD_CLASSES", "benign,suspicious")
    monkeypatch.setenv("THYROCAD_POSITIVE_CLASS", "suspicious")
    s = load_settings()
    assert s.allowed_aets == ["MODALITY1", "PACS"]
    assert s.classes == ["benign", "suspicious"]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("THYROCAD_AE_TITLE", "A" * 17, "AE title"),
        ("THYROCAD_POSITIVE_CLASS", "cancer", "not one of"),
        ("THYROCAD_CLASSES", "normal", "at least two"),
        ("THYROCAD_PORT", "eleven", "port"),
        ("THYROCAD_PORT", "99999", "less than or equal to 65535"),
        ("THYROCAD_PORT", "0", "greater than or equal to 1"),
        ("THYROCAD_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("THYROCAD_LOG_LEVEL", "loud", "DEBUG, INFO, WARNING"),
    ],
)
def test_unsafe_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        load_settings()


def test_every_setting_is_documented() -> None:
    example = (ROOT / "deploy" / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", example, re.M))
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        env = env_name(name)
        assert env in listed, f"{env} is missing from deploy/.env.example"
        assert env in readme, f"{env} is missing from the README's configuration table"


def test_a_refused_setting_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from thyrocad.errors import settings_message

    monkeypatch.setenv("THYROCAD_PORT", "99999")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@db/x")
    monkeypatch.setenv("THYROCAD_CLASSES", "normal")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    message = settings_message(caught.value)
    assert "\n" not in message and "secret" not in message
    assert message.startswith("invalid settings: THYROCAD_PORT=99999: Input should be less than")
    monkeypatch.setenv("THYROCAD_PORT", "11112")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert settings_message(caught.value) == (
        "invalid settings: THYROCAD_CLASSES needs at least two distinct class names"
    )
    monkeypatch.delenv("THYROCAD_CLASSES")
    assert load_settings(log_level="debug").log_level == "DEBUG"


def test_a_relative_data_dir_becomes_absolute(tmp_path, monkeypatch) -> None:
    """Paths under the data folder are stored in the database and read by processes that
    run elsewhere; a relative one would mean a different file to each of them."""
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=Path("site"))
    assert settings.data_dir == tmp_path / "site"
    assert settings.spool_dir.is_absolute() and settings.registry_dir.is_absolute()
