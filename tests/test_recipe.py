"""Unit tests of the training-recipe options (no Ray): precision selection and autocast, the lr
schedules, test-time augmentation, the ordinal head (likelihood, training, model file, pruning,
ONNX), the ``el`` policy and uint8 operator output, and the in-memory training data path.

Small on purpose (8-32 px inputs, one torch thread): the file runs in well under 30 s on two cores.
"""
from __future__ import annotations

import copy
import platform
import threading

import numpy as np
import pytest
import torch
from torch import nn

from components.augment.operator import AugmentOperator
from components.augment.policies import build_policy, list_policies
from components.data.images import encode_png
from components.evaluate.report import predict_dataset
from components.evaluate.tta import tta_proba, views
from components.models import create_model, load_model, save_model
from components.models.heads import OrdinalHead
from components.train import precision as precision_mod
from components.train.loop import lr_factor
from components.train.memory import MemorySplit, epoch_order, standardise
from components.train.precision import autocast, cpu_flags, resolve_precision
from components.train.settings import RECIPE_OFF

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512_bf16"}, "bf16"),
    ({"avx2"}, "fp32"),
    ({"amx_bf16"}, "bf16"),
    (set(), "fp32"),
])
def test_auto_precision_follows_the_cpu_probe(monkeypatch, flags, expected):
    # only the probe is faked: resolve_precision -> cpu_has_native_bf16 -> cpu_flags run for real
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset(flags))
    assert precision_mod.cpu_has_native_bf16() is (expected == "bf16")
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert precision_mod.describe(expected, "auto")["cpu_native_bf16"] is (expected == "bf16")


def test_explicit_precision_is_kept_and_unknown_is_refused(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx2"}))
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, "cpu") == p  # explicit: no probe override, even without native bf16
    for bad in ("float32", "FP32", "", "amp"):
        with pytest.raises(ValueError, match="precision must be one of"):
            resolve_precision(bad, "cpu")


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads the x86 flags line of /proc/cpuinfo")
def test_cpu_flags_parse_this_machines_cpuinfo():
    cpu_flags.cache_clear()
    flags = cpu_flags()
    assert isinstance(flags, frozenset) and flags
    assert "sse2" in flags and "fpu" in flags  # every x86-64 CPU has them
    with open("/proc/cpuinfo") as fh:
        line = next(ln for ln in fh if ln.startswith("flags"))
    assert flags == frozenset(line.split(":", 1)[1].split())
    assert precision_mod.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_autocast_bf16_runs_linear_in_bfloat16_and_fp32_is_a_no_op():
    cpu = torch.device("cpu")
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    with autocast(cpu, resolve_precision("bf16", cpu)):
        assert layer(x).dtype == torch.bfloat16
    with autocast(cpu, resolve_precision("fp32", cpu)):
        out = layer(x)
    assert out.dtype == torch.float32 and torch.equal(out, layer(x))
    assert precision_mod.grad_scaler(cpu, "bf16") is None and precision_mod.grad_scaler(cpu, "fp16") is None


# ------------------------------------------------------------------------------- lr schedule
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_schedules_warm_up_peak_and_reach_zero(schedule):
    warmup = 0.1
    assert lr_factor(0.0, schedule, warmup) < 0.02
    assert lr_factor(warmup, schedule, warmup) == pytest.approx(1.0)
    assert lr_factor(1.0, schedule, warmup) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(1.5, schedule, warmup) == pytest.approx(0.0, abs=1e-9)  # clamped past the end
    up = [lr_factor(t, schedule, warmup) for t in np.linspace(0, warmup * 0.99, 20)]
    assert all(b > a for a, b in zip(up, up[1:]))  # warm-up rises
    down = [lr_factor(t, schedule, warmup) for t in np.linspace(warmup, 1.0, 50)]
    assert all(b < a for a, b in zip(down, down[1:]))  # strictly decreasing after warm-up
    assert max(down) == pytest.approx(1.0) and all(0 <= v <= 1 for v in down)
    # no warm-up: starts at the peak
    assert lr_factor(0.0, schedule, 0.0) == pytest.approx(1.0)
    assert lr_factor(0.55, schedule, warmup) == pytest.approx(0.5)  # half-way through the decay
    quarter = lr_factor(0.325, schedule, warmup)
    assert quarter == pytest.approx(0.75 if schedule == "linear" else 0.5 * (1 + np.cos(np.pi / 4)))


