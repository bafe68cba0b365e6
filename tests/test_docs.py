"""The README documents every setting, as flag and environment variable."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [
        name
        for name in Settings.model_fields
        if f"`--{name.replace('_', '-')}`" not in README
        or f"`MATCHER_{name.upper()}`" not in README
    ]
    assert not missing, missing


def test_every_setting_has_a_description() -> None:
    assert all(field.description for field in Settings.model_fields.values())
