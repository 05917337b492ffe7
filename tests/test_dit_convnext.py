"""Dit-ConvNeXt on timm's ConvNeXt: counts, placement, equivalence to timm's model, bad input."""
import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt

import bionets  # noqa: F401  (registers the models)
from bionets.config import load_config
from bionets.engine.model import count_parameters
from bionets.errors import BionetsError
from bionets.layers.quadratic import QuadraticChannel, set_quadratic
from bionets.models.dit_convnext import DitConvNeXt, DwConvQuadratic

SPEC = {  # SPEC-DIT: Dit total, timm's ConvNeXt, stage-0 channels
    "tiny": (29_473_864, 28_589_128, 96), "small": (51_108_424, 50_223_688, 96),
    "base": (90_688_616, 88_591_464, 128),
}
TINY = dict(depths=(3, 1, 1, 1), dims=(16, 24, 32, 48))


@pytest.mark.parametrize("size", SPEC)
def test_parameter_counts_match_the_spec(size):
    total, plain, c = SPEC[size]
    assert count_parameters(f"convnext_{size}") == plain
    assert count_parameters(f"dit_convnext_{size}") == total == plain + c ** 3
    # pixel-wise row: two bias-free depthwise 7x7 convs + their BatchNorms
    assert count_parameters(f"dit_convnext_{size}", quad_type="pixel") == plain + 2 * (c * 49 + 2 * c)


@pytest.mark.parametrize("size", SPEC)
def test_big_models_forward_backward_on_a_small_input(size):
    torch.manual_seed(0)
    model = timm.create_model(f"dit_convnext_{size}", num_classes=3)
    out = model(torch.randn(1, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.stages[0].blocks[2].conv_dw, DwConvQuadratic)


@pytest.mark.parametrize("quad_type", ["channel", "pixel"])
def test_every_parameter_gets_a_gradient(quad_type):
    torch.manual_seed(0)
    model = timm.create_model("test_dit_convnext", num_classes=5, in_chans=2, quad_type=quad_type)
    quad = model.stages[0].blocks[2].conv_dw.quad
    with torch.no_grad():   # a trained-like term (at zero init, its upstream factors get zero gradient)
        for p in quad.parameters():
            p.normal_(std=0.1)
    out = model(torch.randn(2, 2, 64, 64))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing and out.shape == (2, 5)


def test_zero_q_is_timms_convnext_and_the_term_is_added_to_the_dwconv():
    torch.manual_seed(0)
    plain = ConvNeXt(**TINY).eval()
    dit = DitConvNeXt(**TINY).eval()
    missing, unexpected = dit.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["stages.0.blocks.2.conv_dw.quad.weight"] and not unexpected   # timm's names kept
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dit(x), plain(x))

    conv = dit.stages[0].blocks[2].conv_dw
    with torch.no_grad():
        conv.quad.weight.normal_(std=0.1)
    h = torch.randn(2, 16, 16, 16)
    expected = torch.nn.functional.conv2d(h, conv.weight, conv.bias, padding=3, groups=16) \
        + torch.einsum("oij,nihw,njhw->nohw", conv.quad.weight, h, h)
    torch.testing.assert_close(conv(h), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv(h.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dit(x), plain(x))
    set_quadratic(dit, False, ["stages.0.blocks.2"])
    torch.testing.assert_close(dit(x), plain(x))


def test_timms_pretrained_path_starts_a_dit_convnext_from_a_plain_convnext_file(tmp_path):
    """A timm ConvNeXt's weights as the pretrained file: the quadratic terms the file lacks start at
    their zero (either form), so the model is the ConvNeXt it was loaded from."""
    torch.manual_seed(0)
    plain = timm.create_model("convnext_atto").eval()
    torch.save(plain.state_dict(), tmp_path / "atto.pth")
    x = torch.randn(1, 3, 64, 64)
    for quad_type in ("channel", "pixel"):
        dit = timm.create_model("test_dit_convnext", depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True,
                                quad_blocks=["stages.0.blocks.1"], quad_type=quad_type, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(tmp_path / "atto.pth"))).eval()
        torch.testing.assert_close(dit(x), plain(x))


