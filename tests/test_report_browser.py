"""The report in a real browser (headless Chromium, ``essa.report.browser``): every image loads, the tables are
there, nothing is wider than an 800 px page, and the screenshot is the whole page. Skipped, with the reason, where no
Chromium is installed (``.ci/run`` installs the Debian package when it can)."""

from __future__ import annotations

import pytest
from PIL import Image

from essa.report import browser
from tests.test_report import report  # noqa: F401  (the fixture: a report of a made-up study with figures)

pytestmark = pytest.mark.skipif(browser.find_browser() is None,
                                reason="no headless Chromium (apt-get install chromium, or set ESSA_CHROMIUM)")


def test_the_report_loads_every_image_shows_its_tables_and_fits_800_px(report):  # noqa: F811
    _, _, paths = report
    measured = browser.measure(paths["html"])
    page = paths["html"].read_text()
    assert len(measured["images"]) == len(paths["figures"]) == page.count("<img ")
    assert all(img["loaded"] and 0 < img["width"] <= browser.PAGE_WIDTH for img in measured["images"])
    assert measured["tables"] == page.count("<table>") > 0
    assert measured["viewport"] == browser.PAGE_WIDTH
    assert browser.problems(measured) == []


def test_the_check_sees_a_broken_image_and_a_table_too_wide(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><p>ok</p><img alt="missing" src="data:image/png;base64,AAAA">'
                    '<table><tr><td><div style="width: 2000px">wide</div></td></tr></table></body></html>')
    measured = browser.measure(page)
    assert measured["tables"] == 1 and measured["page_width"] > 2000
    found = browser.problems(measured)
    assert found[0] == "image 'missing' did not load"
    assert found[1].startswith("the page is ") and found[1].endswith(" px wide in a 800 px window")
    assert found[2:] == ["wider than the page: table: wide"]  # the outermost element only


def test_the_screenshot_is_the_whole_page_800_px_wide(report, tmp_path):  # noqa: F811
    _, _, paths = report
    png = browser.screenshot(paths["html"], tmp_path / "shot" / "report.png")
    height = browser.measure(paths["html"])["page_height"]
    with Image.open(png) as image:
        assert image.size == (browser.PAGE_WIDTH, height)
        assert len(image.convert("L").resize((50, 200)).getcolors(maxcolors=256) or range(257)) > 10  # drawn


def test_a_missing_browser_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ESSA_CHROMIUM", str(tmp_path / "no-such-chromium"))
    assert browser.find_browser() is None
    with pytest.raises(browser.BrowserError, match="no headless Chromium found .*apt-get install chromium"):
        browser.measure(tmp_path / "x.html")
