"""Screenshots of the Dagster UI for a project home the main job has run on (docs/screenshots/).

    apt-get install chromium && .venv/bin/pip install playwright   # no browser download: Debian's Chromium
    .venv/bin/python docs/ui_screenshots.py --home ./curation_home --out docs/screenshots

Starts ``dagster-webserver -w workspace.yaml --read-only`` on loopback against the home's instance
(``<home>/dagster``), waits until it serves the asset graph, and has headless Chromium draw, for each release asset,
its upstream lineage from the raw pool through the release passes, and its page with its report
(funnel, histograms, example grids, preview table), whole; and the asset groups.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
WINDOW = {"width": 1600, "height": 1100}
ASSET_PAGE_HEIGHT = 6_000  # a release page with its report, unscrolled
RENDER_MS = 4_000  # after the network settles: the graph layout and images finish drawing


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _release_assets(port: int) -> list[str]:
    query = '{ assetNodes { assetKey { path } } }'
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["assetNodes"]
    names = ["/".join(node["assetKey"]["path"]) for node in nodes]
    passes = {"release_plan", "release_candidates", "release_cuts", "release_selections"}
    return sorted(name for name in names if name.startswith("release_") and name not in passes)


def _wait(port: int, process: subprocess.Popen, seconds: float = 180) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return _release_assets(port)
        except (OSError, KeyError, ValueError):
            time.sleep(2)
    raise SystemExit("the webserver did not come up (see its log)")


def _shoot(page, url: str, out: Path, height: int = WINDOW["height"]) -> None:
    """``height``: the UI scrolls inside its own panels, so a long page is drawn in a tall window."""
    page.set_viewport_size({"width": WINDOW["width"], "height": height})
    page.goto(url, wait_until="networkidle")
    try:  # Dagster's one-time newsletter prompt, shown once per browser profile
        page.get_by_role("button", name="Skip").click(timeout=8_000)
    except PlaywrightTimeout:
        pass
    page.wait_for_timeout(RENDER_MS)
    page.screenshot(path=str(out), full_page=True)
    print(f"{out}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a project home the main job has run on")
    parser.add_argument("--pool", help="the pool the home was run on ($CURATION_POOL), for the raw pool's metadata")
    parser.add_argument("--recipes", help="the recipes folder the home was run with ($CURATION_RECIPES)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = os.environ | {"DAGSTER_HOME": str((args.home / "dagster").resolve()),
                        "CURATION_HOME": str(args.home.resolve()), "DAGSTER_DISABLE_TELEMETRY": "1"}
    env |= {name: value for name, value in (("CURATION_POOL", args.pool), ("CURATION_RECIPES", args.recipes)) if value}
    webserver = Path(sys.executable).with_name("dagster-webserver")
    log = (args.out / "webserver.log").open("wb")
    process = subprocess.Popen([str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port),
                                "--read-only"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        releases = _wait(port, process)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=browser, args=["--no-sandbox"])
            page = chromium.new_page(viewport=WINDOW)
            for name in releases:
                _shoot(page, f"{base}/assets/{name}?view=lineage&lineageScope=upstream&lineageDepth=12",
                       args.out / f"lineage_{name}.png")
                _shoot(page, f"{base}/assets/{name}", args.out / f"{name}.png", height=ASSET_PAGE_HEIGHT)
            _shoot(page, f"{base}/asset-groups", args.out / "asset_groups.png")
            chromium.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
        (args.out / "webserver.log").unlink()


if __name__ == "__main__":
    main()
