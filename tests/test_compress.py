"""Unit tests of model compression: structured pruning, int8 ONNX quantization, distillation.

Small on purpose (32x32 inputs, a few training steps): the file runs in well under 90 s on two
cores. MACs are recounted here with torch-pruning's counter on the models themselves, channel
counts are read from the modules, and the distillation loss is recomputed with numpy.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from torch import nn

from components.data.images import decode_image
from components.data.sources import get_source
from components.models import CheckpointError, create_model, list_models, load_model, save_model
from components.prune import (DistillationLoss, OnnxClassifier, StructuredPruningError, export_onnx, finetune_epoch,
                              quantize_onnx, recalibrate_batchnorm, structured_prune)
from components.models.checkpoint import is_structured, load_structured, save_structured, structure_of

SIZE = 32
NUM_CLASSES = 3
META = {"model_name": "resnet18", "num_classes": NUM_CLASSES, "in_chans": 1, "image_size": SIZE,
        "class_names": ["crack", "ok", "spot"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two spinning
    OpenMP threads make the small convolutions up to 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def macs_of(model: nn.Module) -> int:
    return int(tp.utils.count_ops_and_params(model, torch.zeros(1, 1, SIZE, SIZE))[0])


def total_conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------------------------- structured
@pytest.fixture(scope="module", params=list_models())
def pruned(request):
    """(name, original, pruned, report) for every registered variant, MACs halved."""
    torch.manual_seed(0)
    original = create_model(request.param, num_classes=NUM_CLASSES, in_chans=1).eval()
    model = copy.deepcopy(original).to(memory_format=torch.channels_last)  # as the trainer holds it
    report = structured_prune(model, torch.randn(1, 1, SIZE, SIZE), target="macs", ratio=0.5, importance="l1")
    assert not model.training and model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    return request.param, original, model, report


def test_structured_prune_halves_macs_with_fewer_channels(pruned):
    name, original, model, report = pruned
    before, after = macs_of(original), macs_of(model)
    assert abs((1 - after / before) - 0.5) <= 0.05, f"{name}: MACs {before} -> {after}"
    # the report's count (conv + linear MACs) is within 1 % of torch-pruning's (which adds BN etc.)
    assert report.macs_before == pytest.approx(before, rel=0.01) and report.macs_after == pytest.approx(after, rel=0.01)
    assert abs(report.macs_reduction - 0.5) <= 0.02  # the search's own tolerance
    assert total_conv_channels(model) < total_conv_channels(original)
    assert report.channels_after == total_conv_channels(model) < report.channels_before
    for stage in (1, 2, 3, 4):  # every stage lost channels
        block = getattr(model, f"layer{stage}")[0]
        assert block.conv1.out_channels < getattr(original, f"layer{stage}")[0].conv1.out_channels
    assert sum(p.numel() for p in model.parameters()) == report.params_after < report.params_before
    # the image channels and the classes are untouched
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1 and model.fc.out_features == NUM_CLASSES
    x = torch.randn(5, 1, SIZE, SIZE)
    with torch.no_grad():
        assert model(x).shape == original(x).shape == (5, NUM_CLASSES)


def test_structured_prune_keeps_residual_additions_consistent(pruned):
    name, original, model, _ = pruned
    channels = model.layer1[0].conv1.in_channels  # what the stem (and max pool) hands to layer1
    stem_convs = [m for n, m in model.named_modules() if n.startswith("conv1") and isinstance(m, nn.Conv2d)]
    assert stem_convs[-1].out_channels == channels
    for stage in (1, 2, 3, 4):
        for index, block in enumerate(getattr(model, f"layer{stage}")):
            assert block.conv1.in_channels == channels, f"{name} layer{stage}.{index} input"
            out = block.conv2.out_channels
            assert block.bn2.num_features == out and block.conv2.in_channels == block.conv1.out_channels
            if block.downsample is not None:
                assert block.downsample[0].in_channels == channels
                assert block.downsample[0].out_channels == block.downsample[1].num_features == out
            else:  # identity shortcut: the branch must give back exactly the input channels
                assert out == channels, f"{name} layer{stage}.{index}: branch {out} + shortcut {channels}"
            se = getattr(block, "attention", None)
            if se is not None and hasattr(se, "fc1"):  # SE gate: scales the branch channel-wise
                orig_se = getattr(original, f"layer{stage}")[index].attention
                assert se.fc1.in_channels == se.fc2.out_channels == out
                assert se.fc1.out_channels == se.fc2.in_channels == orig_se.fc1.out_channels  # squeeze width kept
            channels = out
    assert model.fc.in_features == channels


def test_structured_model_file_round_trip(pruned, tmp_path):
    name, _, model, report = pruned
    meta = META | {"model_name": name}
    path = save_structured(tmp_path / "pruned.pt", model, meta, report)
    payload = torch.load(path, map_location="cpu", weights_only=True)  # no pickled classes in the file
    assert set(payload) == {"state_dict", "meta"} and is_structured(path) and is_structured(payload["meta"])
    assert payload["meta"]["structured"]["report"]["macs_after"] == report.macs_after
    loaded, loaded_meta = load_structured(path)
    assert loaded_meta["model_name"] == name and not loaded.training
    assert structure_of(loaded) == structure_of(model)
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)
    loaded.to(memory_format=torch.channels_last)  # the fixture's model is channels_last: same kernels
    x = torch.randn(4, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    routed, _ = load_model(path)  # load_model routes structured files to load_structured
    assert structure_of(routed) == structure_of(model)


def test_load_structured_reads_plain_checkpoints_and_rejects_bad_tables(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=NUM_CLASSES, in_chans=1).eval()
    plain = save_model(tmp_path / "plain.pt", model, META)
    loaded, _ = load_structured(plain)
    assert not is_structured(plain)
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    payload = torch.load(plain, weights_only=True)
    payload["meta"]["structured"] = {"format": 1, "modules": {"no.such.layer": {"type": "conv", "in_channels": 1,
                                                                                "out_channels": 2, "groups": 1}}}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no module 'no.such.layer'"):
        load_structured(tmp_path / "bad.pt")


def test_structured_prune_global_and_params_targets():
    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=NUM_CLASSES, in_chans=1)
    params_before = sum(p.numel() for p in model.parameters())
    report = structured_prune(model, torch.randn(1, 1, SIZE, SIZE), target="params", ratio=0.4,
                              importance="l2", global_pruning=True)
    params_after = sum(p.numel() for p in model.parameters())
    assert abs((1 - params_after / params_before) - 0.4) <= 0.04
    assert report.achieved == pytest.approx(1 - params_after / params_before)
    # global ranking prunes layers unevenly, unlike the uniform local ratio
    kept = [after / before for before, after in report.layer_channels.values()]
    assert max(kept) - min(kept) > 0.1


def test_structured_prune_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=NUM_CLASSES, in_chans=1)
    x = torch.randn(1, 1, SIZE, SIZE)
    channels = total_conv_channels(model)
    with pytest.raises(StructuredPruningError, match="within"):  # unreachable: left unpruned
        structured_prune(model, x, ratio=0.95, max_channel_ratio=0.3, max_trials=3, target="macs", importance="l1")
    assert total_conv_channels(model) == channels
    with pytest.raises(ValueError, match="ratio"):
        structured_prune(model, x, ratio=1.5, target="macs", importance="l1")
    with pytest.raises(ValueError, match="grad_batch"):
        structured_prune(model, x, importance="taylor", target="macs", ratio=0.5)
    headless = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(StructuredPruningError, match="classifier"):
        structured_prune(headless, x, target="macs", ratio=0.5, importance="l1")


# ------------------------------------------------------------------------------------- int8
@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory):
    """128 normalised 32x32 grey images of the synthetic source (3 classes), shuffled."""
    root = tmp_path_factory.mktemp("synthetic")
    source = get_source("synthetic")
    source.ingest(root, num_images=128, image_size=SIZE, num_classes=NUM_CLASSES, seed=0)
    frame = source.records(root).frame
    images = np.stack([decode_image((root / p).read_bytes())[..., 0] for p in frame.path]).astype(np.float32)
    images = ((images / 255.0 - 0.5) / 0.25)[:, None]
    order = np.random.default_rng(0).permutation(len(frame))
    return images[order], frame.label.to_numpy()[order]


@pytest.fixture(scope="module")
def int8_models(synthetic_images, tmp_path_factory):
    """A small trained model as torch, float ONNX and int8 ONNX.

    resnet18 with 95 % of its MACs pruned, 20 training steps, then its BatchNorm statistics
    re-estimated on the training images (after so few steps the running averages lag the weights
    and the eval-mode model predicts one class).
    """
    images, labels = synthetic_images
    x, y = torch.from_numpy(images[:96]), torch.from_numpy(labels[:96])
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=NUM_CLASSES, in_chans=1)
    structured_prune(model, x[:1], ratio=0.95, target="macs", importance="l1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        i = (step * 16) % 96
        loss = nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert recalibrate_batchnorm(model, [x[i:i + 32] for i in range(0, 96, 32)]) == 96
    model.eval()
    out = tmp_path_factory.mktemp("onnx")
    float_path = export_onnx(model, out / "model.onnx", SIZE, 1)
    calibration = [images[i:i + 8] for i in range(0, 32, 8)]  # 32 training images
    report = quantize_onnx(float_path, out / "model.int8.onnx", calibration)
    return model, float_path, report


def test_onnx_float_model_matches_torch_with_any_batch(int8_models, synthetic_images):
    model, float_path, _ = int8_models
    images = synthetic_images[0][96:]
    session = OnnxClassifier(float_path, threads=1)
    assert session.input_name == "image" and session.input_shape[1:] == (1, SIZE, SIZE)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    for batch_size in (1, 7, 32):  # the batch axis is dynamic
        np.testing.assert_allclose(session.logits(images, batch_size=batch_size), expected, atol=1e-4, rtol=0)
    probs = session.predict_proba(images)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and np.array_equal(probs.argmax(1), expected.argmax(1))


def test_torchscript_export_matches_torch_too(int8_models, synthetic_images, tmp_path):
    model, _, _ = int8_models
    images = synthetic_images[0][96:112]
    path = export_onnx(model, tmp_path / "legacy.onnx", SIZE, 1, dynamo=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(OnnxClassifier(path).logits(images, batch_size=5), expected, atol=1e-4, rtol=0)


def test_int8_model_agrees_with_float_and_is_four_times_smaller(int8_models, synthetic_images):
    _, float_path, report = int8_models
    images = synthetic_images[0][96:]
    float_probs = OnnxClassifier(float_path).predict_proba(images)
    # a meaningful comparison: the float model learned (better than the 1/3 of chance on held-out
    # images), is confident, and does not predict one class for all
    accuracy = float((float_probs.argmax(1) == synthetic_images[1][96:]).mean())
    assert accuracy > 0.6 and np.median(float_probs.max(1)) > 0.8 and len(np.unique(float_probs.argmax(1))) == 3
    int8 = OnnxClassifier(report.int8_path, threads=2)
    int8_probs = int8.predict_proba(images)
    agreement = float((int8_probs.argmax(1) == float_probs.argmax(1)).mean())
    assert agreement >= 0.95, f"int8 agrees with float on {agreement:.1%}"
    assert np.allclose(int8_probs.sum(1), 1, atol=1e-5) and not np.array_equal(int8_probs, float_probs)
    assert report.calibration_images == 32 and report.int8_bytes == int8.file_bytes
    assert report.float_bytes / report.int8_bytes > 3.3, report.as_dict()
    graph = onnx.load(report.int8_path).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "convolution weights are not stored as int8"
    scales = {t.name: t for t in graph.initializer}
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                   {t.name for t in int8_weights} and len(scales[n.input[1]].dims) == 1
                   and scales[n.input[1]].dims[0] > 1]
    assert per_channel, "weights are not quantized per channel"


def test_quantize_refuses_empty_calibration(int8_models, tmp_path):
    _, float_path, _ = int8_models
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(float_path, tmp_path / "q.onnx", [])
    with pytest.raises(ValueError, match="does not fit"):
        quantize_onnx(float_path, tmp_path / "q.onnx", [np.zeros((2, 3, SIZE, SIZE), np.float32)])


# ----------------------------------------------------------------------------- distillation
def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class FixedTeacher(nn.Module):
    """Returns fixed logits (and counts its calls); has a parameter and a BatchNorm to watch."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))
        self.bn = nn.BatchNorm1d(logits.shape[1], eps=1e-12)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.logits * self.scale + 0 * x.sum())


STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.2, 0.1]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0], [-1.0, 0.0, 1.0]]
LABELS = [1, 2, 0]


def test_distillation_loss_equals_hand_computed_value():
    s, t, y, temp, alpha = np.array(STUDENT), np.array(TEACHER), np.array(LABELS), 2.0, 0.3
    log_pt, log_ps = np_log_softmax(t / temp), np_log_softmax(s / temp)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(1).mean()
    ce = -np_log_softmax(s)[np.arange(3), y].mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    teacher = FixedTeacher(torch.tensor(TEACHER))  # eval BN with fresh statistics is the identity
    loss = DistillationLoss(teacher, temperature=temp, alpha=alpha)
    got = loss(torch.tensor(STUDENT), torch.tensor(LABELS), inputs=torch.zeros(3, 4))
    assert float(got) == pytest.approx(expected, rel=1e-5) and teacher.calls == 1
    assert loss.last["soft"] == pytest.approx(temp ** 2 * kl, rel=1e-5) and loss.last["base"] == pytest.approx(ce)
    precomputed = loss(torch.tensor(STUDENT), torch.tensor(LABELS), teacher_logits=torch.tensor(TEACHER))
    assert float(precomputed) == pytest.approx(expected, rel=1e-5)
    same = DistillationLoss(teacher, temperature=temp, alpha=1.0)  # student == teacher: no soft loss
    assert float(same(torch.tensor(TEACHER), torch.tensor(LABELS), teacher_logits=torch.tensor(TEACHER))) \
        == pytest.approx(0.0, abs=1e-6)


