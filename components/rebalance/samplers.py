"""Class rebalancing of the training split: samplers, synthetic rows and loss class weights.

Strategies (``rebalance_frame(..., strategy=...)``), combinable as a list or ``"a+b"``:

* ``none`` - leave the rows alone;
* ``class_weight`` - loss weights per class (``balanced`` unless ``class_weight=`` names a mode);
* ``random_under`` - drop rows of the large classes (imbalanced-learn ``RandomUnderSampler``);
* ``random_over`` - repeat rows of the small classes (imbalanced-learn ``RandomOverSampler``);
* ``smote`` - add interpolated images (imbalanced-learn ``SMOTE``), ``source="smote"``;
* ``gan`` - add images from a class-conditional generator (:mod:`components.rebalance.gan`),
  ``source="gan"``.

Order of application, whatever order they are listed in: under-sampling first, then the
over-samplers (``random_over``, ``smote``, ``gan``), then class weights computed on the result.
Several over-samplers share each class's deficit evenly (in the order given, remainder to the
first), and every over-sampler works from the same under-sampled *real* rows (SMOTE never
interpolates random copies or GAN images).

Random samplers work on row indices: imbalanced-learn decides *which* rows to repeat or drop
(``sample_indices_``) and the image bytes follow, so no pixel matrix is materialised.

**Feature space of SMOTE: downsampled pixels.** Each training image is decoded, converted to
``in_chans`` channels (grayscale for EL images), resized to ``smote_size`` x ``smote_size``
(area interpolation) and flattened to a vector in [0, 1]. SMOTE interpolates between a row and
one of its ``k`` nearest same-class neighbours in that space; a synthesised vector is reshaped to
an image, resized back (bilinear) to the class's most common original size and stored as PNG.
Why pixels and not learned embeddings: rebalancing runs *before* training, so no trained model
exists yet (SMOTE on embeddings would need one, and a decoder back to images); and EL solar
cell images are aligned crops of the same geometry (busbars and cell edges at fixed places),
so a convex combination of two cells of one class is a plausible cell - cracks and dark regions
blend rather than land in impossible places. The price: interpolated images are blurrier than
real ones (the downsampling caps their detail at ``smote_size``), so keep ``smote_size`` at or
above the model's input size.

Only rows with ``split == "train"`` are resampled; every other row (val, test) passes through
untouched, in its place. Synthetic rows always get ``split="train"``.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from imblearn.over_sampling import SMOTE, RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.utils.class_weight import compute_class_weight

from components.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png

# Everything ``strategy=`` accepts.
STRATEGIES = ("none", "class_weight", "random_over", "random_under", "smote", "gan")
OVER_SAMPLERS = ("random_over", "smote", "gan")
SYNTHETIC_SOURCES = ("smote", "gan")
CLASS_WEIGHTS = ("none", "balanced", "sqrt")

TargetRatio = float | Mapping[int | str, float]


@dataclass(frozen=True)
class RebalanceResult:
    frame: pd.DataFrame
    counts_before: dict[int, int]          # training split only
    counts_after: dict[int, int]           # training split only, synthetic rows included
    class_weights: list[float] | None
    strategy: tuple[str, ...] = ()
    added: dict[str, dict[int, int]] = field(default_factory=dict)  # over-sampler -> class -> rows added
    generator_version: str | None = None


# ----------------------------------------------------------------------------- targets
def parse_strategy(strategy: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``"smote+class_weight"``, ``"smote,class_weight"`` or a list into the
    canonical order (under, over-samplers in the given order, class_weight)."""
    if strategy is None:
        return ()
    names = ([s for part in strategy.replace(",", "+").split("+") for s in [part.strip()] if s]
             if isinstance(strategy, str) else [str(s).strip() for s in strategy])
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"rebalance.strategy: unknown {unknown}; choose from {STRATEGIES} (combine with '+')")
    if len(set(names)) != len(names):
        raise ValueError(f"rebalance.strategy lists a strategy twice: {names}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"rebalance.strategy: 'none' cannot be combined with {[s for s in names if s != 'none']}")
    if not names or names == ["none"]:
        return ("none",)
    under = [s for s in names if s == "random_under"]
    over = [s for s in names if s in OVER_SAMPLERS]
    return tuple(under + over + [s for s in names if s == "class_weight"])


def _check_ratio(r: float, what: str) -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1], got {r!r}") from None
    if not 0 < r <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {r}")
    return r