def test_onecycle_schedule_shape():
    assert lr_factor(0.0, "onecycle") == pytest.approx(1 / 25)
    assert lr_factor(0.3, "onecycle") == pytest.approx(1.0)
    assert lr_factor(1.0, "onecycle") == pytest.approx(0.0, abs=1e-5)
    grid = np.linspace(0, 1, 101)
    values = [lr_factor(t, "onecycle", warmup=0.2) for t in grid]  # warmup does not apply
    assert int(np.argmax(values)) == 30 and max(values) == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(values[:31], values[1:31]))
    assert all(b <= a for a, b in zip(values[30:], values[31:]))


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="train.schedule must be one of"):
        lr_factor(0.5, "step")


# ------------------------------------------------------------------------------- TTA
def _distinct(arrays) -> int:
    return len({a.tobytes() for a in arrays})


def test_views_are_the_exact_flips_and_dihedral_symmetries():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    flips = views(x, "flips")
    dihedral = views(x, "dihedral")
    assert len(flips) == 4 and _distinct([v.numpy() for v in flips]) == 4
    assert len(dihedral) == 8 and _distinct([v.numpy() for v in dihedral]) == 8
    assert views(x, "none") == [x]
    # exact permutations of each image plane: same values, same shape
    plane = np.sort(x.numpy().reshape(2, 3, -1), axis=2)
    for v in flips + dihedral:
        assert v.shape == x.shape and np.array_equal(np.sort(v.numpy().reshape(2, 3, -1), axis=2), plane)
    # the flips are the 4 expected ones, and the dihedral views are the 8 symmetries of the square
    expected_flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    assert {v.numpy().tobytes() for v in flips} == {e.numpy().tobytes() for e in expected_flips}
    expected_d4 = [torch.rot90(x, k, (2, 3)) for k in range(4)] + \
                  [torch.rot90(x.transpose(2, 3), k, (2, 3)) for k in range(4)]
    assert {v.numpy().tobytes() for v in dihedral} == {e.numpy().tobytes() for e in expected_d4}
    # numpy inputs: the same views as numpy arrays
    a = x.numpy()
    for mode, torch_views in (("flips", flips), ("dihedral", dihedral)):
        np_views = views(a, mode)
        assert all(isinstance(v, np.ndarray) for v in np_views)
        assert [v.tobytes() for v in np_views] == [v.numpy().tobytes() for v in torch_views]
    with pytest.raises(ValueError, match="evaluate.tta"):
        views(x, "rotations")


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 5) -> list[dict]:
    return [{"image": x[i:i + size], "label": y[i:i + size]} for i in range(0, len(y), size)]


def test_tta_leaves_an_invariant_model_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    labels, plain = predict_dataset(model, _batches(x, y))
    for mode in ("flips", "dihedral"):
        labels_tta, probs = predict_dataset(model, _batches(x, y), tta=mode)
        assert np.array_equal(labels_tta, y.numpy()) and np.array_equal(labels, y.numpy())
        np.testing.assert_allclose(probs, plain, atol=1e-6, rtol=0)


