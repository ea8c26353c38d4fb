"""The chat page in headless Chromium, driven by Playwright, against real gateways.

The tests use Playwright's sync API, so they are plain (non-async) tests: the
sync API cannot run inside the event loop pytest-asyncio gives async tests.
Chromium is Debian's ``/usr/bin/chromium`` (``make tools`` installs it); the
Socket.IO client the page loads comes from ``node_modules`` (``npm ci``).

Set ``CHAT_UPDATE_SCREENSHOT=1`` to write the screenshot of the page to
``docs/chat-page.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from service.auth import issue_token
from service.embedded import free_port
from service.page import SOCKETIO_CLIENT_JS
from tests.conftest import SECRET, GatewayProcess, RunningGateway

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "chat-page.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
JAEGER = "http://127.0.0.1:16686"
TASK = "T-1042"
TRACE_ID = re.compile(r"[0-9a-f]{32}")

expect.set_options(timeout=10_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module; each page gets its own context."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make tools` (Debian package chromium)")
    if not SOCKETIO_CLIENT_JS.exists():
        pytest.fail(f"{SOCKETIO_CLIENT_JS} not found: run `npm ci`")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@dataclass
class ChatPage:
    """A browser tab on the chat page, with the errors its console showed."""

    page: Page
    errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def record_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def send(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.click("#composer button[type=submit]")

    def message(self, text: str) -> Locator:
        """Return the message item whose text is exactly ``text``."""
        body = self.page.locator("p.text").filter(
            has_text=re.compile(f"^{re.escape(text)}$")
        )
        return self.page.locator("li.message").filter(has=body)

    def connection(self) -> Locator:
        return self.page.locator("#connection")


OpenPage = Callable[..., ChatPage]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """Open the chat page in a fresh browser context; all are closed after the test."""
    contexts = []

    def open_chat(
        url: str, token: str | None, *, via: str = "#", connected: bool = True
    ) -> ChatPage:
        context = browser.new_context(
            viewport={"width": 1180, "height": 760}, locale="en-US", timezone_id="UTC"
        )
        contexts.append(context)
        chat = ChatPage(context.new_page())
        chat.page.on("pageerror", lambda error: chat.errors.append(str(error)))
        chat.page.on("console", chat.record_console)
        address = f"{url}/{via}token={token}" if token else f"{url}/"
        chat.page.goto(address)
        if token and connected:
            expect(chat.connection()).to_have_attribute("data-state", "connected")
        return chat

    yield open_chat
    for context in contexts:
        context.close()


def post_message(
    gateway: RunningGateway, token: str, text: str, client_msg_id: str
) -> Any:
    response = httpx.post(
        f"{gateway.url}/api/tasks/{TASK}/messages",
        json={"client_msg_id": client_msg_id, "text": text},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()


def wait_until(check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.1)
    return result


def test_page_participants_chat_both_ways(
    gateway_factory: Any, open_page: OpenPage, mongo: Any
) -> None:
    """An operator and a manager each see their own and the other's message saved."""
    gateway = gateway_factory(indexing_enabled=False)
    operator = open_page(gateway.url, gateway.token(TASK, "olga", "operator"))
    manager = open_page(gateway.url, gateway.token(TASK, "max", "manager"))

    operator.send("Customer cannot sign in since 09:00")
    manager.send("Looking into it now")

    for chat in (operator, manager):
        first = chat.message("Customer cannot sign in since 09:00")
        second = chat.message("Looking into it now")
        expect(first).to_have_attribute("data-state", "saved")
        expect(second).to_have_attribute("data-state", "saved")
        expect(first).to_have_attribute("data-sender", "olga")
        expect(second).to_have_attribute("data-sender", "max")
        expect(first.locator(".role")).to_have_text("operator")
        expect(second.locator(".role")).to_have_text("manager")
        expect(chat.page.locator("li.message")).to_have_count(2)
    expect(operator.message("Customer cannot sign in since 09:00")).to_have_class(
        re.compile(r"\bmine\b")
    )
    expect(manager.message("Customer cannot sign in since 09:00")).not_to_have_class(
        re.compile(r"\bmine\b")
    )
    expect(operator.page.locator("#identity")).to_contain_text(
        f"olga (operator) in task {TASK}"
    )

    stored = list(mongo[gateway.database].messages.find({"task_id": TASK}))
    assert sorted(doc["sender"] for doc in stored) == ["max", "olga"]
    assert operator.errors == []
    assert operator.console_errors == []
    assert manager.errors == []
    assert manager.console_errors == []