def resolve_ratios(target_ratio: TargetRatio, label_names: Mapping[int, str] | None = None) -> float | dict[int, float]:
    """A scalar ratio, or a per-class dict whose keys are class indices (int or digit strings,
    as YAML may give them) or class names; values in (0, 1]."""
    if not isinstance(target_ratio, Mapping):
        return _check_ratio(target_ratio, "rebalance.target_ratio")
    by_name = {v: k for k, v in (label_names or {}).items()}
    out: dict[int, float] = {}
    for key, r in target_ratio.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            c = int(key)
        elif isinstance(key, str) and key in by_name:
            c = int(by_name[key])
        elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
            c = int(key)
        else:
            raise ValueError(f"rebalance.target_ratio: unknown class {key!r}; use a class index or one of "
                             f"{sorted(by_name)}")
        out[c] = _check_ratio(r, f"rebalance.target_ratio[{key!r}]")
    return out


def sampling_strategy(counts: dict[int, int], sampler: str, target_ratio: TargetRatio,
                      majority: int | None = None) -> dict[int, int]:
    """Per-class target counts.

    Scalar ``target_ratio``:
      over-samplers (random_over, smote, gan): every class raised to at least ``target_ratio`` x
      the majority count; random_under: every class lowered to at most minority count / ``target_ratio``.
    Dict ``{class: ratio}`` (int keys): class c's target is ``ratio x majority``, where
      ``majority`` is the largest class count *before any resampling* (defaults to ``max(counts)``);
      over-samplers only add (max of current and target), random_under only drops (min). Classes
      not in the dict keep their count.
    """
    under = sampler == "random_under"
    if not under and sampler not in OVER_SAMPLERS:
        raise ValueError(f"no target counts for sampler {sampler!r}")
    if isinstance(target_ratio, Mapping):
        m = max(counts.values()) if majority is None else majority
        out = dict(counts)
        for c, r in target_ratio.items():
            r = _check_ratio(r, f"rebalance.target_ratio[{c!r}]")
            if c not in counts:
                continue  # a class absent from the training split cannot be resampled
            goal = r * m
            out[c] = min(counts[c], math.floor(goal + 1e-9)) if under else max(counts[c], math.ceil(goal - 1e-9))
        return out
    target_ratio = _check_ratio(target_ratio, "rebalance.target_ratio")
    if not under:
        goal = int(np.ceil(max(counts.values()) * target_ratio))
        return {c: max(n, goal) for c, n in counts.items()}
    goal = int(np.floor(min(counts.values()) / target_ratio))
    return {c: min(n, goal) for c, n in counts.items()}


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> list[float] | None:
    """Loss weights per class: ``balanced`` (n / (k * n_c)), ``sqrt`` (its square root) or None."""
    if mode == "none":
        return None
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"rebalance.class_weight must be one of {CLASS_WEIGHTS}, got {mode!r}")
    present = np.unique(labels)
    w = np.ones(num_classes)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    if mode == "sqrt":
        w = np.sqrt(w)
    return [float(x) for x in w / w[present].mean()]


def _counts(labels) -> dict[int, int]:
    return {int(k): int(v) for k, v in sorted(pd.Series(labels, dtype="int64").value_counts().items())}