def test_distillation_with_alpha_zero_is_the_base_loss():
    teacher = FixedTeacher(torch.tensor(TEACHER))
    base = nn.CrossEntropyLoss(label_smoothing=0.1)
    loss = DistillationLoss(teacher, temperature=4.0, alpha=0.0, base_loss=base)
    s, y = torch.tensor(STUDENT), torch.tensor(LABELS)
    assert torch.equal(loss(s, y, inputs=torch.zeros(3, 4)), base(s, y))
    assert teacher.calls == 0  # not even run
    with pytest.raises(ValueError):
        DistillationLoss(teacher, temperature=4.0, alpha=1.5)
    with pytest.raises(ValueError, match="inputs"):
        DistillationLoss(teacher, temperature=4.0, alpha=0.5)(s, y)


def test_distillation_gradients_do_not_reach_the_teacher():
    teacher = FixedTeacher(torch.tensor(TEACHER)).train()  # left in train mode by its owner
    running_mean = teacher.bn.running_mean.clone()
    student = nn.Linear(4, 3)
    x = torch.randn(3, 4)
    loss = DistillationLoss(teacher, temperature=3.0, alpha=0.7)
    loss(student(x), torch.tensor(LABELS), inputs=x).backward()
    assert teacher.scale.grad is None and all(p.grad is None for p in teacher.parameters())
    assert student.weight.grad is not None and float(student.weight.grad.abs().sum()) > 0
    assert not teacher.training and torch.equal(teacher.bn.running_mean, running_mean)


