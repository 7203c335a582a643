"""The data stages: ingest, prepare, augment, gan, rebalance (one thin function per DVC stage)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from pipelines.layout import (AUGMENTED, EEG_DATASETS, EXTRA, GAN_DIR, GAN_REPORTS, METRICS, PREPARED, RAW, REBALANCED,
                              say, write_json)
from pipelines.params import Params
from pipelines.runtime import init_ray


def ingest(p: Params) -> dict:
    from components.data.sources import get_source

    name = p("data.dataset")
    if name in EEG_DATASETS:
        return _ingest_eeg(p, name)
    source = get_source(name)
    if RAW.exists():
        shutil.rmtree(RAW)
    opts = {"folder": dict(p("data.folder")), "synthetic": dict(p("data.synthetic"), seed=p("seed"))}.get(name, {})
    source.ingest(RAW / name, **opts)
    n = sum(1 for f in (RAW / name).rglob("*") if f.is_file())
    say(f"ingest: {n} raw files of dataset {name!r} in {RAW / name}")
    return {"dataset": name, "files": n}


def prepare(p: Params) -> dict:
    from components.data.prepare import prepare_dataset

    name = p("data.dataset")
    if name in EEG_DATASETS:
        return _prepare_eeg(p, name)
    res = prepare_dataset(RAW / name, PREPARED, name, p("data.task"), in_chans=p("data.in_chans"),
                          test_size=p("data.test_size"), val_size=p("data.val_size"), seed=p("seed"),
                          skip_corrupt=p("data.skip_corrupt"), rows_per_shard=p("data.rows_per_shard"),
                          max_image_pixels=p("data.max_image_pixels"), extra=_extra_folders(p))
    say(f"prepare: {res.report['num_prepared']} images, {len(res.report['corrupt'])} corrupt, "
         f"counts {res.report['counts']}; examples per class in {PREPARED / 'samples.png'}")
    return res.report


def _extra_folders(p: Params) -> list[str]:
    """``data.extra``: folders under data/extra (the prepare stage's DVC dep, so adding or correcting an
    image re-runs prepare and what follows)."""
    folders = [str(f) for f in (p("data.extra") or [])]
    for f in folders:
        if EXTRA.resolve() not in Path(f).resolve().parents:
            raise ValueError(f"data.extra: {f} is not under {EXTRA}/: put it there (`resops feedback export --to "
                             f"{EXTRA}/<name>`) so DVC sees when it changes")
    return folders


def _ingest_eeg(p: Params, name: str) -> dict:
    from components.data.eeg import ingest_bonn, synthetic_bonn, write_bonn_layout

    e = p("data.eeg")
    if RAW.exists():
        shutil.rmtree(RAW)
    dest = RAW / name
    if name == "eeg_synthetic":
        sy = e["synthetic"]
        write_bonn_layout(dest, synthetic_bonn(int(sy["n_per_set"]), length=int(e["length"]), fs=float(e["fs"]),
                                               seed=p("seed")))
    elif name == "bonn_eeg":
        ingest_bonn(dest, e["path"])
    else:
        if not e["path"] or not Path(e["path"]).is_dir():
            raise FileNotFoundError(f"data.eeg.path must be a folder of <class>/<file>.edf recordings, got {e['path']!r}")
        shutil.copytree(e["path"], dest)
    n = sum(1 for f in dest.rglob("*") if f.is_file())
    say(f"ingest: {n} raw EEG files of dataset {name!r} in {dest}")
    return {"dataset": name, "files": n}


def _prepare_eeg(p: Params, name: str) -> dict:
    from components.data.eeg import read_bonn, read_edf_folder
    from components.data.eeg_prepare import prepare_eeg

    e = p("data.eeg")
    if p("data.in_chans") != 1:
        raise ValueError("EEG scalograms are grayscale: set data.in_chans: 1")
    if name == "eeg_edf":
        # EDF recordings are long: cut into windows here, grouped by recording for the split.
        ds = read_edf_folder(RAW / name, channel=e["channel"], window=int(e["window"]), overlap=0)
        window, overlap = int(e["window"]), 0
    else:
        ds = read_bonn(RAW / name, p("data.task"), length=int(e["length"]), fs=float(e["fs"]),
                       skip_malformed=p("data.skip_corrupt"))
        window, overlap = int(e["window"]), int(e["overlap"])
    init_ray(p)
    res = prepare_eeg(ds, PREPARED, dataset=name, task=p("data.task"), window=window, overlap=overlap,
                      reassemble_per_class=int(e["reassemble_per_class"]), parts=int(e["parts"]), cwt=dict(e["cwt"]),
                      test_size=p("data.test_size"), val_size=p("data.val_size"), seed=p("seed"),
                      rows_per_shard=p("data.rows_per_shard"), use_ray=True,
                      cpus_per_task=p("augment.cpus_per_task"))
    r = res.report
    say(f"prepare: {r['num_recordings']} EEG recordings -> {r['num_prepared']} scalograms ({window}-sample windows, "
         f"overlap {overlap}, {sum(r['reassembled'].values())} reassembled), counts {r['counts']}; "
         f"examples in {r['examples']}")
    return r


def augment(p: Params) -> dict:
    """Offline augmentation of the training split on Ray Data; originals plus ``offline_copies`` copies."""
    from components.data.shards import read_shards, write_shards
    from components.train.trainer import augment_batch

    train = read_shards(PREPARED / "shards", split="train")
    parts = [train]
    copies = int(p("augment.offline_copies"))
    if copies > 0 and p("augment.policy") not in (None, "none"):
        init_ray(p)  # only when there is work for Ray Data
        import ray.data

        ds = ray.data.from_pandas(train).map_batches(
            augment_batch, batch_format="numpy", batch_size=64, num_cpus=p("augment.cpus_per_task"),
            fn_kwargs=dict(policy=p("augment.policy"), output="png", copies=copies, seed=p("seed"),
                           in_chans=p("data.in_chans"), max_pixels=p("data.max_image_pixels")))
        parts.append(ds.to_pandas().sort_values("path", kind="stable"))
    out = pd.concat(parts, ignore_index=True)
    write_shards(out, AUGMENTED / "shards", p("data.rows_per_shard"))
    report = {"policy": p("augment.policy"), "offline_copies": copies, "rows_in": len(train), "rows_out": len(out)}
    write_json(AUGMENTED / "augment.json", report)
    say(f"augment: {len(train)} training images -> {len(out)} rows (policy {p('augment.policy')}, {copies} copies)")
    return report


def gan(p: Params) -> dict:
    """Train the class-conditional GAN on the real training split when ``rebalance.strategy`` uses it.

    Otherwise the stage only records that no generator is in use (DVC still needs its outs), so
    the default pipeline pays nothing for it.
    """
    from components.data.prepare import load_report
    from components.data.shards import read_shards
    from components.rebalance import parse_strategy

    shutil.rmtree(GAN_DIR, ignore_errors=True)
    shutil.rmtree(GAN_REPORTS, ignore_errors=True)
    GAN_DIR.mkdir(parents=True)
    GAN_REPORTS.mkdir(parents=True)
    if "gan" not in parse_strategy(p("rebalance.strategy")):
        report = {"enabled": False, "reason": f"rebalance.strategy {p('rebalance.strategy')!r} does not use gan"}
        write_json(GAN_DIR / "gan.json", report)
        write_json(METRICS / "gan.json", report)
        (GAN_REPORTS / "README.txt").write_text("No GAN: rebalance.strategy does not use it.\n")
        from components.data.images import save_class_grid

        # the picture `dvc plots show` lists under GAN samples: what a generator would be judged against
        save_class_grid(read_shards(PREPARED / "shards", split="train"), load_report(PREPARED)["class_names"],
                        GAN_REPORTS / "samples.png", title=f"no generator ({report['reason']}): real training "
                        "images per class", in_chans=p("data.in_chans"), seed=p("seed"),
                        max_pixels=p("data.max_image_pixels"))
        say(f"gan: skipped ({report['reason']})")
        return report

    from components.rebalance.gan import generate, save_sample_grid, train_gan
    from components.rebalance.quality import check_quality, quality_report

    prep = load_report(PREPARED)
    real = read_shards(PREPARED / "shards", split="train")
    g = p("gan")
    init_ray(p)
    res = train_gan(real, GAN_DIR, p.config.gan, in_chans=p("data.in_chans"), num_classes=len(prep["class_names"]),
                    class_names=prep["class_names"], seed=p("seed"), max_pixels=p("data.max_image_pixels"))
    grid = save_sample_grid(res.generator_path, real, GAN_REPORTS / "samples.png", seed=p("seed"))
    q = g["quality"]
    fakes = generate(res.generator_path, {k: int(q["samples_per_class"]) for k in range(len(prep["class_names"]))},
                     seed=p("seed") + 1)
    quality = quality_report(real, fakes, num_classes=len(prep["class_names"]), image_size=q["image_size"],
                             in_chans=p("data.in_chans"), epochs=q["epochs"], seed=p("seed"),
                             threads=p("train.threads_per_worker"))
    report = {"enabled": True, "generator": str(res.generator_path), "version": res.version, "epochs": len(res.history),
              "last_epoch": res.history[-1] if res.history else None, "samples": str(grid), "quality": quality}
    write_json(GAN_DIR / "gan.json", report)
    write_json(METRICS / "gan.json", {k: v for k, v in report.items() if k != "last_epoch"})
    say(f"gan: generator {res.version[:12]} after {len(res.history)} epochs; Frechet distance {quality['fd']:.2f} "
         f"(real held-out {quality['fd_real_holdout']:.2f}); samples in {grid}")
    # A generator that produces garbage fails the stage here, before its rows reach training.
    check_quality(quality, max_fd=q["max_fd"], min_class_accuracy=q["min_class_accuracy"],
                  max_fd_ratio=q["max_fd_ratio"], min_relative_class_accuracy=q["min_relative_class_accuracy"])
    return report


def rebalance(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.data.shards import read_shards, write_shards
    from components.rebalance import parse_strategy, rebalance_frame

    num_classes = len(load_report(PREPARED)["class_names"])
    strategy = parse_strategy(p("rebalance.strategy"))
    generator = GAN_DIR / "generator.pt" if "gan" in strategy else None
    res = rebalance_frame(read_shards(AUGMENTED / "shards"), num_classes, strategy=strategy,
                          target_ratio=p("rebalance.target_ratio"), class_weight=p("rebalance.class_weight"),
                          seed=p("seed"), generator=generator, gan_size=p("rebalance.gan_size"),
                          smote_size=p("rebalance.smote.size"), smote_k_neighbors=p("rebalance.smote.k_neighbors"),
                          in_chans=p("data.in_chans"), max_pixels=p("data.max_image_pixels"))
    write_shards(res.frame.sample(frac=1.0, random_state=p("seed")), REBALANCED / "shards", p("data.rows_per_shard"))
    report = {"strategy": "+".join(res.strategy), "target_ratio": p("rebalance.target_ratio"),
              "counts_before": res.counts_before, "counts_after": res.counts_after, "added": res.added,
              "class_weights": res.class_weights, "generator_version": res.generator_version}
    write_json(REBALANCED / "rebalance.json", report)
    say(f"rebalance ({report['strategy']}): {res.counts_before} -> {res.counts_after}, "
         f"class weights {res.class_weights}")
    return report
