"""Do ``/docs`` (Swagger UI) and ``/redoc`` render without internet? Headless Chromium loads them from
the edge runtime (``resops edge`` on the calibrate stage's bundle, 127.0.0.1) with every request to
another host refused (``--host-resolver-rules``), then the rendered DOM is searched for what only a
working page has (Swagger UI's operation blocks naming ``/predict``; ReDoc's rendered operation), and
a screenshot of each page is written next to the JSON for a person to look at.

    python benchmarks/docs_render.py [--bundle models/serve/edge] [--chromium chromium]

Writes benchmarks/results/docs_render.json and docs_swagger.png / docs_redoc.png; exits 1 when a
page did not render. Needs the Debian package ``chromium``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, _free_port, say, wait_healthy, write_json  # common puts ROOT on sys.path

# What a page shows only when its script ran: Swagger UI's rendered operations, ReDoc's rendered menu.
MARKERS = {"/docs": ["opblock", "/predict"], "/redoc": ["redoc-wrap", "predict"]}
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def chromium(binary: str, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=15000", *OFFLINE, *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="models/serve/edge")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--out", default=str(RESULTS / "docs_render.json"))
    args = ap.parse_args()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "components.edge.cli", "--bundle", str(ROOT / args.bundle),
                               "--port", str(port)], cwd=ROOT)
    pages = {}
    try:
        wait_healthy(base, 60.0, server)
        for path, markers in MARKERS.items():
            dom = chromium(args.chromium, base + path, "--dump-dom").stdout
            shot = Path(args.out).with_name(f"docs_{'swagger' if path == '/docs' else 'redoc'}.png")
            chromium(args.chromium, base + path, f"--screenshot={shot}", "--window-size=1200,900")
            found = {m: (m in dom) for m in markers}
            pages[path] = {"rendered": all(found.values()), "markers": found, "dom_chars": len(dom),
                           "screenshot": str(shot.relative_to(ROOT)) if shot.exists() else None}
            say(f"{path}: {'rendered' if pages[path]['rendered'] else 'NOT rendered'} ({found}, {len(dom)} chars)")
    finally:
        server.terminate()
        server.wait(timeout=20)
    version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()
    write_json(args.out, {"benchmark": "docs_render", "chromium": version, "offline": OFFLINE, "pages": pages})
    return 0 if all(p["rendered"] for p in pages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
