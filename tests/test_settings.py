"""The process settings (common/settings.py): parsing, errors that name the variable, the .env file,
the secret token, and .env.example kept in step with the fields."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import MissingTokenError, bot_token
from common.settings import BOT_API_DOWNLOAD_LIMIT, ConfigError, Settings, describe, load_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / ".env.example"
TOKEN = "123456:AAE-secret-part-of-the-token_xyz"
OURS = ("bot", "captioner", "storage", "train", "bench", "tests")


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No setting inherited from the test run, and no .env file found from the working directory."""
    for variable in Settings.variables().values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def load(environ: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        environ.setenv(name, value)
    return load_settings()


def documented() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", EXAMPLE.read_text(encoding="utf-8"), flags=re.MULTILINE))


# ---------------------------------------------------------------------- .env.example


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    read = set(Settings.variables().values())
    assert read - set(documented()) == set(), "settings read but not documented in .env.example"
    assert set(documented()) - read == set(), "variables documented in .env.example but read by no setting"


def test_env_example_values_are_the_defaults(environ: pytest.MonkeyPatch) -> None:
    # Loading the example as a .env file must give exactly what no settings at all give.
    assert load_settings(EXAMPLE) == load_settings()
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in documented():  # each has a comment right above it (or above its group)
        assert re.search(rf"#[^\n]*\n(?:[A-Z_]+=[^\n]*\n)*{name}=", text), name


def test_every_setting_names_its_variable() -> None:
    variables = Settings.variables()
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]+", v) for v in variables.values()), variables
    assert len(set(variables.values())) == len(variables)


# ---------------------------------------------------------------------- parsing


def test_settings_defaults_and_parsing(environ: pytest.MonkeyPatch) -> None:
    settings = load(environ, TELEGRAM_BOT_TOKEN=TOKEN)
    assert settings.base_url == "https://api.telegram.org/bot"
    assert settings.photos_per_minute == 6 and settings.beam_size is None
    assert settings.admin_ids == frozenset()
    assert settings.download_limit == BOT_API_DOWNLOAD_LIMIT
    assert settings.batch_size is None and settings.queue_capacity is None  # the caption service decides
    settings = load(
        environ, TELEGRAM_BOT_TOKEN=f"  {TOKEN} ", CAPTIONBOT_ADMIN_IDS="12, 34;56,",
        CAPTIONBOT_MAX_FILE_MB="50",
        CAPTIONBOT_BEAM_SIZE="1", CAPTIONBOT_BATCH_WAIT_MS="5", CAPTIONBOT_DEVICE="CUDA:1",
        CAPTIONBOT_LOG_LEVEL="debug", CAPTIONBOT_DATA_DIR="~/cb", CAPTIONBOT_MODEL_POLL_SECONDS="0",
        CAPTIONBOT_BATCH_SIZE="",  # empty: the default
    )
    assert bot_token(settings) == TOKEN
    assert settings.admin_ids == frozenset({12, 34, 56})
    assert settings.is_admin(34) and not settings.is_admin(None)
    assert settings.download_limit == BOT_API_DOWNLOAD_LIMIT  # the cloud Bot API's limit still applies
    assert load(environ, TELEGRAM_LOCAL_MODE="yes").download_limit == 50 * 1024 * 1024
    assert settings.beam_size == 1 and settings.batch_wait_ms == pytest.approx(5)
    assert settings.batch_size is None
    assert settings.device == "cuda:1" and settings.log_level == "DEBUG" and settings.model_poll_seconds == 0
    assert settings.data_dir is not None and "~" not in str(settings.data_dir)


@pytest.mark.parametrize(("name", "value"), [
    ("CAPTIONBOT_PHOTOS_PER_MINUTE", "lots"),
    ("CAPTIONBOT_PHOTOS_PER_MINUTE", "-1"),
    ("CAPTIONBOT_ADMIN_IDS", "12,@alice"),
    ("CAPTIONBOT_DEVICE", "tpu"),
    ("CAPTIONBOT_BATCH_SIZE", "0"),
    ("CAPTIONBOT_QUEUE_CAPACITY", "many"),
    ("CAPTIONBOT_REQUEST_TIMEOUT", "nan"),
    ("CAPTIONBOT_MAX_FILE_MB", "inf"),
    ("TELEGRAM_BASE_URL", "api.telegram.org/bot"),
    ("TELEGRAM_LOCAL_MODE", "maybe"),
    ("CAPTIONBOT_LOG_LEVEL", "LOUD"),
])
def test_bad_settings_name_the_variable(environ: pytest.MonkeyPatch, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name) as caught:
        load(environ, TELEGRAM_BOT_TOKEN=TOKEN, **{name: value})
    assert repr(value) in str(caught.value)


def test_settings_built_in_code_name_the_variable_too() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(photos_per_minute=-1)
    assert describe(caught.value).startswith("CAPTIONBOT_PHOTOS_PER_MINUTE=-1 is not valid")


def test_missing_or_malformed_token(environ: pytest.MonkeyPatch) -> None:
    settings = load(environ, TELEGRAM_BOT_TOKEN="   ")
    assert settings.token is None  # fine for train, which needs no token
    with pytest.raises(MissingTokenError, match="TELEGRAM_BOT_TOKEN"):
        bot_token(settings)
    with pytest.raises(ConfigError, match="does not look like") as caught:
        load(environ, TELEGRAM_BOT_TOKEN="not a-token")
    assert "not a-token" not in str(caught.value)  # a secret is never repeated, even a wrong one


def test_the_token_is_never_shown(environ: pytest.MonkeyPatch) -> None:
    settings = load(environ, TELEGRAM_BOT_TOKEN=TOKEN)
    secret = TOKEN.split(":")[1]
    for shown in (repr(settings), str(settings), settings.model_dump_json(), f"{settings.token}"):
        assert secret not in shown, shown


# ---------------------------------------------------------------------- the .env file


def test_env_file_is_found_upwards_and_the_environment_wins(environ: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"TELEGRAM_BOT_TOKEN={TOKEN}\nCAPTIONBOT_PHOTOS_PER_MINUTE=9\nCAPTIONBOT_QUEUE_NOTICE_AT=5\n"
        "SOMETHING_ELSE=ignored\n"
    )
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    environ.chdir(below)
    settings = load(environ, CAPTIONBOT_PHOTOS_PER_MINUTE="2")
    assert bot_token(settings) == TOKEN
    assert (settings.photos_per_minute, settings.queue_notice_at) == (2, 5)


def test_a_named_settings_file_must_exist(environ: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.env")
    named = tmp_path / "bot.env"
    named.write_text("CAPTIONBOT_LOG_LEVEL=warning\n")
    assert load_settings(named).log_level == "WARNING"


# ---------------------------------------------------------------------- layering


def test_common_imports_nothing_of_ours() -> None:
    for path in (ROOT / "common").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in OURS, f"{path.name} imports {module}"
