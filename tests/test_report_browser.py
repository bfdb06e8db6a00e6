"""The report page opens in a real browser and every image on it loads.

Headless Chromium from Debian (`chromium`, `chromium-driver`; `scripts/install.sh` installs both)
driven by Selenium opens `report.html` from a report built on the fabricated study folder of
`test_report.py`, and reads each `<img>`'s load state from the page itself. Skipped only where
Chromium is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from dmvae_study import report
from tests.test_report import add_derived, make_study, report_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync")
LOAD_TIMEOUT_S = 60
IMAGES_JS = "return Array.from(document.images, im => [im.getAttribute('src'), im.complete, im.naturalWidth, " \
            "im.naturalHeight]);"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (scripts/install.sh installs "
                                "the Debian packages chromium and chromium-driver)")


def _browser(profile: Path) -> Any:
    """Headless Chromium through the Debian chromedriver: both paths given, so Selenium looks up
    and downloads nothing (its driver manager would need the network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    assert Path(CHROMEDRIVER).exists(), f"Chromium is installed but chromedriver is not ({CHROMEDRIVER}): " \
                                        "apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(LOAD_TIMEOUT_S)
    return driver


def _images_after_load(driver: Any) -> list[tuple[str, bool, int, int]]:
    """(src, complete, naturalWidth, naturalHeight) of every `<img>`, once the page and each image
    finished loading or failing (`complete` is true for a broken image too, with width 0)."""
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, LOAD_TIMEOUT_S).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
        and all(done for _, done, _, _ in d.execute_script(IMAGES_JS)))
    return [tuple(im) for im in driver.execute_script(IMAGES_JS)]


def test_every_image_of_the_report_loads_in_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium's driver manager reach for the network
    study = make_study(tmp_path)
    add_derived(study)
    report.build_report(study, max_points=60)
    out = study / "report"
    driver = _browser(tmp_path / "chromium-profile")
    try:
        driver.get((out / "report.html").as_uri())
        images = _images_after_load(driver)
        title, tables = driver.title, driver.execute_script("return document.querySelectorAll('table').length")
        # the check must see a broken image: remove one and reload
        (out / "grids" / "vae_samples.png").rename(tmp_path / "moved.png")
        driver.refresh()
        after_removal = _images_after_load(driver)
    finally:
        driver.quit()

    assert title == "DMVAE study report: table1-smoke"
    assert tables == 2  # Table 1 and the row settings
    assert sorted(src for src, *_ in images) == sorted(report_images())
    broken = [src for src, _, width, height in images if width == 0 or height == 0]
    assert not broken, f"images that did not load in Chromium: {broken}"
    for src, _, width, height in images:
        with Image.open(tmp_path / "moved.png" if src == "grids/vae_samples.png" else out / src) as im:
            assert (width, height) == im.size, src  # the browser decoded the very file
    assert [src for src, _, width, _ in after_removal if width == 0] == ["grids/vae_samples.png"]
