"""The DNRT paper's CNNs and the tiny test model through timm's factory, as timm's own models:
pretrained files, configs, headless models, feature extraction; and the spiking families' limits."""
import pytest
import timm
import torch
from timm.data import resolve_data_config

import bionets.engine.model  # (importing bionets registers the models)
from bionets.errors import BionetsError

FAMILIES = {"resnet18_cifar": (3, 32, 32), "vgg11_cifar": (3, 32, 32), "test_mlp": (1, 8, 8)}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_pretrained_file_loads_and_no_file_is_timms_one_line(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(RuntimeError, match=f"No pretrained weights exist for {name}"):
        timm.create_model(name, pretrained=True)
    assert resolve_data_config({}, model=model)["input_size"] == FAMILIES[name] == model.default_cfg["input_size"]
    assert model.num_classes == 10


@pytest.mark.parametrize("name", FAMILIES)
def test_no_classes_gives_the_pooled_features(name):
    x = torch.randn(2, *FAMILIES[name])
    headless = timm.create_model(name, num_classes=0).eval()
    assert headless(x).shape == (2, headless.num_features) and headless.num_features > 0
    model = timm.create_model(name).eval()
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name, reductions", [("resnet18_cifar", [1, 1, 2, 4, 8]), ("vgg11_cifar", [1, 2, 4, 8, 16])])
def test_the_cnns_give_timms_feature_maps_at_the_reductions_they_state(name, reductions):
    """(ResNet-18's CIFAR stem, stride 1 and no max-pool, changes every reduction from timm's ResNet's.)"""
    features = timm.create_model(name, features_only=True)
    maps = features(torch.randn(1, 3, 32, 32))
    assert [32 // m.shape[-1] for m in maps] == features.feature_info.reduction() == reductions
    assert [m.shape[1] for m in maps] == features.feature_info.channels()


def test_resnet18_cifar_takes_timms_options():
    model = timm.create_model("resnet18_cifar", in_chans=1, num_classes=5, drop_path_rate=0.1, act_layer="gelu")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5) and type(model.act1).__name__ == "GELU"


def test_spiking_families_refuse_features_only_and_state_their_pre_logits_width():
    for name in ("snn_digits", "sew_resnet18"):
        with pytest.raises(BionetsError, match=f"{name} has no features_only form: .*forward_features"):
            timm.create_model(name, features_only=True)
    model = timm.create_model("snn_digits", num_classes=0)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, model.head_hidden_size) == (2, 256)


def _small_input(model: torch.nn.Module) -> torch.Tensor:
    """Two images of the model's stated input size, ImageNet-sized ones at 32 x 32 (enough for their strides)."""
    c, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(2, c, *((32, 32) if h > 64 else (h, w)))


@pytest.mark.parametrize("name", bionets.engine.model.bionets_models())
def test_every_registered_model_runs_trains_and_splits_like_a_timm_model(name):
    """Each of bionets' registered models, as timm builds it: the output has num_classes columns, every
    trainable parameter takes a gradient, forward_head(forward_features(x)) is forward(x), and without
    classes it gives its pooled features. Models above 20 M parameters (seconds to initialize on this
    CPU) run on the meta device, shapes only: their smaller siblings run the same code for real."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5)
    device = "meta" if sum(p.numel() for p in model.parameters()) > 20e6 else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name, num_classes=5)
        x = _small_input(model)
    out = model(x)
    assert out.shape == (2, 5)
    if device == "cpu":
        out.sum().backward()
        assert torch.isfinite(out).all()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
        model.eval()
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    width = getattr(model, "head_hidden_size", None) or model.num_features
    model.reset_classifier(0)
    assert model(x).shape == (2, width)
