"""The dashboard in a real browser: headless Chromium watches a farm of real processes.

A queue runner (``--builder-timeout 3``) and two builders run as child processes
(``tests/helpers/procs.py``); Debian's Chromium (``scripts/system-deps.sh`` installs it) is driven
through Playwright's sync API, launched with ``executable_path`` at the system browser (Playwright
never downloads one here). The page is loaded once and never reloaded: everything the test sees
arrives through the dashboard's own polling.

Playwright's sync API must be called from the thread that started it, so every browser call
runs on one dedicated worker thread (``Browser``); the farm stays in trio.  Every wait is
bounded: Playwright's ``expect`` retries a DOM condition until ``WAIT_MS``.

The test saves a screenshot of the overview (two machines, one of them killed; one build
running, one queued; succeeded and failed builds) to ``$HYDRA_TRIO_SCREENSHOT`` when that is
set (``HYDRA_TRIO_SCREENSHOT=docs/dashboard.png`` regenerates the README's picture; a relative
path is taken from the current directory), and to the test's tmp_path otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio

from .helpers.procs import RealFarm, real_farm

pytestmark = pytest.mark.realnet

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (scripts/system-deps.sh installs Debian's chromium): "
        "skipped the dashboard browser test",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
expect = sync_api.expect

T = TypeVar("T")

#: The runner's --builder-timeout.
BUILDER_TIMEOUT = 3.0
#: A generous bound on the whole test (it takes about 12 s).
TEST_TIMEOUT = 90.0
#: Milliseconds a DOM condition may take to hold: the page polls the API every second.
WAIT_MS = 15_000
#: The browser window, and so the screenshot.
VIEWPORT = {"width": 1280, "height": 800}
#: Where to save the screenshot instead of tmp_path (``docs/dashboard.png`` for the README).
SCREENSHOT_ENV = "HYDRA_TRIO_SCREENSHOT"
#: Seconds given to closing the browser, even when the test is being cancelled.
CLOSE_GRACE = 10.0


@attrs.define(eq=False)
class Browser:
    """One headless Chromium page; ``await browser(fn)`` runs ``fn(page)`` on the browser's
    thread (Playwright's sync objects belong to the thread that created them).

    ``problems`` collects the page's uncaught exceptions and console errors (a refused fetch,
    a Content-Security-Policy violation)."""

    executor: ThreadPoolExecutor
    page: Any
    problems: list[str]

    async def __call__(self, fn: Callable[[Any], T]) -> T:
        # Not abandoned on cancellation: each call is bounded by WAIT_MS, and the browser must
        # not be used from two threads at once.
        return await trio.to_thread.run_sync(self.executor.submit(fn, self.page).result)


@contextlib.asynccontextmanager
async def open_browser(executable: str) -> AsyncIterator[Browser]:
    """Start Playwright's driver and the system Chromium; both are closed when the block
    exits, however it exits (under a shielded ``CLOSE_GRACE``)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")

    async def on_thread(fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(executor.submit(fn).result)

    problems: list[str] = []

    def launch() -> tuple[Any, Any]:
        playwright = sync_api.sync_playwright().start()
        try:
            chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        except BaseException:
            playwright.stop()
            raise
        return playwright, chromium

    def new_page(chromium: Any) -> Any:
        page = chromium.new_page(viewport=VIEWPORT, color_scheme="light")
        page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
        page.on(
            "console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        return page

    def close(playwright: Any, chromium: Any) -> None:
        try:
            chromium.close()
        finally:
            playwright.stop()

    try:
        playwright, chromium = await on_thread(launch)
        try:
            page = await on_thread(lambda: new_page(chromium))
            yield Browser(executor=executor, page=page, problems=problems)
        finally:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await on_thread(lambda: close(playwright, chromium))
    finally:
        executor.shutdown(wait=False)


# -- what the page shows, as bounded DOM waits (each runs on the browser's thread) ----------


def machine_badge(hostname: str, state: str | re.Pattern[str]) -> Callable[[Any], None]:
    """The machines table lists ``hostname`` with the state badge ``state``."""

    def check(page: Any) -> None:
        row = page.locator("#machines tr").filter(has=page.get_by_text(hostname, exact=True))
        expect(row.locator(".badge")).to_have_text(state, timeout=WAIT_MS)

    return check


def build_row(
    section: str, build_id: str, badge: str | re.Pattern[str], detail: str | re.Pattern[str]
) -> Callable[[Any], None]:
    """The list ``#section`` (running, queued or recent) shows the build with that badge and
    detail text."""

    def check(page: Any) -> None:
        row = page.locator(f'#{section} a[href="#build/{build_id}"]')
        expect(row.locator(".badge")).to_have_text(badge, timeout=WAIT_MS)
        expect(row.locator(".c-detail")).to_have_text(detail, timeout=WAIT_MS)

    return check


def no_build_row(section: str, build_id: str) -> Callable[[Any], None]:
    def check(page: Any) -> None:
        row = page.locator(f'#{section} a[href="#build/{build_id}"]')
        expect(row).to_have_count(0, timeout=WAIT_MS)

    return check


def text_of(selector: str, text: str | re.Pattern[str]) -> Callable[[Any], None]:
    def check(page: Any) -> None:
        expect(page.locator(selector)).to_have_text(text, timeout=WAIT_MS)

    return check


def no_escapes(page: Any) -> None:
    """The rendered text holds no ``\\uXXXX`` sequence (an escape written where HTML, not
    JavaScript, reads it shows up literally, as ``\\u2190 All builds`` once did)."""
    text = page.locator("body").inner_text() + page.title()
    assert re.search(r"\\u[0-9a-fA-F]{4}", text) is None, text


def click(selector: str) -> Callable[[Any], None]:
    def act(page: Any) -> None:
        page.locator(selector).click(timeout=WAIT_MS)

    return act


def twice(selector: str) -> Callable[[Any], None]:
    """Click a button that asks for a second click to confirm, and confirm."""

    def act(page: Any) -> None:
        button = page.locator(selector)
        button.click(timeout=WAIT_MS)
        expect(button).to_have_text(re.compile("Click again"), timeout=WAIT_MS)
        button.click(timeout=WAIT_MS)

    return act


def no_undrain_button(hostname: str) -> Callable[[Any], None]:
    def check(page: Any) -> None:
        row = page.locator("#machines tr").filter(has=page.get_by_text(hostname, exact=True))
        expect(row.get_by_role("button", name="Undrain")).to_have_count(0, timeout=WAIT_MS)

    return check


def rows(section: str, count: int) -> Callable[[Any], None]:
    def check(page: Any) -> None:
        expect(page.locator(f"#{section} li")).to_have_count(count, timeout=WAIT_MS)

    return check


# -- builds -------------------------------------------------------------------------------


def gated(gate: Path, then: str) -> list[str]:
    """A command that waits for ``gate`` to exist, then runs ``then`` (it gives up after 30 s,
    so an orphaned one ends by itself)."""
    script = f'for i in $(seq 300); do [ -e "$0" ] && {{ {then}; exit; }}; sleep 0.1; done; exit 9'
    return ["sh", "-c", script, str(gate)]


async def submit(farm: RealFarm, name: str, command: list[str]) -> str:
    response = await farm.client.post(f"{farm.url}/builds", json={"name": name, "command": command})
    assert response.status_code == 201, response.text
    build_id: str = response.json()["id"]
    return build_id


async def running_on(farm: RealFarm, build_id: str) -> str:
    """The hostname the API says runs the build, once it does."""
    with trio.fail_after(10):
        build = await farm.wait_build(build_id, "running", lambda b: b["state"] == "running")
    hostname: str = build["machine"]
    return hostname


def screenshot_path(tmp_path: Path) -> Path:
    return Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")


async def test_the_dashboard_shows_builds_run_and_a_killed_builder_live(tmp_path: Path) -> None:
    """Without a reload, the page shows a build appear, run and succeed, failed and queued
    builds, and a SIGKILLed builder turn disconnected; it raises no error meanwhile."""
    assert CHROMIUM is not None
    with trio.fail_after(TEST_TIMEOUT):
        async with real_farm(tmp_path) as farm, open_browser(CHROMIUM) as browser:
            await farm.start_runner(builder_timeout=BUILDER_TIMEOUT)
            builders = {name: await farm.start_builder(name) for name in ("bA", "bB")}

            await browser(lambda page: page.goto(f"{farm.url}/"))
            # Gone if the page is ever reloaded or navigated away from.
            await browser(lambda page: page.evaluate("window.__loadedOnce = true"))
            await browser(text_of("#conn", "live"))
            for name in builders:
                await browser(machine_badge(name, "connected"))
            await browser(text_of("#n-machines", "(2 connected)"))
            await browser(text_of("#machines tr:first-child td:nth-child(7)", re.compile("^load ")))
            await browser(no_escapes)

            # A build appears, runs (held on a gate file until the page has seen it running)
            # and succeeds.
            gate = tmp_path / "gate-hello"
            hello = await submit(farm, "hello", gated(gate, "echo hello > $OUT/greeting"))
            await browser(
                text_of(
                    f'#queued a[href="#build/{hello}"], #running a[href="#build/{hello}"]',
                    re.compile(hello),
                )
            )
            holder = await running_on(farm, hello)
            await browser(
                build_row("running", hello, re.compile("building|running"), f"on {holder}")
            )
            gate.touch()
            await browser(build_row("recent", hello, "success", f"on {holder}"))
            await browser(no_build_row("running", hello))

            # More finished builds, one of them failed.
            docs = await submit(farm, "docs", ["sh", "-c", "uname -a > $OUT/uname.txt"])
            sums = await submit(
                farm, "checksums", ["sh", "-c", "sha256sum /etc/os-release > $OUT/SHA256SUMS"]
            )
            tests = await submit(
                farm, "unit-tests", ["sh", "-c", 'echo "1 failed, 41 passed" >&2; exit 1']
            )
            for build_id in (docs, sums):
                await browser(build_row("recent", build_id, "success", re.compile("^on b[AB]$")))
            await browser(
                build_row(
                    "recent", tests, "build-failed", re.compile(r"^on b[AB] · .*exit (status )?1$")
                )
            )
            await browser(text_of("#n-recent", "(4)"))

            # The build page, reached and left without a reload, shows what it must.
            await browser(click(f'#recent a[href="#build/{tests}"]'))
            await browser(text_of("#b-title", re.compile("unit-tests")))
            await browser(no_escapes)
            await browser(text_of("#buildview p a", "\u2190 All builds"))
            await browser(click("#buildview p a"))
            await browser(text_of("#n-recent", "(4)"))

            # The state filter keeps the failed build only.
            await browser(lambda page: page.select_option("#f-state", "failed"))
            await browser(rows("recent", 1))
            await browser(build_row("recent", tests, "build-failed", re.compile("exit")))
            await browser(lambda page: page.select_option("#f-state", "succeeded,failed,cancelled"))
            await browser(rows("recent", 4))

            # A killed builder turns disconnected on the page.
            builders["bB"].signal(signal.SIGKILL)
            await browser(machine_badge("bB", "disconnected"))
            await browser(text_of("#n-machines", "(1 connected, 1 disconnected)"))

            # One running build holds bA's only slot, so the next one waits in the queue.
            release_gate = tmp_path / "gate-release"
            release = await submit(farm, "release", gated(release_gate, "echo v1.0 > $OUT/version"))
            assert await running_on(farm, release) == "bA"
            publish = await submit(farm, "publish", ["sh", "-c", "echo done > $OUT/receipt"])
            await browser(build_row("running", release, re.compile("building|running"), "on bA"))
            await browser(
                build_row("queued", publish, "queued", re.compile("waiting for a free job slot"))
            )
            await browser(
                text_of("#counts", re.compile("queued 1.*running 1.*succeeded 3.*failed 1"))
            )

            path = screenshot_path(tmp_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            await browser(lambda page: page.screenshot(path=str(path)))
            assert path.stat().st_size > 10_000, "an empty screenshot"

            # The queued build runs once the slot is free, still without a reload.
            release_gate.touch()
            await browser(build_row("recent", release, "success", "on bA"))
            await browser(build_row("recent", publish, "success", "on bA"))

            # Cancel from the build's page: a queued build (no machine has its system).
            stuck = await farm.client.post(
                f"{farm.url}/builds",
                json={"name": "stuck", "command": ["true"], "system": "pdp11-unix"},
            )
            stuck_id = stuck.json()["id"]
            await browser(lambda page: page.evaluate(f"location.hash = '#build/{stuck_id}'"))
            await browser(text_of("#b-title", re.compile("stuck")))
            await browser(twice("#b-cancel"))
            await browser(text_of("#b-title .badge", "cancelled"))
            assert (await farm.client.get(f"{farm.url}/builds/{stuck_id}")).json()[
                "state"
            ] == "cancelled"
            await browser(click("#buildview p a"))

            # The search box finds a build by its name.
            await browser(lambda page: page.fill("#f-text", "checksums"))
            await browser(rows("recent", 1))
            await browser(build_row("recent", sums, "success", re.compile("^on b[AB]$")))
            await browser(lambda page: page.fill("#f-text", ""))
            await browser(rows("recent", 7))  # the cancelled build is finished too

            # Pages of 50: 55 builds no machine can run, newest first.
            for i in range(55):
                response = await farm.client.post(
                    f"{farm.url}/builds",
                    json={"name": f"bulk-{i}", "command": ["true"], "system": "pdp11-unix"},
                )
                assert response.status_code == 201
            await browser(lambda page: page.select_option("#f-state", "queued"))
            await browser(rows("recent", 50))
            await browser(text_of("#n-recent", "(newest 50 of 55)"))
            await browser(text_of("#recent li:first-child .c-what", re.compile("^bulk-54")))
            await browser(click("#page-older"))
            await browser(rows("recent", 5))
            await browser(text_of("#n-recent", "(51\u201355 of 55)"))
            await browser(text_of("#recent li:last-child .c-what", re.compile("^bulk-0")))
            await browser(click("#page-newer"))
            await browser(rows("recent", 50))

            # Drain from the machines table: bA leaves once idle, and the runner remembers
            # the drain until the Undrain button is pressed.
            await browser(twice("#machines tr:has-text('bA') button"))
            await browser(machine_badge("bA", re.compile("draining|disconnected")))
            await browser(text_of("#machines tr:has-text('bA') button", "Undrain"))
            await browser(click("#machines tr:has-text('bA') button"))
            await browser(no_undrain_button("bA"))
            status = (await farm.client.get(f"{farm.url}/status")).json()
            assert not any(m["drainRequested"] for m in status["machines"])

            # A graph's builds are shown as a group (queued: no machine has their system).
            graph = await farm.client.post(
                f"{farm.url}/builds",
                json={
                    "builds": [
                        {"name": "g-compile", "command": ["true"], "system": "pdp11-unix"},
                        {
                            "name": "g-test",
                            "command": ["true"],
                            "system": "pdp11-unix",
                            "after": ["g-compile"],
                        },
                    ]
                },
            )
            assert graph.status_code == 201, graph.text
            await browser(
                text_of(
                    "#recent li.group",
                    re.compile("^graph of 2 builds: g-compile, g-test +2 queued$"),
                )
            )
            await browser(rows("recent", 51))  # the header, then the page's 50 builds
            await browser(
                lambda page: expect(page.locator("#recent li.in-group")).to_have_count(
                    2, timeout=WAIT_MS
                )
            )

            assert await browser(lambda page: page.evaluate("window.__loadedOnce === true"))
            assert browser.problems == []


#: The size the dashboard must stay usable at (issue 20).
BIG_MACHINES = 2_000
BIG_BUILDS = 100_000


def big_farm() -> Any:
    """2,000 known machines and 100,000 builds: 30,000 cancelled, the rest queued."""
    from hydra_trio.runner.farm import Farm
    from hydra_trio.runner.model import BuildSpec, Machine

    farm = Farm()
    for i in range(BIG_MACHINES):
        farm.registry.machines[f"m-{i:05}"] = Machine(
            machine_id=f"m-{i:05}",
            hostname=f"builder-{i:05}",
            systems=("x86_64-linux",),
            supported_features=frozenset(),
            mandatory_features=frozenset(),
            max_jobs=4,
            speed_factor=1.0,
        )
    for i in range(BIG_BUILDS):
        farm.submit(
            BuildSpec(command=("make", f"part-{i}"), name=f"part-{i}", system="x86_64-linux"), 0.0
        )
    for build_id in list(farm.builds)[: BIG_BUILDS * 3 // 10]:
        farm.cancel(build_id, 0.0)
    return farm


def first_render_ms(url: str) -> Callable[[Any], float]:
    """Load the page; once every machine row and each list is there, the milliseconds since
    the navigation started."""

    def measure(page: Any) -> float:
        page.goto(url)
        # Checked in the page on every animation frame, so the time is the render's own
        # (the page's policy forbids Playwright's wait_for_function: it evaluates a string).
        done = (
            f"document.querySelectorAll('#machines tr').length === {BIG_MACHINES}"
            " && document.querySelectorAll('#queued li').length === 50"
            " && document.querySelectorAll('#recent li').length === 50"
        )
        elapsed: float = page.evaluate(
            "() => new Promise((resolve) => { const check = () => (" + done + ")"
            " ? resolve(performance.now()) : requestAnimationFrame(check); check(); })"
        )
        return elapsed

    return measure


async def test_the_dashboard_renders_two_thousand_machines_and_100000_builds(
    tmp_path: Path,
) -> None:
    """A runner's API (in-process, real HTTP) with 2,000 machines and 100,000 builds: the page
    shows every machine, the queued and the finished lists, pages through the finished ones
    and raises no error.  Prints how long the first render took (a figure, not a bound)."""
    import functools
    import time

    from hypercorn.config import Config
    from hypercorn.trio import serve

    from hydra_trio.runner.blobs import Storage
    from hydra_trio.runner.http import create_app

    assert CHROMIUM is not None
    started = time.perf_counter()
    farm = await trio.to_thread.run_sync(big_farm)
    filled = time.perf_counter() - started
    app = create_app(farm, Storage.in_dir(tmp_path), default_system="x86_64-linux")
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    with trio.fail_after(TEST_TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
            async with open_browser(CHROMIUM) as browser:
                render = await browser(first_render_ms(url + "/"))
                await browser(text_of("#n-recent", "(newest 50 of 30000)"))
                await browser(click("#page-older"))
                await browser(text_of("#n-recent", "(51\u2013100 of 30000)"))
                await browser(no_escapes)
                assert browser.problems == []
            nursery.cancel_scope.cancel()
    print(
        f"\n{BIG_MACHINES} machines, {BIG_BUILDS} builds (made in {filled:.1f} s): "
        f"first render {render:.0f} ms after navigation"
    )
