"""Unit tests of components.models: the ResNet18 variants, transfer learning, and model files."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

from components.models import (CheckpointError, PretrainedWeightsError, backbone_parameters, count_parameters,
                               create_model, head_parameters, list_models, load_model, load_pretrained,
                               predict_proba, prediction_layer, save_model)
from components.models.transfer import adapt_input_conv_weight
from components.models.variants import SimAM, se_added_parameters

VARIANTS = list_models()
# non-default options, so a round trip proves model_kwargs are stored and used
VARIANT_OPTIONS = {"resnet18": {}, "resnet18_k2": {}, "se_resnet18": {"reduction": 8},
                   "resnet18_simam": {"e_lambda": 1e-3, "stages": [1, 3]}}
STAGE_CHANNELS = (64, 128, 256, 512)


def test_registry_lists_every_variant():
    assert VARIANTS == ["resnet18", "resnet18_k2", "resnet18_simam", "se_resnet18"]
    assert set(VARIANT_OPTIONS) == set(VARIANTS)


# ------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_and_backward(name, in_chans, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    images = torch.randn(2, in_chans, 32, 32)
    logits = model(images)
    assert logits.shape == (2, num_classes)
    F.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name
    proba = predict_proba(model, images)  # eval mode, channels_last
    assert proba.shape == (2, num_classes)
    assert torch.allclose(proba.sum(1), torch.ones(2))


def test_simam_adds_no_parameters():
    plain = create_model("resnet18", num_classes=3, in_chans=1)
    for stages in [(1, 2), (1, 2, 3, 4), (4,)]:
        simam = create_model("resnet18_simam", num_classes=3, in_chans=1, stages=stages)
        assert count_parameters(simam) == count_parameters(plain)
        assert {k: v.shape for k, v in simam.state_dict().items()} == \
               {k: v.shape for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("reduction", [16, 8])
def test_se_adds_the_documented_parameter_count(reduction):
    # per block on C channels, h = C // r: fc1 C*h weights + h biases, fc2 h*C weights + C biases
    expected = sum(2 * (c * (c // reduction) + c // reduction + (c // reduction) * c + c) for c in STAGE_CHANNELS)
    if reduction == 16:
        assert expected == 89080
    plain = create_model("resnet18", num_classes=4, in_chans=3)
    se = create_model("se_resnet18", num_classes=4, in_chans=3, reduction=reduction)
    assert count_parameters(se) - count_parameters(plain) == expected == se_added_parameters(reduction)
    assert prediction_layer(se).out_features == 4


def test_se_gate_rescales_the_residual_branch_before_the_addition():
    model = create_model("se_resnet18", num_classes=2, in_chans=3).eval()
    torch.manual_seed(1)
    for block, x in [(model.layer1[0], torch.randn(2, 64, 8, 8)), (model.layer2[0], torch.randn(2, 64, 8, 8))]:
        gate = block.attention
        with torch.no_grad():
            gate.fc2.weight.zero_()
            gate.fc2.bias.fill_(30.0)  # sigmoid = 1: the block is torchvision's BasicBlock
            assert torch.allclose(block(x), BasicBlock.forward(block, x), atol=1e-5)
            gate.fc2.bias.fill_(-30.0)  # sigmoid = 0: only the shortcut is left
            shortcut = x if block.downsample is None else block.downsample(x)
            assert torch.allclose(block(x), torch.relu(shortcut), atol=1e-5)
            assert not torch.allclose(BasicBlock.forward(block, x), torch.relu(shortcut), atol=1e-2)


def test_simam_matches_the_energy_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5))
    e_lambda = 1e-2
    expected = np.empty_like(x)
    for n in range(2):
        for c in range(3):
            channel = x[n, c]
            squared = (channel - channel.mean()) ** 2
            variance = squared.sum() / (channel.size - 1)
            energy_inverse = squared / (4 * (variance + e_lambda)) + 0.5
            expected[n, c] = channel / (1 + np.exp(-energy_inverse))
    out = SimAM(e_lambda)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # a 1x1 map has no spread: x * sigmoid(0.5), not 0/0
    one = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    assert torch.allclose(SimAM()(one), one * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))


def test_simam_sits_in_the_chosen_stages_only():
    default = create_model("resnet18_simam", num_classes=2, in_chans=1)
    with_simam = {f"layer{s}.{i}": isinstance(getattr(default, f"layer{s}")[i].attention, SimAM)
                  for s in range(1, 5) for i in range(2)}
    assert [k for k, v in with_simam.items() if v] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert default.layer1[0].attention.e_lambda == 1e-4
    deep = create_model("resnet18_simam", num_classes=2, in_chans=1, stages=[4, 3], e_lambda=1e-3).eval()
    assert isinstance(deep.layer4[1].attention, SimAM) and isinstance(deep.layer1[0].attention, nn.Identity)
    assert deep.layer3[0].attention.e_lambda == 1e-3
    assert torch.isfinite(deep(torch.randn(2, 1, 32, 32))).all()  # layer4 maps are 1x1 at 32x32
    # a block without attention computes exactly torchvision's BasicBlock
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(deep.layer1[0](x), BasicBlock.forward(deep.layer1[0], x))
        y = torch.randn(1, 256, 4, 4)
        assert not torch.allclose(deep.layer3[1](y), BasicBlock.forward(deep.layer3[1], y), atol=1e-3)


def stem_and_pool(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stem = model.relu(model.bn1(model.conv1(x)))
    return stem, model.maxpool(stem)


@pytest.mark.parametrize("size", [64, 224, 63])
def test_k2_stem_keeps_resnet18_feature_map_sizes(size):
    k2 = create_model("resnet18_k2", num_classes=2, in_chans=3).eval()
    plain = create_model("resnet18", num_classes=2, in_chans=3).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        k2_stem, k2_pooled = stem_and_pool(k2, x)
        plain_stem, plain_pooled = stem_and_pool(plain, x)
    assert k2_stem.shape == plain_stem.shape == (1, 64, -(-size // 2), -(-size // 2))
    assert k2_pooled.shape == plain_pooled.shape
    assert [m.kernel_size for m in k2.conv1.modules() if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3
    assert [m.stride for m in k2.conv1.modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (1, 1)]


def receptive_rows(model: nn.Module, pooled: bool) -> list[int]:
    """Input rows that reach the centre output of a 1-channel model's stem (and a 3x3 s2 pool), by gradient."""
    model = model.eval()
    with torch.no_grad():
        for m in model.conv1.modules() if isinstance(model.conv1, nn.Sequential) else [model.conv1]:
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.1)  # positive weights, positive input: no ReLU hides a path
    x = (torch.rand(1, 1, 40, 40) + 0.5).requires_grad_(True)
    out = model.relu(model.bn1(model.conv1(x)))
    if pooled:  # the max pool's geometry; an average pool passes gradient to every window element
        out = F.avg_pool2d(out, kernel_size=3, stride=2, padding=1)
    centre = out.shape[-1] // 2
    out[0, 0, centre, centre].backward()
    return x.grad[0, 0].abs().sum(1).nonzero().flatten().tolist()


