"""The model registry: every architecture builds, has normalisation first, and gives (B, classes) logits."""

from __future__ import annotations

import pytest
import torch

from catrs.errors import UserError
from catrs.inference import INFERENCE_MODES, prepare_for_inference
from catrs.models import Normalization, Normalize, create_model, model_names

SHAPES = {
    "lenet": (1, 28, 28),
    "cifar_resnet20": (3, 32, 32),
    "cifar_resnet110": (3, 32, 32),
    "resnet50": (3, 224, 224),
    "digits_cnn": (1, 8, 8),
    "digits_cnn_bn": (1, 8, 8),
}


def test_every_registered_model_has_a_shape_under_test():
    assert sorted(SHAPES) == model_names()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_shape(name):
    model = create_model(name, 7).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *SHAPES[name])).shape == (2, 7)
    assert isinstance(model[0], Normalize)


def test_normalization_is_the_first_layer_and_applies_per_channel():
    norm = Normalization((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    layer = create_model("cifar_resnet20", 10, normalization=norm)[0]
    x = torch.ones(1, 3, 2, 2)
    assert layer(x)[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]


def test_cifar_resnet_depths():
    def count(m: torch.nn.Module) -> int:
        return sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())

    # 6n+2 layers: 6n convs in blocks + the stem (+ 2 projection shortcuts)
    assert count(create_model("cifar_resnet20", 10)) == 18 + 1 + 2
    assert count(create_model("cifar_resnet110", 10)) == 108 + 1 + 2


def test_unknown_architecture_names_the_valid_ones():
    with pytest.raises(UserError, match="lenet"):
        create_model("resnet9000", 10)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def test_the_plain_digits_cnn_keeps_its_weights_layout_and_the_normalised_one_only_adds_batch_norm():
    """digits_cnn checkpoints written before digits_cnn_bn existed still load: the same names and shapes."""
    plain = _shapes(create_model("digits_cnn", 10))
    assert plain == {
        "1.0.weight": (32, 1, 3, 3), "1.0.bias": (32,),
        "1.2.weight": (64, 32, 3, 3), "1.2.bias": (64,),
        "1.6.weight": (128, 1024), "1.6.bias": (128,),
        "1.8.weight": (10, 128), "1.8.bias": (10,),
    }  # fmt: skip
    normalised = create_model("digits_cnn_bn", 10)
    norms = [m for m in normalised.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert [m.num_features for m in norms] == [32, 64, 128]
    added = [shape for norm in norms for shape in _shapes(norm).values()]
    assert sorted(_shapes(normalised).values()) == sorted([*plain.values(), *added])


def test_the_normalised_digits_cnn_trains_on_a_batch_of_one_without_touching_its_running_statistics():
    """The last batch of an epoch can hold one image (1,437 digits in batches of 4); it must not fail."""
    model = create_model("digits_cnn_bn", 10).train()
    model(torch.rand(8, 1, 8, 8)).sum().backward()  # an ordinary batch moves the statistics
    before = {name: value.clone() for name, value in model.state_dict().items()}
    out = model(torch.rand(1, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    feature_norm = model[1][9]
    assert torch.equal(feature_norm.running_mean, before["1.9.running_mean"])
    assert torch.equal(feature_norm.running_var, before["1.9.running_var"])
    assert not torch.equal(model[1][1].running_mean, before["1.1.running_mean"])  # the conv norms still learn


@pytest.mark.parametrize("name", ["lenet", "cifar_resnet20", "digits_cnn_bn"])
@pytest.mark.parametrize("mode", [m for m in INFERENCE_MODES if m != "eager"])
def test_inference_modes_give_the_eager_logits(name, mode):
    model = create_model(name, 10).eval()
    x = torch.randn(16, *SHAPES[name])
    fast = prepare_for_inference(model, mode)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(x[:5]), expected[:5], rtol=1e-4, atol=1e-4)  # another batch size
    assert next(model.parameters()).is_contiguous()  # the caller's model is left as it was
