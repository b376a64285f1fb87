"""``python -m bot``: run the Telegram bot with long polling until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from bot.config import MissingTokenError, bot_token
from common.settings import ConfigError, Settings, load_settings

log = logging.getLogger("bot")

NO_TOKEN = """\
captionbot needs a Telegram bot token, and TELEGRAM_BOT_TOKEN is not set.

  1. In Telegram, open a chat with @BotFather and send /newbot; it replies with a token
     that looks like 123456789:AAE...
  2. Put it in a .env file next to where you start the bot (see .env.example):
         TELEGRAM_BOT_TOKEN=123456789:AAE...
     or export it:  export TELEGRAM_BOT_TOKEN=123456789:AAE...
  3. Run  python -m bot  again.

To try the captioner without Telegram:  python -m captioner caption PHOTO.jpg
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description="Run the captionbot Telegram bot (long polling). Settings come from environment "
        "variables and a .env file; see .env.example.",
    )
    parser.add_argument("--env-file", type=Path, default=None,
                        help="settings file (default: the nearest .env from the working directory up)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.env_file)
        token = bot_token(settings)
    except MissingTokenError:
        print(NO_TOKEN, file=sys.stderr, end="")
        return 2
    except ConfigError as err:
        print(f"captionbot: configuration error: {err}\nSee .env.example for every setting.", file=sys.stderr)
        return 2
    # Read once: from here on only the settings object holds it, not the environment that child
    # processes (the caption worker) inherit.
    os.environ.pop(Settings.variables()["token"], None)

    from bot.logs import configure_logging

    configure_logging(settings.log_level, [token])
    try:
        return asyncio.run(_serve(settings))
    except KeyboardInterrupt:  # a second Ctrl-C while shutting down
        log.warning("interrupted again: exiting without a clean shutdown")
        return 130


async def _serve(settings: Settings) -> int:
    from telegram.error import InvalidToken, NetworkError

    from bot.app import CaptionBot
    from captioner.serving.base import ModelLoadError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def request_stop(signame: str) -> None:
        if stop.is_set():
            log.warning("%s again: stopping now", signame)
            if main_task is not None:
                main_task.cancel()
            return
        log.info("%s received: shutting down (send it again to force)", signame)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop, sig.name)

    bot = CaptionBot(settings)
    try:
        await bot.start()
    except InvalidToken:
        log.error("Telegram rejected TELEGRAM_BOT_TOKEN (Unauthorized). Check it with @BotFather (/token).")
        return 1
    except NetworkError as err:
        log.error("cannot reach the Telegram Bot API at %s: %s", settings.base_url, err)
        return 1
    except ModelLoadError as err:
        log.error("cannot load the caption model: %s (check CAPTIONBOT_MODEL)", err)
        return 1
    try:
        await stop.wait()
        log.info("stopping: no new updates; finishing the photos in hand")
    finally:
        await bot.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
