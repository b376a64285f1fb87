"""A fake Telegram Bot API server for end-to-end tests of the bot over real HTTP.

It speaks the Bot API wire format (``POST /bot<token>/<method>`` with form, JSON or multipart
bodies; ``{"ok": true, "result": ...}`` answers; ``GET /file/bot<token>/<path>`` downloads) for
the methods the bot uses, and checks requests the way Telegram does: unknown chats, replies to
missing messages, malformed HTML, keyboards (callback data 1-64 bytes), text lengths, "message is
not modified", callback queries answered twice, files over 20 MB, flood limits (429).

Tests play people through :class:`Person` (send photos, albums, documents, text, stickers;
press buttons; reply to messages) and read what the bot did from :attr:`FakeTelegram.calls`
and :attr:`FakeTelegram.messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from PIL import Image

T = TypeVar("T")

DOWNLOAD_LIMIT = 20 * 1024 * 1024
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64
MAX_ANSWER_TEXT = 200
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note",
}
HTML_TAGS = {
    "b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "tg-spoiler",
    "span", "blockquote", "tg-emoji",
}
SENDING_METHODS = {
    "sendMessage", "sendPhoto", "editMessageText", "editMessageReplyMarkup", "editMessageCaption",
}
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of the message"
)


class ApiError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes]
    at: float
    ok: bool = True
    error: str | None = None
    result: Any = None


@dataclass
class StoredFile:
    file_id: str
    file_unique_id: str
    data: bytes
    file_path: str
    file_size: int  # as declared to the bot (may differ from len(data) to fake huge files)


@dataclass
class CallbackQuery:
    id: str
    user_id: int
    chat_id: int
    message_id: int
    data: str
    answered: bool = False
    answer: dict[str, Any] = field(default_factory=dict)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


_ATTRIBUTE = r"""\s+[a-zA-Z-]+(?:=(?:"[^"]*"|'[^']*'|[^\s>]+))?"""
_TAG = re.compile(rf"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:{_ATTRIBUTE})*)\s*(/?)>")
_ENTITY = re.compile(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")
_ENTITY_VALUES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


def parse_html(text: str) -> str:
    """Plain text of a Telegram-HTML string; raises ApiError like Telegram for what it rejects."""
    out: list[str] = []
    stack: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "<":
            match = _TAG.match(text, i)
            if match is None:
                raise ApiError(400, f"Bad Request: can't parse entities: Unexpected end of name token at "
                                    f"byte offset {len(text[:i].encode())}")
            closing, name, _attrs, _self = match.groups()
            name = name.lower()
            if name not in HTML_TAGS:
                raise ApiError(400, f'Bad Request: can\'t parse entities: Unsupported start tag "{name}" at '
                                    f"byte offset {len(text[:i].encode())}")
            if closing:
                if not stack or stack[-1] != name:
                    expected = stack[-1] if stack else ""
                    offset = len(text[:i].encode())
                    raise ApiError(400, "Bad Request: can't parse entities: Unmatched end tag at byte offset "
                                        f'{offset}, expected "</{expected}>", found "</{name}>"')
                stack.pop()
            else:
                stack.append(name)
            i = match.end()
        elif ch == "&":
            match = _ENTITY.match(text, i)
            if match is None:
                raise ApiError(400, "Bad Request: can't parse entities: Character '&' is reserved and must "
                                    "be escaped with &amp;")
            key = match.group(1)
            if key.startswith("#x"):
                out.append(chr(int(key[2:], 16)))
            elif key.startswith("#"):
                out.append(chr(int(key[1:])))
            else:
                out.append(_ENTITY_VALUES[key])
            i = match.end()
        elif ch == ">":
            raise ApiError(400, "Bad Request: can't parse entities: Character '>' is reserved")
        else:
            out.append(ch)
            i += 1
    if stack:
        raise ApiError(400, f'Bad Request: can\'t parse entities: Can\'t find end tag corresponding to start '
                            f'tag "{stack[-1]}"')
    return "".join(out)


def check_reply_markup(raw: Any) -> dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    try:
        markup = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object") from None
    if not isinstance(markup, dict):
        raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
    if "inline_keyboard" in markup:
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise ApiError(400, 'Bad Request: field "inline_keyboard" of the InlineKeyboardMarkup should be '
                                "an Array of Arrays")
        if sum(len(row) for row in rows) > 100 or any(len(row) > 8 for row in rows):
            raise ApiError(400, "Bad Request: too many inline keyboard buttons")
        for row in rows:
            for button in row:
                text = button.get("text") if isinstance(button, dict) else None
                if not text:
                    raise ApiError(400, "Bad Request: text buttons are unallowed in the inline keyboard")
                actions = [k for k in ("url", "callback_data", "switch_inline_query", "pay", "login_url",
                                       "web_app", "copy_text") if k in button]
                if len(actions) != 1:
                    raise ApiError(400, "Bad Request: can't parse inline keyboard button: Exactly one of the "
                                        "optional fields should be used")
                data = button.get("callback_data")
                if data is not None and not 1 <= len(str(data).encode()) <= MAX_CALLBACK_DATA:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup
    if markup.get("force_reply") is True:
        placeholder = markup.get("input_field_placeholder")
        if placeholder is not None and not 1 <= len(placeholder) <= 64:
            raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        return markup
    if "keyboard" in markup or markup.get("remove_keyboard") is True:
        return markup
    raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")


def _json_param(value: Any, name: str) -> Any:
    if value is None or not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ApiError(400, f"Bad Request: can't parse {name} JSON object") from None


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"Bad Request: invalid {name} specified") from None


def _flag(value: Any) -> bool:
    return value in (True, "true", "True", "1", 1)


class FakeTelegram:
    """The fake Bot API; ``await start()``, point the bot at :attr:`base_url`, ``await close()``."""

    def __init__(self, token: str = "7000001:AAF-fake-token-For_Tests_0123456789",
                 bot_username: str = "captionbot_test_bot", flood_per_second: int = 30) -> None:
        self.token = token
        self.bot_id = int(token.split(":")[0])
        self.bot_username = bot_username
        self.flood_per_second = flood_per_second
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []  # not yet confirmed by an offset
        self.delivered_at: dict[int, float] = {}  # update_id -> first time getUpdates returned it
        self.created_at: dict[int, float] = {}  # update_id -> when the test created it
        self.update_of: dict[tuple[int, int], int] = {}  # (chat id, message id) -> update id
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self.files: dict[str, StoredFile] = {}
        self.queries: dict[str, CallbackQuery] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}
        self.chats: dict[int, dict[str, Any]] = {}
        self.conflicts = 0
        self.polls = 0  # getUpdates calls (empty ones are not kept in ``calls``)
        self.flood_errors = 0
        self.download_delay = 0.0  # seconds a file download stalls (a slow Telegram file server)
        self._update_ids = itertools.count(1000)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._file_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._sends: deque[float] = deque()
        self._changed = asyncio.Condition()
        self._poll_generation = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ server

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._handle_file)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        async with self._changed:
            self._poll_generation += 1
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    def env(self) -> dict[str, str]:
        return {"TELEGRAM_BOT_TOKEN": self.token, "TELEGRAM_BASE_URL": self.base_url,
                "TELEGRAM_BASE_FILE_URL": self.base_file_url}

    async def _handle_method(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params, files = await self._read_params(request)
        call = Call(method, params, files, time.monotonic())
        if request.match_info["token"] != self.token:
            return self._error(call, ApiError(401, "Unauthorized"))
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            return self._error(call, ApiError(404, "Not Found"))
        try:
            if method in SENDING_METHODS:
                self._check_flood()
            if method == "getUpdates":
                result = await handler(params, files, request)
            else:
                result = handler(params, files)
        except ApiError as err:
            return self._error(call, err)
        call.result = result
        await self._record(call)
        return web.json_response({"ok": True, "result": result})

    def _error(self, call: Call, err: ApiError) -> web.Response:
        call.ok, call.error = False, err.description
        self.calls.append(call)
        self._notify_soon()
        body: dict[str, Any] = {"ok": False, "error_code": err.code, "description": err.description}
        if err.retry_after is not None:
            body["parameters"] = {"retry_after": err.retry_after}
        return web.json_response(body, status=err.code)

    async def _record(self, call: Call) -> None:
        if call.method != "getUpdates" or call.result:
            self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()

    def _notify_soon(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        params: dict[str, Any] = dict(request.query)
        files: dict[str, bytes] = {}
        if request.method != "POST" or not request.can_read_body:
            return params, files
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.filename is not None:
                    files[part.name] = bytes(await part.read())
                else:
                    params[part.name] = await part.text()
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        return params, files

    async def _handle_file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            raise web.HTTPUnauthorized()
        path = request.match_info["path"]
        for stored in self.files.values():
            if stored.file_path == path:
                self.calls.append(Call("download", {"file_path": path}, {}, time.monotonic()))
                self._notify_soon()
                await asyncio.sleep(self.download_delay)
                return web.Response(body=stored.data, content_type="application/octet-stream")
        raise web.HTTPNotFound()

    def _check_flood(self) -> None:
        now = time.monotonic()
        while self._sends and now - self._sends[0] >= 1.0:
            self._sends.popleft()
        if len(self._sends) >= self.flood_per_second:
            self.flood_errors += 1
            raise ApiError(429, "Too Many Requests: retry after 1", retry_after=1)
        self._sends.append(now)

    # ------------------------------------------------------------------ state helpers

    @property
    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "Caption Bot", "username": self.bot_username}

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def _chat(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = _int(params.get("chat_id"), "chat_id")
        chat = self.chats.get(chat_id)
        if chat is None:
            raise ApiError(400, "Bad Request: chat not found")
        return chat

    def add_file(self, data: bytes, kind: str, ext: str, declared_size: int | None = None) -> StoredFile:
        n = next(self._file_ids)
        stored = StoredFile(f"FILE{n:05d}-{kind}", f"UNIQ{n:05d}", data, f"{kind}/file_{n}.{ext}",
                            len(data) if declared_size is None else declared_size)
        self.files[stored.file_id] = stored
        return stored

    def _reply_target(self, params: dict[str, Any], chat_id: int) -> dict[str, Any] | None:
        parameters = _json_param(params.get("reply_parameters"), "reply parameters")
        if parameters is None and params.get("reply_to_message_id"):
            parameters = {"message_id": params["reply_to_message_id"],
                          "allow_sending_without_reply": params.get("allow_sending_without_reply")}
        if parameters is None:
            return None
        target = self.messages.get((chat_id, _int(parameters.get("message_id"), "message_id")))
        if target is None:
            if _flag(parameters.get("allow_sending_without_reply")):
                return None
            raise ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _new_bot_message(self, chat: dict[str, Any], params: dict[str, Any],
                         **content: Any) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": self._next_message_id(chat["id"]),
            "from": self.bot_user,
            "chat": chat,
            "date": int(time.time()),
            **content,
        }
        target = self._reply_target(params, chat["id"])
        if target is not None:
            message["reply_to_message"] = {k: v for k, v in target.items() if k != "reply_to_message"}
        markup = check_reply_markup(params.get("reply_markup"))
        if markup is not None and "inline_keyboard" in markup:
            message["reply_markup"] = markup
        self.messages[(chat["id"], message["message_id"])] = message
        message.setdefault("_markup", markup)
        return message

    @staticmethod
    def public(message: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in message.items() if not k.startswith("_")}

    def _text(self, params: dict[str, Any], key: str, limit: int, required: bool = True) -> tuple[str, str]:
        raw = params.get(key)
        if raw is None or raw == "":
            if required:
                raise ApiError(400, "Bad Request: message text is empty")
            return "", ""
        raw = str(raw)
        plain = parse_html(raw) if str(params.get("parse_mode", "")).upper() == "HTML" else raw
        if not plain.strip() and required:
            raise ApiError(400, "Bad Request: message text is empty")
        if _utf16_len(plain) > limit:
            raise ApiError(400, "Bad Request: message is too long" if key == "text"
                           else "Bad Request: message caption is too long")
        return raw, plain

    # ------------------------------------------------------------------ Bot API methods

    def api_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return {**self.bot_user, "can_join_groups": True, "can_read_all_group_messages": False,
                "supports_inline_queries": False}

    def api_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        if _flag(params.get("drop_pending_updates")):
            self.updates.clear()
        return True

    def api_getWebhookInfo(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        return {"url": "", "has_custom_certificate": False, "pending_update_count": len(self.updates)}

    def api_close(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def api_logOut(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        return True

    def api_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        commands = _json_param(params.get("commands"), "commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise ApiError(400, "Bad Request: can't parse commands JSON object")
        for command in commands:
            name, description = command.get("command", ""), command.get("description", "")
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        scope = _json_param(params.get("scope"), "scope") or {"type": "default"}
        if scope.get("type") == "chat":
            chat_id = _int(scope.get("chat_id"), "chat_id")
            if chat_id not in self.chats:
                raise ApiError(400, "Bad Request: chat not found")
            key = f"chat:{chat_id}"
        else:
            key = scope.get("type", "default")
        self.commands[key] = commands
        return True

    def api_getMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> list[dict[str, Any]]:
        return self.commands.get("default", [])

    async def api_getUpdates(self, params: dict[str, Any], files: dict[str, bytes],
                             request: web.Request) -> list[dict[str, Any]]:
        self.polls += 1
        offset = _int(params.get("offset") or 0, "offset")
        limit = max(1, min(100, _int(params.get("limit") or 100, "limit")))
        timeout = float(params.get("timeout") or 0)
        allowed = _json_param(params.get("allowed_updates"), "allowed updates")
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
        async with self._changed:
            self._poll_generation += 1  # a newer poll ends the older one, as on Telegram
            generation = self._poll_generation
            self._changed.notify_all()
        deadline = time.monotonic() + timeout
        while True:
            ready = [u for u in self.updates if not allowed or any(k in u for k in allowed)][:limit]
            if ready or time.monotonic() >= deadline:
                break
            async with self._changed:
                if self._poll_generation != generation:
                    break
                with contextlib.suppress(TimeoutError):
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
            if self._poll_generation != generation:
                if request.transport is not None and not request.transport.is_closing():
                    self.conflicts += 1
                break
        now = time.monotonic()
        for update in ready:
            self.delivered_at.setdefault(update["update_id"], now)
        return ready

    def api_sendChatAction(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        self._chat(params)
        if params.get("action") not in CHAT_ACTIONS:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    def api_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        chat = self._chat(params)
        raw, plain = self._text(params, "text", MAX_TEXT)
        message = self._new_bot_message(chat, params, text=plain, _html=raw)
        return self.public(message)

    def api_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        chat = self._chat(params)
        data = files.get("photo")
        if data is None:
            file_id = params.get("photo")
            if not file_id or file_id not in self.files:
                raise ApiError(400, "Bad Request: wrong file identifier/HTTP URL specified")
            data = self.files[file_id].data
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height = image.size
        except Exception:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None
        raw, plain = self._text(params, "caption", MAX_CAPTION, required=False)
        stored = self.add_file(data, "photos", "jpg")
        size = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "width": width,
                "height": height, "file_size": len(data)}
        content: dict[str, Any] = {"photo": [size], "_photo_bytes": data}
        if plain:
            content.update(caption=plain, _html=raw)
        return self.public(self._new_bot_message(chat, params, **content))

    def _own_message(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("inline_message_id"):
            raise ApiError(400, "Bad Request: MESSAGE_ID_INVALID")
        chat = self._chat(params)
        message = self.messages.get((chat["id"], _int(params.get("message_id"), "message_id")))
        if message is None:
            raise ApiError(400, "Bad Request: message to edit not found")
        if message.get("from", {}).get("id") != self.bot_id:
            raise ApiError(400, "Bad Request: message can't be edited")
        return message

    def api_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message = self._own_message(params)
        if "text" not in message:
            raise ApiError(400, "Bad Request: there is no text in the message to edit")
        raw, plain = self._text(params, "text", MAX_TEXT)
        markup = check_reply_markup(params.get("reply_markup"))
        if plain == message["text"] and markup == message.get("reply_markup"):
            raise ApiError(400, NOT_MODIFIED)
        message.setdefault("_edits", []).append(message["text"])
        message["text"], message["_html"] = plain, raw
        message["edit_date"] = int(time.time())
        if markup is not None and "inline_keyboard" in markup:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        return self.public(message)

    def api_editMessageReplyMarkup(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        message = self._own_message(params)
        markup = check_reply_markup(params.get("reply_markup"))
        if markup is not None and "inline_keyboard" not in markup:
            raise ApiError(400, "Bad Request: inline keyboard expected")
        if markup == message.get("reply_markup"):
            raise ApiError(400, NOT_MODIFIED)
        if markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = markup
        message["edit_date"] = int(time.time())
        return self.public(message)

    def api_deleteMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        message = self._own_message(params)
        del self.messages[(message["chat"]["id"], message["message_id"])]
        return True

    def api_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, bytes]) -> bool:
        query = self.queries.get(str(params.get("callback_query_id")))
        if query is None or query.answered:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is "
                                "invalid")
        text = str(params.get("text") or "")
        if len(text) > MAX_ANSWER_TEXT:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        query.answered = True
        query.answer = {"text": text, "show_alert": _flag(params.get("show_alert"))}
        return True

    def api_getFile(self, params: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
        stored = self.files.get(str(params.get("file_id")))
        if stored is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        if stored.file_size > DOWNLOAD_LIMIT:
            raise ApiError(400, "Bad Request: file is too big")
        return {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                "file_size": stored.file_size, "file_path": stored.file_path}

    # ------------------------------------------------------------------ playing people

    def person(self, user_id: int, first_name: str = "Ada", language_code: str = "en") -> Person:
        return Person(self, user_id, first_name, language_code)

    def group(self, chat_id: int, title: str = "Friends") -> dict[str, Any]:
        chat = {"id": chat_id, "type": "group", "title": title}
        self.chats[chat_id] = chat
        return chat

    async def push_update(self, kind: str, payload: dict[str, Any]) -> int:
        update_id = next(self._update_ids)
        self.updates.append({"update_id": update_id, kind: payload})
        self.created_at[update_id] = time.monotonic()
        async with self._changed:
            self._changed.notify_all()
        return update_id

    # ------------------------------------------------------------------ reading what the bot did

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def errors(self) -> list[Call]:
        return [c for c in self.calls if not c.ok]

    def bot_messages(self, chat_id: int) -> list[dict[str, Any]]:
        """What the bot posted in a chat, oldest first (as it looks now, edits applied)."""
        return sorted((m for (cid, _), m in self.messages.items()
                       if cid == chat_id and m.get("from", {}).get("id") == self.bot_id),
                      key=lambda m: m["message_id"])

    def latency(self, message: dict[str, Any], answer: dict[str, Any]) -> float:
        """Seconds from the bot receiving ``message`` (getUpdates) to sending or editing ``answer``."""
        key = (message["chat"]["id"], message["message_id"])
        received = self.delivered_at[self.update_of[key]]
        sent = min(c.at for c in self.calls
                   if c.method in ("sendMessage", "editMessageText") and isinstance(c.result, dict)
                   and c.result.get("message_id") == answer["message_id"]
                   and c.result.get("chat", {}).get("id") == key[0]
                   and c.result.get("text") == answer["text"])
        return sent - received

    def replies_to(self, chat_id: int, message_id: int) -> list[dict[str, Any]]:
        return [m for m in self.bot_messages(chat_id)
                if m.get("reply_to_message", {}).get("message_id") == message_id]

    async def wait_for(self, condition: Callable[[], T | None], timeout: float = 30.0,
                       what: str = "the bot") -> T:
        """Wait until ``condition()`` returns something truthy (re-checked after every request)."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))

    async def wait_reply(self, message: dict[str, Any], count: int = 1, timeout: float = 60.0,
                         final: bool = True) -> list[dict[str, Any]]:
        """The bot's replies to a person's message, once there are ``count`` of them; with
        ``final``, a queue notice ("You're number N") does not count until edited into the answer."""
        chat_id = message["chat"]["id"]

        def ready() -> list[dict[str, Any]] | None:
            replies = self.replies_to(chat_id, message["message_id"])
            if final:
                replies = [r for r in replies if not str(r.get("text", "")).startswith("⏳")]
            return replies if len(replies) >= count else None

        return await self.wait_for(ready, timeout, f"a reply to message {message['message_id']}")

    async def wait_answer(self, query_id: str, timeout: float = 30.0) -> dict[str, Any]:
        query = self.queries[query_id]
        await self.wait_for(lambda: query.answered, timeout, f"an answer to callback query {query_id}")
        return query.answer


class Person:
    """A Telegram user talking to the bot in a private chat (or in a group via ``chat``)."""

    def __init__(self, fake: FakeTelegram, user_id: int, first_name: str, language_code: str) -> None:
        self.fake = fake
        self.id = user_id
        self.user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name,
                                     "language_code": language_code}
        self.chat: dict[str, Any] = {"id": user_id, "type": "private", "first_name": first_name}
        fake.chats[user_id] = self.chat

    def in_chat(self, chat: dict[str, Any]) -> Person:
        other = Person.__new__(Person)
        other.fake, other.id, other.user, other.chat = self.fake, self.id, self.user, chat
        return other

    async def _send(self, reply_to: dict[str, Any] | None = None, **content: Any) -> dict[str, Any]:
        chat_id = self.chat["id"]
        message: dict[str, Any] = {
            "message_id": self.fake._next_message_id(chat_id),
            "from": self.user,
            "chat": self.chat,
            "date": int(time.time()),
            **content,
        }
        if reply_to is not None:
            message["reply_to_message"] = FakeTelegram.public(
                {k: v for k, v in reply_to.items() if k != "reply_to_message"})
        self.fake.messages[(chat_id, message["message_id"])] = message
        update_id = await self.fake.push_update("message", message)
        self.fake.update_of[(chat_id, message["message_id"])] = update_id
        return message

    async def text(self, text: str, reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._send(reply_to, text=text)

    async def command(self, command: str, reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        text = command if command.startswith("/") else f"/{command}"
        length = len(text.split()[0])
        return await self._send(reply_to, text=text,
                                entities=[{"type": "bot_command", "offset": 0, "length": length}])

    async def photo(self, data: bytes, *, file_size: int | None = None, media_group_id: str | None = None,
                    caption: str | None = None) -> dict[str, Any]:
        """A compressed photo: Telegram sends a thumbnail and the full size (largest last)."""
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            thumb = image.convert("RGB")
            thumb.thumbnail((32, 32))
            buffer = io.BytesIO()
            thumb.save(buffer, "JPEG")
        small = self.fake.add_file(buffer.getvalue(), "photos", "jpg")
        full = self.fake.add_file(data, "photos", "jpg", file_size)
        sizes = [
            {"file_id": small.file_id, "file_unique_id": small.file_unique_id, "width": thumb.width,
             "height": thumb.height, "file_size": small.file_size},
            {"file_id": full.file_id, "file_unique_id": full.file_unique_id, "width": width,
             "height": height, "file_size": full.file_size},
        ]
        content: dict[str, Any] = {"photo": sizes}
        if media_group_id is not None:
            content["media_group_id"] = media_group_id
        if caption is not None:
            content["caption"] = caption
        return await self._send(**content)

    async def album(self, photos: list[bytes]) -> list[dict[str, Any]]:
        group = f"album-{self.id}-{next(self.fake._file_ids)}"
        return [await self.photo(data, media_group_id=group) for data in photos]

    async def document(self, data: bytes, *, mime_type: str | None, file_name: str,
                       file_size: int | None = None) -> dict[str, Any]:
        ext = file_name.rsplit(".", 1)[-1] if "." in file_name else "bin"
        stored = self.fake.add_file(data, "documents", ext, file_size)
        document: dict[str, Any] = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                    "file_name": file_name, "file_size": stored.file_size}
        if mime_type is not None:
            document["mime_type"] = mime_type
        return await self._send(document=document)

    async def sticker(self) -> dict[str, Any]:
        stored = self.fake.add_file(b"RIFF....WEBPVP8 ", "stickers", "webp")
        return await self._send(sticker={"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                         "type": "regular", "width": 512, "height": 512, "is_animated": False,
                                         "is_video": False, "emoji": "😀"})

    async def video(self) -> dict[str, Any]:
        stored = self.fake.add_file(b"\x00\x00\x00\x18ftypmp42", "videos", "mp4")
        return await self._send(video={"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                       "width": 640, "height": 360, "duration": 3, "mime_type": "video/mp4"})

    async def voice(self) -> dict[str, Any]:
        stored = self.fake.add_file(b"OggS", "voice", "ogg")
        return await self._send(voice={"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                       "duration": 2})

    async def press(self, message: dict[str, Any], label_prefix: str) -> str:
        """Press the inline button whose label starts with ``label_prefix``; returns the query id."""
        current = self.fake.messages.get((message["chat"]["id"], message["message_id"]), message)
        for row in current.get("reply_markup", {}).get("inline_keyboard", []):
            for button in row:
                if button["text"].startswith(label_prefix):
                    return await self.press_data(current, button["callback_data"])
        raise AssertionError(
            f"no button starting with {label_prefix!r} under message {message['message_id']}")

    async def press_data(self, message: dict[str, Any], data: str) -> str:
        query_id = f"Q{next(self.fake._query_ids)}"
        chat_id = message["chat"]["id"]
        self.fake.queries[query_id] = CallbackQuery(query_id, self.id, chat_id, message["message_id"], data)
        current = self.fake.messages.get((chat_id, message["message_id"]), message)
        await self.fake.push_update("callback_query", {
            "id": query_id, "from": self.user, "message": FakeTelegram.public(current),
            "chat_instance": f"ci{chat_id}", "data": data,
        })
        return query_id