def test_dihedral_tta_is_the_mean_over_the_eight_symmetries():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x, y = torch.randn(11, 1, 8, 8), torch.randint(0, 3, (11,))
    _, plain = predict_dataset(model, _batches(x, y))
    _, probs = predict_dataset(model, _batches(x, y), tta="dihedral")
    with torch.no_grad():
        symmetric = [torch.rot90(x, k, (2, 3)) for k in range(4)] + \
                    [torch.rot90(torch.flip(x, (2,)), k, (2, 3)) for k in range(4)]  # the same group of 8
        expected = torch.stack([torch.softmax(model(v), 1) for v in symmetric]).mean(0).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    assert not np.allclose(probs, plain, atol=1e-3)  # the model is not invariant: TTA changed something
    _, flips = predict_dataset(model, _batches(x, y), tta="flips")
    with torch.no_grad():
        expected_flips = torch.stack([torch.softmax(model(v), 1) for v in
                                      (x, x.flip(2), x.flip(3), x.flip(2).flip(3))]).mean(0).numpy()
    np.testing.assert_allclose(flips, expected_flips, atol=1e-6, rtol=0)
    # tta_proba on numpy views (the ONNX path) gives the same
    def predict_np(a):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(a)), 1).numpy()
    np.testing.assert_allclose(tta_proba(predict_np, x.numpy(), "dihedral"), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- ordinal head
def test_ordinal_head_returns_log_probabilities_and_ordered_cuts():
    torch.manual_seed(3)
    for k in (2, 3, 5):
        head = OrdinalHead(6, k)
        with torch.no_grad():
            head.raw_cuts.copy_(torch.randn(k - 1) * 3)
        cuts = head.cut_points()
        assert cuts.shape == (k - 1,) and bool((cuts[1:] > cuts[:-1]).all())
        out = head(torch.randn(20, 6))
        assert out.shape == (20, k) and bool((out <= 0).all())
        np.testing.assert_allclose(out.exp().sum(1).detach().numpy(), 1, atol=1e-5)
    # default cut points: evenly spaced one apart, centred on 0
    np.testing.assert_allclose(OrdinalHead(4, 4).cut_points().detach().numpy(), [-1, 0, 1], atol=1e-3)
    with pytest.raises(ValueError):
        OrdinalHead(4, 1)


def test_ordinal_cross_entropy_is_the_cumulative_link_likelihood():
    torch.manual_seed(4)
    head = OrdinalHead(5, 4)
    with torch.no_grad():
        head.raw_cuts.copy_(torch.tensor([-1.3, 0.2, -0.7]))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 1, 3])
    loss = nn.functional.cross_entropy(head(x), y)
    with torch.no_grad():
        s = (x @ head.score.weight.T + head.score.bias).squeeze(1).double()
        c = head.cut_points().double()
    nll = []
    for si, yi in zip(s.tolist(), y.tolist()):
        above = [1.0] + [float(torch.sigmoid(torch.tensor(si - ck))) for ck in c.tolist()] + [0.0]
        nll.append(-np.log(above[yi] - above[yi + 1]))  # P(y) = P(y > k-1) - P(y > k)
    assert float(loss.detach()) == pytest.approx(float(np.mean(nll)), rel=1e-5)


def test_ordinal_head_learns_an_ordered_toy_problem():
    torch.manual_seed(5)
    x = torch.rand(400, 1) * 4  # 4 bands of [0, 4): class = band
    y = x.squeeze(1).floor().long().clamp(max=3)
    model = nn.Sequential(nn.Linear(1, 1), OrdinalHead(1, 4))  # features -> ordinal head
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model((x - 2) / 2), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((model((x - 2) / 2).argmax(1) == y).float().mean())
        grid = torch.linspace(0.02, 3.98, 200)[:, None]
        decoded = model((grid - 2) / 2).argmax(1)
        centres = model((torch.tensor([[0.5], [1.5], [2.5], [3.5]]) - 2) / 2).argmax(1)
    assert acc > 0.9, acc
    assert centres.tolist() == [0, 1, 2, 3]
    assert bool((decoded[1:] >= decoded[:-1]).all())  # monotone in x: never out of order
    assert sorted(set(decoded.tolist())) == [0, 1, 2, 3]


ORDINAL_META = {"model_name": "resnet18", "num_classes": 4, "in_chans": 1, "image_size": SIZE,
                "class_names": ["0", "1/3", "2/3", "1"], "model_kwargs": {"head": "ordinal"}}


@pytest.fixture(scope="module")
def ordinal_model():
    torch.manual_seed(6)
    model = create_model("resnet18", 4, 1, head="ordinal").eval()
    assert isinstance(model.fc, OrdinalHead) and model.fc.num_classes == 4
    return model


