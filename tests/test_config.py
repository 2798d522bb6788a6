"""Settings: environment parsing, secrets hidden, and the README's table kept complete."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from seemly.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_comma_separated_lists_and_resolved_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEEMLY_FILE_ROOTS", f"{tmp_path}/a/../b, {tmp_path}/c")
    monkeypatch.setenv("SEEMLY_HTTP_ALLOWED_HOSTS", "images.example.com,cdn.example.com")
    settings = Settings()
    assert settings.file_roots == [(tmp_path / "b").resolve(), (tmp_path / "c").resolve()]
    assert settings.http_allowed_hosts == ["images.example.com", "cdn.example.com"]


def test_secrets_never_appear_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEMLY_S3_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("SEEMLY_LABEL_STUDIO_API_KEY", "token-123456")
    settings = Settings()
    text = repr(settings) + str(settings) + str(settings.model_dump())
    assert "very-secret-value" not in text
    assert "token-123456" not in text
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "very-secret-value"


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEEMLY_MAX_IMAGE_PIXELS", "-5")
    with pytest.raises(ValidationError, match="max_image_pixels"):
        Settings()


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    missing = [
        f"SEEMLY_{name.upper()}" for name in Settings.model_fields if f"SEEMLY_{name.upper()}" not in text
    ]
    assert not missing, f"README configuration table lacks {missing}"