@pytest.mark.parametrize("pruned", ["resnet18"], indirect=True)  # one variant is enough for the fine-tune loop
def test_finetune_epoch_distills_a_pruned_student(pruned):
    _, original, student, _ = pruned
    student = copy.deepcopy(student)
    teacher_state = {k: v.clone() for k, v in original.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    torch.manual_seed(0)
    batches = [{"image": torch.randn(3, 1, SIZE, SIZE), "label": torch.tensor([0, 1, 2])} for _ in range(3)]
    loss = DistillationLoss(original, temperature=4.0, alpha=0.5)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    stats = finetune_epoch(student, batches, optimizer, loss, torch.device("cpu"), max_steps=2)
    assert stats["samples"] == 6 and 0 <= stats["correct"] <= 6
    assert stats["loss_sum"] == pytest.approx(0.5 * stats["soft_loss_sum"] + 0.5 * stats["base_loss_sum"], rel=1e-5)
    assert stats["soft_loss_sum"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    assert all(torch.equal(v, teacher_state[k]) for k, v in original.state_dict().items())
    plain = finetune_epoch(student, batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), max_steps=1)
    assert plain["samples"] == 3 and "soft_loss_sum" not in plain


def test_recalibrate_batchnorm_averages_the_batch_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU()).eval()
    batches = [torch.randn(4, 1, 8, 8) * 2 + 1 for _ in range(3)]
    with torch.no_grad():
        features = [conv(b) for b in batches]
    assert recalibrate_batchnorm(model, batches) == 12
    bn = model[1]
    expected_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in features]).mean(0)  # unbiased
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(model, [])
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)  # an empty call changed nothing