def test_ordinal_resnet_saves_and_loads(ordinal_model, tmp_path):
    x = torch.randn(3, 1, SIZE, SIZE)
    path = save_model(tmp_path / "ordinal.pt", ordinal_model, ORDINAL_META)
    loaded, meta = load_model(path)
    assert meta["model_kwargs"] == {"head": "ordinal"} and isinstance(loaded.fc, OrdinalHead)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), ordinal_model(x))
        np.testing.assert_allclose(loaded(x).exp().sum(1).numpy(), 1, atol=1e-5)


def test_ordinal_resnet_prunes_and_exports_to_onnx(ordinal_model, tmp_path):
    from components.models.checkpoint import load_structured, save_structured
    from components.prune import OnnxClassifier, export_onnx, structured_prune

    model = copy.deepcopy(ordinal_model)
    x = torch.randn(4, 1, SIZE, SIZE)
    report = structured_prune(model, torch.randn(1, 1, SIZE, SIZE), target="macs", ratio=0.5, importance="l1")
    assert abs(report.achieved - 0.5) <= 0.05, report.summary()
    assert isinstance(model.fc, OrdinalHead) and model.fc.score.in_features < 512
    assert model.fc.score.in_features == model.layer4[-1].bn2.num_features
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out.exp().sum(1).numpy(), 1, atol=1e-5)
    # the pruned ordinal model's file round-trips
    loaded, _ = load_structured(save_structured(tmp_path / "pruned.pt", model, ORDINAL_META, report))
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, atol=1e-6)
    # ONNX: the unpruned ordinal model (and the pruned one) give torch's probabilities
    images = torch.randn(6, 1, SIZE, SIZE)
    for net, name in ((ordinal_model, "ordinal.onnx"), (model, "pruned.onnx")):
        path = export_onnx(net, tmp_path / name, SIZE, 1, dynamo=False)
        with torch.no_grad():
            expected = torch.softmax(net(images), 1).numpy()
        probs = OnnxClassifier(path, threads=1).predict_proba(images.numpy(), batch_size=4)
        np.testing.assert_allclose(probs, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_ordinal_resnet_exports_with_the_default_dynamo_exporter(ordinal_model, tmp_path):
    from components.prune import OnnxClassifier, export_onnx

    images = torch.randn(3, 1, SIZE, SIZE)
    path = export_onnx(ordinal_model, tmp_path / "ordinal_dynamo.onnx", SIZE, 1)
    with torch.no_grad():
        expected = torch.softmax(ordinal_model(images), 1).numpy()
    np.testing.assert_allclose(OnnxClassifier(path).predict_proba(images.numpy()), expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- el policy, uint8
def test_el_policy_keeps_shape_dtype_and_is_reproducible():
    assert "el" in list_policies()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8) for _ in range(6)]

    def run(seed):
        policy = build_policy("el", seed=seed)
        return [policy(image=im)["image"] for im in images]

    first, again, other = run(7), run(7), run(8)
    for im, out in zip(images, first):
        assert out.shape == im.shape and out.dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert not all(np.array_equal(a, im) for a, im in zip(first, images))  # it augments
    # 2-D grayscale input keeps its shape too
    flat = build_policy("el", seed=1)(image=images[0][:, :, 0])["image"]
    assert flat.shape == (SIZE, SIZE) and flat.dtype == np.uint8


def test_operator_uint8_output_decodes_and_resizes_only():
    rng = np.random.default_rng(1)
    small = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(3)]
    large = [rng.integers(0, 256, (48, 40), dtype=np.uint8) for _ in range(2)]
    batch = {"image": np.array([encode_png(a) for a in small + large], dtype=object),
             "label": np.array([0, 1, 2, 3, 0])}
    out = AugmentOperator(output="uint8", image_size=SIZE)(batch)
    assert out["image"].shape == (5, SIZE, SIZE, 1) and out["image"].dtype == np.uint8
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1, 2, 3, 0]
    for i, a in enumerate(small):  # already at the size: exactly the decoded pixels
        assert np.array_equal(out["image"][i, :, :, 0], a)
    augmented = AugmentOperator(policy="el", output="uint8", image_size=SIZE, seed=3)(batch)
    assert augmented["image"].shape == (5, SIZE, SIZE, 1) and augmented["image"].dtype == np.uint8
    with pytest.raises(ValueError, match="needs image_size"):
        AugmentOperator(output="uint8")


