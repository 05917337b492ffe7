"""bionets.convert on timm and torchvision models, composition, idempotence, errors; bionets bench smoke."""
import re

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pytest

from bionets.cli import main
from bionets.conversion import convert
from bionets.errors import BionetsError
from bionets.layers.quadratic import QuadraticChannel
from bionets.layers.raa import RAA
from bionets.layers.stds import soft_thresholds
from bionets.mechanisms.quadratic import ConvPlusQuadratic

ALL = dict(quadratic=True, activation="raa", sparsity="stds", regularization=True)
MODELS = {
    "timm resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm resnet50": lambda: timm.create_model("resnet50", num_classes=10),
    "timm convnext_tiny": lambda: timm.create_model("convnext_tiny", num_classes=10),
    "timm efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
    "timm vit_small": lambda: timm.create_model("vit_small_patch16_224", num_classes=10, img_size=32, patch_size=8),
    "torchvision resnet18": lambda: torchvision.models.resnet18(num_classes=10),
}
ACTIVATIONS = ("ReLU", "GELU", "SiLU", "Swish")   # torch.nn and timm classes of these names


def n_activations(model: nn.Module) -> int:
    return sum(type(m).__name__ in ACTIVATIONS for m in model.modules())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def options_for(name: str) -> dict:
    # a ViT has no convolution that the channel-wise term fits (its only conv is the patch embedding)
    return {k: v for k, v in ALL.items() if not (k == "quadratic" and "vit" in name)}


def convolutions_and_linears(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_every_listed_model(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    before, acts = n_params(model), n_activations(model)
    layers = convolutions_and_linears(model)
    model, report = convert(model, **options_for(name))
    by_mech = {r.mechanism: r for r in report.reports}

    assert report.params_added == n_params(model) - before > 0
    assert acts > 0 and n_activations(model) == 0
    assert len(by_mech["raa"].changes) == sum(isinstance(m, RAA) for m in model.modules()) == acts
    assert by_mech["raa"].params_added == sum(n_params(m) for m in model.modules() if isinstance(m, RAA))
    assert len(by_mech["stds"].changes) == len(soft_thresholds(model)) == layers
    if "quadratic" in by_mech:
        quads = [m for m in model.modules() if isinstance(m, ConvPlusQuadratic)]
        assert len(quads) == len(by_mech["quadratic"].changes) == 1
        q = quads[0].quad
        assert by_mech["quadratic"].params_added == n_params(q) == q.out_channels * q.in_channels ** 2
    assert "total:" in str(report) and len(report.hooks) == 2    # the STDS schedule and ARR's loss

    for hook in report.hooks:
        hook.attach(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    for hook in report.hooks:
        extra = hook.aux_loss(model, x, logits, y)
        loss = loss + extra if extra is not None else loss
    loss.backward()
    assert logits.shape == (2, 10) and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "quad" in n or "raa" in n.lower())


@pytest.mark.parametrize("name", ["timm resnet18", "torchvision resnet18", "timm vit_small"])
def test_convert_twice_changes_nothing_more(name):
    model, _ = convert(MODELS[name](), **options_for(name))
    keys, count = list(model.state_dict()), n_params(model)
    model, again = convert(model, **options_for(name))
    assert again.changes == 0 and again.params_added == 0
    assert list(model.state_dict()) == keys and n_params(model) == count


def test_converting_again_with_other_options_says_it_left_the_layers_as_they_were():
    """Idempotence keeps a layer's first conversion; the report says so instead of 0 changes alone."""
    model, _ = convert(timm.create_model("resnet18", num_classes=10), quadratic=True, activation="raa",
                       sparsity="stds")
    _, again = convert(model, quadratic=True, activation={"variant": "scalar"}, sparsity="stds")
    notes = [n for r in again.reports for n in r.notes]
    assert again.changes == 0 and len(notes) == 3
    assert all("already: left as they are, with their own settings" in n for n in notes)


def test_converting_again_with_another_schedule_or_arr_memory_is_one_line():
    """STDS's hook drives every STDS layer of the model, and ARR's hook fills the one memory: other
    settings for them would apply silently to the layers converted before (the report said 'left
    as they are'), so they are refused; the same settings are fine."""
    model, _ = convert(timm.create_model("resnet18", num_classes=10), sparsity={"d_max": 0.05, "schedule": "fixed"})
    with pytest.raises(BionetsError, match=r"made with other settings \(sparse_function 'stmod' -> 'st', schedule "
                                           r"'fixed' -> 'linear', d_max 0.05 -> 0.5\)"):
        convert(model, sparsity={"d_max": 0.5, "schedule": "linear", "sparse_function": "st"})
    convert(model, sparsity={"d_max": 0.05, "schedule": "fixed"})
    vit, _ = convert(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2),
                     regularization={"layers": "classifier"})
    with pytest.raises(BionetsError, match="ARR's class memory already, 1 layer.s. x 10 classes x 192 features, "
                                           "where arr layers=blocks needs 2 x 10 x 192"):
        convert(vit, regularization={"layers": "blocks"})
    _, again = convert(vit, regularization={"layers": "classifier"})
    assert again.changes == 0 and "memory already: kept" in again.reports[0].notes[0]


def test_raa_names_the_activation_types_it_left():
    """MobileNetV2's ReLU6 and MobileNetV3's Hardswish are activations of types RAA was not asked
    for: the error (nothing replaced) or the report's note names them; their gates are not listed."""
    with pytest.raises(BionetsError, match="in EfficientNet; it has ReLU6 x35: to swap them, add their class names"):
        convert(timm.create_model("mobilenetv2_100", num_classes=10), activation="raa")
    _, report = convert(timm.create_model("mobilenetv3_small_100", num_classes=10), activation="raa")
    assert report.reports[0].notes[1] == ("left as they are: Hardswish x19 (to swap them too, add their class names "
                                          "to types)")
    model, report = convert(timm.create_model("mobilenetv2_100", num_classes=10),
                            activation={"types": ["ReLU6"]})
    assert report.changes == 35 and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_arr_on_a_transformer_with_two_token_widths_regularizes_its_classifier_input():
    """CrossViT has blocks and an embed_dim, but a list of two widths: 'auto' takes the classifier's
    input (it built a memory of dim [96, 192] and failed), and 'blocks' is refused in one line."""
    model, report = convert(timm.create_model("crossvit_tiny_240", num_classes=10), regularization=True)
    assert model.arr_memory.mean.shape == (1, 10, 192)          # the input of its last head (the wider branch)
    with pytest.raises(BionetsError, match="CrossVit has embed_dim=\\[96, 192\\]: use layers=classifier"):
        convert(timm.create_model("crossvit_tiny_240", num_classes=10), regularization={"layers": "blocks"})


def test_grad_r_through_convert_trains_with_its_own_optimizer():
    from bionets.engine.optim import OptimConfig
    from bionets.mechanisms.stds import create_gradr
    model, report = convert(timm.create_model("resnet18", num_classes=10), sparsity="gradr")
    assert report.reports[0].mechanism == "gradr" and report.changes == 21
    assert "train with the gradr optimizer" in report.reports[0].notes[0]
    assert not report.reports[0].for_optimizer("gradr", {}).notes       # (a run with it: the note is noise)
    with pytest.raises(BionetsError, match="config key 'sparsity.gradr.target_sparsity': Input should be greater"):
        convert(nn.Linear(2, 2), sparsity={"gradr": {"target_sparsity": 0.4}})     # the key as the user wrote it
    optimizer = create_gradr(model, OptimConfig(name="gradr", lr=1e-3))
    torch.manual_seed(0)
    x, y, losses = torch.randn(8, 3, 32, 32), torch.arange(8), []
    for _ in range(15):                     # one batch learnt by heart
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]     # 2.21 -> 0.008 measured


