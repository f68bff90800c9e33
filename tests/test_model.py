"""FD-MobileNet against the authors' released 0.25x weights, and its shapes at other sizes and widths."""
import pytest
import torch
from torch import nn

from fdmobilenet.checkpoint import load_checkpoint, load_weights
from fdmobilenet.model import FDMobileNet


@pytest.fixture(scope="module")
def released(released_weights):
    return load_checkpoint(released_weights)  # weights_only=True, map_location='cpu' (its storages say cuda)


@pytest.fixture(scope="module")
def released_model(released, released_weights):
    model = FDMobileNet(0.25)
    load_weights(model, released, str(released_weights))
    return model.eval()


def test_released_file_loads_strictly(released, released_model):
    assert released["name"] == "0.25x-FDMobileNet-224"
    theirs = released["state_dict"]
    assert len(theirs) == 117
    ours = released_model.state_dict()
    # Same names exactly; BatchNorm's num_batches_tracked is the only addition (torch >= 0.4).
    assert set(ours) == set(theirs) | {k for k in ours if k.endswith("num_batches_tracked")}
    assert {k.rsplit(".", 1)[0] for k in ours if k.endswith("num_batches_tracked")} == \
        {m for m, mod in released_model.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_released_weights_give_finite_probabilities(released_model):
    torch.manual_seed(0)
    with torch.no_grad():
        out = released_model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()  # despite running_var ~ 5.6e-45 in some dead channels


@pytest.mark.parametrize("size", [96, 160, 224, 320])
def test_input_sizes(size):
    model = FDMobileNet(0.25, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


@pytest.mark.parametrize("width, last", [(0.75, 768), (1.5, 1536), (2.0, 2048)])
def test_other_widths_build_and_run(width, last):
    model = FDMobileNet(width).eval()
    assert model.num_features == last
    assert model.features.conv_0.out_channels == int(32 * width)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_plain_relu_and_no_conv_bias():
    model = FDMobileNet(1.0)
    activations = [m for m in model.modules() if not list(m.children()) and not isinstance(
        m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.AdaptiveAvgPool2d, nn.Identity))]
    assert activations and all(type(m) is nn.ReLU for m in activations)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 11
    assert all(c.bias is None for c in convs)
    assert sum(c.groups == c.in_channels > 1 for c in convs) == 11  # the depthwise convs