# ------------------------------------------------------------------------------- memory split
def test_epoch_order_is_a_seeded_cut_permutation():
    order = epoch_order(50, steps=3, batch_size=16, seed=11)
    assert len(order) == 48 and len(set(order.tolist())) == 48 and set(order.tolist()) <= set(range(50))
    assert np.array_equal(order, epoch_order(50, 3, 16, 11))
    assert not np.array_equal(order, epoch_order(50, 3, 16, 12))
    full = epoch_order(50, steps=4, batch_size=16, seed=11)  # more steps than rows: every row once
    assert sorted(full.tolist()) == list(range(50))
    assert np.array_equal(full[:48], order)  # the cut is a prefix of the same permutation


def _split(n: int = 37) -> MemorySplit:
    rng = np.random.default_rng(2)
    return MemorySplit(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), np.arange(n, dtype=np.int64) % 5)


def test_memory_batches_prefetched_in_order_and_standardised():
    split = _split()
    order = np.random.default_rng(3).permutation(len(split))
    for prefetch in (0, 2):
        batches = list(split.batches(order, 8, operator=None, prefetch=prefetch))
        assert [len(b["label"]) for b in batches] == [8, 8, 8, 8, 5]
        images = torch.cat([b["image"] for b in batches]).numpy()
        labels = torch.cat([b["label"] for b in batches]).numpy()
        assert images.dtype == np.float32 and images.shape == (37, 1, 8, 8)
        assert np.array_equal(labels, split.labels[order])
        assert np.array_equal(images, standardise(split.images[order]))
    np.testing.assert_allclose(standardise(split.images[:2]),
                               (split.images[:2].astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 63.75)
    x, y = split.tensors()
    assert torch.equal(x, torch.from_numpy(standardise(split.images))) and torch.equal(y, torch.from_numpy(split.labels))


class _FailingOperator:
    """Stands in for an AugmentOperator whose policy raises on the ``fail_at``-th image."""

    policy = object()

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def _augment(self, img: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise RuntimeError("augmentation exploded")
        return img


def _batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "resops-batches" and t.is_alive()]


def test_augmentation_error_reaches_the_consumer():
    split = _split()
    order = np.arange(len(split))
    with pytest.raises(RuntimeError, match="augmentation exploded"):
        list(split.batches(order, 8, _FailingOperator(fail_at=1), prefetch=2))
    got = []
    with pytest.raises(RuntimeError, match="augmentation exploded"):
        for b in split.batches(order, 8, _FailingOperator(fail_at=17), prefetch=2):  # in the third batch
            got.append(b)
    assert len(got) == 2 and torch.equal(torch.cat([b["label"] for b in got]), torch.from_numpy(split.labels[:16]))
    # a real operator with a policy augments in the worker and keeps the shapes
    op = AugmentOperator(policy="el", output="uint8", image_size=8, seed=0)
    batches = list(split.batches(order, 8, op, prefetch=2))
    assert torch.cat([b["image"] for b in batches]).shape == (37, 1, 8, 8)
    assert not _batch_threads()


def test_abandoned_batches_stop_their_producer():
    split = _split(200)
    gen = split.batches(np.arange(200), 4, operator=None, prefetch=1)
    first = next(gen)
    assert len(first["label"]) == 4
    gen.close()  # the consumer stops early (a spent time budget): the producer must not hang
    assert not _batch_threads()


# ------------------------------------------------------------------------------- the loop's clock
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def perf_counter(self) -> float:
        return self.t


class _StepCostsOneSecond(nn.Module):
    """A tiny classifier (with the ``fc`` the loop's parameter groups need) whose every training
    forward pass advances the fake clock by one second; evaluation is free."""

    def __init__(self, clock: _Clock, num_classes: int) -> None:
        super().__init__()
        self.clock = clock
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        if self.training:
            self.clock.t += 1.0
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _shard_files(directory, images: np.ndarray, labels: np.ndarray, split: str) -> list[str]:
    """Rows as the prepare stage writes them (PNG bytes, label, split) in Parquet shards."""
    import pandas as pd

    from components.data.shards import shard_files, write_shards

    frame = pd.DataFrame({"image": [encode_png(im) for im in images], "label": labels.astype("int64"),
                          "split": split})
    write_shards(frame, directory, rows_per_shard=16)
    return [str(f) for f in shard_files(directory)]


def _run_loop(monkeypatch, tmp, **cfg_overrides) -> tuple[list[dict], list[dict]]:
    """``train_loop_per_worker`` in this process with ray.train's worker API faked (one rank, CPU,
    no checkpoint to resume), a fake clock (1 s per training step) and 40 images of 8 px (10 steps
    of 4 per epoch). Returns (reported records, reported training states)."""
    import ray.train
    import ray.train.torch

    from components.train import loop

    clock = _Clock()
    monkeypatch.setattr(loop, "time", clock)  # the loop reads only time.perf_counter
    monkeypatch.setattr(loop, "create_model", lambda name, num_classes, in_chans, **kw: _StepCostsOneSecond(
        clock, num_classes))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 2
    files = {"train_files": _shard_files(f"{tmp}/train", images, labels, "train"),
             "val_files": _shard_files(f"{tmp}/val", images[:8], labels[:8], "val")}

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    records, states = [], []

    def report(record, checkpoint=None, **_):
        records.append(dict(record))
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = torch.load(f"{d}/{loop.STATE_FILE}", map_location="cpu", weights_only=True)
                state["exported"] = torch.load(f"{d}/{loop.MODEL_FILE}", map_location="cpu",
                                               weights_only=True)["state_dict"]
                states.append(state)

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    cfg = RECIPE_OFF | dict(
        schedule="cosine", max_pixels=50_000_000, shuffle_buffer=0, model_name="resnet18", num_classes=2,
        class_names=["a", "b"], in_chans=1, image_size=8, epochs=2, batch_size=4, lr=0.01, weight_decay=0.0,
        label_smoothing=0.0, threads_per_worker=1, seed=0, data_cache="memory", precision="fp32", online_policy=None,
        wandb={"mode": "disabled"}, run_name="fake", **files) | cfg_overrides
    torch_threads, ray_before = torch.get_num_threads(), ray.is_initialized()
    try:
        loop.train_loop_per_worker(cfg)
    finally:
        torch.set_num_threads(torch_threads)
    # ray.train's API was faked: the loop started no Ray instance (another test may have one up)
    assert ray.is_initialized() == ray_before
    return records, states


def test_loop_schedule_over_epochs_with_ema(monkeypatch, tmp_path):
    records, states = _run_loop(monkeypatch, tmp_path, epochs=2, ema_decay=0.9, schedule="cosine", warmup=0.0)
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [10, 20]
    assert [r["train_seconds"] for r in records] == [10.0, 20.0]  # one (fake) second per step
    # the lr of an epoch is the one its last step ran with: step 9 and 19 of 20
    assert records[0]["lr"] == pytest.approx(0.01 * lr_factor(9 / 20))
    assert records[1]["lr"] == pytest.approx(0.01 * lr_factor(19 / 20))
    assert states[-1]["finished"] and states[-1]["ema_n_averaged"] == 20
    assert {r["precision"] for r in records} == {"fp32"}
    # the checkpoint's model file holds the EMA weights; the raw weights are kept in the training state
    exported, raw = states[-1]["exported"], states[-1]["raw_state_dict"]
    assert exported.keys() == raw.keys()
    assert any(not torch.equal(exported[k], raw[k]) for k in raw if raw[k].is_floating_point())


def test_budget_run_spends_its_budget(monkeypatch, tmp_path):
    # 25 s of budget, 10 s per epoch: epochs 1 and 2, then epoch 3 stops after 5 steps
    records, _ = _run_loop(monkeypatch, tmp_path, epochs=50, budget_minutes=25 / 60, schedule="cosine", warmup=0.0)
    assert [r["step"] for r in records] == [10, 20, 25], records
    assert records[-1]["train_seconds"] == pytest.approx(25.0)
    assert records[-1]["lr"] == pytest.approx(0.01 * lr_factor(24 / 25))  # ~0.004 x lr
