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
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsUnavailableError, match="notes.txt: not a state dict written by torch.save"):
        ResNet18Trunk(str(tmp_path / "notes.txt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(WeightsUnavailableError, match="tensor.pt: holds a Tensor, not a state dict"):
        ResNet18Trunk(str(tmp_path / "tensor.pt"))
    torch.save({"format_version": 3, "model": {}, "config": {}}, tmp_path / "best.pt")  # a captioner checkpoint
    with pytest.raises(WeightsUnavailableError, match=r"best.pt: a captioner checkpoint, not a trunk's weights; "
                                                       r"--init-from .*best.pt starts a run from its whole model"):
        ResNet18Trunk(str(tmp_path / "best.pt"))


def test_frozen_prefix_statistics_never_move_outside_calibration():
    from captioner.models.encoder import ResNet18Trunk

    trunk = ResNet18Trunk("none", trainable_layers=2)
    before = {k: v.clone() for k, v in trunk.prefix.state_dict().items()}
    trunk.forward_prefix(torch.randn(2, 3, 64, 64))  # straight after construction
    trunk.train()
    trunk(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in trunk.prefix.state_dict().items())


@pytest.mark.parametrize("stages,grid_convs,pool,channels,cells", [
    (5, 0, 1, 512, 2),  # whole trunk: stride 32
    (3, 0, 1, 128, 8),  # cut after layer2: stride 8
    (3, 2, 1, 96, 8),  # grid convolutions keep the resolution
    (3, 2, 2, 96, 4),  # ... and the max pool after them halves it
    (4, 1, 2, 96, 2),
])
def test_cut_trunk_gives_the_grid_its_stages_promise(stages, grid_convs, pool, channels, cells):
    trunk = ResNet18Trunk("none", trainable_layers=0, stages=stages, grid_convs=grid_convs, grid_width=96,
                          grid_pool=pool)
    grid = trunk(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, channels, cells, cells)
    assert trunk.out_channels == channels and trunk.stride == 64 // cells
    grid_params = list(trunk.grid_convs.parameters())
    assert (len(grid_params) > 0) == (grid_convs > 0) and all(p.requires_grad for p in grid_params)
    assert not any(p.requires_grad for p in trunk.prefix.parameters())


def test_inconsistent_trunk_settings_are_refused_with_the_flag_to_change():
    with pytest.raises(ValueError, match="--trunk-stages"):
        ResNet18Trunk("none", trainable_layers=5, stages=3)
    with pytest.raises(ValueError, match="--trunk-stages"):
        ResNet18Trunk("none", stages=6)
    with pytest.raises(ValueError, match="--grid-pool"):
        ResNet18Trunk("none", stages=3, trainable_layers=0, grid_convs=1, grid_pool=0)


def test_train_names_inconsistent_trunk_settings(synthetic_dataset, tmp_path, capsys):
    from captioner.cli import main
    from conftest import TINY

    d = synthetic_dataset
    code = main(["train", "--dataset", "coco", "--train-captions", str(d.train_captions),
                 "--train-images", str(d.train_images), "--val-captions", str(d.val_captions),
                 "--val-images", str(d.val_images), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY,
                 "--trunk-stages", "3", "--trainable-layers", "5"])
    assert code != 0 and "--trunk-stages 3 keeps 3 stages" in capsys.readouterr().err
