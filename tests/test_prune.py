"""Unit tests of components.prune: global magnitude pruning and the sparse model file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from components.models import CheckpointError, create_model, load_model, save_model
from components.models.checkpoint import load_sparse, save_sparse
from components.prune import apply_global_magnitude, make_permanent, prunable_parameters, sparsity_report

META = {"model_name": "resnet18", "num_classes": 3, "in_chans": 1, "image_size": 32,
        "class_names": ["ok", "crack", "spot"]}


def conv_sparsity(model: nn.Module) -> float:
    """Zero fraction over every Conv2d weight, counted independently of sparsity_report."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total


@pytest.fixture(scope="module")
def pruned50():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, in_chans=1)
    apply_global_magnitude(model, 0.5)
    make_permanent(model)
    return model.eval()


def test_prunable_parameters_are_the_convolutions():
    model = create_model("resnet18", num_classes=3, in_chans=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    params = prunable_parameters(model)
    assert [m for m, _ in params] == convs and all(n == "weight" for _, n in params)
    with_fc = prunable_parameters(model, include_fc=True)
    assert len(with_fc) == len(convs) + 1 and with_fc[-1][0] is model.fc
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3


def test_global_magnitude_reaches_requested_sparsity(pruned50):
    assert abs(conv_sparsity(pruned50) - 0.5) < 0.01
    report = sparsity_report(pruned50)
    assert report["target_sparsity_measured"] == pytest.approx(conv_sparsity(pruned50))
    assert report["target_params"] == sum(m.weight.numel() for m in pruned50.modules() if isinstance(m, nn.Conv2d))
    # the classifier and batch norms were not targeted
    assert int((pruned50.fc.weight == 0).sum()) == 0
    assert 0.45 < report["overall_sparsity"] < 0.5


def test_make_permanent_removes_the_reparametrisation(pruned50):
    names = [n for n, _ in pruned50.named_parameters()]
    assert not any(n.endswith("weight_orig") for n in names)
    assert not any(n.endswith("weight_mask") for n, _ in pruned50.named_buffers())
    assert set(pruned50.state_dict()) == set(create_model("resnet18", num_classes=3, in_chans=1).state_dict())


def test_magnitude_pruning_is_global_and_can_include_the_classifier():
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=3, in_chans=1)
    targets = prunable_parameters(model, include_fc=True)
    before = torch.cat([m.weight.detach().abs().flatten() for m, _ in targets])
    apply_global_magnitude(model, 0.3, include_fc=True)
    # before make_permanent the mask re-parametrisation is in place (a fine-tune keeps the zeros)
    assert hasattr(model.conv1, "weight_mask") and hasattr(model.fc, "weight_orig")
    make_permanent(model)
    assert not hasattr(model.fc, "weight_mask") and not hasattr(model.conv1, "weight_orig")
    after = torch.cat([m.weight.detach().abs().flatten() for m, _ in targets])
    assert abs(float((after == 0).float().mean()) - 0.3) < 0.01
    assert sparsity_report(model, include_fc=True)["target_sparsity_measured"] == pytest.approx(
        float((after == 0).float().mean()))
    # one threshold across all layers (global), and the smallest magnitudes are the ones removed
    threshold = before[after == 0].max()
    assert bool((before[after != 0] >= threshold).all())
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in targets]
    assert max(per_layer) - min(per_layer) > 0.1  # layers are not pruned uniformly


def test_sparsity_out_of_range_is_refused():
    model = create_model("resnet18", num_classes=3, in_chans=1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="prune.sparsity"):
            apply_global_magnitude(model, bad)


@pytest.fixture(scope="module")
def saved50(pruned50, tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    return save_sparse(d / "edge.npz", pruned50, META), save_model(d / "full.pt", pruned50, META)


def test_sparse_file_is_smaller_and_round_trips(pruned50, saved50):
    sparse, dense = saved50
    assert sparse.stat().st_size < dense.stat().st_size
    assert sparse.stat().st_size < 0.75 * dense.stat().st_size

    loaded, meta = load_sparse(sparse)
    assert meta == META
    assert not loaded.training
    ref_state, new_state = pruned50.state_dict(), loaded.state_dict()
    assert set(ref_state) == set(new_state)
    for k in ref_state:
        assert torch.equal(ref_state[k], new_state[k]), k
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pruned50(x), loaded(x))
    # models.load_model dispatches .npz files to the sparse loader
    via_registry, _ = load_model(sparse)
    with torch.no_grad():
        assert torch.equal(via_registry(x), pruned50(x))


def test_save_sparse_keeps_a_bare_file_name(tmp_path):
    layer = nn.Linear(16, 8)
    path = save_sparse(tmp_path / "model.sparse", layer, META)
    assert path == tmp_path / "model.sparse" and path.exists()
    assert not (tmp_path / "model.sparse.npz").exists()