def test_converted_model_starts_as_the_original():
    """Q starts at zero and STDS with D = 0 is the identity: only RAA (not an identity) is left out."""
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = plain(x)
    model, _ = convert(plain, quadratic=["layer1.*.conv2", "layer2.1.conv1"], sparsity="stds")
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert sum(isinstance(m, QuadraticChannel) for m in model.modules()) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(activation="swish9"), "convert(activation='swish9'): unknown choice"),
    (dict(sparsity={"sparse_fn": "st"}), "did you mean: sparse_function"),
    (dict(quadratic=["nosuch.*"]), "matches no convolution of ResNet"),
    (dict(sparsity={"include": ["nosuch"]}), "STDS found no conv/linear layer of ResNet matching"),
    (dict(regularization={"weight": -1}), "'regularization.weight': Input should be greater than or equal to 0 "
                                          "(got -1)"),
    (dict(activation={"input_size": [3, 0, 32]}), "'activation.input_size.1': Input should be greater than 0 (got 0)"),
])
def test_bad_conversion_is_one_clear_error(kwargs, message):
    with pytest.raises(BionetsError) as err:
        convert(timm.create_model("resnet18", num_classes=10), **kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_convert_follows_the_models_device_and_dtype():
    """New RAA parameters, quadratic terms and STDS buffers take the model's dtype (float64 here) and
    device ('meta': shapes only, as for sizing a large model); ARR's statistics its device, in float32."""
    model = timm.create_model("resnet18", num_classes=10).double()
    convert(model, quadratic=True, activation="raa", sparsity="stds", regularization="arr")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.arr_memory.mean.dtype == torch.float32
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()

    meta = timm.create_model("resnet18", num_classes=10).to("meta")
    convert(meta, quadratic="auto", activation="raa", regularization="arr")
    assert {t.device.type for t in (*meta.parameters(), *meta.buffers())} == {"meta"}
    assert meta(torch.randn(2, 3, 32, 32, device="meta")).shape == (2, 10)


def test_raa_reads_the_features_where_the_layer_before_put_them():
    """An NHWC MLP (timm's ConvNeXt with conv_mlp=False) whose map height equals the hidden width:
    RAA after a Linear takes the last dim as the features, not dim 1 (which has the same size)."""
    from bionets.layers.raa import raa_expression
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", dims=(8, 16, 32, 64), conv_mlp=False, num_classes=3).eval()
    convert(model, activation="raa")
    raa = model.stages[0].blocks[0].mlp.act
    assert raa.dim == -1 and raa.num_features == 32
    with torch.no_grad():
        raa.v.normal_(std=0.3)
        x = torch.randn(2, 32, 32, 32)                    # [N, H, W, C]: H = C = 32
        torch.testing.assert_close(raa(x), raa_expression(x, raa.vc, "vector", "gelu", -1))
        conv_raa = convert(timm.create_model("resnet18", num_classes=3), activation="raa")[0].act1
        assert conv_raa.dim == 1


def test_raa_on_conv1d_and_conv3d_nets_takes_the_channels():
    """A Conv1d net (with and without an input size to probe) and torchvision's r3d_18 (Conv3d; it
    states no input size): every RAA on dim 1, the channels, not the length or the frame width (the
    probe read [N, C, L] as tokens, and the layers' width was refused on a 5-D map)."""
    def conv1d_net():
        return nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                             nn.Flatten(), nn.Linear(6, 3))
    for options in ({}, {"input_size": [2, 20]}):
        model, _ = convert(conv1d_net(), activation=options)
        raa = model[2]              # (after a BatchNorm1d, which may also see tokens: dim 1 found per call)
        assert raa.num_features == 6 and raa.dim in ((1,) if options else (None, 1))
        with torch.no_grad():
            raa.v.normal_()
            h = torch.randn(4, 6, 33)                                   # any length
            torch.testing.assert_close(raa(h), torch.relu(h + torch.einsum("c,ncl->nl", raa.v, h)[:, None] + raa.c))
        assert model(torch.randn(4, 2, 33)).shape == (4, 3)
    model, report = convert(torchvision.models.video.r3d_18(num_classes=5), activation="raa")
    raas = [m for m in model.modules() if isinstance(m, RAA)]
    assert len(raas) == 17 and all(r.dim == 1 for r in raas) and report.params_added == 3921
    model(torch.randn(2, 3, 4, 16, 16)).sum().backward()
    assert model.stem[2].vc.grad.shape == (65,)


