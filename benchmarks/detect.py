"""Detection benchmark: the ResNet18-backbone YOLO detector on synthetic conveyor scenes, before and
after pruning, against YOLOv3's Darknet-53 detector counted at the same input size.

1. Data: ``--images`` synthetic conveyor scenes (``components.data.detection.synthetic_conveyor``:
   dark glossy "coal" and grey matte "gangue" lumps on a grooved belt, ``--scene-size`` pixels),
   written in YOLO format, read back and prepared (split 70/15/15 by image, seed 42). **Synthetic
   scenes, not a real coal/gangue set**: mAP here checks the detector and the pipeline, it is not
   comparable with Xue et al.'s 96.27 % on their images.
2. Training: ``resnet18_yolo`` (ResNet18 backbone, YOLOv3 neck and heads) from scratch with Ray Train
   (``components.train.fit``), ``--epochs`` at ``--image-size``, online ``conveyor`` box-aware
   augmentation, anchors fitted by k-means on the training boxes.
3. Compression, each from the trained model, fine-tuned ``--finetune-epochs`` in-process:
   unstructured global magnitude pruning at ``--sparsities`` (the paper's method: smaller files,
   same dense compute) and structured channel pruning at ``--structured-ratio`` of the MACs
   (torch-pruning; smaller and faster).
4. For each model: test mAP@0.5 and mAP@0.5:0.95 (torchmetrics/pycocotools), parameters (non-zero
   for sparse models), MACs at ``--image-size`` (FlopCounterMode), file size, CPU latency per frame
   at batch 1 (median of 50, ``--threads`` threads, channels_last, inference mode) at ``--image-size``
   and at 416 x 416 (YOLOv3's default input).
5. YOLOv3 with Darknet-53 (a definition here, for counting only: the yolov3.cfg layers) with the
   same classes: parameters and MACs at the same sizes, and its CPU latency. Its parameter count
   with 80 classes is printed as a check of the definition (yolov3.cfg: 61,949,149).

    python benchmarks/detect.py [--images 400] [--scene-size 256] [--image-size 128] [--epochs 15]
        [--sparsities 0.5,0.7] [--structured-ratio 0.5] [--finetune-epochs 2] [--out FILE]

Prints a Markdown table and writes benchmarks/results/detect.json (and detect_predictions.png,
detect_pr.png next to it).
"""
from __future__ import annotations

import argparse
import json
import copy
import tempfile
import time
from pathlib import Path

import common  # benchmarks/common.py (also puts the repository root on sys.path)
from common import RESULTS, SPLIT_SEED, count_macs, environment_info, markdown_table, measure_latency, say
import numpy as np
import torch
from torch import nn

from components.data.detection import read_yolo, synthetic_conveyor, write_yolo
from components.data.detection_prepare import prepare_detection
from components.data.shards import read_shards
from components.evaluate.detection import detection_metrics, predict_frame, save_pr_curves, save_prediction_grid
from components.models import count_parameters, create_model, load_model, save_model
from components.models.detector import DEFAULT_ANCHORS, anchor_fitness, fit_anchors
from components.models.checkpoint import save_sparse, save_structured
from components.prune.structured import count_macs_params, structured_prune
from components.prune.unstructured import apply_global_magnitude, make_permanent, sparsity_report
from components.train import fit
from components.train.detect import finetune_detector

CLASSES = ["coal", "gangue"]
PAPER = {"source": "Xue et al., YOLOv3 with a ResNet18 backbone, unstructured pruning (reported, their data)",
         "map": 0.9627, "ms_per_frame": 45.5, "size_mb": 65.34, "fewer_parameters_than_yolov3": 0.714,
         "faster_than_yolov3": 0.393}


