"""Grad-CAM (components.evaluate.explain): a model that can only learn its label from one corner of the
image is explained by heat maps that peak in that corner, for every classifier of the model zoo and
for the channel-pruned edge model; the evaluate stage's grid and the overlay are real pictures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from components.evaluate.explain import cam_layer, collect_examples, gradcam, gradcam_grid, overlay, to_uint8
from components.models import create_model, list_models

SIZE, CORNER = 64, 24  # at 64 px Grad-CAM weighs layer3 (4 x 4 cells): the quadrants are 2 x 2 cells each
VARIANTS = list_models()
HALF = SIZE // 2


def corner_set(n: int, seed: int, corner: str = "top-left") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; class 1 has a checkerboard in the CORNER x CORNER pixels of ``corner``, class 0
    the same noise there. Nothing else differs between the classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    y = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(CORNER), torch.arange(CORNER), indexing="ij")
    board = (((yy // 3) + (xx // 3)) % 2).float() * 4.0 - 2.0
    rows, cols = (slice(0, CORNER), slice(0, CORNER)) if corner == "top-left" else \
        (slice(SIZE - CORNER, SIZE), slice(SIZE - CORNER, SIZE))
    x[y == 1, 0, rows, cols] = board + 0.3 * x[y == 1, 0, rows, cols]
    return x, y


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def quadrants(cams: np.ndarray) -> tuple[float, float, float]:
    """(share of maps peaking in the top-left quadrant, in the bottom-right one, mean heat top-left /
    mean heat bottom-right)."""
    peaks = [np.unravel_index(np.argmax(c), c.shape) for c in cams]
    tl = float(np.mean([r < HALF and c < HALF for r, c in peaks]))
    br = float(np.mean([r >= HALF and c >= HALF for r, c in peaks]))
    ratio = cams[:, :HALF, :HALF].mean() / max(cams[:, HALF:, HALF:].mean(), 1e-9)
    return tl, br, float(ratio)


def explained_corner(model, test) -> tuple[float, float, float]:
    x, y = test
    acc = accuracy(model, x, y)
    assert acc >= 0.9, f"the model did not learn the corner (held-out accuracy {acc:.2f}): nothing to explain"
    cams, probs = gradcam(model, x[y == 1], target=1)
    assert cams.shape == (int((y == 1).sum()), SIZE, SIZE) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert probs.shape == (len(cams), 2) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    return quadrants(cams)


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(2)
    return corner_set(192, seed=0), corner_set(64, seed=1)


@pytest.fixture(scope="module")
def trained_resnet18(data):
    (x, y), _ = data
    torch.manual_seed(0)
    return fit(create_model("resnet18", num_classes=2, in_chans=1), x, y, epochs=4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_heat_map_peaks_in_the_corner_that_carries_the_label(variant, data, trained_resnet18):
    train, test = data
    if variant == "resnet18":
        model = trained_resnet18
    else:
        torch.manual_seed(0)
        model = fit(create_model(variant, num_classes=2, in_chans=1), *train, epochs=4)
    assert cam_layer(model, SIZE) == ("layer3", model.layer3) and cam_layer(model, 224)[0] == "layer4"
    tl, _, ratio = explained_corner(model, test)
    assert tl >= 0.9 and ratio > 1.5, (tl, ratio)


def test_the_heat_map_follows_what_the_model_learned():
    """Control: the same model trained with the label in the opposite corner is explained there."""
    torch.manual_seed(0)
    model = fit(create_model("resnet18", num_classes=2, in_chans=1), *corner_set(192, 0, "bottom-right"), epochs=4)
    tl, br, ratio = explained_corner(model, corner_set(64, 1, "bottom-right"))
    assert br >= 0.9 and tl == 0.0 and ratio < 1 / 1.5, (tl, br, ratio)


def test_heat_map_of_the_channel_pruned_edge_model_peaks_in_the_corner(data, trained_resnet18):
    import copy

    from components.prune.structured import conv_channels, structured_prune

    train, test = data
    model = copy.deepcopy(trained_resnet18)
    before = conv_channels(model)
    structured_prune(model, torch.randn(1, 1, SIZE, SIZE), target="macs", ratio=0.5, importance="l1")
    assert sum(conv_channels(model).values()) < sum(before.values())  # really fewer channels
    fit(model, *train, epochs=2, lr=1e-3)  # the prune stage's fine-tune: 50 % of the MACs cut needs it
    tl, _, ratio = explained_corner(model, test)
    assert tl >= 0.9 and ratio > 1.5, (tl, ratio)


def test_explaining_leaves_the_model_as_it_was(trained_resnet18, data):
    _, (x, _) = data
    with torch.no_grad():
        before = trained_resnet18(x[:4])
    gradcam(trained_resnet18, x[:4])
    assert not trained_resnet18.training
    for layer in (trained_resnet18.layer3, trained_resnet18.layer4):  # Captum's hooks are gone
        assert not layer._forward_hooks and not layer._backward_hooks
    with torch.no_grad():
        assert torch.equal(trained_resnet18(x[:4]), before)


def test_overlay_is_drawn_at_the_image_size():
    img = np.full((40, 30, 1), 128, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[:4, :4] = 1.0
    out = overlay(img, cam)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8
    hot, cold = out[:10, :8].astype(int), out[-10:, -8:].astype(int)
    assert hot[..., 0].mean() > cold[..., 0].mean() + 40  # jet: red where the map is 1, blue where it is 0
    x = torch.from_numpy((np.arange(16, dtype=np.float32).reshape(1, 4, 4) - 127.5) / 63.75)
    assert to_uint8(x)[..., 0].tolist() == np.arange(16).reshape(4, 4).tolist()


def test_grid_shows_right_and_wrong_examples_per_class(data, trained_resnet18, tmp_path):
    _, (x, y) = data
    flipped = y.clone()
    flipped[:6] = 1 - flipped[:6]  # six labels the model will get "wrong"
    batches = [{"image": x[i:i + 16], "label": flipped[i:i + 16]} for i in range(0, len(x), 16)]
    shown = gradcam_grid(trained_resnet18, batches, ["plain", "corner"], tmp_path / "grid.png", per_cell=3,
                         title="test")
    assert shown["plain"]["right"] == 3 and shown["corner"]["right"] == 3
    assert shown["plain"]["wrong"] + shown["corner"]["wrong"] >= 5
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
        assert np.asarray(im.convert("L")).std() > 10  # a picture, not a blank page
    xs, ys, kinds = collect_examples(trained_resnet18, batches, 2, 3)
    assert len(xs) == len(ys) == len(kinds) and set(kinds.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="empty"):
        collect_examples(trained_resnet18, [], 2, 3)