def test_a_reference_checkpoint_loads_with_its_term(tmp_path):
    """A checkpoint of the reference ImageNet code (timm names plus ``stages.0.blocks.2.quadratic.quadratic``
    [C, C*C], the weight of its channels-last outer product) loads through timm's pretrained path and
    through convert_reference_state_dict: the term equals the reference's formula (it was left at
    zero, the checkpoint's key unexpected)."""
    from bionets.models.dit_convnext import convert_reference_state_dict
    torch.manual_seed(0)
    plain = timm.create_model("test_dit_convnext", num_classes=5)
    c = plain.stages[0].blocks[2].conv_dw.in_channels
    w = torch.randn(c, c * c).double()           # (float32 values: the float32 model holds them exactly)
    reference = {k: v for k, v in plain.state_dict().items() if ".conv_dw.quad." not in k}
    torch.save({"state_dict": {**reference, "stages.0.blocks.2.quadratic.quadratic": w.float()}}, tmp_path / "ref.pth")
    loaded = timm.create_model("test_dit_convnext", num_classes=5, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "ref.pth")))
    direct = timm.create_model("test_dit_convnext", num_classes=5)
    direct.load_state_dict(convert_reference_state_dict({**reference, "module.stages.0.blocks.2.quadratic.quadratic": w}))
    x = torch.randn(2, 5, 5, c, dtype=torch.float64)                  # channels-last pixels, as the reference reads
    outer = (x[..., :, None] * x[..., None, :]).reshape(2, 5, 5, c * c)
    want = (outer @ w.T).permute(0, 3, 1, 2)
    for model in (loaded, direct):
        term = model.stages[0].blocks[2].conv_dw.quad.double()
        torch.testing.assert_close(term(x.permute(0, 3, 1, 2)), want)


def test_placement_is_an_argument_and_follows_the_spec_for_short_stages():
    model = DitConvNeXt(quad_blocks=["stages.0.blocks.0", "stages.2.blocks.0"], quad_impl="full", **TINY)
    terms = {n: m for n, m in model.named_modules() if isinstance(m, QuadraticChannel)}
    assert sorted(terms) == ["stages.0.blocks.0.conv_dw.quad", "stages.2.blocks.0.conv_dw.quad"]
    assert terms["stages.2.blocks.0.conv_dw.quad"].weight.shape == (32, 32, 32)
    # stage 0 with 2 blocks (atto, femto, ...): no quadratic term by default, as in the reference
    short = DitConvNeXt(depths=(2, 1, 1, 1), dims=(8, 8, 8, 8))
    assert short.quad_blocks == [] and not any(isinstance(m, QuadraticChannel) for m in short.modules())
    with pytest.raises(BionetsError, match="unknown quadratic block 'stages.0.blocks.2'"):
        DitConvNeXt(depths=(2, 1, 1, 1), dims=(8, 8, 8, 8), quad_blocks=["stages.0.blocks.2"])


def test_bad_input_is_one_clear_error():
    with pytest.raises(BionetsError, match="unknown quadratic block 'stages.0.block.2'"):
        timm.create_model("test_dit_convnext", quad_blocks=["stages.0.block.2"])
    with pytest.raises(BionetsError, match="built for in_chans=3.*in_chans=1"):
        timm.create_model("test_dit_convnext")(torch.randn(1, 1, 64, 64))
    with pytest.raises(BionetsError, match="unknown quad_type"):
        timm.create_model("test_dit_convnext", quad_type="spatial")


def test_imagenet_configs():
    for size in SPEC:
        dit, pixel = load_config(f"dit/imagenet_dit_convnext_{size}"), load_config(f"dit/imagenet_pixel_convnext_{size}")
        assert dit.model.name == pixel.model.name == f"dit_convnext_{size}"
        drop_path = {"tiny": 0.1, "small": 0.4, "base": 0.5}[size]     # T: the seed's; S, B: ConvNeXt's recipe
        assert pixel.model.kwargs == {"drop_path_rate": drop_path, "quad_type": "pixel"}
        assert (dit.optim.name, dit.optim.lr, dit.optim.weight_decay) == ("adamw", 0.006, 0.08)
        assert (dit.sched.name, dit.sched.warmup_epochs, dit.sched.warmup_lr, dit.sched.min_lr) == ("cosine", 20, 1e-5, 0)
        assert (dit.train.epochs, dit.train.grad_accum, dit.data.batch_size) == (300, 8, 512)   # 64 x 8 GPUs x 8
        assert (dit.train.ema_decay, dit.train.label_smoothing, dit.train.amp) == (0.9998, 0.1, "bf16")
        d = dit.data
        assert (d.auto_augment, d.mixup, d.cutmix, d.reprob, d.crop_pct) == ("rand-m9-mstd0.5", 0.8, 1.0, 0.25, 0.95)
