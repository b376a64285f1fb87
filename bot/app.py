"""The bot's life cycle: open storage, start the worker, poll Telegram, and shut down cleanly.

:class:`CaptionBot` is used by ``python -m bot`` and, in-process, by the tests::

    bot = CaptionBot(settings)
    await bot.start()        # getMe, database, model, setMyCommands, polling
    ...
    await bot.stop()         # stop polling, answer what is in flight, stop the worker, close the db
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from typing import Any

from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeDefault, LinkPreviewOptions, Update
from telegram.constants import ParseMode
from telegram.error import TelegramError
from telegram.ext import AIORateLimiter, Application, Defaults
from telegram.warnings import PTBDeprecationWarning

from bot import texts
from bot.config import bot_token
from bot.handlers import register
from bot.inbox import replay_inbox
from bot.limits import Admission, InFlight, Limits
from bot.metrics import BotMetrics, PollWatch
from bot.model_updates import checkpoint_path, follow_promoted
from bot.ops import POLL_SLACK, HealthCheck, OpsServer, PollingRequest
from bot.ratelimit import RateLimiter
from bot.review import notify_waiting
from bot.runtime import CONTEXT_TYPES, BotData, Runtime
from bot.service import ServiceFactory, create_service, service_config
from bot.upkeep import sweep_daily
from captioner.serving.base import CaptionService, ModelLoadError
from common.settings import Settings
from storage import Storage
from storage.screening import EntryPolicy

log = logging.getLogger("bot")

# PTB's own rate limiter reads RetryAfter.retry_after, which warns about a future type change.
warnings.filterwarnings("ignore", message=".*retry_after.*", category=PTBDeprecationWarning)

ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]
NO_PREVIEWS = LinkPreviewOptions(is_disabled=True)
POLL_TIMEOUT = 10  # seconds a getUpdates call waits for news
POLL_READ_TIMEOUT = POLL_TIMEOUT + 10


def build_application(settings: Settings,
                      poll: PollWatch | None = None) -> Application[Any, Any, Any, Any, BotData, Any]:
    """The Application; ``poll`` hears of every getUpdates answer (the health check reads it)."""
    app = (
        Application.builder()
        .token(bot_token(settings))
        .context_types(CONTEXT_TYPES)
        .base_url(settings.base_url)
        .base_file_url(settings.base_file_url)
        .local_mode(settings.local_mode)
        .defaults(Defaults(parse_mode=ParseMode.HTML, link_preview_options=NO_PREVIEWS))
        .rate_limiter(AIORateLimiter(max_retries=3))
        .concurrent_updates(settings.concurrent_updates)
        .connect_timeout(10)
        .read_timeout(30)
        .write_timeout(30)
        .media_write_timeout(60)
        .pool_timeout(30)
        .get_updates_request(PollingRequest(poll or PollWatch(), read_timeout=POLL_READ_TIMEOUT))
        .build()
    )
    register(app)
    return app


def person_limits(settings: Settings) -> Limits:
    return Limits(
        photos=RateLimiter(settings.photos_per_minute),
        actions=RateLimiter(settings.actions_per_minute),
        in_flight=InFlight(settings.photos_in_flight),
        admission=Admission.for_settings(service_config(settings, None).queue_capacity,
                                         settings.concurrent_updates),
    )


class CaptionBot:
    def __init__(self, settings: Settings, service_factory: ServiceFactory | None = None) -> None:
        self.settings = settings
        self.service_factory = service_factory or create_service
        self.metrics = BotMetrics()
        self.metrics.watch_service(lambda: self.service)
        self.app = build_application(settings, self.metrics.poll)
        self.storage: Storage | None = None
        self.service: CaptionService | None = None
        self.runtime: Runtime | None = None
        self._initialized = False
        self._follower: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.ops: OpsServer | None = None  # /metrics and /healthz, when CAPTIONBOT_METRICS_PORT is set
        self.health = HealthCheck(self.metrics, self._polling, lambda: self.service,
                                  poll_max_quiet=POLL_READ_TIMEOUT + POLL_SLACK)

    async def start(self) -> None:
        """Start everything; on failure, undo what was started and re-raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        started = time.monotonic()
        settings = self.settings
        if settings.metrics_port is not None:  # first: while the model loads, /healthz says 503, not nothing
            self.ops = OpsServer(settings.metrics_host, settings.metrics_port, self.metrics, self.health)
            await self.ops.start()
        await self.app.initialize()  # getMe: fails fast on a bad token or an unreachable server
        self._initialized = True
        log.info("connected to Telegram as @%s (id %d)", self.app.bot.username, self.app.bot.id)
        policy = EntryPolicy.from_values(
            settings.corrections_per_day, settings.flags_before_hold, settings.blocklist_file, settings.data_dir
        )
        self.storage = await Storage.open(settings.database_url, settings.data_dir, policy=policy)
        log.info("storage open at %s", self.storage.data_dir)
        promoted, checkpoint = await self._startup_model(self.storage)
        self.service, serving_promoted = await self._start_service(checkpoint, promoted is not None)
        self.runtime = Runtime(settings, self.storage, self.service, person_limits(settings),
                               service_config(settings, None).image_limits, metrics=self.metrics)
        self.runtime.promoted_loaded = promoted if serving_promoted else None
        self.app.bot_data.attach(self.runtime)
        await self._register_commands()
        assert self.app.updater is not None
        self.metrics.poll.polling_started()
        await self.app.updater.start_polling(timeout=POLL_TIMEOUT, allowed_updates=ALLOWED_UPDATES)
        await self.app.start()
        await replay_inbox(self.app)
        self._sweeper = asyncio.create_task(sweep_daily(self.runtime), name="retention-sweep")
        if settings.model_poll_seconds > 0:
            self._follower = asyncio.create_task(
                follow_promoted(self.runtime, settings.model_poll_seconds, self._notify_reviews),
                name="follow-promoted-model",
            )
        log.info("ready in %.1f s: serving model %s, polling for updates", time.monotonic() - started,
                 self.service.model_version)

    def _polling(self) -> bool:
        updater = self.app.updater
        return updater is not None and updater.running

    async def _notify_reviews(self) -> None:
        if self.runtime is not None and self.settings.admin_ids:
            await notify_waiting(self.runtime, self.app.bot)

    async def _startup_model(self, storage: Storage) -> tuple[str | None, str | None]:
        """(promoted name, checkpoint to start with): the promoted model when following them."""
        if self.settings.model_poll_seconds > 0:
            active = await storage.active_model_version()
            if active is not None:
                path = checkpoint_path(active, storage.data_dir)
                if path.exists():
                    return active.name, str(path)
                log.error("promoted model %s is missing at %s; starting with the configured model",
                          active.name, path)
        return None, self.settings.model

    async def _start_service(self, checkpoint: str | None, promoted: bool) -> tuple[CaptionService, bool]:
        """The started service, and whether it serves the promoted model (else the configured one)."""
        service = self.service_factory(self.settings, checkpoint)
        self.service = service  # so that a failed start still gets closed
        try:
            await service.start()
            return service, promoted
        except ModelLoadError as err:
            if not promoted:
                raise
            log.error("could not load the promoted model (%s); starting with the configured model", err)
        with contextlib.suppress(Exception):
            await service.close(drain_timeout=0)
        service = self.service_factory(self.settings, self.settings.model)
        self.service = service
        await service.start()
        return service, False

    async def _register_commands(self) -> None:
        bot = self.app.bot
        await bot.set_my_commands(texts.bot_commands(), scope=BotCommandScopeDefault())
        admin_commands = texts.bot_commands() + [
            BotCommand(name, description) for name, description in texts.ADMIN_COMMANDS
        ]
        for admin_id in sorted(self.settings.admin_ids):
            try:
                await bot.set_my_commands(admin_commands, scope=BotCommandScopeChat(admin_id))
            except TelegramError as err:  # they have not talked to the bot yet
                log.info("operator commands not shown to %d: %s", admin_id, err)

    def _request_timeout(self) -> float:
        """How long a photo may wait for its caption (the worker's setting or its default)."""
        return service_config(self.settings, None).request_timeout

    async def stop(self) -> None:
        """Stop taking updates, finish the ones in hand, stop the worker, close the database."""
        started = time.monotonic()
        app = self.app
        if self.ops is not None:
            await self.ops.close()
            self.ops = None
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()  # waits for the handlers in flight (their captions are still served)
        for task in (self._follower, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._follower = self._sweeper = None
        if self.service is not None:
            try:
                await self.service.close(drain_timeout=self._request_timeout())
            except Exception:
                log.exception("the caption worker did not stop cleanly")
            self.service = None
        if self.storage is not None:
            await self.storage.close()
            self.storage = None
        if self._initialized:
            with contextlib.suppress(TelegramError):
                await app.shutdown()
            self._initialized = False
        log.info("stopped in %.1f s", time.monotonic() - started)