def test_a_short_name_with_options_of_its_own():
    """sparsity={'gradr': {...}}: Grad R with options (a dict was always STDS's: Grad R's options
    were unknown keys, without a hint); activation={'raa_relu': {...}} keeps the short name's base."""
    from bionets.layers.gradr import SignedStrength
    model, report = convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                            sparsity={"gradr": {"alpha": 2e-3, "target_sparsity": 0.9}})
    assert "alpha=0.002, target sparsity 0.9" in str(report)
    assert isinstance(model[0].parametrizations.weight[0], SignedStrength)
    with pytest.raises(BionetsError, match=r"unknown config key 'sparsity.alpha' .*; Grad R's options go in "
                                           r"sparsity=\{'gradr': \{...\}\}"):
        convert(nn.Sequential(nn.Linear(4, 4)), sparsity={"alpha": 2e-3})
    model, _ = convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), activation={"raa_relu": {"variant": "scalar"}})
    assert (model[1].base, model[1].variant) == ("relu", "scalar")
    with pytest.raises(BionetsError, match=r"convert\(activation=\{'raa': ...\}\) takes a dict of raa's options, "
                                           "got int"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), activation={"raa": 1})


def test_the_modules_convert_adds_take_the_models_mode_and_a_lazy_model_is_one_line():
    """Converted in eval mode, the new RAA, quadratic, STDS and ARR modules were in training mode; a
    model with a Lazy* layer failed deep inside a mechanism (a RuntimeError, or 'in_channels=0')."""
    model = timm.create_model("resnet18", num_classes=10).eval()
    convert(model, activation="raa", quadratic=True, sparsity="stds", regularization=True)
    assert not any(m.training for m in model.modules())
    model = timm.create_model("resnet18", num_classes=10)
    convert(model, activation="raa")
    assert all(m.training for m in model.modules())
    for options in ({"sparsity": "stds"}, {"quadratic": ["1"]}):
        lazy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyConv2d(4, 3))
        with pytest.raises(BionetsError, match=r"parameter '1.weight' is lazy .* run one forward pass on an example input "
                                               "first"):
            convert(lazy, **options)


