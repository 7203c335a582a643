"""Do the evaluation report and the `dvc plots show` page render without internet? Headless Chromium
opens each (file://) with every host but 127.0.0.1 unresolvable, the page's own check
(``body[data-loaded]``: images that loaded / images, charts Vega drew) is read from the rendered DOM,
and a screenshot is written and checked not to be blank.

    python benchmarks/report_render.py [--report reports/report/index.html] [--chromium chromium]

Pages: the ``report`` stage's page, and the page ``dvc plots show`` writes for this project (run here
into a temporary directory; its template is ``.dvc/plots/offline.html``). Writes
benchmarks/results/report_render.json and the screenshots docs/report.png and docs/dvc_plots.png;
exits 1 when a page is blank or something on it did not load. Needs the Debian package ``chromium``
(``apt-get install chromium``); it installs nothing itself.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, say, write_json  # common puts ROOT on sys.path

from docs_render import OFFLINE  # every host but 127.0.0.1 unresolvable

DOCS = ROOT / "docs"


def chromium(binary: str, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--allow-file-access-from-files", "--virtual-time-budget=20000", *OFFLINE, *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def not_blank(png: Path) -> dict:
    """How much of the screenshot is not background: a blank page is one colour."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    return {"std": float(a.std()), "non_white_share": float((a < 240).mean()), "size": [int(a.shape[1]),
                                                                                         int(a.shape[0])]}


def check(binary: str, page: Path, shot: Path, height: int) -> dict:
    url = page.resolve().as_uri()
    dom = chromium(binary, url, "--dump-dom").stdout
    m = re.search(r'data-loaded="images (\d+)/(\d+), charts (\d+)"', dom)
    chromium(binary, url, f"--screenshot={shot}", f"--window-size=1280,{height}")
    blank = not_blank(shot) if shot.exists() else None
    out = {"page": str(page), "dom_chars": len(dom), "screenshot": str(shot.relative_to(ROOT)) if shot.exists() else None,
           "images_loaded": int(m.group(1)) if m else None, "images": int(m.group(2)) if m else None,
           "charts_drawn": int(m.group(3)) if m else None, "screenshot_stats": blank}
    out["ok"] = bool(m and out["images"] > 0 and out["images_loaded"] == out["images"] and blank
                     and blank["std"] > 10 and blank["non_white_share"] > 0.02)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", default="reports/report/index.html")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", default=str(RESULTS / "report_render.json"))
    args = ap.parse_args()
    if not args.chromium:
        say("no chromium: install the Debian package (apt-get install chromium) and run this again")
        return 2
    DOCS.mkdir(exist_ok=True)
    pages = {"report": check(args.chromium, ROOT / args.report, DOCS / "report.png", 3200)}
    with tempfile.TemporaryDirectory(prefix="resops-dvc-plots-") as tmp:
        run = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", tmp], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        say(f"dvc plots show: exit {run.returncode} {run.stderr.strip()[-300:]}")
        html = Path(tmp) / "index.html"
        text = html.read_text() if html.exists() else ""
        expected = text.count("vegaEmbed(")
        pages["dvc_plots"] = check(args.chromium, html, DOCS / "dvc_plots.png", 4200)
        pages["dvc_plots"].update(charts_expected=expected, dvc_exit=run.returncode)
        pages["dvc_plots"]["ok"] = (pages["dvc_plots"]["ok"] and run.returncode == 0
                                    and pages["dvc_plots"]["charts_drawn"] == expected > 0)
    for name, p in pages.items():
        say(f"{name}: {'ok' if p['ok'] else 'NOT ok'}: images {p['images_loaded']}/{p['images']}, charts "
            f"{p['charts_drawn']}, screenshot {p['screenshot']} {p['screenshot_stats']}")
    version = subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()
    write_json(args.out, {"benchmark": "report_render", "chromium": version, "offline": OFFLINE, "pages": pages})
    return 0 if all(p["ok"] for p in pages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
