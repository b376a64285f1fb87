"""What the bot adds to the process settings (:mod:`common.settings`): it cannot run without a token."""

from __future__ import annotations

from common.settings import ConfigError, Settings


class MissingTokenError(ConfigError):
    pass


def bot_token(settings: Settings) -> str:
    """The bot token in clear, for the Telegram client and the log redaction only."""
    if settings.token is None:
        raise MissingTokenError(f"{Settings.variables()['token']} is not set")
    return settings.token.get_secret_value()
