"""Drive the served page in a real headless Chromium over the DevTools protocol, as a person would:
type a prompt and a seed, click Generate, wait for the image, save a screenshot.

    python scripts/browser_page.py http://127.0.0.1:8000/ reports/serve/page.png [--prompt TEXT] [--seed N]

Chromium comes from the Debian packages (`apt-get install -y chromium`); it listens for DevTools
on a loopback port only. Exit status 0 only when the page showed a generated image.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


class Page:
    """The few DevTools calls this check needs, over one websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails'].get('exception', {}).get('description')}")
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                sys.exit(f"page check failed: {what} within {timeout:.0f} s")
            time.sleep(0.1)

    def click(self, selector: str) -> None:
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_into(self, selector: str, text: str) -> None:
        self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("screenshot")
    p.add_argument("--prompt", default="a big yellow circle on the left on a violet background")
    p.add_argument("--seed", default="7")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("page check: no chromium on PATH (apt-get update && apt-get install -y chromium)")
    port, profile = free_port(), tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "--window-size=900,640", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("page check failed: chromium did not open its DevTools port")
            time.sleep(0.2)
        page = Page(pages[0]["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Page.navigate", url=args.url)
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('prompt')", 30, "page load")
        page.type_into("#prompt", args.prompt)
        page.type_into("#seed", args.seed)
        t0 = time.perf_counter()
        page.click("#go")
        page.wait_for("document.getElementById('info').dataset.done === '1' && "
                      "document.getElementById('img').naturalWidth > 0", 60, "a generated image on the page")
        info = page.js("document.getElementById('info').innerText")
        width = page.js("document.getElementById('img').naturalWidth")
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
        with open(args.screenshot, "wb") as f:
            f.write(base64.b64decode(shot))
        print(f"page check: image {width} px wide shown after {time.perf_counter() - t0:.2f} s; "
              f"{' | '.join(info.splitlines())}; screenshot {args.screenshot}")
    finally:
        browser.terminate()
        browser.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