def test_convert_takes_one_placement_string_and_rejects_a_non_module():
    model, report = convert(timm.create_model("resnet18", num_classes=10), quadratic="layer1.0.conv2")
    assert isinstance(model.layer1[0].conv2, ConvPlusQuadratic) and report.changes == 1
    with pytest.raises(BionetsError, match="convert takes a torch.nn.Module, got str"):
        convert("resnet18", activation="raa")


def test_convert_torchvision_bottlenecks_with_an_input_size():
    """torchvision's Bottleneck calls one relu at two widths: with input_size, convert gives each
    width its own RAA, and the converted model trains (forward and backward)."""
    from bionets.layers.raa_swap import RAAByWidth
    model, report = convert(torchvision.models.resnet50(num_classes=10), activation={"input_size": [3, 32, 32]})
    assert sum(isinstance(m, RAAByWidth) for m in model.modules()) == 16
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert "layer1.0.relu: -> RAA" in str(report)


def test_convert_probes_raa_widths_at_the_size_the_model_states():
    """Without input_size (auto), RAA's widths come from a forward pass at the size the model states:
    torchvision's resnet50 (one relu at two widths per Bottleneck) and efficientnet_b0 (squeeze-
    excitation layers registered out of call order) convert and train; input_size=None reads the
    widths from the layers only, and resnet50's forward then stops with the fix."""
    from bionets.layers.raa_swap import RAAByWidth
    for build, by_width in ((torchvision.models.resnet50, 16), (torchvision.models.efficientnet_b0, 0)):
        model, _ = convert(build(num_classes=10), activation="raa")
        assert sum(isinstance(m, RAAByWidth) for m in model.modules()) == by_width
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    unprobed, _ = convert(torchvision.models.resnet50(num_classes=10), activation={"input_size": None})
    with pytest.raises(BionetsError, match="called at several widths"):
        unprobed(torch.randn(1, 3, 32, 32))


def test_a_wrapped_model_is_probed_at_the_size_the_model_inside_states():
    """DataParallel, a Sequential around the model, torch.compile: the probe sees torchvision's
    ResNet-50 inside (whose block calls one ReLU at two widths), so every width is right; a model
    that states no size says that the widths came from its layers."""
    for wrap in (nn.DataParallel, nn.Sequential, torch.compile):
        model, report = convert(wrap(torchvision.models.resnet50(num_classes=10)), activation="raa")
        assert "widths read from the layers" not in str(report)
        inner = getattr(model, "_orig_mod", model)
        inner(torch.randn(2, 3, 32, 32)).sum().backward()
    _, report = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), activation="raa")
    assert "note: widths read from the layers: Sequential states no input size" in str(report)


def test_stated_input_size_reads_the_model_as_built():
    """timm keeps the registered pretrained_cfg when img_size or in_chans change: the size comes
    from the patch embedding and the first convolution instead; torchvision's classifiers state
    224 x 224; a model of one's own states nothing (no probe)."""
    from bionets.mechanisms.raa import stated_input_size
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, num_classes=10)
    assert stated_input_size(vit) == [1, 32, 32]
    assert stated_input_size(timm.create_model("resnet20_cifar", in_chans=1)) == [1, 32, 32]
    assert stated_input_size(torchvision.models.mobilenet_v3_small()) == [3, 224, 224]
    assert stated_input_size(timm.create_model("mixer_s16_224", img_size=64)) == [3, 64, 64]     # its stem's
    assert stated_input_size(timm.create_model("tresnet_m")) == [3, 224, 224]     # in_chans, not the stem conv's 48
    assert stated_input_size(torchvision.models.segmentation.fcn_resnet50(weights_backbone=None)) == [3, 224, 224]
    assert stated_input_size(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) is None


class _Picky(nn.Module):
    """States a 3 x 8 x 8 input but takes only 3 x 4 x 4."""
    pretrained_cfg = {"input_size": (3, 8, 8)}

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.act(self.fc(x.flatten(1))))


def test_raa_falls_back_to_the_layers_widths_when_the_stated_size_fails():
    """auto: a model that fails at the size it states is swapped by the widths read from its layers,
    and the report says why (naming the model's error); an input_size given explicitly that fails
    is an error."""
    model, report = convert(_Picky(), activation="raa")
    assert model.act.num_features == 5 and model(torch.randn(2, 3, 4, 4)).shape == (2, 2)
    assert "the width probe at the model's stated input size [3, 8, 8] failed (RuntimeError: mat1 and mat2" in str(report)
    with pytest.raises(BionetsError, match=r"width probe: the model failed on an input of shape \[2, 3, 8, 8\]"):
        convert(_Picky(), activation={"input_size": [3, 8, 8]})


