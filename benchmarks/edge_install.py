"""What `resops edge` costs on a device: a fresh venv with requirements-edge.lock and resops (no deps).

    python benchmarks/edge_install.py [--bundle models/serve/edge]

Measures the installed size (site-packages, MB) next to the full platform's venv, checks that the
runtime starts there without torch, Ray or OpenCV installed at all, and, given a bundle, answers a
request from it. Writes benchmarks/results/edge_install.json. Needs the package registry (pip).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, ROOT, say, write_json  # noqa: E402


def dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "models" / "serve" / "edge"))
    ap.add_argument("--out", default=str(RESULTS / "edge_install.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="resops-edge-venv-") as tmp:
        venv = Path(tmp) / "venv"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        base_mb = dir_mb(site_packages(venv))  # pip and setuptools of a bare venv
        subprocess.run([py, "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements-edge.lock")], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", str(ROOT)], check=True)
        install_s = time.perf_counter() - start
        edge_mb = dir_mb(site_packages(venv)) - base_mb
        probe = ("import importlib.util, json; "
                 "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
                 "('torch', 'ray', 'cv2', 'pandas', 'onnxruntime', 'fastapi')}))")
        present = json.loads(subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True,
                                            cwd=tmp).stdout)
        help_rc = subprocess.run([venv / "bin" / "resops", "edge", "--help"], capture_output=True, cwd=tmp).returncode
        answer = None
        if Path(args.bundle, "edge.json").exists():
            code = ("import json, sys\nfrom pathlib import Path\nfrom fastapi.testclient import TestClient\n"
                    "from components.edge.app import create_app\n"
                    "png = sorted(Path(sys.argv[2]).glob('*.png'))[0].read_bytes()\n"
                    "with TestClient(create_app(sys.argv[1], cloud_token_env=None)) as c:\n"
                    "    r = c.post('/predict', content=png, params={'mode': 'edge'})\n"
                    "    print(json.dumps({'status': r.status_code, 'label': r.json().get('label')}))\n")
            images = next(ROOT.glob(".venv/lib/python3*/site-packages/elpv_dataset/data/images"), None)
            if images is not None:
                out = subprocess.run([py, "-c", code, str(Path(args.bundle).resolve()), str(images)],
                                     capture_output=True, text=True, cwd=tmp)
                answer = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                    {"error": out.stderr.strip().splitlines()[-1:]}
    full = ROOT / ".venv"
    full_mb = dir_mb(site_packages(full)) if full.exists() else None
    result = {"edge_site_packages_mb": round(edge_mb, 1),
              "full_site_packages_mb": round(full_mb, 1) if full_mb else None,
              "ratio": round(edge_mb / full_mb, 3) if full_mb else None, "install_seconds": round(install_s, 1),
              "importable": present, "resops_edge_help_exit": help_rc,
              "bundle": ({"path": str(args.bundle), "model_version": json.loads(Path(args.bundle, "edge.json")
                                                                               .read_text())["model_version"]}
                         if Path(args.bundle, "edge.json").exists() else None),
              "bundle_answer": answer,
              "python": sys.version.split()[0]}
    say(f"edge runtime venv: {edge_mb:.0f} MB of packages (full platform: {full_mb or float('nan'):.0f} MB); "
        f"torch/ray/cv2 importable there: {present['torch']}/{present['ray']}/{present['cv2']}; answer {answer}")
    write_json(args.out, result)
    ok = help_rc == 0 and not (present["torch"] or present["ray"] or present["cv2"])
    return 0 if ok and (answer is None or answer.get("status") == 200) else 1


if __name__ == "__main__":
    sys.exit(main())
