"""Transfer learning through Ray Train: pretrained weights are loaded in the worker, the backbone
stays frozen for `freeze_backbone_epochs` while the head learns, then everything trains."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from components.data.prepare import prepare_dataset
from components.data.sources import get_source
from components.models import create_model
from components.models.checkpoint import load_payload
from components.models.transfer import PretrainedWeightsError
from components.train import fit
from components.train.settings import RECIPE_OFF


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    get_source("synthetic").ingest(root / "raw", num_images=96, image_size=32, num_classes=2, seed=3)
    res = prepare_dataset(root / "raw", root / "prepared", "synthetic", "multiclass", seed=3)
    weights = root / "resnet18_torchvision.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)  # torchvision format, RGB
    return root, res.report, weights


def _cfg(report: dict, **kw) -> dict:
    return RECIPE_OFF | dict(
        schedule="cosine", max_pixels=50_000_000, data_cache="stream", precision="fp32", model_name="resnet18",
        num_classes=len(report["class_names"]), class_names=report["class_names"], in_chans=1, image_size=32,
        epochs=2, batch_size=16, lr=1e-3, weight_decay=0.0, label_smoothing=0.0, shuffle_buffer=0,
        class_weights=None, threads_per_worker=1, seed=0, wandb={"mode": "disabled"}) | kw


def test_pretrained_frozen_backbone_then_full_finetune(ray_address, tiny):
    root, report, weights = tiny
    source = torch.load(weights, weights_only=True)
    cfg = _cfg(report, pretrained=str(weights), freeze_backbone_epochs=1, backbone_lr_scale=0.1)
    storage = root / "ckpt"
    res = fit(cfg, root / "prepared/shards", root / "prepared/shards", storage, root / "model.pt",
              num_workers=1, cpus_per_worker=1, data_cpus=0.5, max_failures=0, online_policy=None, use_gpu=False,
              keep_checkpoints=2, select_by="last")
    epoch1 = load_payload(next(storage.glob("*/epoch_0001")) / "model.pt")["state_dict"]
    final = load_payload(root / "model.pt")["state_dict"]
    # Epoch 1: the backbone is exactly the pretrained one (grayscale stem = sum of the RGB filters) ...
    assert torch.equal(epoch1["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert torch.allclose(epoch1["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    # ... while the new 2-class head learned from its initialisation (the worker seeds with cfg seed + rank).
    torch.manual_seed(0)
    initial = create_model("resnet18", 2, 1).state_dict()
    assert epoch1["fc.weight"].shape == (2, 512)
    assert not torch.equal(epoch1["fc.weight"], initial["fc.weight"])
    # Epoch 2: the backbone trains too.
    assert not torch.equal(final["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert [h["epoch"] for h in res.history] == [1, 2]


def test_missing_pretrained_file_fails_clearly(tmp_path):
    from components.models import create_model, load_pretrained

    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_pretrained(create_model("resnet18", 2, 1), tmp_path / "imagenet.pth", in_chans=1)
