"""Configuration: precedence, validation on assignment, errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from prowzi.config import ProwziConfig, get_config
from prowzi.errors import ConfigError


def test_defaults_match_the_design_document() -> None:
    config = ProwziConfig()
    assert config.enable_checkpointing is False
    assert config.checkpoint_dir == Path("./prowzi_checkpoints")
    assert config.enable_telemetry is True
    assert config.checkpoint_interval == 1


def test_constructor_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROWZI_MAX_RETRIES", "5")
    assert get_config().max_retries == 5
    assert get_config(max_retries=1).max_retries == 1
    monkeypatch.delenv("PROWZI_MAX_RETRIES")
    assert get_config().max_retries == 3


def test_environment_is_read_when_called_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_config()
    monkeypatch.setenv("PROWZI_CHECKPOINT_INTERVAL", "4")
    assert get_config().checkpoint_interval == 4 and first.checkpoint_interval == 1


def test_assignment_is_validated() -> None:
    config = ProwziConfig()
    config.checkpoint_interval = 2
    assert config.checkpoint_interval == 2
    with pytest.raises(ConfigError, match="PROWZI_CHECKPOINT_INTERVAL"):
        config.checkpoint_interval = 0
    with pytest.raises(ConfigError, match="PROWZI_MAX_RETRIES"):
        config.max_retries = -1
    with pytest.raises(ConfigError, match="no_such_setting"):
        config.no_such_setting = True  # type: ignore[attr-defined]
    assert config.checkpoint_interval == 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROWZI_MAX_RETRIES", "many"),
        ("PROWZI_ENABLE_TELEMETRY", "sometimes"),
        ("PROWZI_RETRY_BACKOFF_BASE", "-1"),
        ("PROWZI_CHECKPOINT_COMPRESSION", "rar"),
        ("PROWZI_CHECKPOINT_DIR", ""),
    ],
)
def test_bad_variable_is_a_one_line_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        get_config()
    message = str(info.value)
    assert variable in message and "\n" not in message


@pytest.mark.parametrize("field", ["telemetry_dir", "checkpoint_dir"])
@pytest.mark.parametrize("value", [None, "/srv/prowzi", "relative/dir"])
def test_light_directory_resolver_agrees_with_the_config(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str | None
) -> None:
    from prowzi.config.paths import directory_setting

    if value is not None:
        monkeypatch.setenv(f"PROWZI_{field.upper()}", value)
    assert directory_setting(field) == getattr(get_config(), field)  # type: ignore[arg-type]


def test_light_directory_resolver_refuses_what_the_config_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prowzi.config.paths import directory_setting

    monkeypatch.setenv("PROWZI_TELEMETRY_DIR", " ")
    with pytest.raises(ConfigError) as light:
        directory_setting("telemetry_dir")
    with pytest.raises(ConfigError) as full:
        get_config()
    assert (
        str(light.value)
        == str(full.value)
        == ("invalid setting telemetry_dir (PROWZI_TELEMETRY_DIR=' '): must not be empty")
    )


@pytest.mark.parametrize("field", ["telemetry_dir", "checkpoint_dir", "output_dir"])
def test_a_directory_setting_naming_a_file_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str
) -> None:
    from prowzi.config.paths import directory_setting

    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    variable = f"PROWZI_{field.upper()}"
    monkeypatch.setenv(variable, str(a_file))
    with pytest.raises(ConfigError) as info:
        get_config()
    assert str(info.value) == (
        f"invalid setting {field} ({variable}={str(a_file)!r}): "
        f"{a_file} exists and is not a directory"
    )
    if field != "output_dir":  # the light reader serves the two read-only directories
        with pytest.raises(ConfigError) as light:
            directory_setting(field)  # type: ignore[arg-type]
        assert str(light.value) == str(info.value)


def test_a_default_directory_that_is_a_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from prowzi.config.paths import directory_setting

    monkeypatch.chdir(tmp_path)
    Path("prowzi_checkpoints").write_text("x")
    with pytest.raises(ConfigError, match=r"PROWZI_CHECKPOINT_DIR.*is not a directory"):
        get_config()
    with pytest.raises(ConfigError, match=r"PROWZI_CHECKPOINT_DIR.*is not a directory"):
        directory_setting("checkpoint_dir")


def test_a_directory_setting_that_cannot_be_examined_is_left_to_its_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name too long to stat is not refused by the setting (nor a traceback): the command
    that uses the directory reports it."""
    from prowzi.config.paths import directory_setting

    monkeypatch.setenv("PROWZI_CHECKPOINT_DIR", "/tmp/" + "a" * 300 + "/x")
    assert get_config().checkpoint_dir.name == "x"
    assert directory_setting("checkpoint_dir").name == "x"