def test_page_trace_starts_in_browser(
    gateway_factory: Any,
    open_page: OpenPage,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """The page's trace id is the trace of the gateway's span, linked to Jaeger."""
    provider, exporter = spans
    gateway = gateway_factory(
        tracer_provider=provider, indexing_enabled=False, jaeger_ui_url=JAEGER + "/"
    )
    operator = open_page(gateway.url, gateway.token(TASK, "olga"))

    operator.send("trace this message")
    message = operator.message("trace this message")
    expect(message).to_have_attribute("data-state", "saved")

    link = message.locator("a.trace-id")
    trace_id = link.inner_text()
    assert TRACE_ID.fullmatch(trace_id)
    assert link.get_attribute("href") == f"{JAEGER}/trace/{trace_id}"
    client_msg_id = message.get_attribute("data-client-msg-id")

    def server_span() -> Any:
        for span in exporter.get_finished_spans():
            attributes = span.attributes or {}
            if attributes.get("messaging.message.conversation_id") == client_msg_id:
                return span
        return None

    span = wait_until(server_span)
    assert span.name == "send_message task:{task_id}"
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert span.parent.is_remote
    assert operator.errors == []
    assert operator.console_errors == []


def test_page_oversized_message_fails(
    gateway_factory: Any, open_page: OpenPage, mongo: Any
) -> None:
    """A message over 4,000 characters shows text_too_long and is not stored."""
    gateway = gateway_factory(indexing_enabled=False)
    operator = open_page(gateway.url, gateway.token(TASK, "olga"))
    text = "x" * 4001

    operator.page.fill("#text", text)
    expect(operator.page.locator("#count")).to_have_text("4001 / 4000")
    expect(operator.page.locator("#count")).to_have_class(re.compile(r"\bover\b"))
    operator.page.click("#composer button[type=submit]")

    message = operator.message(text)
    expect(message).to_have_attribute("data-state", "failed")
    expect(message.locator(".state")).to_have_text("failed")
    error = message.locator(".error")
    expect(error).to_have_attribute("data-code", "text_too_long")
    expect(error).to_contain_text("text_too_long: text is 4001 characters")
    expect(message.locator("button.retry")).to_be_hidden()
    assert mongo[gateway.database].messages.count_documents({}) == 0
    assert operator.errors == []
    assert operator.console_errors == []


def test_page_search_finds_message(gateway_factory: Any, open_page: OpenPage) -> None:
    """The search box returns the task's message that matches by meaning."""
    gateway = gateway_factory()
    operator = open_page(gateway.url, gateway.token(TASK, "olga"))
    texts = [
        "Customer cannot log in to the portal since this morning",
        "Invoice 4471 was paid twice",
        "Please update the delivery address",
    ]
    for text in texts:
        operator.send(text)
        expect(operator.message(text)).to_have_attribute("data-state", "saved")
    wait_until(lambda: gateway.gateway.metrics.indexed._value.get() >= len(texts))

    operator.page.fill("#query", "user has a sign-in problem")
    operator.page.click("#search-form button[type=submit]")

    expect(operator.page.locator("#search-status")).to_have_text(
        re.compile(r"^\d+ results? for ")
    )
    first = operator.page.locator("#results li.result").first
    expect(first.locator(".text")).to_have_text(texts[0])
    expect(first.locator(".sender")).to_have_text("olga")
    assert operator.errors == []
    assert operator.console_errors == []


def test_page_resends_after_gateway_restart(
    spawn_gateway: Callable[..., GatewayProcess], open_page: OpenPage, mongo: Any
) -> None:
    """A message sent while the gateway is down is saved once after it restarts."""
    port = free_port()
    database = f"chat_browser_{os.getpid()}_{port}"
    env = {"CHAT_INDEXING_ENABLED": "false", "CHAT_MONGODB_DATABASE": database}
    first = spawn_gateway(env=env, port=port)
    token = issue_token(SECRET, user="olga", task=TASK, role="operator", ttl=600)
    operator = open_page(first.url, token)
    operator.send("before the restart")
    expect(operator.message("before the restart")).to_have_attribute(
        "data-state", "saved"
    )

    first.stop()
    assert first.process.poll() is not None
    expect(operator.connection()).to_have_attribute("data-state", "offline")
    operator.send("sent while the gateway is down")
    pending = operator.message("sent while the gateway is down")
    expect(pending).to_have_attribute("data-state", "sending")
    expect(pending.locator(".state")).to_have_text(
        "sending (waiting for the connection)"
    )

    spawn_gateway(env=env, port=port)
    expect(operator.connection()).to_have_attribute(
        "data-state", "connected", timeout=20_000
    )
    expect(pending).to_have_attribute("data-state", "saved")

    messages = mongo[database].messages
    assert messages.count_documents({"text": "sent while the gateway is down"}) == 1
    assert messages.count_documents({}) == 2
    expect(operator.page.locator("li.message")).to_have_count(2)
    assert operator.errors == []


def test_page_reload_resends_pending_once(
    gateway_factory: Any, open_page: OpenPage, mongo: Any
) -> None:
    """Unacked messages kept in localStorage are resent after a reload, none doubled."""
    gateway = gateway_factory(indexing_enabled=False)
    token = gateway.token(TASK, "olga")
    # "stored-1" reached the gateway but its ack was lost; "lost-1" never did.
    post_message(gateway, token, "ack was lost", "stored-1")
    operator = open_page(gateway.url, token)
    operator.page.evaluate(
        """([key, items]) => localStorage.setItem(key, JSON.stringify(items))""",
        [
            f"chat-gateway:pending:{TASK}:olga",
            [
                {"client_msg_id": "stored-1", "text": "ack was lost"},
                {"client_msg_id": "lost-1", "text": "never arrived"},
            ],
        ],
    )

    operator.page.reload()

    for text in ("ack was lost", "never arrived"):
        expect(operator.message(text)).to_have_attribute("data-state", "saved")
        expect(operator.message(text)).to_have_count(1)
    expect(operator.page.locator("li.message")).to_have_count(2)
    messages = mongo[gateway.database].messages
    assert messages.count_documents({"client_msg_id": "stored-1"}) == 1
    assert messages.count_documents({"client_msg_id": "lost-1"}) == 1
    left = operator.page.evaluate("() => localStorage.length")
    assert left == 0
    assert operator.errors == []
    assert operator.console_errors == []


def test_page_history_renders_text_not_html(
    gateway_factory: Any, open_page: OpenPage
) -> None:
    """History loads with a ?token= URL, and markup in a message stays text."""
    gateway = gateway_factory(indexing_enabled=False)
    token = gateway.token(TASK, "olga")
    attack = '<img src=x onerror="window.injected = true"><b>bold</b>'
    post_message(gateway, gateway.token(TASK, "max", "manager"), attack, "m-1")
    post_message(gateway, token, "second line\nof one message", "o-1")

    operator = open_page(gateway.url, token, via="?")

    expect(operator.message(attack)).to_have_attribute("data-sender", "max")
    expect(operator.page.locator("li.message")).to_have_count(2)
    assert operator.page.locator("li.message img, li.message b").count() == 0
    assert operator.page.evaluate("() => window.injected") is None
    assert "token" not in operator.page.url
    texts = operator.page.locator("li.message p.text").all_inner_texts()
    assert texts == [attack, "second line\nof one message"]
    assert operator.errors == []
    assert operator.console_errors == []


def test_page_token_form_opens_chat(gateway_factory: Any, open_page: OpenPage) -> None:
    """Without a token the page shows a form, rejects a non-JWT, then connects."""
    gateway = gateway_factory(indexing_enabled=False)
    chat = open_page(gateway.url, None)
    expect(chat.page.locator("#token-panel")).to_be_visible()
    expect(chat.page.locator("#chat")).to_be_hidden()

    chat.page.fill("#token-input", "not-a-token")
    chat.page.click("#token-form button[type=submit]")
    expect(chat.page.locator("#token-error")).to_contain_text("3 dot-separated parts")

    chat.page.fill("#token-input", gateway.token(TASK, "olga"))
    chat.page.click("#token-form button[type=submit]")
    expect(chat.connection()).to_have_attribute("data-state", "connected")
    expect(chat.page.locator("#chat")).to_be_visible()
    assert chat.errors == []


def test_page_rejected_token_shows_code(
    gateway_factory: Any, open_page: OpenPage
) -> None:
    """A token signed with another secret is rejected with its code and message."""
    gateway = gateway_factory(indexing_enabled=False)
    forged = issue_token(
        "another-secret-" + "y" * 40, user="eve", task=TASK, role="manager", ttl=60
    )
    chat = open_page(gateway.url, forged, connected=False)

    expect(chat.connection()).to_have_attribute("data-state", "rejected")
    expect(chat.connection()).to_have_text("connection rejected: unauthorized")
    expect(chat.page.locator("#notice")).to_contain_text(
        "unauthorized: invalid access token"
    )
    assert chat.errors == []


def test_page_screenshot(
    gateway_factory: Any,
    open_page: OpenPage,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    tmp_path: Path,
) -> None:
    """Two participants, one failed message, trace ids and a search: the README picture."""
    provider, _exporter = spans
    gateway = gateway_factory(tracer_provider=provider, jaeger_ui_url=JAEGER)
    manager_token = gateway.token(TASK, "max", "manager")
    post_message(gateway, manager_token, "Morning! Anything urgent on T-1042?", "h-1")
    operator = open_page(gateway.url, gateway.token(TASK, "olga", "operator"))
    manager = open_page(gateway.url, manager_token)
    log = "".join(
        f"09:{line // 6:02d}:{line % 6 * 10:02d} AUTH-401 login rejected for "
        "account 5521: token expired\n"
        for line in range(70)
    )

    conversation = [
        (
            operator,
            "Customer cannot sign in since 09:00, error AUTH-401 on the portal.",
        ),
        (manager, "Looking into it now. Is it only this customer?"),
        (operator, "Only this one so far. Pasting the full log below."),
    ]
    for sender, text in conversation:
        sender.send(text)
        expect(manager.message(text)).to_have_attribute("data-state", "saved")
    operator.send(f"Full log:\n{log}")
    expect(operator.page.locator('li.message[data-state="failed"]')).to_have_count(1)
    expect(operator.page.locator('li.message[data-state="saved"]')).to_have_count(4)
    expect(operator.page.locator("a.trace-id")).to_have_count(3)

    wait_until(lambda: gateway.gateway.metrics.indexed._value.get() >= 4)
    operator.page.fill("#query", "login problem")
    operator.page.click("#search-form button[type=submit]")
    expect(operator.page.locator("#results li.result")).to_have_count(4)

    path = tmp_path / "chat-page.png"
    operator.page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000
    if os.environ.get("CHAT_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, SCREENSHOT)


def test_vendor_client_missing_explains_fix(
    gateway_factory: Any, tmp_path: Path
) -> None:
    """Without node_modules the client route returns 404 naming `npm ci`."""
    missing = tmp_path / "socket.io.min.js"
    gateway = gateway_factory(indexing_enabled=False, socketio_client_js=missing)

    response = httpx.get(f"{gateway.url}/static/vendor/socket.io.min.js", timeout=10)

    assert response.status_code == 404
    assert "npm ci" in response.text
    assert str(missing) in response.text


def test_page_served_with_config(gateway_factory: Any) -> None:
    """The page, its client library and its config come from the gateway."""
    gateway = gateway_factory(indexing_enabled=False, jaeger_ui_url=JAEGER + "/")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        page = client.get("/")
        library = client.get("/static/vendor/socket.io.min.js")
        config = client.get("/api/config")
        schema = client.get("/openapi.json").json()

    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert library.status_code == 200
    assert library.headers["content-type"].startswith("text/javascript")
    assert library.content == SOCKETIO_CLIENT_JS.read_bytes()
    assert config.json() == {"jaeger_ui_url": JAEGER, "max_text_chars": 4000}
    assert "/api/config" in schema["paths"]
