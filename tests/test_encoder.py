import urllib.error

import pytest
import torch
from torchvision.models import resnet18

from captioner.errors import WeightsUnavailableError
from captioner.models.encoder import ResNet18Trunk, _imagenet_weights_file


def test_imagenet_weights_offline_name_the_file_to_place(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        ResNet18Trunk("imagenet")
    message = str(err.value)
    assert str(_imagenet_weights_file()) in message and "resnet18-f37072fd.pth" in message


def test_weights_from_a_local_state_dict_file(tmp_path):
    torch.manual_seed(1)
    reference = resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    trunk = ResNet18Trunk(str(tmp_path / "r18.pth"), trainable_layers=5)
    torch.testing.assert_close(trunk.suffix[0][0].weight, reference.conv1.weight)


def test_missing_or_foreign_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        ResNet18Trunk(str(tmp_path / "absent.pth"))
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailableError, match="not a ResNet18 state dict"):
        ResNet18Trunk(str(tmp_path / "other.pth"))


def test_frozen_prefix_statistics_never_move_outside_calibration():
    from captioner.models.encoder import ResNet18Trunk

    trunk = ResNet18Trunk("none", trainable_layers=2)
    before = {k: v.clone() for k, v in trunk.prefix.state_dict().items()}
    trunk.forward_prefix(torch.randn(2, 3, 64, 64))  # straight after construction
    trunk.train()
    trunk(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in trunk.prefix.state_dict().items())