def test_k2_stem_receptive_field():
    plain_rows = receptive_rows(create_model("resnet18", num_classes=2, in_chans=1), pooled=False)
    assert plain_rows == list(range(17, 24))  # 7x7 s2 p3: output 10 sees rows 17..23 (the method is right)
    assert len(receptive_rows(create_model("resnet18", num_classes=2, in_chans=1), pooled=True)) == 11
    k2_rows = receptive_rows(create_model("resnet18_k2", num_classes=2, in_chans=1), pooled=False)
    assert k2_rows == list(range(18, 24))  # documented: output k sees rows 2k-2 .. 2k+3, 6 rows
    assert len(receptive_rows(create_model("resnet18_k2", num_classes=2, in_chans=1), pooled=True)) == 10


@pytest.mark.parametrize("name,options,message", [
    ("se_resnet18", {"reduction": 0}, "reduction must be an integer in \\[1, 64\\]"),
    ("se_resnet18", {"reduction": 65}, "reduction must be an integer"),
    ("se_resnet18", {"reduction": 2.5}, "reduction must be an integer"),
    ("se_resnet18", {"reduction": True}, "reduction must be an integer"),
    ("resnet18_simam", {"stages": [5]}, "unknown stage\\(s\\) \\[5\\]"),
    ("resnet18_simam", {"stages": [0, 1]}, "unknown stage\\(s\\) \\[0\\]"),
    ("resnet18_simam", {"stages": "12"}, "stages must be a list"),
    ("resnet18_simam", {"stages": 2}, "stages must be a list"),
    ("resnet18_simam", {"stages": [1, 1]}, "lists a stage twice"),
    ("resnet18_simam", {"stages": []}, "stages is empty"),
    ("resnet18_simam", {"e_lambda": 0}, "e_lambda must be a positive"),
    ("resnet18_simam", {"e_lambda": float("nan")}, "e_lambda must be a positive"),
    ("resnet18", {"reduction": 16}, "'resnet18' does not take \\['reduction'\\]"),
    ("resnet18_k2", {"stages": [1]}, "'resnet18_k2' does not take \\['stages'\\]"),
    ("se_resnet18", {"reductoin": 16}, "its options: \\['reduction'\\]"),
])
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, num_classes=2, in_chans=1, **options)


def test_create_model_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet99'"):
        create_model("resnet99", num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="in_chans must be a positive integer"):
        create_model("se_resnet18", num_classes=2, in_chans=2.0)


