"""Headless Chromium from Debian (``chromium`` + ``chromium-driver``, installed by ``make
test``) driven through Selenium; nothing downloads a browser. Screenshots go to
``test-artefacts/``."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import ROOT

ARTEFACTS = ROOT / "test-artefacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (own profile, no background network), 1400×1000."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: `make test` installs Debian's chromium "
                    "and chromium-driver (apt-get)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (failed loads included)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE"]


def screenshot(driver, name: str) -> None:
    """Save the whole page as ``test-artefacts/<name>.png``."""
    ARTEFACTS.mkdir(exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height, 1000), 6000))
    assert driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))
