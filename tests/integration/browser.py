"""A real browser on a written page: Debian's headless Chromium loads a folder served by ``http.server``
on loopback, and a checker page served beside it (same origin, nothing written into the folder) opens the
page in an iframe, waits for it to load, reads every image's naturalWidth, fetches every link and writes
what it found as JSON into its own DOM, which ``chromium --dump-dom`` prints."""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

CHROMIUM = "/usr/bin/chromium"
CHECKER_PATH = "/__report_checker__.html"
"""Served from memory beside the folder (no file of that name is ever read from it)."""
MARK = "REPORT-CHECK"
CHECKER = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<iframe id="page" style="width:1200px;height:800px"></iframe><pre id="result"></pre>
<script>
const CONFIG = __CONFIG__;
const frame = document.getElementById("page");
frame.addEventListener("load", async () => {
  const doc = frame.contentDocument;
  const images = Array.from(doc.images).map(img => ({id: img.id, alt: img.alt, complete: img.complete,
                                                      width: img.naturalWidth, height: img.naturalHeight}));
  const links = [];
  for (const a of doc.querySelectorAll("a[href]")) {
    const url = new URL(a.getAttribute("href"), frame.contentWindow.location.href);
    let status = null;
    try {
      const response = await fetch(url);
      status = response.status;
      await response.arrayBuffer();
    } catch (err) {
      status = String(err);
    }
    links.push({href: a.getAttribute("href"), url: url.href, same_origin: url.origin === location.origin, status});
  }
  const texts = {}, before = {};
  for (const el of doc.querySelectorAll("[id]")) texts[el.id] = el.textContent;
  for (const id of CONFIG.ids) {
    const el = doc.getElementById(id);
    before[id] = el === null ? null : Array.from(doc.querySelectorAll("table, img")).filter(
        other => other.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING).length;
  }
  const found = {images, links, texts, tables_before: before};
  document.getElementById("result").textContent = CONFIG.mark + JSON.stringify(found) + CONFIG.mark;
});
frame.src = CONFIG.page;
</script></body></html>"""


def find_chromium() -> tuple[str | None, str]:
    """(Chromium's path, or None with the reason it is not there). Installs Debian's ``chromium`` once
    with apt-get when it is missing and this process is root (``apt-get update`` first if that fails)."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, f"no Chromium at {CHROMIUM} and no apt-get to install it"
    if os.geteuid() != 0:
        return None, f"no Chromium at {CHROMIUM}; install it (apt-get install chromium) as root"
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not Path(CHROMIUM).is_file():
        return None, f"apt-get install chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    return CHROMIUM, ""


class _Folder(SimpleHTTPRequestHandler):
    checker = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] == CHECKER_PATH:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(self.checker)))
            self.end_headers()
            self.wfile.write(self.checker)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@contextmanager
def serve(folder: Path, checker: str) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 (a real ``http.server`` in a thread), the checker page beside it;
    yields the base URL."""
    handler = functools.partial(type("Handler", (_Folder,), {"checker": checker.encode()}), directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Browser:
    """``check(folder, page, ids)``: ``folder/page`` loaded in headless Chromium."""

    def __init__(self, chromium: str):
        self.chromium = chromium

    def check(self, folder: Path, page: str, ids: tuple[str, ...] = ()) -> dict[str, Any]:
        return check_page(self.chromium, folder, page, ids)


def check_page(chromium: str, folder: Path, page: str, ids: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load ``folder/page`` in headless Chromium and report {images: [{id, alt, complete, width, height}],
    links: [{href, url, same_origin, status}], texts: {element id: its text}, tables_before: {each of
    ``ids``: how many tables and images come before it in the page (None: no such element)}}."""
    config = json.dumps({"page": quote(page), "ids": list(ids), "mark": MARK})
    with serve(folder, CHECKER.replace("__CONFIG__", config)) as base:
        done = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--dump-dom",
                               base + CHECKER_PATH], capture_output=True, text=True, timeout=180)
    found = re.search(f"{MARK}({{.*}}){MARK}", done.stdout, re.S)
    if found is None:
        raise AssertionError(f"the checker page reported nothing (chromium exit {done.returncode}):\n"
                             f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(html.unescape(found.group(1)))
