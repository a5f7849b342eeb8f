import pytest
import torch

from distill.image.models import MODELS, build_model, count_parameters, parameter_count


def test_cifar_resnets_have_cifar_stem_and_expected_size():
    r18, r34 = build_model("resnet18"), build_model("resnet34")
    for m in (r18, r34):
        assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
        assert isinstance(m.maxpool, torch.nn.Identity)
    assert count_parameters(r18) == 11_173_962
    assert count_parameters(r34) == 21_282_122
    assert parameter_count("resnet34") == count_parameters(r34)


def test_forward_shapes():
    x = torch.randn(2, 3, 32, 32)
    for name, kw in [("resnet18", {}), ("resnet_small", {"width": 8, "depth": 2})]:
        assert build_model(name, 7, **kw)(x).shape == (2, 7)


def test_small_resnet_is_configurable():
    assert parameter_count("resnet_small", width=8) < parameter_count("resnet_small", width=16) < parameter_count("resnet_small", width=16, depth=2)
    with pytest.raises(ValueError):
        build_model("resnet_small", width=0)


def test_registry_errors():
    assert {"resnet18", "resnet34", "resnet_small"} <= set(MODELS)
    with pytest.raises(KeyError, match="unknown model"):
        build_model("resnet50x")
