"""A real headless Chromium for the status pages' tests (hostd's and headquarters').

Rules this module keeps:
- the browser is Debian's: /usr/bin/chromium driven by /usr/bin/chromedriver through Selenium;
  never a browser build downloaded by a driver manager (Selenium Manager is never asked: the
  driver and the browser are both named);
- a machine without them gets them: once per test session, under a lock that other test runs on
  the machine share, `apt-get update` and `apt-get install -y --no-install-recommends chromium
  chromium-driver fonts-wqy-microhei` (CI runs as root on a clean Debian; the font so that
  screenshots show Chinese); the time it took is printed. When that is
  not possible the test FAILS with one line naming the packages: a page test is never skipped;
- each test gets a fresh browser with its own --user-data-dir under its tmp dir (no cookies or
  cache from another test), closed when the test ends;
- screenshot() saves a PNG under the test's tmp dir and copies it to SCREENS (a stable path,
  printed) for a person to look at.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# a CJK font too: verdicts and card titles are Chinese, and a screenshot of boxes helps no one
CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")
PACKAGES = ("chromium", "chromium-driver", "fonts-wqy-microhei")
SCREENS = Path("/tmp/hexiao-screens")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")  # a container's /dev/shm is small: Chromium would crash
_LOCK = Path("/tmp/hexiao-chromium-install.lock")
_APT_TIMEOUT_S = 1200  # a guard against a hung mirror, never a performance claim
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def _missing() -> list[Path]:
    return [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)] + (
        [] if CJK_FONT.is_file() else [CJK_FONT])


def _fail(why: str) -> None:
    pytest.fail(f"the page tests need Debian's {', '.join(PACKAGES)} "
                f"(apt-get install {' '.join(PACKAGES)}): {why}", pytrace=False)


def _apt(*args: str) -> None:
    # another apt (or another test run's install) may hold dpkg's lock: wait for it, bounded
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_APT_TIMEOUT_S,
                              env={**os.environ, **_APT_ENV}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        _fail(f"`{' '.join(argv)}` could not run: {e}")
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        _fail(f"`apt-get {' '.join(args)}` exited {done.returncode}: {last[0]}")


def ensure_chromium() -> float | None:
    """Install Debian's chromium and chromium-driver if they are missing; the seconds the install
    took, or None when they were there already. Fails the test when it cannot."""
    if not _missing():
        return None
    if shutil.which("apt-get") is None:
        _fail("this machine has no apt-get")
    if os.geteuid() != 0:
        _fail("installing them needs root")
    _LOCK.touch(exist_ok=True)
    with _LOCK.open() as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time on this machine
        if not _missing():  # another test run installed them while we waited
            return None
        t = time.monotonic()
        _apt("update")
        _apt("install", "-y", "--no-install-recommends", *PACKAGES)
        took = time.monotonic() - t
    if _missing():
        _fail(f"still missing after the install: {', '.join(map(str, _missing()))}")
    print(f"\ninstalled {' '.join(PACKAGES)} in {took:.0f} s")
    return took


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed if missing (once per session); its path."""
    ensure_chromium()
    return CHROMIUM


@pytest.fixture
def browser(chromium: Path, tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium (selenium.webdriver.Chrome) for one test."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    for flag in (*FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console_errors()
    try:
        driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    except WebDriverException as e:
        _fail(f"chromedriver could not start Chromium: {e.msg}")
    try:
        yield driver
    finally:
        with contextlib.suppress(WebDriverException):
            driver.quit()


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """The page as the browser shows it, its whole height (Chromium's DevTools capture beyond
    the window): saved under tmp_path and copied to SCREENS/name (printed); the stable copy's
    path is returned."""
    width = driver.execute_script("return document.documentElement.clientWidth")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    png = tmp_path / name
    png.write_bytes(base64.b64decode(shot["data"]))
    if png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        pytest.fail(f"the browser saved no PNG to {png}", pytrace=False)
    SCREENS.mkdir(exist_ok=True)
    stable = SCREENS / name
    shutil.copyfile(png, stable)
    print(f"\nscreenshot ({width} px wide): {stable}")
    return stable


@contextlib.contextmanager
def small_screen(driver: Any, width: int = 390, height: int = 844) -> Iterator[None]:
    """The page as a phone shows it (Chromium's device emulation: its width, touch, overlay
    scrollbars), back to the desktop window after."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def console_errors(driver: Any) -> list[str]:
    """What the page logged as errors so far (a script error, a CSP violation, a 404)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait_until(driver: Any, ok: Callable[[Any], Any], limit_s: float, what: str) -> Any:
    """Poll the live page (no reload) until ok(driver) is truthy; fail naming `what` after the
    guard limit_s (a guard against a hang, not a timing claim)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, limit_s, poll_frequency=0.1).until(ok)
    except TimeoutException:
        pytest.fail(f"the page never showed {what} (waited {limit_s:.0f} s)", pytrace=False)