def test_raa_names_the_activations_a_forward_calls_as_functions():
    """torchvision's DenseNet applies its last relu with F.relu: the report says it stays; GoogLeNet
    calls every relu so: the error says where, not only that nothing was found."""
    _, report = convert(torchvision.models.densenet121(num_classes=10), activation="raa")
    assert "left as they are: activations called as functions, relu (in DenseNet.forward) x1" in str(report)
    with pytest.raises(BionetsError, match=r"in GoogLeNet; its forward calls relu \(in BasicConv2d.forward\) x57"):
        convert(torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False), activation="raa")


class _Silu(nn.Module):
    def forward(self, x):
        return F.silu(x)


class _GeluActivation(nn.Module):
    def forward(self, x):
        return F.gelu(x)


class _ScaledRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return F.relu(x) * self.scale


def test_raa_names_modules_of_other_types_that_call_an_activation():
    """A module of one's own (no children, no parameters) that calls F.gelu is an activation of a
    type not asked for (add it to types); one with parameters calls it as a function in its forward;
    one of the types asked for is swapped and not named."""
    model = nn.Sequential(nn.Linear(4, 4), _Silu(), nn.Linear(4, 4), _GeluActivation(), _GeluActivation(),
                          _ScaledRelu(), nn.Linear(4, 2))
    model, report = convert(model, activation={"types": ["_Silu"], "input_size": [4]})
    assert isinstance(model[1], RAA) and "_Silu" not in str(report).split("+5")[-1]
    assert "left as they are: _GeluActivation x2 (to swap them too, add their class names to types)" in str(report)
    assert "left as they are: activations called as functions, relu (in _ScaledRelu.forward) x1" in str(report)


def test_raa_input_size_errors_are_one_line():
    for size, expected in (([], "at least 1 item"), ([True, 8, 8], "valid integer"),
                           ([3, 2**40, 2**40], "cannot make an input of shape")):
        with pytest.raises(BionetsError, match=expected) as err:
            convert(timm.create_model("resnet18", num_classes=3), activation={"input_size": size})
        assert "\n" not in str(err.value)


def test_raa_report_notes_the_learning_rate_of_v_and_c():
    """The shift's v and scalar c sum their gradients over every pixel (SGD at 0.1 diverged on a CIFAR
    ResNet): the report says which multipliers to set; the matrix variant (a c per feature, as a
    norm's bias) says nothing."""
    for variant in ("vector", "scalar"):
        text = str(convert(timm.create_model("resnet18", num_classes=10), activation={"variant": variant})[1])
        assert "note: v and c sum their gradients" in text and "optim.lr_mult: {'*.vc': 0.01, '*.c': 0.01}" in text
    matrix = str(convert(timm.create_model("resnet18", num_classes=10), activation={"variant": "matrix"})[1])
    assert "note:" not in matrix


@pytest.mark.parametrize("optimizer, lr_mult, added", [
    ("sgd", {}, {"*.vc": 0.01, "*.c": 0.01}), ("momentum", {"*.vc": 0.1}, {"*.c": 0.01}),
    ("sgd", {"*.vc": 0.02, "*.c": 0.03}, {}), ("adamw", {}, {})])
def test_a_run_under_sgd_gives_v_and_c_their_rate_unless_the_config_does(tmp_path, capsys, optimizer, lr_mult, added):
    """Under SGD a run adds RAA's multipliers for the patterns its lr_mult lacks (ResNet-20 on the
    digits fell to chance without them), says so once, and saves them; the report's note asking
    for them (for convert's users) is left out of a run, whose rates are set."""
    import yaml

    from engine_helpers import fast_config
    from bionets.engine.trainer import train
    mults = "{" + ", ".join(f"'{k}': {v}" for k, v in lr_mult.items()) + "}"
    cfg = fast_config(tmp_path, "train.epochs=1", "mechanisms={raa: {}}", f"optim.name={optimizer}",
                      f"optim.lr_mult={mults}")
    assert cfg.optim.lr_mult == {**lr_mult, **added}
    train(cfg)
    out = capsys.readouterr().out
    assert "note: v and c sum their gradients" not in out
    assert (f"optim.lr_mult takes {added}" in out) == bool(added)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr_mult"] == {**lr_mult, **added}