# ----------------------------------------------------------------------------- SMOTE
def pixel_features(images: Sequence[bytes], size: int = 32, in_chans: int = 1,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The SMOTE feature space: each image decoded to ``in_chans`` channels, area-resized to
    ``size`` x ``size`` and flattened, float32 in [0, 1]; shape (n, size * size * in_chans)."""
    import cv2

    out = np.empty((len(images), size * size * in_chans), dtype=np.float32)
    for i, data in enumerate(images):
        img = decode_image(data, in_chans, max_pixels)
        if img.shape[0] != size or img.shape[1] != size:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, in_chans)
        out[i] = img.reshape(-1).astype(np.float32) / 255.0
    return out


def features_to_png(vec: np.ndarray, size: int, in_chans: int, width: int, height: int) -> bytes:
    """Inverse of :func:`pixel_features` for one vector: reshape, resize to ``width`` x ``height``
    (bilinear), quantise to uint8 and encode as PNG."""
    import cv2

    img = np.clip(np.rint(vec.reshape(size, size, in_chans) * 255.0), 0, 255).astype(np.uint8)
    if (width, height) != (size, size):
        img = cv2.resize(img, (int(width), int(height)), interpolation=cv2.INTER_LINEAR).reshape(
            int(height), int(width), in_chans)
    return encode_png(img)


def _class_sizes(frame: pd.DataFrame, idx: np.ndarray, labels: np.ndarray, size: int) -> dict[int, tuple[int, int]]:
    """Most common (width, height) of each class's rows; ``size`` when the frame has no size columns."""
    if "width" not in frame or "height" not in frame:
        return {}
    sub = pd.DataFrame({"label": labels, "w": frame["width"].to_numpy()[idx], "h": frame["height"].to_numpy()[idx]})
    out = {}
    for c, g in sub.groupby("label"):
        pairs = g[["w", "h"]].dropna().astype(int)
        pairs = pairs[(pairs["w"] > 0) & (pairs["h"] > 0)]
        if len(pairs):
            w, h = pairs.value_counts().idxmax()
            out[int(c)] = (int(w), int(h))
    return out


def smote_rows(frame: pd.DataFrame, idx: np.ndarray, add: dict[int, int], *, seed: int, size: int = 32,
               in_chans: int = 1, k_neighbors: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS,
               label_names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """``add[c]`` SMOTE rows per class interpolated among the rows ``frame.iloc[idx]`` (real,
    unique training rows), as a frame with the standard columns and ``source="smote"``."""
    add = {int(c): int(n) for c, n in add.items() if n > 0}
    if not add:
        return pd.DataFrame()
    labels = frame["label"].to_numpy()[idx].astype(np.int64)
    counts = _counts(labels)
    small = {c: counts.get(c, 0) for c in add}
    too_few = {c: n for c, n in small.items() if n < 2}
    if too_few:
        raise ValueError(f"SMOTE needs at least 2 training rows of a class to interpolate; classes {too_few} have "
                         "fewer (use random_over for them)")
    k = min(int(k_neighbors), min(small.values()) - 1)
    if k < int(k_neighbors):
        warnings.warn(f"SMOTE: k_neighbors lowered from {k_neighbors} to {k}: a class to oversample has only "
                      f"{min(small.values())} rows", stacklevel=3)
    x = pixel_features(frame["image"].to_numpy()[idx], size, in_chans, max_pixels)
    target = {c: n + add.get(c, 0) for c, n in counts.items()}
    if len(counts) < 2:  # imbalanced-learn wants two classes: a single far-away dummy row, never a neighbour
        x = np.vstack([x, np.full((1, x.shape[1]), 1e3, np.float32)])
        labels = np.append(labels, -1)
        target[-1] = 1
    sm = SMOTE(sampling_strategy=target, k_neighbors=k, random_state=seed)
    x_res, y_res = sm.fit_resample(x, labels)
    new_x, new_y = x_res[len(x):], np.asarray(y_res[len(x):], dtype=np.int64)
    sizes = _class_sizes(frame, idx, frame["label"].to_numpy()[idx].astype(np.int64), size)
    names = label_names or {}
    rows = []
    per_class: dict[int, int] = {}
    for vec, c in zip(new_x, new_y):
        c = int(c)
        i = per_class[c] = per_class.get(c, -1) + 1
        w, h = sizes.get(c, (size, size))
        png = features_to_png(vec, size, in_chans, w, h)
        path = f"synthetic/smote/{names.get(c, c)}/{seed}-{i:06d}.png"
        rows.append({"image": png, "path": path, "label": c, "label_name": names.get(c, str(c)), "split": "train",
                     "group": path, "sha256": hashlib.sha256(png).hexdigest(), "width": w, "height": h,
                     "source": "smote",
                     "attrs": json.dumps({"sampler": "smote", "feature_size": size, "in_chans": in_chans,
                                          "k_neighbors": k, "seed": seed})})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- GAN rows
def gan_rows(generator, add: dict[int, int], *, seed: int, size: int | None = None,
             label_names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """``add[c]`` generated rows per class. ``generator`` is a ``generator.pt`` path (see
    :func:`components.rebalance.gan.generate`) or a callable ``(counts, seed) -> frame``."""
    add = {int(c): int(n) for c, n in add.items() if n > 0}
    if not add:
        return pd.DataFrame()
    if callable(generator):
        out = generator(add, seed)
    else:
        from components.rebalance.gan import generate

        out = generate(generator, add, seed, size=size, class_names=label_names)
    got = _counts(out["label"]) if len(out) else {}
    if got != add:
        raise ValueError(f"the generator returned {got} rows per class, {add} were asked for")
    out = out.copy()
    out["split"] = "train"
    out["source"] = "gan"
    if "group" not in out and "path" in out:
        out["group"] = out["path"]
    return out


def _generator_version(rows: pd.DataFrame) -> str | None:
    if "generator_version" in rows and len(rows):
        vals = rows["generator_version"].dropna().unique()
        return str(vals[0]) if len(vals) else None
    if "attrs" in rows and len(rows):
        try:
            return json.loads(rows["attrs"].iloc[0]).get("generator_version")
        except (TypeError, ValueError, AttributeError):
            return None
    return None


def _with_version_in_attrs(rows: pd.DataFrame, version: str | None) -> pd.DataFrame:
    if version is None or not len(rows):
        return rows
    rows = rows.copy()
    attrs = []
    for a in rows["attrs"] if "attrs" in rows else [None] * len(rows):
        try:
            d = json.loads(a) if isinstance(a, str) and a else {}
        except ValueError:
            d = {}
        d = d if isinstance(d, dict) else {}
        d.setdefault("generator_version", version)
        attrs.append(json.dumps(d))
    rows["attrs"] = attrs
    return rows


# ----------------------------------------------------------------------------- the frame
def _label_names(frame: pd.DataFrame) -> dict[int, str]:
    if "label_name" not in frame:
        return {}
    pairs = frame[["label", "label_name"]].dropna().drop_duplicates("label")
    return {int(k): str(v) for k, v in zip(pairs["label"], pairs["label_name"])}


def _split_deficit(deficit: dict[int, int], methods: list[str]) -> dict[str, dict[int, int]]:
    shares: dict[str, dict[int, int]] = {m: {} for m in methods}
    for c, d in deficit.items():
        base, extra = divmod(int(d), len(methods))
        for i, m in enumerate(methods):
            shares[m][c] = base + (1 if i < extra else 0)
    return shares


def _align(rows: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """Synthetic rows with exactly the frame's columns (absent ones null), in its column order."""
    out = pd.DataFrame(index=range(len(rows)))
    for col in frame.columns:
        values = pd.Series(rows[col].to_numpy() if col in rows else [None] * len(rows), dtype=object)
        try:  # keep the frame's dtypes (string columns, int labels) so concatenation changes nothing
            out[col] = values.astype(frame[col].dtype)
        except (TypeError, ValueError):
            out[col] = values
    return out


def _oversample(frame: pd.DataFrame, keep: np.ndarray, labels: np.ndarray, over: list[str], ratios, majority: int,
                seed: int, names: dict[int, str], *, generator, gan_size: int | None, smote_size: int,
                smote_k_neighbors: int, in_chans: int, max_pixels: int):
    """The over-samplers ``over`` on the rows ``keep``, sharing each class's deficit: returns (rows
    added per method and class, the indices random_over repeats, synthetic frames, generator version)."""
    added: dict[str, dict[int, int]] = {}
    repeats = np.empty(0, dtype=np.int64)
    synthetic: list[pd.DataFrame] = []
    version = None
    if not over or not len(keep):
        return added, repeats, synthetic, version
    current = _counts(labels[keep])
    goal = sampling_strategy(current, over[0], ratios, majority)
    shares = _split_deficit({c: goal[c] - n for c, n in current.items()}, over)
    for method in over:
        share = {c: n for c, n in shares[method].items() if n > 0}
        added[method] = {c: shares[method].get(c, 0) for c in current}
        if not share:
            continue
        if method == "random_over":
            s = RandomOverSampler(sampling_strategy={c: n + share.get(c, 0) for c, n in current.items()},
                                  random_state=seed)
            s.fit_resample(keep.reshape(-1, 1), labels[keep])
            repeats = keep[s.sample_indices_[len(keep):]]
        elif method == "smote":
            synthetic.append(smote_rows(frame, keep, share, seed=seed, size=smote_size, in_chans=in_chans,
                                        k_neighbors=smote_k_neighbors, max_pixels=max_pixels, label_names=names))
        else:
            rows = gan_rows(generator, share, seed=seed, size=gan_size, label_names=names)
            version = _generator_version(rows)
            synthetic.append(_with_version_in_attrs(rows, version))
    return added, repeats, synthetic, version


def rebalance_frame(frame: pd.DataFrame, num_classes: int, strategy: str | Sequence[str] = "none",
                    target_ratio: TargetRatio = 1.0, class_weight: str = "none", seed: int = 42, *,
                    generator: object = None, gan_size: int | None = None, smote_size: int = 32,
                    smote_k_neighbors: int = 5, in_chans: int = 1,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> RebalanceResult:
    """Rebalance the training rows of ``frame`` (columns image, label, split, ... as the shards).

    ``strategy``: a name of :data:`STRATEGIES`, a ``"a+b"`` string or a list (see the module
    docstring for order and combination). Rows whose ``split`` is not ``"train"`` are kept
    byte-identical in their place; a frame without a ``split`` column counts as all training.

    ``target_ratio``: a scalar (over-samplers: every class to >= ratio x majority; random_under:
    every class to <= minority / ratio) or a dict ``{class index or name: ratio}`` (class c's
    target is ratio x the majority count before resampling; classes left out are unchanged).
    ``class_weight``: the weight mode (``none``/``balanced``/``sqrt``); with the ``class_weight``
    strategy and mode ``none``, ``balanced`` is used.
    ``generator``: for ``gan``, a ``generator.pt`` path or a callable ``(counts, seed) -> frame``;
    ``gan_size``: pixel size of generated images (None: the generator's own size).
    ``smote_size``/``smote_k_neighbors``/``in_chans``: SMOTE's pixel feature space and neighbours.

    Synthetic rows are appended after the real ones, carry only the frame's columns,
    ``split="train"``, ``source`` ``"smote"``/``"gan"`` and a JSON ``attrs`` (with
    ``generator_version`` for GAN rows).
    """
    steps = parse_strategy(strategy)
    over = [s for s in steps if s in OVER_SAMPLERS]
    if "gan" in steps and generator is None:
        raise ValueError("the gan strategy needs generator= (a generator.pt from components.rebalance.gan.train_gan)")
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"rebalance.class_weight must be one of {CLASS_WEIGHTS}, got {class_weight!r}")
    names = _label_names(frame)
    ratios = resolve_ratios(target_ratio, names)

    is_train = (frame["split"] == "train").to_numpy() if "split" in frame else np.ones(len(frame), bool)
    labels = frame["label"].to_numpy().astype(np.int64)
    train_idx = np.flatnonzero(is_train)
    before = _counts(labels[train_idx])
    majority = max(before.values()) if before else 0

    keep = train_idx
    if "random_under" in steps and len(keep):
        s = RandomUnderSampler(sampling_strategy=sampling_strategy(before, "random_under", ratios, majority),
                               random_state=seed)
        s.fit_resample(keep.reshape(-1, 1), labels[keep])
        keep = np.sort(keep[s.sample_indices_])

    added, repeats, synthetic, version = _oversample(frame, keep, labels, over, ratios, majority, seed, names,
                                                     generator=generator, gan_size=gan_size, smote_size=smote_size,
                                                     smote_k_neighbors=smote_k_neighbors, in_chans=in_chans,
                                                     max_pixels=max_pixels)

    rows_idx = np.sort(np.concatenate([keep, repeats, np.flatnonzero(~is_train)]).astype(np.int64), kind="stable")
    parts = [frame.iloc[rows_idx]] + [_align(r, frame) for r in synthetic if len(r)]
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)

    out_train = (out["split"] == "train").to_numpy() if "split" in out else np.ones(len(out), bool)
    train_labels = out["label"].to_numpy()[out_train].astype(np.int64)
    after = _counts(train_labels)
    mode = class_weight if class_weight != "none" else ("balanced" if "class_weight" in steps else "none")
    weights = class_weights(train_labels, num_classes, mode)
    return RebalanceResult(out, before, after, weights, strategy=steps, added=added, generator_version=version)
