"""Headless Chromium for tests and screenshots, driven with Selenium.

Uses Debian's ``chromium`` and the matching ``chromedriver`` (package
``chromium-driver``; ``.ci/run`` installs both when missing), never a downloaded
browser: the driver is given by path, so Selenium Manager never fetches one.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"


def chromium_available() -> bool:
    return bool(shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER))


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 900) -> Iterator["object"]:
    """A Selenium WebDriver of a headless Chromium window of ``width`` x ``height``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM) or CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER) or CHROMEDRIVER),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_png(driver, path: Path) -> Path:
    """Screenshot the whole page (beyond the window), as Chromium's DevTools render it."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot",
                                  {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
