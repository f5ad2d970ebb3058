"""The report as a reader sees it: ``report.html`` opened in a headless Chromium (the Debian ``chromium`` package,
or ``$ESSA_CHROMIUM``), at a page width, to check that every image loads, the tables are there and nothing is wider
than the page, and to save a screenshot of the whole page (``essa run --screenshot``).

Chromium is driven from its command line only (``--dump-dom``, ``--screenshot``): a copy of the page gets a script
that, once the page has loaded, writes what it measured into the page as JSON, which ``--dump-dom`` returns.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from essa.errors import EssaError, NotFoundError

#: The page width the checks and the screenshot use, in CSS pixels.
PAGE_WIDTH = 800

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Run after the load event: images, tables, and the outermost elements whose right edge passes the viewport.
_PROBE = """
<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const images = [...document.images].map(img => ({alt: img.alt, loaded: img.complete && img.naturalWidth > 0,
                                                    width: img.getBoundingClientRect().width}));
  const passes = el => el.getBoundingClientRect().right > width + 0.5;
  const wide = [...document.body.querySelectorAll("*")]  // the outermost ones: not inside another that passes
    .filter(el => passes(el) && !(el.parentElement && el.parentElement !== document.body && passes(el.parentElement)))
    .map(el => el.tagName.toLowerCase() + (el.textContent ? ": " + el.textContent.trim().slice(0, 60) : ""));
  const out = {viewport: width, page_width: document.documentElement.scrollWidth,
               page_height: document.documentElement.scrollHeight, images: images,
               tables: document.querySelectorAll("table").length, too_wide: wide};
  const pre = document.createElement("pre");
  pre.id = "essa-measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


class BrowserError(EssaError, RuntimeError):
    """No headless browser to open the report with, or it failed."""


def find_browser() -> str | None:
    """The Chromium to use: ``$ESSA_CHROMIUM``, else the first of chromium, chromium-browser, google-chrome on PATH."""
    given = os.environ.get("ESSA_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    return next((found for name in _CANDIDATES if (found := shutil.which(name))), None)


def _browser() -> str:
    found = find_browser()
    if found is None:
        raise BrowserError("no headless Chromium found (looked for $ESSA_CHROMIUM, " + ", ".join(_CANDIDATES)
                           + "); install one, e.g. apt-get install chromium")
    return found


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="essa-chromium-") as profile:
        command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", "--mute-audio", f"--user-data-dir={profile}", *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BrowserError(f"Chromium did not finish within {timeout:.0f} s: {' '.join(command)}") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BrowserError(f"Chromium failed (exit code {done.returncode}): {tail}")
    return done.stdout


def measure(page: str | Path, width: int = PAGE_WIDTH, timeout: float = 120.0) -> dict[str, Any]:
    """Open the HTML file ``page`` in headless Chromium with a ``width``-pixel-wide window and return what it
    measured once loaded: ``viewport`` and ``page_width`` (px; wider than the viewport means a horizontal scroll),
    ``page_height``, ``images`` (``alt``, ``loaded``, ``width`` each), ``tables`` (how many), ``too_wide``
    (the elements whose right edge passes the viewport, by tag and first words)."""
    page = Path(page)
    _browser()
    if not page.is_file():
        raise NotFoundError(f"no page to open at {page}")
    text = page.read_text(encoding="utf-8")
    probed = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory(prefix="essa-page-") as tmp:
        copy = Path(tmp) / page.name  # beside nothing: a self-contained page must not need its folder
        copy.write_text(probed, encoding="utf-8")
        dom = _run([f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom",
                    copy.resolve().as_uri()], timeout)
    found = re.search(r'<pre id="essa-measured">(.*?)</pre>', dom, re.S)
    if found is None:
        raise BrowserError(f"the page {page} did not finish loading in Chromium (no measurement came back)")
    return json.loads(html.unescape(found.group(1)))


def problems(measured: dict[str, Any]) -> list[str]:
    """What is wrong with a page as :func:`measure` saw it, one line each: images that did not load, a page wider
    than its viewport, elements that pass its right edge; empty when nothing is."""
    out = [f"image {img['alt']!r} did not load" for img in measured["images"] if not img["loaded"]]
    if measured["page_width"] > measured["viewport"]:
        out.append(f"the page is {measured['page_width']} px wide in a {measured['viewport']} px window")
    out += [f"wider than the page: {what}" for what in measured["too_wide"]]
    return out


def screenshot(page: str | Path, png: str | Path, width: int = PAGE_WIDTH, timeout: float = 120.0) -> Path:
    """Save the whole of the HTML file ``page`` as a PNG ``width`` pixels wide (its height: the page's)."""
    page, png = Path(page), Path(png)
    height = int(measure(page, width, timeout)["page_height"])
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{max(height, 1)}", "--virtual-time-budget=10000", f"--screenshot={png.resolve()}",
          page.resolve().as_uri()], timeout)
    if not png.is_file():
        raise BrowserError(f"Chromium wrote no screenshot at {png}")
    return png