# ------------------------------------------------------------------------ model files
META = {"num_classes": 3, "in_chans": 1, "image_size": 32, "class_names": ["ok", "crack", "spot"]}


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, **VARIANT_OPTIONS[name]).eval()
    path = save_model(tmp_path / "model.pt", model, {**META, "model_name": name,
                                                    "model_kwargs": VARIANT_OPTIONS[name]})
    loaded, meta = load_model(path)
    assert meta["model_name"] == name and meta["model_kwargs"] == VARIANT_OPTIONS[name]
    assert type(loaded) is type(model) and count_parameters(loaded) == count_parameters(model)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_without_the_variant_options_fails(tmp_path):
    model = create_model("se_resnet18", num_classes=3, in_chans=1, reduction=8)
    path = save_model(tmp_path / "model.pt", model, {**META, "model_name": "se_resnet18"})  # no model_kwargs
    with pytest.raises(CheckpointError, match="weights do not fit se_resnet18"):
        load_model(path)


# ---------------------------------------------------------------------- transfer learning
@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A torchvision-format ResNet18 state dict (random weights: nothing is downloaded)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def expected_report(name: str, model_keys: list[str], file_keys: list[str]) -> dict[str, set[str]]:
    head = {"fc.weight", "fc.bias"}
    if name == "resnet18_k2":  # the whole stem is new; torchvision's conv1 and bn1 have no place
        old_stem = {k for k in file_keys if k == "conv1.weight" or k.startswith("bn1.")}
        assert len(old_stem) == 6
        new_stem = {k for k in model_keys if k.startswith("conv1.")}
        assert len(new_stem) == 3 + 3 * 5  # three convs, three batch norms
        return {"loaded": set(file_keys) - old_stem - head, "adapted": set(),
                "reinitialised": new_stem | head, "ignored": old_stem | head}
    gates = {k for k in model_keys if ".attention." in k}
    assert len(gates) == (32 if name == "se_resnet18" else 0)  # 8 blocks x fc1/fc2 x weight/bias
    return {"loaded": set(file_keys) - {"conv1.weight"} - head, "adapted": {"conv1.weight"},
            "reinitialised": gates | head, "ignored": head}


@pytest.mark.parametrize("name", VARIANTS)
def test_load_torchvision_weights_into_each_variant(torchvision_weights, name):
    path, file_state = torchvision_weights
    model = create_model(name, num_classes=4, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, path, in_chans=1)
    after = model.state_dict()
    expected = expected_report(name, list(after), list(file_state))
    got = {kind: getattr(report, kind) for kind in expected}
    for kind, names in got.items():
        assert len(names) == len(set(names)), kind
        assert set(names) == expected[kind], kind
    assert sorted(report.loaded + report.adapted + report.reinitialised) == sorted(after)
    for key in report.loaded:
        assert torch.equal(after[key], file_state[key]), key
    for key in report.reinitialised:
        assert torch.equal(after[key], before[key]), key
    if report.adapted:
        assert torch.allclose(after["conv1.weight"], file_state["conv1.weight"].sum(dim=1, keepdim=True))
    summary = report.summary()
    assert f"loaded {len(expected['loaded'])} tensors" in summary and str(path) in summary
    assert f"reinitialised {len(expected['reinitialised'])}:" in summary
    assert "fc.weight: shape (1000, 512) in the file, (4, 512) in the model" in summary
    if name != "resnet18_k2":
        assert "conv1.weight: summed 3 input channels to 1" in summary
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_input_conv_adaptation(torchvision_weights):
    path, file_state = torchvision_weights
    rgb = file_state["conv1.weight"]
    # 3 -> 3: loaded as is
    same = create_model("resnet18", num_classes=1000, in_chans=3)
    report = load_pretrained(same, path, in_chans=3)
    assert report.adapted == [] and report.reinitialised == [] and report.ignored == []
    assert torch.equal(same.conv1.weight, rgb)
    # 3 -> 5: channels repeated R, G, B, R, G and scaled by 3/5
    five = create_model("resnet18", num_classes=1000, in_chans=5)
    report = load_pretrained(five, path, in_chans=5)
    assert report.adapted == ["conv1.weight"]
    assert "repeated 3 input channels to 5, scaled by 3/5" in report.summary()
    for channel, source in enumerate([0, 1, 2, 0, 1]):
        assert torch.allclose(five.conv1.weight[:, channel], rgb[:, source] * 0.6)
    # 3 -> 1: a grey image gets the response the RGB filters give to the same grey in every channel
    grey = torch.rand(1, 1, 16, 16)
    summed = adapt_input_conv_weight(rgb, 1)
    assert torch.allclose(F.conv2d(grey, summed), F.conv2d(grey.repeat(1, 3, 1, 1), rgb), atol=1e-5)
    # and so does 3 -> 6 (repeat and scale; exact when in_chans is a multiple of 3)
    assert torch.allclose(F.conv2d(grey.repeat(1, 6, 1, 1), adapt_input_conv_weight(rgb, 6)),
                          F.conv2d(grey.repeat(1, 3, 1, 1), rgb), atol=1e-5)


