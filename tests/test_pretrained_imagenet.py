"""`model.pretrained: imagenet`: torchvision's ResNet18 ImageNet weights through torch hub's cache.

Nothing is downloaded here: a cache hit uses a random-weights file placed where torchvision would
look, and the offline case fails before any download is attempted."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torch.hub
import torchvision
from torchvision.models import ResNet18_Weights

from components.models import PretrainedWeightsError, create_model, load_pretrained, resolve_pretrained

URL = ResNet18_Weights.IMAGENET1K_V1.url
FILENAME = os.path.basename(urlparse(URL).path)  # resnet18-<hash prefix>.pth


def _expected_cache_path(torch_home: Path) -> Path:
    """Where torch.hub.load_state_dict_from_url (so torchvision) caches the weights under TORCH_HOME."""
    return torch_home / "hub" / "checkpoints" / FILENAME


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")


def _offline(*args, **kwargs):
    raise OSError("Network is unreachable (simulated)")


def test_imagenet_cache_hit_loads_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(socket, "create_connection", _offline)
    target = _expected_cache_path(tmp_path)
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"  # TORCH_HOME is honoured
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), target)  # random weights, torchvision format

    path = resolve_pretrained("imagenet")
    assert path == target

    source = torch.load(target, weights_only=True)
    model = create_model("resnet18", 4, 1)
    report = load_pretrained(model, path, in_chans=1)
    state = model.state_dict()
    assert torch.equal(state["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    assert "layer1.0.conv1.weight" in report.loaded
    assert report.adapted == ["conv1.weight"]  # RGB stem summed to 1 channel
    assert torch.allclose(state["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    assert set(report.reinitialised) == {"fc.weight", "fc.bias"}  # 1000-class head -> 4 classes
    assert state["fc.weight"].shape == (4, 512)


def test_imagenet_offline_fails_fast_naming_file_and_path(tmp_path, monkeypatch):
    # The sandbox has no network anyway; the simulated unreachable host keeps the test independent of that.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", _offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    with pytest.raises(PretrainedWeightsError) as caught:
        resolve_pretrained("imagenet")
    message = str(caught.value)
    assert FILENAME in message and str(_expected_cache_path(tmp_path)) in message and URL in message
    assert "Network is unreachable" in message
    assert not _expected_cache_path(tmp_path).exists()


def test_imagenet_download_failure_is_reported(tmp_path, monkeypatch):
    """Host reachable but the download fails (e.g. a proxy refuses it): same error, with the reason."""
    class Connection:
        def close(self):
            pass

    def failing_download(url, progress=True, check_hash=False):
        assert url == URL and check_hash
        raise OSError("connection reset")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connection())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", failing_download)
    with pytest.raises(PretrainedWeightsError, match="connection reset") as caught:
        resolve_pretrained("imagenet")
    assert str(_expected_cache_path(tmp_path)) in str(caught.value)


def test_plain_path_spec_resolves_to_that_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(socket, "create_connection", _offline)
    weights = tmp_path / "weights.pt"
    assert resolve_pretrained(str(weights)) == weights.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("weights.pt") == weights.resolve()  # relative, not required to exist yet
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_pretrained("~/weights.pt") == weights.resolve()