# ------------------------------------------------------------------- YOLOv3 / Darknet-53
def _cbl(c_in: int, c_out: int, k: int, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_cbl(c, c // 2, 1), _cbl(c // 2, c, 3))

    def forward(self, x):
        return x + self.body(x)


class YOLOv3Darknet53(nn.Module):
    """YOLOv3 (yolov3.cfg) for counting parameters, MACs and CPU latency; never trained here."""

    def __init__(self, num_classes: int):
        super().__init__()
        out = 3 * (5 + num_classes)
        stages, c = [_cbl(3, 32, 3)], 32
        for width, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
            stages.append(nn.Sequential(_cbl(c, width, 3, 2), *[_Residual(width) for _ in range(blocks)]))
            c = width
        self.stem, self.s1, self.s2, self.c3, self.c4, self.c5 = stages[0], stages[1], stages[2], *stages[3:]

        def five(c_in, c):
            return nn.Sequential(_cbl(c_in, c, 1), _cbl(c, 2 * c, 3), _cbl(2 * c, c, 1), _cbl(c, 2 * c, 3), _cbl(2 * c, c, 1))

        self.set5, self.head5 = five(1024, 512), nn.Sequential(_cbl(512, 1024, 3), nn.Conv2d(1024, out, 1))
        self.red5, self.set4 = _cbl(512, 256, 1), five(768, 256)
        self.head4 = nn.Sequential(_cbl(256, 512, 3), nn.Conv2d(512, out, 1))
        self.red4, self.set3 = _cbl(256, 128, 1), five(384, 128)
        self.head3 = nn.Sequential(_cbl(128, 256, 3), nn.Conv2d(256, out, 1))

    def forward(self, x):
        c3 = self.c3(self.s2(self.s1(self.stem(x))))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p5 = self.set5(c5)
        up = nn.functional.interpolate
        p4 = self.set4(torch.cat([up(self.red5(p5), size=c4.shape[-2:]), c4], 1))
        p3 = self.set3(torch.cat([up(self.red4(p4), size=c3.shape[-2:]), c3], 1))
        return [self.head3(p3), self.head4(p4), self.head5(p5)]


# ---------------------------------------------------------------------------- measuring
def nonzero_params(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def cost(model: nn.Module, image_size: int, threads: int, in_chans: int = 3) -> dict:
    out = {"params": count_parameters(model), "nonzero_params": nonzero_params(model)}
    for size in sorted({image_size, 416}):
        lat = measure_latency(model, size, in_chans, threads=threads, runs=50, warmup=5, batch=8, batch_runs=5)
        out[f"at_{size}"] = {"macs": count_macs(model, size, in_chans), "ms_per_frame": lat["latency_ms_median"],
                             "ms_p90": lat["latency_ms_p90"], "frames_per_second_batch8":
                             lat["throughput_images_per_second_median"]}
    return out


def evaluate(model: nn.Module, test, meta: dict) -> dict:
    preds, gts = predict_frame(model, test, meta)
    m = detection_metrics(preds, gts, CLASSES)
    return {k: m[k] for k in ("map_50", "map_50_95", "ap_50_per_class", "ap_50_95_per_class", "num_images",
                              "num_boxes")}


# ---------------------------------------------------------------------------------- main
def compressed_variants(full, train, meta: dict, args, work: Path, sparsities: list[float]) -> dict:
    """The full detector and its pruned twins (unstructured sparsities, one structured ratio), fine-tuned."""
    rows = {"full": {"model": full, "file": work / "full.pt", "how": "trained"}}
    for sp in sparsities:
        m = copy.deepcopy(full)
        apply_global_magnitude(m, sp)
        finetune_detector(m, train, image_size=args.image_size, in_chans=3, epochs=args.finetune_epochs,
                          batch_size=args.batch_size, lr=2e-4, policy="conveyor", seed=args.seed, threads=args.threads)
        make_permanent(m)
        path = save_sparse(work / f"sparse{int(sp * 100)}.npz", m, meta)
        rows[f"unstructured {sp:.0%}"] = {"model": m, "file": path, "how": f"global magnitude {sp:.0%} of the "
                                          f"convolution weights + {args.finetune_epochs} fine-tune epochs",
                                          "sparsity": sparsity_report(m)}
    m = copy.deepcopy(full)
    x = torch.rand(1, 3, args.image_size, args.image_size)
    rep = structured_prune(m, x, ratio=args.structured_ratio, target="macs", importance="l1")
    finetune_detector(m, train, image_size=args.image_size, in_chans=3, epochs=args.finetune_epochs,
                      batch_size=args.batch_size, lr=2e-4, policy="conveyor", seed=args.seed, threads=args.threads)
    path = save_structured(work / "structured.pt", m, meta)
    rows[f"structured -{args.structured_ratio:.0%} MACs"] = {
        "model": m, "file": path, "how": f"channels (torch-pruning, L1) + {args.finetune_epochs} fine-tune epochs",
        "structured": {"macs_before": rep.macs_before, "macs_after": rep.macs_after}}
    return rows


def print_table(results: dict, s: int) -> None:
    table = []
    for name, r in results.items():
        table.append([name, f"{r['map_50']:.3f}" if "map_50" in r else "-",
                      f"{r['map_50_95']:.3f}" if "map_50_95" in r else "-",
                      f"{r['nonzero_params'] / 1e6:.2f} M non-zero of {r['params'] / 1e6:.2f} M" if "sparsity" in r
                      else f"{r['params'] / 1e6:.2f} M",
                      f"{r[f'at_{s}']['macs'] / 1e9:.2f} G", f"{r['file_bytes'] / 1e6:.1f} MB",
                      f"{r[f'at_{s}']['ms_per_frame']:.1f}", f"{r['at_416']['ms_per_frame']:.1f}"])
    print()
    print(markdown_table(["model", "mAP@0.5", "mAP@0.5:0.95", "parameters", f"MACs @{s}", "file",
                          f"ms/frame @{s}", "ms/frame @416"], table))


# one worker of one CPU next to 0.5 CPU of Ray Data tasks, no retries, the last epoch exported
DETECT_FIT = dict(num_workers=1, cpus_per_worker=1.0, data_cpus=0.5, max_failures=0, keep_checkpoints=1,
                  online_policy="conveyor", use_gpu=False, select_by="last")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--scene-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--structured-ratio", type=float, default=0.5)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(RESULTS / "detect.json"))
    args = ap.parse_args(argv)
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    out_path = Path(args.out)

    ray = common.start_ray()
    env = environment_info()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="resops-detect-") as tmp:
        work = Path(args.work or tmp)
        images, boxes = synthetic_conveyor(args.images, args.scene_size, seed=args.seed)
        write_yolo(work / "raw", images, boxes, CLASSES)
        prep = prepare_detection(read_yolo(work / "raw"), work / "prepared", dataset="synthetic_conveyor",
                                 test_size=0.15, val_size=0.15 / 0.85, seed=SPLIT_SEED).report
        say(f"prepared {prep['num_prepared']} scenes: images {prep['images']}, boxes {prep['boxes']}")
        shards = work / "prepared" / "shards"
        train = read_shards(shards, split="train")
        test = read_shards(shards, split="test")
        wh = np.concatenate([np.asarray(json.loads(b), np.float32).reshape(-1, 5) for b in train["boxes"]])[:, 3:5]
        anchors = fit_anchors(wh, seed=args.seed)
        fitness = {"kmeans": anchor_fitness(wh, anchors), "yolov3_coco": anchor_fitness(wh, np.asarray(DEFAULT_ANCHORS))}
        say(f"anchors fitted by k-means: mean best IoU {fitness['kmeans']:.3f} (YOLOv3's COCO anchors "
            f"{fitness['yolov3_coco']:.3f})")
        meta = {"model_name": "resnet18_yolo", "num_classes": 2, "in_chans": 3, "image_size": args.image_size,
                "class_names": CLASSES, "model_kwargs": {"anchors": anchors.tolist()}}
        cfg = {**{k: meta[k] for k in ("model_name", "num_classes", "in_chans", "image_size", "class_names")},
               "model_kwargs": meta["model_kwargs"], "epochs": args.epochs, "batch_size": args.batch_size,
               "lr": args.lr, "weight_decay": 5e-4, "shuffle_buffer": 64, "threads_per_worker": args.threads,
               "seed": args.seed, "warmup_steps": 50, "wandb": {"mode": "disabled"}, "precision": "fp32",
               "run_name": f"bench-detect-{time.time_ns()}"}
        t0 = time.perf_counter()
        res = fit(cfg, shards, shards, work / "runs", work / "full.pt", **DETECT_FIT)
        train_seconds = time.perf_counter() - t0
        say(f"trained {args.epochs} epochs in {train_seconds:.0f} s; last val mAP@0.5 {res.history[-1]['val_map_50']:.3f}")
        common.stop_ray()
        del ray

        full, _ = load_model(work / "full.pt")
        rows = compressed_variants(full, train, meta, args, work, sparsities)
        results = {}
        for name, r in rows.items():
            say(f"measuring {name}")
            results[name] = {"how": r["how"], "file_bytes": Path(r["file"]).stat().st_size,
                             **evaluate(r["model"], test, meta), **cost(r["model"], args.image_size, args.threads),
                             **{k: r[k] for k in ("sparsity", "structured") if k in r}}
        save_prediction_grid(full, test, meta, out_path.with_name("detect_predictions.png"), n=8)
        preds, gts = predict_frame(full, test, meta)
        save_pr_curves(detection_metrics(preds, gts, CLASSES), out_path.with_name("detect_pr.png"),
                       title="resnet18_yolo on synthetic conveyor scenes (test)")
        yolo = YOLOv3Darknet53(len(CLASSES)).eval()
        with tempfile.TemporaryDirectory() as t2:
            torch.save(yolo.state_dict(), Path(t2) / "yolov3.pt")
            yolo_bytes = (Path(t2) / "yolov3.pt").stat().st_size
        results["YOLOv3 Darknet-53 (counted)"] = {"how": "yolov3.cfg layers, untrained, same classes",
                                                  "file_bytes": yolo_bytes, **cost(yolo, args.image_size, args.threads),
                                                  "params_with_80_classes": count_parameters(YOLOv3Darknet53(80))}

    result = {"benchmark": "detect", "data": "SYNTHETIC conveyor scenes (components.data.detection): not real coal",
              "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
              "environment": env, "prepared": prep, "anchors": anchors.tolist(), "anchor_fitness": fitness,
              "training": {"seconds": train_seconds, "history": res.history}, "models": results,
              "paper_reference": PAPER, "total_seconds": time.perf_counter() - t_start}
    print_table(results, args.image_size)
    common.write_json(out_path, result)
    return result


if __name__ == "__main__":
    main()
