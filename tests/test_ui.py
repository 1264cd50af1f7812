"""The admin UI at `/ui` as an operator uses it: headless Chromium (Debian's `chromium` and
`chromium-driver`, which `deploy/setup.sh` installs) driven by Selenium against a real stack
with keys checked. Screenshots are kept under `$ROUNDHOUSE_TEST_ARTIFACTS` (default
`tests/artifacts/`); with `ROUNDHOUSE_UI_DOCS_SCREENSHOT` set to a path, the models page is
saved there too (the README's `docs/ui.png`).

Without chromium the browser tests fail (they are part of what the UI promises); set
`ROUNDHOUSE_SKIP_BROWSER_TESTS=1` to skip them instead on a machine that cannot have it.

The stack runs on the test's event loop, so every blocking browser call runs in a thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jobs_harness import copy_model, uid
from limits_harness import new_key
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, running_stack, tiny_documents

from roundhouse.v1 import registry_pb2
from services.common.asset_proto import spec_to_proto
from services.common.assetspec import parse_spec
from services.common.drain import Drain
from services.router.ui.actions import ModelActions
from services.router.ui.feed import EventFeed
from services.router.ui.freshness import PictureRefresh
from services.router.ui.session import UiSession, UiSessions
from services.router.ui.views import template_environment

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("ROUNDHOUSE_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
WAIT_S = 60
ROW = "document.querySelector(`tr[data-asset='${arguments[0]}']`)"
"""The models page's row of the asset given as the script's first argument."""

needs_chromium = pytest.mark.skipif(os.environ.get("ROUNDHOUSE_SKIP_BROWSER_TESTS") == "1",
                                    reason="ROUNDHOUSE_SKIP_BROWSER_TESTS=1")


@pytest.fixture(scope="module")
async def stack(own_db: str, nats_url: str, sources: Path,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A stack checking API keys, on a database of the module's own (the UI lists every asset)."""
    async with running_stack(own_db, nats_url, sources, tmp_path_factory.mktemp("store"), auth=True) as running:
        await running.apply(*tiny_documents(sources))
        yield running


