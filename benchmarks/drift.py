"""Drift watch on the promoted model: is `GET /drift` quiet on unseen ELPV images and loud on shifted ones?

Uses what `dvc repro` wrote: the promoted cloud model (models/promoted/) and its drift reference
(models/serve/drift_reference.json: training-split statistics, null levels from the validation split).
Windows of the reference's size (serve.drift.window, 200) are drawn from the ELPV **test** split (never
seen by the reference) and from shifted copies of it, and scored by the same DriftMonitor the router and
the edge runtime run, on the same model inputs (validation transform) and the same embeddings (the
head's input):

* ``elpv test``: in distribution;
* ``brightness +40`` / ``contrast x0.6`` / ``brighter, low contrast`` (0.5 x + 110): a new scanner or exposure;
* ``blur (sigma 1.5)``: a dirty lens;
* ``digits``: scikit-learn's bundled 8x8 handwritten digits, upsampled (MNIST is not downloadable here);
* ``25 % / 50 % brighter``: a window where only part of the inputs shifted.

    python benchmarks/drift.py [--windows 30]

writes benchmarks/results/drift.json and prints the table the README shows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, ROOT, environment_info, markdown_table, setup_environment  # noqa: E402

setup_environment()
import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.augment.operator import AugmentOperator  # noqa: E402
from components.feedback.drift import PIXEL_MEAN, PIXEL_SCALE, DriftMonitor, load_reference  # noqa: E402
from components.feedback.reference import embed  # noqa: E402
from components.serve.config import DRIFT_REFERENCE  # noqa: E402
from components.models import load_model  # noqa: E402


def split_images(shards: Path, split: str) -> list[bytes]:
    import pyarrow.parquet as pq

    out = []
    for f in sorted(shards.glob("*.parquet")):
        t = pq.read_table(f, columns=["image", "split"]).to_pydict()
        out += [img for img, s in zip(t["image"], t["split"]) if s == split]
    return out


def to_pixels(x: np.ndarray) -> np.ndarray:
    return x * PIXEL_SCALE + PIXEL_MEAN


def from_pixels(p: np.ndarray) -> np.ndarray:
    return ((np.clip(p, 0, 255) - PIXEL_MEAN) / PIXEL_SCALE).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(im[0], (0, 0), sigma)[None] for im in x])


def digits(n: int, size: int) -> np.ndarray:
    import cv2
    from sklearn.datasets import load_digits  # bundled with scikit-learn

    d = load_digits().images[:n] * 255 / 16
    return from_pixels(np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR)[None] for im in d]))


def statistics(model, x: np.ndarray, bins: int, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(input histograms, embeddings) of the inputs ``x``, as the calibrate stage computes the reference's."""
    return embed(model, ({"image": torch.from_numpy(x[i:i + batch])} for i in range(0, len(x), batch)), bins)


def score_windows(ref: dict, threshold: float, hists: np.ndarray, embs: np.ndarray, windows: int, rng,
                  mix: tuple[np.ndarray, np.ndarray, float] | None = None) -> dict:
    """Scores of ``windows`` windows of ``ref['window']`` inputs drawn from (hists, embs), each a fresh
    DriftMonitor as a server starts one; ``mix`` = (hists, embs, share) of the window taken from another set."""
    w, rows = int(ref["window"]), []
    for _ in range(windows):
        idx = rng.choice(len(hists), size=w, replace=len(hists) < w)
        h, e = hists[idx], embs[idx]
        if mix is not None:
            mh, me, share = mix
            k = int(round(share * w))
            j = rng.choice(len(mh), size=k, replace=len(mh) < k)
            h, e = np.concatenate([h[k:], mh[j]]), np.concatenate([e[k:], me[j]])
        m = DriftMonitor(ref, threshold)
        for hi, ei in zip(h, e):
            m.observe(histogram=hi, embedding=ei)
        s = m.score()
        rows.append((s["intensity"]["score"], s["embedding"]["score"], s["score"], s["drifted"]))
    a = np.array(rows, dtype=float)
    med = np.median(a[:, :3], 0)
    return {"windows": windows, "intensity_score_median": med[0], "embedding_score_median": med[1],
            "score_median": med[2], "score_min": float(a[:, 2].min()), "score_max": float(a[:, 2].max()),
            "declared_rate": float(a[:, 3].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=30, help="random windows scored per arm")
    ap.add_argument("--reference", default=str(ROOT / DRIFT_REFERENCE))
    ap.add_argument("--model", default=str(ROOT / "models/promoted/full.pt"))
    ap.add_argument("--out", default=str(RESULTS / "drift.json"))
    args = ap.parse_args()
    ref_path, model_path = Path(args.reference), Path(args.model)
    for f in (ref_path, model_path):
        if not f.exists():
            sys.exit(f"{f} does not exist: run `dvc repro` first (the calibrate stage writes the drift reference)")
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    threshold = float(params["serve"]["drift"]["threshold"])
    ref = load_reference(ref_path)
    model, meta = load_model(model_path)
    model = model.eval().to(memory_format=torch.channels_last)
    torch.set_num_threads(2)
    size = int(meta["image_size"])
    op = AugmentOperator(policy=None, output="tensor", image_size=size, in_chans=int(meta["in_chans"]))
    raw = split_images(ROOT / "data/prepared/shards", "test")
    test = op({"image": np.array(raw, dtype=object), "label": np.zeros(len(raw), dtype=np.int64)})["image"]
    px = to_pixels(test)
    sets = {
        "elpv test": test,
        "brightness +40": from_pixels(px + 40),
        "contrast x0.6": from_pixels((px - px.mean()) * 0.6 + px.mean()),
        "brighter, low contrast (0.5 x + 110)": from_pixels(0.5 * px + 110),
        "blur (sigma 1.5)": blur(test, 1.5),
        "digits (scikit-learn, upsampled)": digits(len(test), size),
    }
    t0 = time.perf_counter()
    stats = {name: statistics(model, x, ref["bins"]) for name, x in sets.items()}
    rng = np.random.default_rng(0)
    results = {name: score_windows(ref, threshold, h, e, args.windows, rng) for name, (h, e) in stats.items()}
    base_h, base_e = stats["elpv test"]
    shift_h, shift_e = stats["brighter, low contrast (0.5 x + 110)"]
    for share in (0.25, 0.5):
        results[f"{share:.0%} of the window brighter, low contrast"] = score_windows(
            ref, threshold, base_h, base_e, args.windows, rng, mix=(shift_h, shift_e, share))
    out = {"benchmark": "drift", "environment": environment_info(), "model": str(model_path.relative_to(ROOT)),
           "model_version": json.loads((ROOT / "models/promoted/model.json").read_text()).get("version"),
           "reference": {k: ref[k] for k in ("window", "bins", "intensity_null95", "embedding_null95", "train_images",
                                             "val_images") if k in ref},
           "threshold": threshold, "test_images": len(test), "seconds": time.perf_counter() - t0, "arms": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    rows = [[name, f"{r['intensity_score_median']:.2f}", f"{r['embedding_score_median']:.2f}",
             f"{r['score_median']:.2f} [{r['score_min']:.2f}, {r['score_max']:.2f}]", f"{r['declared_rate']:.0%}"]
            for name, r in results.items()]
    print(f"drift, model {out['model_version']}, windows of {ref['window']}, threshold {threshold:g}, "
          f"{args.windows} windows per arm")
    print(markdown_table(["inputs", "intensity score", "embedding score", "score (median [min, max])",
                          "windows declared"], rows))


if __name__ == "__main__":
    main()