def test_the_light_settings_are_the_configs_own_fields() -> None:
    """One reader: the settings read-only commands build are the very fields (and checks) of
    the full configuration, not a second copy."""
    from prowzi.config.locations import CheckpointLocation, TelemetryLocation

    for part in (TelemetryLocation, CheckpointLocation):
        assert issubclass(ProwziConfig, part)
        for name, field in part.model_fields.items():
            assert repr(ProwziConfig.model_fields[name]) == repr(field), name


def test_reading_telemetry_ignores_settings_it_does_not_use(tmp_path: Path) -> None:
    """``prowzi sessions`` reads its own settings, so a bad variable it does not use (or a bad
    checkpoint location, used only to tell whether a session runs) does not stop it."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "sessions"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            **os.environ,
            "PROWZI_MAX_RETRIES": "many",
            "PROWZI_CHECKPOINT_URL": "gs://nowhere",
            "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        },
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "No sessions recorded.\n" and proc.stderr == ""


def test_help_does_not_import_the_settings(tmp_path: Path) -> None:
    """``prowzi --help`` starts fast: pydantic-settings is imported only by commands that read
    settings (benchmarks/bench_telemetry.py holds the time to 300 ms)."""
    import subprocess
    import sys

    code = (
        "import sys; from prowzi.cli.main import main\n"
        "sys.argv = ['prowzi', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'pydantic_settings' not in sys.modules, 'pydantic_settings was imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: prowzi" in proc.stdout


@pytest.mark.parametrize(
    ("value", "problem"),
    [("gs://bucket", "unknown scheme 'gs'"), ("s3://", "no bucket"), (" ", "must not be empty")],
)
def test_a_bad_checkpoint_url_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    from prowzi.config.paths import checkpoint_location

    monkeypatch.setenv("PROWZI_CHECKPOINT_URL", value)
    with pytest.raises(ConfigError, match=rf"PROWZI_CHECKPOINT_URL.*{problem}") as full:
        get_config()
    with pytest.raises(ConfigError) as light:
        checkpoint_location()
    assert str(light.value) == str(full.value)
    assert str(full.value).startswith(
        f"invalid setting checkpoint_url (PROWZI_CHECKPOINT_URL={value!r}): {problem}"
    )
    assert "\n" not in str(full.value)


@pytest.mark.parametrize("value", ["s3://bucket/prefix", "az://container", "file:///x", "./here"])
def test_checkpoint_urls_of_known_stores_are_accepted(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from prowzi.config.paths import checkpoint_location

    monkeypatch.setenv("PROWZI_CHECKPOINT_URL", value)
    assert get_config().checkpoint_url == checkpoint_location() == value


def test_without_a_checkpoint_url_the_location_is_the_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prowzi.config.paths import checkpoint_location

    monkeypatch.delenv("PROWZI_CHECKPOINT_URL", raising=False)
    monkeypatch.setenv("PROWZI_CHECKPOINT_DIR", "/srv/checkpoints")
    assert checkpoint_location() == get_config().checkpoint_dir == Path("/srv/checkpoints")