def test_ddp_prefix_is_stripped(tmp_path, torchvision_weights):
    _, file_state = torchvision_weights
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in file_state.items()}, path)
    model = create_model("resnet18_simam", num_classes=4, in_chans=1)
    report = load_pretrained(model, path, in_chans=1)
    assert report.stripped_prefix == "module."
    assert set(report.loaded) == set(file_state) - {"conv1.weight", "fc.weight", "fc.bias"}
    assert torch.equal(model.layer3[1].conv2.weight, file_state["layer3.1.conv2.weight"])
    assert "'module.' prefix stripped" in report.summary()


def test_strict_shapes_refuses_a_mismatched_head(torchvision_weights):
    path, _ = torchvision_weights
    model = create_model("resnet18", num_classes=4, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError, match="fc.weight \\(shape \\(1000, 512\\) in the file, \\(4, 512\\)"):
        load_pretrained(model, path, in_chans=1, strict_shapes=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    fitting = create_model("se_resnet18", num_classes=1000, in_chans=3)
    report = load_pretrained(fitting, path, in_chans=3, strict_shapes=True)  # missing SE tensors are no mismatch
    assert len(report.reinitialised) == 32 and report.ignored == []


def test_in_chans_must_match_the_model(torchvision_weights):
    path, _ = torchvision_weights
    with pytest.raises(ValueError, match="in_chans=3 but the model's first convolution \\(conv1.weight\\) takes 1"):
        load_pretrained(create_model("resnet18", num_classes=2, in_chans=1), path, in_chans=3)


def test_resops_checkpoint_loads_completely(tmp_path):
    torch.manual_seed(0)
    trained = create_model("se_resnet18", num_classes=3, in_chans=1, reduction=8).eval()
    path = save_model(tmp_path / "model.pt", trained, {**META, "model_name": "se_resnet18",
                                                        "model_kwargs": {"reduction": 8}})
    torch.manual_seed(1)
    fresh = create_model("se_resnet18", num_classes=3, in_chans=1, reduction=8)
    report = load_pretrained(fresh, path, in_chans=1)
    assert report.source_format == "resops checkpoint"
    assert sorted(report.loaded) == sorted(trained.state_dict())
    assert report.adapted == report.reinitialised == report.ignored == []
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained(x))


def test_missing_weights_file(tmp_path):
    path = tmp_path / "weights" / "resnet18-f37072fd.pth"
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained(create_model("resnet18", num_classes=2, in_chans=3), path, in_chans=3)
    message = str(error.value)
    assert str(path) in message and "does not exist" in message and "nothing is downloaded" in message
    assert isinstance(error.value, CheckpointError)


def write_random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(1000))


def write_pickled_list(path):
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)


def write_truncated_file(path):
    torch.save({"fc.bias": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:-100])


class NotATensor:
    pass


@pytest.mark.parametrize("write,problem", [
    (write_random_bytes, "cannot be read with torch.load\\(weights_only=True\\): not a pickle of tensors"),
    (write_pickled_list, "cannot be read with torch.load\\(weights_only=True\\): Invalid magic number"),
    (lambda p: torch.save({"conv1.weight": NotATensor()}, p), "Unsupported global: GLOBAL .*NotATensor"),
    (write_truncated_file, "cannot be read with torch.load\\(weights_only=True\\): "),
    (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state dict"),
    (lambda p: torch.save({"conv1.weight": torch.zeros(2), "epoch": 3, "note": "x"}, p),
     "is not a dict of tensors: 'epoch' \\(int\\), 'note' \\(str\\)"),
    (lambda p: torch.save({}, p), "holds an empty state dict"),
    (lambda p: p.mkdir(), "is not a file"),
])
def test_malformed_weights_files(tmp_path, write, problem):
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(PretrainedWeightsError, match=problem) as error:
        load_pretrained(create_model("resnet18", num_classes=2, in_chans=3), path, in_chans=3)
    assert str(path) in str(error.value)


def test_backbone_and_head_parameters_split_the_model():
    model = create_model("se_resnet18", num_classes=3, in_chans=1)
    head, backbone = head_parameters(model), backbone_parameters(model)
    assert [p.shape for p in head] == [(3, 512), (3,)]
    assert {id(p) for p in head}.isdisjoint(id(p) for p in backbone)
    assert len(head) + len(backbone) == len(list(model.parameters()))
    # freezing the backbone: only the head learns
    for p in backbone:
        p.requires_grad_(False)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in head) and all(p.grad is None for p in backbone)