class Browser:
    """A headless Chromium; each call runs in a thread so the stack keeps serving."""

    def __init__(self, base_url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         "--window-size=1280,1000"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        self.base_url = base_url

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` in a thread."""
        return await asyncio.to_thread(call, *args)

    async def open(self, path: str) -> None:
        await self.run(self.driver.get, self.base_url + path)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def until(self, source: str, *args: Any, timeout: float = WAIT_S) -> Any:
        """Wait until the script returns a true value (polled by Selenium, with a deadline)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def holds(driver: Any) -> Any:
            return driver.execute_script(source, *args)

        try:
            return await self.run(WebDriverWait(self.driver, timeout, poll_frequency=0.1).until, holds)
        except TimeoutException:
            shot = await self.screenshot(f"timeout-{uuid.uuid4().hex[:6]}")
            shot.with_suffix(".html").write_text(await self.run(lambda: self.driver.page_source))
            raise AssertionError(f"not within {timeout} s: {source} {args}; see {shot}") from None

    async def log_in(self, key: str) -> None:
        await self.open("/ui/login")
        await self.script("document.getElementById('key').value = arguments[0];"
                          "document.querySelector('form').submit();", key)
        await self.until("return document.readyState === 'complete' && location.pathname")

    async def click(self, row_of: str, button: str) -> None:
        """Click a row's button once the page is live and no fragment is being fetched or
        swapped (a click on a row just swapped out would go nowhere)."""
        await self.until("return document.getElementById('live-status').textContent === 'live' && "
                         "!document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling')")
        await self.script(f"{ROW}.querySelector(arguments[1]).click()", row_of, button)

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"ui-{name}.png"
        await self.run(self.driver.save_screenshot, str(path))
        return path


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[Browser]:
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()):
        pytest.fail("Debian's chromium and chromium-driver are not installed: run deploy/setup.sh, or set "
                    "ROUNDHOUSE_SKIP_BROWSER_TESTS=1 to skip the browser tests")
    opened = Browser(stack.http_url)
    try:
        yield opened
    finally:
        opened.driver.quit()


async def ui_session(stack: Stack, key: str | None) -> tuple[httpx.AsyncClient, str]:
    """An HTTP client signed in to the UI with `key` (none: just the login form's cookie), and
    its CSRF token."""
    http = httpx.AsyncClient(base_url=stack.http_url, timeout=30)
    if key is None:
        return http, ""
    signed_in = await log_in(http, key)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/models", signed_in.text
    page = await http.get("/ui/models")
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert page.status_code == 200 and csrf is not None, page.text
    return http, csrf.group(1)


async def log_in(http: httpx.AsyncClient, key: str) -> httpx.Response:
    """Post the login form (with its one-off token) with `key`."""
    form = await http.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    return await http.post("/ui/login", data={"key": key, "csrf_token": token.group(1)})


async def operations_of(stack: Stack, asset_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        reply = await admin.get("/operations", params={"asset_id": asset_id})
        assert reply.status_code == 200, reply.text
        operations: list[dict[str, Any]] = reply.json()["operations"]
        return operations


async def user_key(stack: Stack) -> str:
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        secret, _ = await new_key(admin, "ui-user")
        return secret


async def test_without_an_admin_session_there_is_no_page_and_no_action(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, timeout=30) as plain:
        assert (await plain.get("/ui/models")).headers.get("location") == "/ui/login"
        assert (await plain.get("/ui/fragments/models")).status_code == 403
        assert (await plain.post("/ui/models/tiny-chat/unload")).status_code == 403

    for key in ("rh-" + "x" * 40, await user_key(stack)):  # an unknown key; a key that is not admin
        http, _ = await ui_session(stack, None)
        refused = await log_in(http, key)
        assert refused.status_code == 403 and "rh_ui_session" not in refused.cookies
        assert (await http.get("/ui/models")).headers.get("location") == "/ui/login"
        await http.aclose()

    http, csrf = await ui_session(stack, stack.admin_key)
    cookie = http.cookies.get("rh_ui_session")
    assert cookie
    assert (await http.post(f"/ui/models/{TINY_EMBED}/install", data={"csrf_token": "forged"})).status_code == 403
    assert (await http.post(f"/ui/models/{TINY_EMBED}/install", headers={"X-CSRF-Token": csrf[:-1]})).status_code == 403
    assert (await http.post("/ui/keys", data={"name": "forged-key", "csrf_token": ""})).status_code == 403
    await http.aclose()
    assert await operations_of(stack, TINY_EMBED) == []
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        names = [k["name"] for k in (await admin.get("/keys")).json()["keys"]]
    assert "forged-key" not in names


async def test_keys_are_created_once_shown_and_revoked_through_the_ui(stack: Stack) -> None:
    http, csrf = await ui_session(stack, stack.admin_key)
    name = uid("ui-made")
    created = await http.post("/ui/keys", data={"name": name, "csrf_token": csrf})
    secret = re.search(r'class="secret">(rh-[^<]+)<', created.text)
    assert created.status_code == 200 and secret is not None, created.text
    models = await http.get("/v1/models", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert models.status_code == 200
    listing = await http.get("/ui/fragments/keys")
    assert f'data-key="{name}"' in listing.text and secret.group(1) not in listing.text

    revoked = await http.post(f"/ui/keys/{name}/revoke", headers={"X-CSRF-Token": csrf})
    assert revoked.status_code == 200
    refused = await http.get("/v1/models", headers={"Authorization": f"Bearer {secret.group(1)}"})
    assert refused.status_code == 401
    await http.aclose()


async def test_disabling_a_model_reapplies_it_disabled_and_enabling_brings_it_back(
    stack: Stack, sources: Path
) -> None:
    asset_id = uid("ui-toggle")
    await stack.apply({**tiny_documents(sources)[1], "asset_id": asset_id})
    actions = ModelActions(stack.jobs.stub, lambda: stack.registry.stub)
    assert (await actions.toggle("disable", asset_id)).spec.lifecycle.desired == 3
    http, _ = await ui_session(stack, stack.admin_key)
    page = await http.get("/ui/models")
    assert re.search(rf'data-asset="{asset_id}" data-state="disabled"', page.text), page.text
    assert (await actions.toggle("enable", asset_id)).spec.lifecycle.desired == 1  # on-demand
    page = await http.get("/ui/models")
    state = re.search(rf'data-asset="{asset_id}" data-state="([a-z_]+)"', page.text)
    assert state is not None and state.group(1) != "disabled", page.text
    await http.aclose()


async def test_routes_workers_and_operations_pages_show_splits_memory_and_history(
    stack: Stack, sources: Path
) -> None:
    other, route = uid("ui-other"), uid("ui-route")
    await stack.apply(
        {"asset_id": other, "interface": "llm-runtime", "source": {"kind": "path", "path": str(sources / TINY_CHAT)}},
        {"asset_id": route, "class": "route", "interface": "llm-runtime",
         "targets": [{"asset": TINY_CHAT, "weight": 3}, {"asset": other, "weight": 1}],
         "shadow": [{"asset": other, "sample": 0.5}]})
    http, csrf = await ui_session(stack, stack.admin_key)
    routes = await http.get("/ui/routes")
    assert routes.status_code == 200
    section = routes.text[routes.text.index(f'data-route="{route}"'):]
    assert f"{TINY_CHAT} 75%" in section and f"{other} 25%" in section
    assert f'data-shadow="{other}"' in section and "50%" in section

    queued = await http.post(f"/ui/models/{other}/load", headers={"X-CSRF-Token": csrf})
    assert queued.status_code == 200 and f"load of {other} queued" in queued.text
    operations = await http.get("/ui/operations")
    assert re.search(rf"<td data-label=\"Model\">{other}</td>", operations.text), operations.text
    workers = await http.get("/ui/workers")
    assert workers.status_code == 200
    assert workers.text.count('class="membar"') == len(stack.workers)
    assert re.search(r'aria-valuemax="[1-9][0-9]*"', workers.text)
    await http.aclose()


@needs_chromium
async def test_the_event_log_shows_events_as_they_happen(stack: Stack, browser: Browser, sources: Path) -> None:
    await browser.log_in(stack.admin_key or "")
    await browser.open("/ui/events")
    await browser.until("return document.querySelector('#event-log') !== null")
    await browser.until("return document.getElementById('live-status').textContent === 'live'")
    asset_id = uid("ui-logged")
    await stack.apply({"asset_id": asset_id, "interface": "embedding-runtime",
                       "source": {"kind": "path", "path": str(sources / TINY_EMBED)}})
    line = await browser.until(
        "return [...document.querySelectorAll('#event-log li')].map(li => li.textContent)"
        ".find(text => text.includes(arguments[0]))", asset_id)
    assert "asset.applied" in line
    await browser.screenshot("events")


@needs_chromium
async def test_both_groups_and_an_unload_turning_the_chat_model_to_sleeping_without_a_reload(
    stack: Stack, browser: Browser
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=stack.admin_key,
                                  max_retries=0) as client:
        await client.chat.completions.create(model=TINY_CHAT, max_tokens=3,
                                             messages=[{"role": "user", "content": "hi"}])
        await client.embeddings.create(model=TINY_EMBED, input=["hi"])
    await browser.log_in(stack.admin_key or "")
    assert await browser.script("return location.pathname") == "/ui/models"
    groups = await browser.script(
        "return [...document.querySelectorAll('section.model-group')].map("
        "s => [s.querySelector('h2').textContent.trim(), [...s.querySelectorAll('tr[data-asset]')]"
        ".map(r => r.dataset.asset)])")
    assert [g[0].split(" (")[0] for g in groups] == ["Language models", "Embedding models"]
    assert TINY_CHAT in groups[0][1] and TINY_EMBED in groups[1][1]
    for loaded in (TINY_CHAT, TINY_EMBED):
        await browser.until(f"return {ROW}.dataset.state === 'loaded'", loaded)
    await browser.screenshot("models-loaded")
    if target := os.environ.get("ROUNDHOUSE_UI_DOCS_SCREENSHOT"):
        shutil.copyfile(await browser.screenshot("docs"), target)

    await browser.script("window.notReloaded = true")
    await browser.click(TINY_CHAT, "button.action-unload")
    await browser.until(f"return {ROW}.dataset.state === 'sleeping'", TINY_CHAT)
    assert await browser.script("return window.notReloaded === true")
    await browser.screenshot("models-unloaded")

    await browser.run(browser.driver.set_window_size, 390, 844)  # a phone
    try:
        await browser.open("/ui/models")
        assert await browser.script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        await browser.screenshot("models-phone")
    finally:
        await browser.run(browser.driver.set_window_size, 1280, 1000)


@needs_chromium
async def test_an_install_shows_its_progress_bar_reaching_100(stack: Stack, browser: Browser, sources: Path) -> None:
    await browser.log_in(stack.admin_key or "")
    asset_id = uid("ui-install")
    folder = copy_model(sources / TINY_CHAT, sources, asset_id)
    spec = parse_spec({"asset_id": asset_id, "interface": "llm-runtime",
                       "source": {"kind": "path", "path": str(folder)}}, source_roots=[sources])
    await browser.script("window.notReloaded = true")
    await stack.registry.stub.ApplyAssets(registry_pb2.ApplyAssetsRequest(
        assets=[registry_pb2.AssetApply(spec=spec_to_proto(spec))]))
    await browser.until(f"return {ROW} && {ROW}.dataset.state === 'not_installed'", asset_id)

    await browser.click(asset_id, "button.action-install")
    await browser.until(f"return {ROW}.querySelector('progress') !== null", asset_id)
    await browser.until(f"const bar = {ROW}.querySelector('progress');"
                        "return bar.value === 100 && bar.closest('.operation').dataset.status === 'succeeded'",
                        asset_id)
    await browser.until(f"return {ROW}.dataset.state === 'sleeping'", asset_id)
    assert await browser.script("return window.notReloaded === true")
    await browser.screenshot("install-done")
    assert [o["status"] for o in await operations_of(stack, asset_id)] == ["succeeded"]


@needs_chromium
async def test_the_usage_chart_counts_a_request_made_through_the_api(stack: Stack, browser: Browser) -> None:
    # A key of the test's own, charted by key: no other test's requests count in its chart.
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        secret, name = await new_key(admin, "ui-usage")
    await browser.log_in(stack.admin_key or "")
    chart = "document.querySelector(`figure[data-group='${arguments[0]}']`)"
    await browser.open("/ui/usage?by=key&window=1h")
    assert await browser.script(f"return {chart}", name) is None
    hint = await browser.script("return document.querySelector('#usage .hint').textContent")
    assert "press Show" in hint
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=secret,
                                  max_retries=0) as client:
        await client.embeddings.create(model=TINY_EMBED, input=["count me"])

    await browser.open("/ui/usage?by=key&window=1h")  # what the Show button submits
    assert await browser.script(f"return {chart}.dataset.requests", name) == "1"
    assert await browser.script(f"return {chart}.querySelector('.requests').textContent", name) == "1"
    bars = await browser.script(f"return [...{chart}.querySelectorAll('rect.bar')]"
                                ".filter(b => b.getAttribute('height') !== '0.0').length", name)
    assert bars == 1
    await browser.screenshot("usage")


async def feed_lines(http: httpx.AsyncClient, opened: asyncio.Event) -> list[str]:
    """Every line of the UI's live feed until it ends; `opened` is set once it is connected."""
    lines = []
    async with http.stream("GET", "/ui/events/feed") as feed:
        assert feed.status_code == 200 and feed.headers["content-type"].startswith("text/event-stream")
        async for line in feed.aiter_lines():
            lines.append(line)
            if line == ": connected":
                opened.set()
    return lines


async def test_logging_out_ends_the_live_feed(stack: Stack) -> None:
    http, csrf = await ui_session(stack, stack.admin_key)
    cookie = http.cookies.get("rh_ui_session")
    opened = asyncio.Event()
    async with asyncio.timeout(WAIT_S):
        feed = asyncio.create_task(feed_lines(http, opened))
        await opened.wait()
        logged_out = await http.post("/ui/logout", data={"csrf_token": csrf})
        assert logged_out.status_code == 303 and logged_out.headers["location"] == "/ui/login"
        assert (await feed)[0] == ": connected"
    http.cookies.set("rh_ui_session", cookie or "", path="/ui")
    assert (await http.get("/ui/events/feed")).status_code == 403
    await http.aclose()


async def test_revoking_the_sessions_key_through_the_admin_api_ends_its_feed(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=f"{stack.http_url}/admin/v1", headers=stack.admin_headers) as admin:
        name = uid("ui-admin")
        created = await admin.post("/keys", json={"name": name, "admin": True})
        assert created.status_code == 201, created.text
        http, _ = await ui_session(stack, created.json()["key"])
        opened = asyncio.Event()
        async with asyncio.timeout(WAIT_S):
            feed = asyncio.create_task(feed_lines(http, opened))
            await opened.wait()
            assert (await admin.delete(f"/keys/{name}")).status_code in (200, 204)
            await feed
    assert (await http.get("/ui/models")).headers.get("location") == "/ui/login"
    await http.aclose()


async def test_ui_pages_may_not_be_framed_and_run_only_their_own_scripts(stack: Stack) -> None:
    http, _ = await ui_session(stack, stack.admin_key)
    for path in ("/ui/login", "/ui/models", "/ui/fragments/models", "/ui/static/ui.js"):
        reply = await http.get(path)
        assert reply.status_code == 200, (path, reply.text)
        policy = reply.headers["content-security-policy"]
        assert reply.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in policy and "script-src 'self';" in policy
    await http.aclose()
    async with httpx.AsyncClient(base_url=stack.http_url) as plain:
        refused = await plain.get("/ui/fragments/models")
        assert refused.status_code == 403 and refused.headers["x-frame-options"] == "DENY"


def test_a_session_shows_none_of_its_credentials() -> None:
    session = UiSession("the-session-id", "rh-the-admin-secret", "the-csrf-token", None, 0.0)
    shown = repr(session)
    assert "UiSession(" in shown
    assert not any(secret in shown for secret in ("the-session-id", "rh-the-admin-secret", "the-csrf-token"))


async def test_pages_share_one_refresh_per_change() -> None:
    pictures = PictureRefresh()
    refreshes = 0
    started, release = asyncio.Event(), asyncio.Event()

    async def refresh() -> None:
        nonlocal refreshes
        refreshes += 1
        started.set()
        await release.wait()

    tabs = [asyncio.create_task(pictures.current(refresh)) for _ in range(5)]
    await started.wait()  # every tab asked before the refresh began
    release.set()
    await asyncio.gather(*tabs)
    assert refreshes == 1
    await pictures.current(refresh)
    assert refreshes == 1  # nothing changed since

    started.clear()
    release.clear()
    pictures.changed()
    first = asyncio.create_task(pictures.current(refresh))
    await started.wait()
    pictures.changed()  # during that refresh, which may have read the state before it
    second = asyncio.create_task(pictures.current(refresh))
    release.set()
    await asyncio.gather(first, second)
    assert refreshes == 3


async def test_the_feed_ends_when_the_router_begins_to_drain() -> None:
    drain, sessions = Drain(), UiSessions(None)
    feed = EventFeed(template_environment(), drain, PictureRefresh(), heartbeat_s=3600)
    stream = feed.stream(None, await sessions.open(""), sessions)
    assert await anext(stream) == ": connected\n\n"
    following = asyncio.ensure_future(anext(stream))
    drain.begin()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(following, WAIT_S)