def test_unknown_mechanism_in_a_config_is_one_line(tmp_path, capsys):
    assert main(["train", f"out_dir={tmp_path}", "mechanisms.raaa={}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown mechanism 'raaa'" in err and "raa" in err and len(err.splitlines()) == 1


def test_all_mechanisms_compose_and_train_on_digits(tmp_path):
    """quadratic + RAA + STDS + ARR on a CIFAR ResNet-20, through the config keys of bionets train.

    RAA's shift v . x + c sums its gradients over every pixel, so under SGD at lr 0.1 the run gives
    v and c 1/100 of the rate by itself (without it the digits run fell to chance)."""
    import json

    args = ["train", "model.name=resnet20_cifar", "model.kwargs={in_chans: 1, img_size: 8}", "train.epochs=6",
            "train.progress=false", f"out_dir={tmp_path}", "name=all",
            "mechanisms={quadratic: {placement: [layer2.1.conv1]}, raa: {}, stds: {d_max: 0.05}, arr: {weight: 1.0}}"]
    assert main(args) == 0
    history = [json.loads(line) for line in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_top1"] > history[0]["train_top1"] + 30 and history[-1]["test_top1"] > 85
    assert history[-1]["sparsity"] > 60 > history[0]["sparsity"]


def test_bench_suite_smoke(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--widths", "8", "--batches", "2", "--repeats", "1",
                 "--out", str(out)]) == 0
    table = (out / "bench.md").read_text()
    for mech in ("quadratic", "raa", "stds", "arr"):
        assert f"| {mech} |" in table
    assert (out / "bench.png").stat().st_size > 0
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and line[2:].split(" |")[0] in
            ("quadratic", "raa", "stds", "arr")]
    assert len(rows) == 4 and all(re.fullmatch(r"\d+\.\d{3}x \(\d+\.\d\d-\d+\.\d\d\)", r[6]) for r in rows)
    # the CPU's peak memory from the profiler's timeline: each case's own (the resident set's rise read
    # 0 for every case after the first)
    assert all(float(v) > 0 for r in rows for v in r[8].split(" / "))
    assert "Step ratio: the median of the round-by-round ratios" in table


def test_a_module_held_in_two_places_is_converted_in_both():
    """One ReLU in two blocks, one conv in two branches: named_modules() names each once, and the
    second place kept the plain module. Both places now hold the one converted module."""
    act, conv = torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), act,
                                torch.nn.Sequential(conv, torch.nn.BatchNorm2d(8), act), torch.nn.Sequential(conv, act))
    model, report = convert(model, activation="raa", quadratic=["3.0"])
    assert model[2] is model[3][2] is model[4][1] and type(model[2]).__name__ == "RAA"
    assert model[3][0] is model[4][0] and isinstance(model[4][0].quad, QuadraticChannel)
    assert "2, 3.2, 4.1: -> RAA" in str(report) and "3.0, 4.0: conv + channel-wise" in str(report)
    assert report.params_added == 9 + sum(p.numel() for p in model[3][0].quad.parameters())   # RAA: v (8) and c
    model(torch.randn(2, 3, 8, 8)).sum().backward()


def test_a_failing_convert_leaves_the_model_as_it_was():
    """ARR, applied last, fails on a model without classifier: the quadratic term, RAA and STDS
    (whose fixed schedule moves the weights to theta by set_) applied before it are undone."""
    model = timm.create_model("resnet18", num_classes=0)
    types, keys = [type(m) for m in model.modules()], list(model.state_dict())
    params = list(model.parameters())
    values = [p.clone() for p in params]
    with pytest.raises(BionetsError, match="create the model with num_classes > 0"):
        convert(model, quadratic=True, activation="raa", sparsity={"schedule": "fixed", "d_max": 0.05},
                regularization=True)
    assert [type(m) for m in model.modules()] == types and list(model.state_dict()) == keys
    assert all(a is b and torch.equal(a, v) for a, b, v in zip(params, model.parameters(), values))
    _, report = convert(model, quadratic=True, activation="raa", sparsity="stds")    # converts as a fresh one
    assert len(report.reports[0].changes) == 1 and model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_a_mechanism_a_model_cannot_take_says_what_the_model_is():
    import bionets  # noqa: F401  (registers the models)
    with pytest.raises(BionetsError, match="found no 2-D convolution in TinyMLP: .*QuadraticNeuron"):
        convert(timm.create_model("test_mlp"), quadratic=True)
    with pytest.raises(BionetsError, match=r"its neurons are spiking \(IFNode x20\): RAA is the activation of a "
                                           "network of rates"):
        convert(timm.create_model("sew_resnet18", T=1), activation="raa")


def test_quadratic_term_on_a_multi_step_spiking_net():
    """SEW ResNet's convolutions take [T, N, C, H, W]: Q folds the time steps into the batch."""
    import bionets  # noqa: F401  (registers the models)
    torch.manual_seed(0)
    model = timm.create_model("sew_resnet18", num_classes=10, T=2)
    model, report = convert(model, quadratic=["layer1.0.conv1", "layer2.0.conv1"])
    assert report.changes == 2
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuadraticChannel):
                m.weight.normal_(std=0.01)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, QuadraticChannel))