def test_missing_sparse_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "edge.npz"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_sparse(missing)
    assert str(missing) in str(info.value)


def test_garbage_sparse_file_names_the_path(tmp_path):
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"definitely not a numpy archive\n" * 20)
    with pytest.raises(CheckpointError) as info:
        load_sparse(bad)
    assert str(bad) in str(info.value) and "malformed" in str(info.value)


def test_sparse_file_without_metadata_is_refused(tmp_path):
    bad = tmp_path / "nometa.npz"
    with open(bad, "wb") as fh:
        np.savez_compressed(fh, weights=np.zeros(4))
    with pytest.raises(CheckpointError) as info:
        load_sparse(bad)
    assert str(bad) in str(info.value)


def test_sparse_file_with_incomplete_metadata_is_refused(tmp_path):
    path = save_sparse(tmp_path / "m.npz", nn.Linear(16, 8), {"model_name": "resnet18"})
    with pytest.raises(CheckpointError, match="metadata lacks") as info:
        load_sparse(path)
    assert str(path) in str(info.value)


# Regression test (the bug is fixed): components/models/checkpoint.py load_sparse() only
# catches (OSError, ValueError, KeyError). A truncated .npz (an interrupted copy or download) makes
# np.load raise zipfile.BadZipFile, which derives from Exception only, so it escapes as
# "BadZipFile: File is not a zip file" without the path instead of a CheckpointError (a flipped
# byte inside a member gives "BadZipFile: Bad CRC-32", equally uncaught). Fix: also catch
# zipfile.BadZipFile and zlib.error (done).
def test_truncated_sparse_file_is_a_checkpoint_error(saved50, tmp_path):
    data = saved50[0].read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_sparse(bad)
    assert str(bad) in str(info.value)


# Regression test (the bug is fixed): components/models/checkpoint.py load_sparse() calls
# model.load_state_dict(state) outside any try, so weights that do not fit the metadata (here a
# 3-class head under num_classes=2) raise a bare torch RuntimeError without the file name, while
# checkpoint.load_model wraps the same case as CheckpointError("model file ...: weights do not fit").
# Fix (done): load_state_dict wrapped, RuntimeError -> CheckpointError naming the path.
def test_sparse_weights_that_do_not_fit_the_metadata_are_a_checkpoint_error(saved50, tmp_path):
    with np.load(saved50[0], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = dict(META, num_classes=2)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    bad = tmp_path / "mismatch.npz"
    with open(bad, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(CheckpointError) as info:
        load_sparse(bad)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------- layer-wise and iterative schedules
def _conv_sparsities(model: nn.Module) -> list[float]:
    return [float((m.weight == 0).float().mean()) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_layerwise_magnitude_prunes_every_layer_to_the_target():
    from components.prune import apply_layerwise_magnitude

    torch.manual_seed(0)
    model = create_model("resnet18", 4, 1)
    apply_layerwise_magnitude(model, 0.6)
    make_permanent(model)
    assert all(abs(s - 0.6) < 0.01 for s in _conv_sparsities(model)), _conv_sparsities(model)


def test_global_pruning_spreads_sparsity_unevenly():
    torch.manual_seed(0)
    model = create_model("resnet18", 4, 1)
    apply_global_magnitude(model, 0.6)
    make_permanent(model)
    per_layer = _conv_sparsities(model)
    assert max(per_layer) - min(per_layer) > 0.1  # one threshold: layers end at different sparsities


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_iterative_schedule_reaches_the_final_sparsity_and_keeps_earlier_zeros(scope):
    from components.prune import magnitude_step, sparsity_schedule

    torch.manual_seed(0)
    model = create_model("resnet18", 4, 1).to(memory_format=torch.channels_last)  # as after a fine-tune
    schedule = sparsity_schedule(0.75, 3)
    assert schedule == pytest.approx([0.25, 0.5, 0.75])
    reached, zeros_before = 0.0, None
    for target in schedule:
        magnitude_step(model, reached, target, scope=scope)
        model = model.to(memory_format=torch.channels_last)
        with torch.no_grad():  # a fine-tune between steps moves the surviving weights
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight_orig.add_(0.01)
        zeros = [m.weight == 0 for m in model.modules() if isinstance(m, nn.Conv2d)]
        if zeros_before is not None:  # pruned weights stay pruned
            assert all(bool((z | ~zb).all()) for z, zb in zip(zeros, zeros_before))
        zeros_before = zeros
        assert sparsity_report(model)["target_sparsity_measured"] == pytest.approx(target, abs=0.01)
        reached = target
    with pytest.raises(ValueError, match="steps"):
        sparsity_schedule(0.5, 0)
    with pytest.raises(ValueError, match="scope"):
        magnitude_step(model, 0.75, 0.8, scope="row")
