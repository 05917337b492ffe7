"""A small spiking conv net for 8x8 one-channel digits (scikit-learn's bundled set): the quick,
CPU-sized twin of the STDS CIFAR-10 network (:mod:`bionets.models.snn_cifar`), with the same
direct encoding, multi-step LIF neurons, 1x1-conv head and voting output, T = 4 by default.

stem conv(1->32)-BN (once, repeated over T)-LIF, conv(32->32)-BN-LIF, MaxPool2, conv(32->64)-BN-LIF,
MaxPool2, flatten (256), Dropout, 1x1 conv 256->256, LIF, Dropout, 1x1 conv 256->100, LIF, voting.
"""
from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from bionets.models.snn_cifar import SpikingVotingNet, create_voting_net

DIGITS_PLAN = (32, 32, "M", 64, "M")

default_cfgs = generate_default_cfgs({
    "snn_digits": dict(url="", num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, mean=(0.0,), std=(1.0,),
                       first_conv="conv_stem", classifier="fc2"),
})


@register_model
def snn_digits(pretrained: bool = False, T: int = 4, **kwargs) -> SpikingVotingNet:
    """Spiking voting net for 8x8 digits (0.12 M weights), T time steps."""
    kwargs = {"in_chans": 1, "img_size": 8, "drop_rate": 0.2, **kwargs}
    return create_voting_net("snn_digits", pretrained, plan=DIGITS_PLAN, hidden=256, T=T, **kwargs)