def test_raa_probes_levit_at_the_size_it_was_built_for():
    """timm's LeViT keeps no img_size and states 224 whatever it was built for: its size comes from
    its attention's grid (the probe at 224 failed, and the widths read from the layers broke the forward)."""
    from bionets.mechanisms.raa import stated_input_size
    model = timm.create_model("levit_128s", num_classes=10, img_size=64)
    assert stated_input_size(model) == [3, 64, 64]
    assert stated_input_size(timm.create_model("levit_128s", num_classes=10)) == [3, 224, 224]
    model, report = convert(model, activation={"types": ["Hardswish"]})
    assert "probe" not in str(report) and model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_converting_arr_again_with_other_options_is_one_line():
    """The hooks of both converts would read the one class memory: other options are refused."""
    model, _ = convert(timm.create_model("resnet18", num_classes=10), regularization={"weight": 10})
    with pytest.raises(BionetsError, match=r"ARR memory was made with other settings \(weight 10.0 -> 1.0, "
                                           r"form 'paper' -> 'code'\): apply ARR to a fresh model") as err:
        convert(model, regularization={"weight": 1, "form": "code"})
    assert "\n" not in str(err.value)
    _, again = convert(model, regularization={"weight": 10})
    assert again.changes == 0


def test_quadratic_placement_on_a_convolution_q_cannot_match():
    """Q is taken at the pixel each kernel is centred on: a 4x4 stride-4 stem or a 2x2 stride-2
    downsampling conv has no centre pixel. Named alone, it is an error saying why; matched by a
    pattern beside fitting ones, the report notes it."""
    model = timm.create_model("convnext_atto", num_classes=10)
    with pytest.raises(BionetsError, match=r"names convolution 'stem.0' of ConvNeXt, whose output grid Q cannot "
                                           r"match \(kernel \(4, 4\), stride \(4, 4\), padding \(0, 0\): Q "
                                           r"needs an odd kernel") as err:
        convert(model, quadratic=["stem.0"])
    assert "\n" not in str(err.value)
    with pytest.raises(BionetsError, match="names convolution 'stages.1.downsample.1'"):
        convert(model, quadratic=["stages.1.downsample.1"])                 # kernel 2, stride 2, padding 0
    model, report = convert(model, quadratic=["stem.0", "stages.0.blocks.0.conv_dw"])
    assert report.changes == 1 and "left as they are, 1 convolution(s)" in str(report)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_raa_patterns_input_size_silu_and_stds_d_in_the_report():
    resnet = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(BionetsError, match=r"matching \['nope\*'\] in ResNet: the patterns match none of its 17 "
                                           r"activation module\(s\) of these types \(act1, layer1.0.act1, "):
        convert(resnet, activation={"patterns": ["nope*"]})
    with pytest.raises(BionetsError, match=r"input_size \[32, 32\]: ResNet has 2-D convolutions, which take one "
                                           r"input as \[C, H, W\]"):
        convert(resnet, activation={"input_size": [32, 32]})
    _, report = convert(timm.create_model("efficientnet_b0", num_classes=10), activation="raa")
    assert "SiLU x49: RAA of the GELU form" in str(report)
    assert "GELU form" not in str(convert(resnet, activation="raa")[1])
    _, report = convert(resnet, sparsity={"d_max": 0.01, "schedule": "fixed"})
    assert report.hooks[0].epoch_metrics(resnet)["stds_d"] == 0.01


def test_a_dit_model_carries_its_quadratic_term_already():
    """Dit-ResNet's blocks and Dit-ConvNeXt's depthwise convolutions hold their own term: convert
    added a second one beside it (Dit-ConvNeXt's DwConvQuadratic is a Conv2d, so it was eligible)."""
    import bionets  # noqa: F401  (registers the models)
    for name, kwargs in (("dit_resnet20", {}), ("dit_convnext_tiny", {"depths": (3, 1, 1, 1), "dims": (8, 16, 32, 64)})):
        model = timm.create_model(name, num_classes=10, **kwargs)
        before = sum(p.numel() for p in model.parameters())
        model, report = convert(model, quadratic=True)
        assert report.changes == 0 and "carries 1 quadratic term(s) already" in str(report)
        assert sum(p.numel() for p in model.parameters()) == before
    _, report = convert(model, quadratic=["stages.0.blocks.2.conv_dw"])     # named: the term it has already
    assert report.changes == 0 and "carries 1 quadratic term(s) already" in str(report)
    # others named beside it: said (a second term inside Dit-ResNet's block came without a word)
    _, report = convert(timm.create_model("dit_resnet20", num_classes=10), quadratic=["layer2.0.conv1", "layer1.0.conv1"])
    assert report.changes == 2 and ("carries 1 quadratic term(s) already (layer2.0): the new ones are added beside "
                                    "them, 1 inside a module that has one ('layer2.0.conv1')") in str(report)


