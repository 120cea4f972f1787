"""The CPU dropout (models/dropout.py): the Bernoulli mask torch's dropout draws, from a cheaper draw."""

import pytest
import torch
from torch import nn

from captioner.models.dropout import Dropout, cpu_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_element_is_kept_with_probability_one_minus_p_independently(p):
    torch.manual_seed(0)
    keep = cpu_keep_mask((1000, 1003), p).float()  # a size that is not a multiple of the four draws per word
    assert keep.shape == (1000, 1003)
    assert abs(keep.mean().item() - (1 - p)) < 0.003  # ~6 standard errors at 1M elements
    # Neighbours come from one 64-bit draw: they must not be correlated.
    neighbours = (keep[:, :-1] * keep[:, 1:]).mean().item()
    assert abs(neighbours - (1 - p) ** 2) < 0.003


def test_training_output_keeps_the_input_expected_value_and_gradients_follow_the_mask():
    torch.manual_seed(0)
    layer = Dropout(0.1).train()
    x = torch.full((400, 500), 2.0, requires_grad=True)
    y = layer(x)
    kept = y != 0
    scale = y[kept].unique()
    assert scale.numel() == 1 and scale.item() == pytest.approx(2.0 / (1 - 6554 / 65536))
    assert y.mean().item() == pytest.approx(2.0, rel=0.01)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() * scale.item() / 2.0)


def test_seeded_runs_repeat_and_eval_mode_is_the_identity():
    layer = Dropout(0.3)
    x = torch.randn(64, 33)
    torch.manual_seed(7)
    first = layer.train()(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first)
    assert not torch.equal(layer(x), first)  # the generator moved on
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_probabilities_behave_as_torch(p):
    x = torch.randn(10, 10)
    torch.testing.assert_close(Dropout(p).train()(x), nn.Dropout(p).train()(x))


def test_models_use_it_without_changing_checkpoint_keys():
    from conftest import tiny_model

    model = tiny_model(dropout=0.1)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {Dropout}, f"plain nn.Dropout left in the model: {kinds}"
    assert not any("drop" in key for key in model.state_dict())
