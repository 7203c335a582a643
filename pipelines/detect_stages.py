"""The detection pipeline's stages (``pipelines/detect/dvc.yaml``; params with ``pipeline: detect``):
ingest -> prepare -> train -> prune -> evaluate -> promote. Each is ``resops run <stage>`` in the
folder of its params.yaml, like the classification stages; paths are relative to that folder.

* ingest: ``data.dataset`` = ``synthetic_conveyor`` (scenes made here), ``yolo`` (a folder with
  images/, labels/ and classes.txt or data.yaml at ``data.path``) or ``coco`` (an instances JSON at
  ``data.path``, images relative to it) -> data/raw in YOLO format or as the COCO files;
* prepare: split by image, shards with the boxes (``components.data.detection_prepare``);
* train: ``resnet18_yolo`` with Ray Train (``components.train.fit``), anchors fitted by k-means on
  the training boxes when ``model.anchors: kmeans``;
* prune: ``prune.method`` unstructured (global magnitude, sparse ``.npz``) | structured (channels,
  ``prune.structured.ratio`` of the MACs) | none, then ``prune.finetune_epochs`` of fine-tuning;
* evaluate: mAP@0.5, mAP@0.5:0.95, AP per class of the full and pruned models on the test split,
  the precision-recall plot and predictions drawn on test images, CPU latency per frame;
* promote: the models and a Serve config (``POST /detect``: edge = pruned, cloud = full) when the
  pruned model's mAP@0.5 passes ``promote.min_map_50`` (null: no gate).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from pipelines.params import Params
from pipelines.runtime import init_ray
from pipelines.layout import METRICS, record_training, say, write_json

RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TRAIN_MODEL = Path("models/train/model.pt")
PRUNE_DIR = Path("models/prune")
PROMOTED = Path("models/promoted")
SERVE_DIR = Path("models/serve")
REPORTS = Path("reports/evaluation")
DATASETS = ("synthetic_conveyor", "yolo", "coco")


def _read_raw(p: Params):
    from components.data.detection import read_coco, read_yolo

    if p("data.dataset") == "coco":
        return read_coco(RAW / "annotations.json", RAW)
    return read_yolo(RAW)


def ingest(p: Params) -> dict:
    from components.data.detection import SYNTHETIC_CLASSES, synthetic_conveyor, write_yolo

    name = p("data.dataset")
    if name not in DATASETS:
        raise ValueError(f"data.dataset must be one of {DATASETS} for the detection pipeline, got {name!r}")
    if RAW.exists():
        shutil.rmtree(RAW)
    if name == "synthetic_conveyor":
        s = dict(p("data.synthetic"))
        images, boxes = synthetic_conveyor(int(s.pop("num_images")), int(s.pop("scene_size")), seed=p("seed"), **s)
        write_yolo(RAW, images, boxes, list(SYNTHETIC_CLASSES))
    else:
        src = Path(str(p("data.path") or "")).expanduser()
        if name == "yolo":
            if not (src / "images").is_dir():
                raise FileNotFoundError(f"data.path must be a YOLO folder with images/ and labels/, got {src}")
            shutil.copytree(src, RAW)
        else:
            if not src.is_file():
                raise FileNotFoundError(f"data.path must be a COCO instances JSON, got {src}")
            from components.data.detection import read_coco

            ds = read_coco(src)  # checks the file; copies only the images it lists
            RAW.mkdir(parents=True)
            shutil.copy2(src, RAW / "annotations.json")
            for rel in ds.frame["path"]:
                (RAW / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ds.root / rel, RAW / rel)
    n = sum(1 for f in RAW.rglob("*") if f.is_file())
    say(f"ingest: {n} raw files of detection dataset {name!r} in {RAW}")
    return {"dataset": name, "files": n}


def prepare(p: Params) -> dict:
    from components.data.detection_prepare import prepare_detection

    res = prepare_detection(_read_raw(p), PREPARED, dataset=p("data.dataset"), in_chans=p("data.in_chans"),
                            test_size=p("data.test_size"), val_size=p("data.val_size"), seed=p("seed"),
                            rows_per_shard=p("data.rows_per_shard"), skip_corrupt=p("data.skip_corrupt"))
    r = res.report
    say(f"prepare: {r['num_prepared']} images {r['images']}, boxes {r['boxes']}, {len(r['corrupt'])} unusable")
    return r


def _anchors(p: Params) -> tuple[list | None, dict]:
    from components.data.detection import boxes_from_json
    from components.data.shards import read_shards
    from components.models.detector import DEFAULT_ANCHORS, anchor_fitness, fit_anchors

    choice = p("model.anchors")
    train = read_shards(PREPARED / "shards", columns=["boxes", "split"], split="train")
    wh = np.concatenate([boxes_from_json(b) for b in train["boxes"]])[:, 3:5]
    if choice == "kmeans":
        anchors = fit_anchors(wh, seed=p("seed")).tolist()
    elif choice in (None, "default"):
        anchors = None
    else:
        anchors = [list(map(float, a)) for a in choice]
    info = {"anchors": anchors or [list(a) for a in DEFAULT_ANCHORS], "source": choice or "default",
            "fitness": anchor_fitness(wh, np.asarray(anchors or DEFAULT_ANCHORS)),
            "fitness_yolov3_default": anchor_fitness(wh, np.asarray(DEFAULT_ANCHORS))}
    return anchors, info


def train(p: Params) -> dict:
    from components.data.prepare import load_report
    from components.models import create_model
    from components.train import fit

    prep = load_report(PREPARED)
    anchors, anchor_info = _anchors(p)
    kwargs = {"backbone": p("model.backbone"), "width": p("model.width"), **({"anchors": anchors} if anchors else {})}
    cfg = {"model_name": p("model.name"), "model_kwargs": kwargs, "num_classes": len(prep["class_names"]),
           "class_names": prep["class_names"], "in_chans": p("data.in_chans"), "image_size": p("model.image_size"),
           "epochs": p("train.epochs"), "batch_size": p("train.batch_size"), "lr": p("train.lr"),
           "weight_decay": p("train.weight_decay"), "warmup_steps": p("train.warmup_steps"),
           "shuffle_buffer": p("train.shuffle_buffer"), "threads_per_worker": p("train.threads_per_worker"),
           "seed": p("seed"), "wandb": dict(p("wandb")), "precision": p("train.precision")}
    create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **kwargs)  # fails here, not in workers
    init_ray(p)
    t0 = time.time()
    res = fit(cfg, PREPARED / "shards", PREPARED / "shards", p("train.storage_path"), TRAIN_MODEL,
              num_workers=p("train.num_workers"), cpus_per_worker=p("train.cpus_per_worker"),
              use_gpu=p("train.use_gpu"), data_cpus=p("augment.cpus_per_task"), max_failures=p("train.max_failures"),
              keep_checkpoints=p("train.keep_checkpoints"), online_policy=p("augment.policy"),
              data_digest=prep["data_digest"], select_by="last")
    last = res.history[-1]
    summary = record_training(res, t0, anchors=anchor_info)
    say(f"train: {len(res.history)} epochs, val mAP@0.5 {last['val_map_50']:.3f}, mAP@0.5:0.95 "
         f"{last['val_map_50_95']:.3f}; model at {TRAIN_MODEL}")
    return summary


def prune(p: Params) -> dict:
    import torch

    from components.data.shards import read_shards
    from components.models import load_model, save_model
    from components.models.checkpoint import save_sparse, save_structured
    from components.prune.structured import count_macs_params, structured_prune
    from components.prune.unstructured import apply_global_magnitude, make_permanent, sparsity_report
    from components.train.detect import finetune_detector

    method = p("prune.method")
    model, meta = load_model(TRAIN_MODEL)
    size = int(meta["image_size"])
    x = torch.rand(1, int(meta["in_chans"]), size, size)
    macs0, params0 = count_macs_params(model, x)
    if PRUNE_DIR.exists():
        shutil.rmtree(PRUNE_DIR)
    PRUNE_DIR.mkdir(parents=True)
    info = {"method": method, "macs_before": macs0, "params_before": params0}
    if method == "unstructured":
        apply_global_magnitude(model, float(p("prune.sparsity")))
    elif method == "structured":
        st = p.config.prune.structured
        rep = structured_prune(model, x, target=st.target, ratio=st.ratio, importance=st.importance)
        info["structured"] = {"macs_ratio_reached": rep.macs_reduction}
    elif method != "none":
        raise ValueError(f"prune.method must be unstructured, structured or none, got {method!r}")
    losses = []
    if method != "none" and p("prune.finetune_epochs") > 0:
        train_rows = read_shards(PREPARED / "shards", columns=["image", "boxes", "split"], split="train")
        losses = finetune_detector(model, train_rows, image_size=size, in_chans=int(meta["in_chans"]),
                                   epochs=int(p("prune.finetune_epochs")), batch_size=int(p("train.batch_size")),
                                   lr=float(p("prune.finetune_lr")), policy=p("augment.policy"), seed=p("seed"),
                                   threads=int(p("train.threads_per_worker")))
    if method == "unstructured":
        make_permanent(model)
        path = save_sparse(PRUNE_DIR / "model.npz", model, meta)
        info["sparsity"] = sparsity_report(model)
    elif method == "structured":
        path = save_structured(PRUNE_DIR / "model.pt", model, meta)
    else:
        path = save_model(PRUNE_DIR / "model.pt", model, meta)
    macs1, params1 = count_macs_params(model, x)
    info.update({"file": path.name, "macs_after": macs1, "params_after": params1,
                 "nonzero_params_after": int(sum(int((q != 0).sum()) for q in model.parameters())),
                 "file_bytes_full": TRAIN_MODEL.stat().st_size, "file_bytes_edge": path.stat().st_size,
                 "finetune_steps": len(losses), "finetune_last_loss": losses[-1] if losses else None})
    write_json(METRICS / "prune.json", info)
    say(f"prune: {method}; MACs {macs0 / 1e9:.2f} G -> {macs1 / 1e9:.2f} G, non-zero parameters "
         f"{info['nonzero_params_after'] / 1e6:.2f} M of {params0 / 1e6:.2f} M, file {info['file_bytes_full'] / 1e6:.1f}"
         f" -> {info['file_bytes_edge'] / 1e6:.1f} MB; {len(losses)} fine-tune steps")
    return info


def _pruned_path() -> Path:
    return PRUNE_DIR / json.loads((METRICS / "prune.json").read_text())["file"]


def evaluate(p: Params) -> dict:
    import torch

    from components.data.shards import read_shards
    from components.evaluate.detection import detection_metrics, predict_frame, save_pr_curves, save_prediction_grid
    from components.models import load_model

    test = read_shards(PREPARED / "shards", split="test")
    out = {}
    for name, path in (("full", TRAIN_MODEL), ("pruned", _pruned_path())):
        model, meta = load_model(path)
        torch.set_num_threads(int(p("train.threads_per_worker")))
        preds, gts = predict_frame(model, test, meta, score_threshold=p("evaluate.score_threshold"),
                                   iou_threshold=p("evaluate.iou_threshold"))
        m = detection_metrics(preds, gts, list(meta["class_names"]))
        x = torch.rand(1, int(meta["in_chans"]), int(meta["image_size"]), int(meta["image_size"]))
        model = model.eval().to(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            times = []
            for _ in range(int(p("evaluate.latency_runs"))):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        m["ms_per_frame_median"] = 1e3 * float(np.median(times))
        out[name] = {k: v for k, v in m.items() if k != "pr_curve_50"}
        REPORTS.mkdir(parents=True, exist_ok=True)
        save_pr_curves(m, REPORTS / f"pr_{name}.png", title=f"{name} model, test split")
        save_prediction_grid(model, test, meta, REPORTS / f"predictions_{name}.png", n=8,
                             score_threshold=p("serve.score_threshold"))
    write_json(METRICS / "evaluate.json", out)
    say(f"evaluate: test mAP@0.5 full {out['full']['map_50']:.3f} / pruned {out['pruned']['map_50']:.3f}, "
         f"mAP@0.5:0.95 {out['full']['map_50_95']:.3f} / {out['pruned']['map_50_95']:.3f}; "
         f"{out['full']['ms_per_frame_median']:.1f} / {out['pruned']['ms_per_frame_median']:.1f} ms per frame")
    return out


def promote(p: Params) -> dict:
    from components.serve.config import build_serve_config, write_serve_config

    ev = json.loads((METRICS / "evaluate.json").read_text())
    gate = p("promote.min_map_50")
    passed = gate is None or ev["pruned"]["map_50"] >= float(gate)
    info = {"promoted": passed, "min_map_50": gate, "map_50_pruned": ev["pruned"]["map_50"],
            "map_50_full": ev["full"]["map_50"]}
    for d in (PROMOTED, SERVE_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    if passed:
        edge = _pruned_path()
        shutil.copy2(TRAIN_MODEL, PROMOTED / "full.pt")
        shutil.copy2(edge, PROMOTED / f"edge{edge.suffix}")
        s = p("serve")
        args = {"cloud_model": str(PROMOTED / "full.pt"), "edge_model": str(PROMOTED / f"edge{edge.suffix}"),
                "model_version": f"detect-{time.strftime('%Y%m%d-%H%M%S')}", "threshold": s["cascade"]["threshold"],
                "default_mode": s["default_mode"],
                "detection": {k: s[k] for k in ("score_threshold", "iou_threshold", "max_detections")},
                "edge": dict(s["edge"]), "cloud": dict(s["cloud"])}
        write_serve_config(SERVE_DIR / "serve_config.yaml", build_serve_config(args, host=s["host"], port=s["port"]))
        info["files"] = {"full": "full.pt", "edge": f"edge{edge.suffix}"}
    else:
        (SERVE_DIR / "NOT_PROMOTED").write_text(f"pruned mAP@0.5 {ev['pruned']['map_50']:.3f} < {gate}\n")
    write_json(PROMOTED / "model.json", info)
    say(f"promote: {'promoted' if passed else 'NOT promoted'} (pruned mAP@0.5 {ev['pruned']['map_50']:.3f}, "
         f"gate {gate})" + (f"; Serve config {SERVE_DIR / 'serve_config.yaml'}: POST /detect" if passed else ""))
    return info


STAGES = {f.__name__: f for f in (ingest, prepare, train, prune, evaluate, promote)}