def test_a_quadratic_term_that_outweighs_the_model_is_noted():
    """Its C^3 weights made MaxViT 134M parameters larger without a word."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    _, report = convert(model, quadratic=True)
    assert "the quadratic term(s) add 32,768 parameters to the model's 10,144 (323%)" in str(report)
    _, report = convert(timm.create_model("resnet18", num_classes=10), quadratic=True)
    assert "add 262,144 parameters" not in str(report)          # 2% of ResNet-18
    # far larger: refused before any term is made (placement ['*'] on Dit-ConvNeXt-T asked for 7 GiB)
    wide = nn.Sequential(nn.Conv2d(3, 512, 3, padding=1), nn.Conv2d(512, 512, 3, padding=1))
    with pytest.raises(BionetsError, match=r"quadratic placement would add 134,217,728 parameters \(0.5 GiB in float32\) "
                                           r"to the model's 2,374,144 in 1 term\(s\), '1' the largest"):
        convert(wide, quadratic=["1"])
    assert isinstance(wide[1], nn.Conv2d)


def test_a_module_held_twice_by_one_parent_is_converted_in_both_slots():
    """named_children() names a module once per parent: the second slot of one Sequential kept the old
    ReLU (or convolution) while the report said it was converted."""
    act, conv = nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), act, conv, act, conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    model, report = convert(model, activation={"input_size": [3, 8, 8]}, quadratic=["2"])
    assert isinstance(model[1], RAA) and model[1] is model[3]
    assert type(model[2]).__name__ == "ConvPlusQuadratic" and model[2] is model[4]
    assert "2, 4: conv + channel-wise" in str(report) and "1, 3: -> RAA" in str(report)


def test_hooks_on_a_replaced_module_move_to_its_replacement():
    """A forward hook on an activation RAA replaces, and forward and backward hooks on a convolution the
    quadratic term wraps, observe the replacement (the conv's own output would lack Q); their handles
    still remove them."""
    model = torchvision.models.resnet18(num_classes=4)
    seen = []
    handles = [model.layer1[0].relu.register_forward_hook(lambda m, i, o: seen.append(("relu", type(m).__name__))),
               model.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.append(("conv2", o.clone()))),
               model.layer1[0].conv2.register_full_backward_hook(lambda m, gi, go: seen.append(("back", type(m).__name__)))]
    model, _ = convert(model, quadratic=["layer1.0.conv2"], activation="raa")
    wrapper = model.layer1[0].conv2
    with torch.no_grad():
        wrapper.quad.weight.normal_()
    seen.clear()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    relu_calls = [t for k, t in seen if k == "relu"]
    assert relu_calls and set(relu_calls) == {"RAA"} and ("back", "ConvPlusQuadratic") in seen
    conv_out = next(t for k, t in seen if k == "conv2")
    assert isinstance(wrapper, ConvPlusQuadratic) and not wrapper.conv._forward_hooks
    x = torch.randn(2, 64, 8, 8)
    seen.clear()
    torch.testing.assert_close(conv_out.shape, wrapper(x).shape)
    assert torch.equal(seen[0][1], wrapper(x)) and not torch.equal(seen[0][1], wrapper.conv(x))
    for handle in handles:
        handle.remove()
    seen.clear()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == []


@pytest.mark.parametrize("how", ["prune", "weight_norm", "spectral_norm"])
def test_pytorchs_own_hooks_stay_on_the_convolution_the_quadratic_term_wraps(how):
    """torch.nn.utils.prune and the old weight_norm / spectral_norm put hooks on a convolution that read
    its own attributes (weight_mask, weight_g, weight_orig): moved to the wrapper, they failed at the
    first forward. The wrapped convolution keeps them and computes as before."""
    import warnings

    from torch.nn.utils import prune
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 36, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # (the old weight_norm is deprecated)
        {"prune": lambda m: prune.l1_unstructured(m, "weight", 0.5), "weight_norm": torch.nn.utils.weight_norm,
         "spectral_norm": torch.nn.utils.spectral_norm}[how](model[2])
    x = torch.randn(2, 3, 6, 6)
    before = model.eval()(x)
    model, _ = convert(model, quadratic={"placement": ["2"]})
    assert model[2].conv._forward_pre_hooks and not model[2]._forward_pre_hooks
    torch.testing.assert_close(model(x), before)
