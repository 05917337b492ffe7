"""The spiking CIFAR-10 network of STDS and Grad R (Chen et al., ICML 2022 / IJCAI 2021), on
SpikingJelly's ``activation_based`` neurons.

conv(3->256)-BN-LIF, 2 x [conv-BN-LIF], MaxPool2, 3 x [conv-BN-LIF], MaxPool2, flatten (16384),
Dropout 0.5, 1x1 conv 16384->2048, LIF, Dropout 0.5, 1x1 conv 2048->100, LIF, voting (the mean of
each group of 10 outputs -> 10 classes). All 3x3 convs pad 1, no bias. The output is the voted
firing rate averaged over the T time steps, trained with ``train.loss: mse_onehot``.

Spiking vocabulary (SPEC-STDS): multi-step (``step_mode='m'``) LIF neurons with tau = 2,
``decay_input``: ``H_t = V_{t-1} + (X_t - V_{t-1}) / tau``, ``S_t = Heaviside(H_t - 1)``,
``V_t = H_t (1 - S_t)`` (hard reset to 0, detached from the graph); IF neurons:
``H_t = V_{t-1} + X_t``. Surrogate gradient ATan, alpha = 2, one instance per neuron. Stateless
layers fold T into the batch (``layer.SeqToANNContainer``). Direct encoding: the first conv+BN run
once on the image and the result is repeated over T. Every neuron's state is reset before and
after each forward pass (training and evaluation alike), inside ``forward`` (``forward_features`` and
``forward_head`` called alone start from rest too).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from spikingjelly.activation_based import base, layer, neuron, surrogate
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from bionets.constants import CIFAR_MEAN, CIFAR_STD
from bionets.errors import BionetsError

CIFAR10_PLAN = (256, 256, 256, "M", 256, 256, 256, "M")


def lif_node() -> neuron.LIFNode:
    """Multi-step LIF, tau 2, decay_input, v_th 1, hard reset to 0 (detached), its own ATan(2)."""
    return neuron.LIFNode(tau=2.0, decay_input=True, v_threshold=1.0, v_reset=0.0,
                          surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=True, step_mode="m")


def if_kwargs() -> dict:
    """Keyword arguments of a multi-step IF neuron: v_th 1, hard reset to 0 (detached), ATan(2)."""
    return dict(v_threshold=1.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0), detach_reset=True,
                step_mode="m")


def check_time_steps(T: int) -> int:
    """``T`` as an int (NumPy's integers too), checked where the model is built and at every forward
    (``model.T = 4`` sets another number of steps, as for evaluating at another T)."""
    if not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 1:
        raise BionetsError(f"spiking model time steps T must be an integer >= 1 (the paper uses 8 on CIFAR, "
                           f"4 on ImageNet), got {T!r}")
    return int(T)


def at_rest(model: nn.Module, modules=None) -> None:
    """Every neuron of ``model`` (or of ``modules``) back at rest, found anew at each call: SpikingJelly's
    ``reset_net`` caches the neurons it found first, so a neuron added or swapped in later kept its
    state from batch to batch. A module set to single-step (``set_step_mode(model, 's')``), which
    would read [T, N, ...] as one step of a T-sample batch, is one error line."""
    for m in model.modules() if modules is None else modules:
        if getattr(m, "step_mode", "m") != "m":
            raise BionetsError(f"{type(model).__name__} runs its neurons multi-step over [T, N, ...], but a "
                               f"{type(m).__name__} is set to step_mode='{m.step_mode}': set "
                               "spikingjelly.activation_based.functional.set_step_mode(model, 'm')")
        if isinstance(m, base.MemoryModule):
            m.reset()


def check_images(model: nn.Module, x: torch.Tensor, in_chans: int, size: tuple[int, int] | None = None) -> None:
    """One line where ``x`` is no batch of [N, in_chans, H, W] images (of ``size`` where the net needs one)."""
    if x.ndim != 4 or x.shape[1] != in_chans or size is not None and tuple(x.shape[-2:]) != size:
        h, w = size if size is not None else ("H", "W")
        raise BionetsError(f"{type(model).__name__} takes images [N, {in_chans}, {h}, {w}] (it repeats them over its "
                           f"T time steps itself), got shape {list(x.shape)}")


def repeat_over_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: [N, ...] -> [T, N, ...], the same input at every step."""
    return x.unsqueeze(0).repeat(T, *([1] * x.ndim))


def conv_bn(c_in: int, c_out: int) -> layer.SeqToANNContainer:
    return layer.SeqToANNContainer(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


class SpikingVotingNet(nn.Module):
    """A direct-encoded spiking conv net with two spiking 1x1-conv layers and a voting output.

    ``plan``: the stem conv's channels, then conv channels or ``"M"`` (2x2 max-pool) for the body.
    """

    def __init__(self, plan: Sequence[int | str] = CIFAR10_PLAN, hidden: int = 2048, T: int = 8,
                 num_classes: int = 10, in_chans: int = 3, img_size: int = 32, voting: int = 10,
                 drop_rate: float = 0.5):
        super().__init__()
        self.T = check_time_steps(T)
        if not 0 <= drop_rate < 1:      # (SpikingJelly's Dropout asserts it, with no message)
            raise BionetsError(f"drop_rate={drop_rate} must lie in [0, 1): the fraction of features dropped")
        pools = sum(1 for p in plan if p == "M")
        h, w = (img_size, img_size) if isinstance(img_size, numbers.Integral) else tuple(img_size)
        if h % 2**pools or w % 2**pools:
            raise BionetsError(f"img_size={img_size} must be divisible by {2**pools} (the net max-pools {pools} times)")
        self.num_classes, self.voting, self.in_chans, self.img_size = num_classes, voting, in_chans, (int(h), int(w))
        c = plan[0]
        self.conv_stem = nn.Conv2d(in_chans, c, 3, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(c)
        self.sn_stem = lif_node()
        body = []
        for item in plan[1:]:
            if item == "M":
                body.append(layer.SeqToANNContainer(nn.MaxPool2d(2, 2)))
            else:
                body += [conv_bn(c, item), lif_node()]
                c = item
        self.features = nn.Sequential(*body)
        self.num_features = c * (h // 2**pools) * (w // 2**pools)    # forward_features' per step, flattened
        self.head_hidden_size = hidden                         # what num_classes=0 or pre_logits gives
        self.drop1 = layer.Dropout(drop_rate, step_mode="m")   # one mask for all T steps
        self.fc1 = nn.Conv2d(self.num_features, hidden, 1, bias=False)
        self.sn1 = lif_node()
        self.drop2 = layer.Dropout(drop_rate, step_mode="m")
        self.fc2 = self._voting_layer(num_classes)
        self.sn2 = lif_node()

    def _voting_layer(self, num_classes: int) -> nn.Module:
        """``voting`` output neurons per class; none for ``num_classes=0`` (pre-logits out)."""
        if num_classes > 0:
            return nn.Conv2d(self.fc1.out_channels, num_classes * self.voting, 1, bias=False)
        return nn.Identity()

    @staticmethod
    def _conv1x1(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 conv as a linear layer over [T, N, F] (T folded into the batch)."""
        t, n, f = x.shape
        out = conv(x.reshape(t * n, f, 1, 1))
        return out.view(t, n, out.shape[1])        # not -1: an empty batch leaves it undetermined

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image [N, C, H, W] -> spikes [T, N, C', H', W'], from neurons at rest."""
        check_images(self, x, self.in_chans, self.img_size)
        at_rest(self)
        x = repeat_over_time(self.bn_stem(self.conv_stem(x)), check_time_steps(self.T))
        return self.features(self.sn_stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Spikes [T, N, ...] -> voted firing rate [N, classes] (averaged over T), from head neurons at rest."""
        at_rest(self, (self.sn1, self.sn2))
        x = self.sn1(self._conv1x1(self.fc1, self.drop1(x.flatten(2))))
        if pre_logits or self.num_classes == 0:
            return x.mean(0)
        x = self.sn2(self._conv1x1(self.fc2, self.drop2(x)))
        t, n, _ = x.shape
        return x.view(t, n, self.num_classes, self.voting).mean(-1).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.forward_head(self.forward_features(x))
        finally:
            at_rest(self)       # no state (or graph) outlives the batch

    def get_classifier(self) -> nn.Module:
        return self.fc2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh voting layer for ``num_classes`` (0: the model returns the hidden layer's firing rates)."""
        self.num_classes = num_classes
        self.fc2 = self._voting_layer(num_classes)


def build_spiking(cls: type, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    """timm's ``build_model_with_cfg`` for a spiking family, which has no ``features_only`` form."""
    if kwargs.pop("features_only", False):
        raise BionetsError(f"{variant} has no features_only form: its maps carry a time axis, [T, N, C, H, W], which "
                           "timm's feature extractors do not know; take them from model.forward_features(x)")
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


def create_voting_net(variant: str, pretrained: bool = False, **kwargs) -> SpikingVotingNet:
    return build_spiking(SpikingVotingNet, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "snn_cifar10": dict(url="", num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR_MEAN,
                        std=CIFAR_STD, first_conv="conv_stem", classifier="fc2"),
})


@register_model
def snn_cifar10(pretrained: bool = False, T: int = 8, **kwargs) -> SpikingVotingNet:
    """The spiking CIFAR-10 net of STDS (voting output, 36.7 M parameters), T time steps."""
    return create_voting_net("snn_cifar10", pretrained, plan=CIFAR10_PLAN, hidden=2048, T=T, **kwargs)
