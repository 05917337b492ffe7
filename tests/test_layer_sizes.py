"""Every layer refuses sizes that are not positive whole numbers with one error naming them: left to
torch, a width of 2.5 or -3 failed deep inside a tensor constructor, and a width of 0 built a layer
that failed at its first call."""
import re

import pytest
import torch

from bionets.errors import BionetsError
from bionets.layers.arr import ArrMemory
from bionets.layers.map_norm import MapLayerNorm
from bionets.layers.quadratic import QuadraticChannel, QuadraticNeuron
from bionets.layers.quadratic_pixel import QuadraticPixel
from bionets.layers.raa import RAA


@pytest.mark.parametrize("build, said", [
    (lambda: QuadraticChannel(2.5), "QuadraticChannel needs positive whole numbers, got in_channels=2.5"),
    (lambda: QuadraticChannel(4, 0), "got out_channels=0"),
    (lambda: QuadraticNeuron(3, 3, rank=1.5), "QuadraticNeuron needs positive whole numbers, got rank=1.5"),
    (lambda: QuadraticPixel(-3), "QuadraticPixel needs positive whole numbers, got in_channels=-3, out_channels=-3"),
    (lambda: QuadraticPixel(4, groups=0), "got groups=0"),
    (lambda: QuadraticPixel(4)(torch.randn(2, 4, 5)), "QuadraticPixel expects [N, 4, H, W] maps, got shape [2, 4, 5]"),
    (lambda: RAA(0), "RAA needs positive whole numbers, got num_features=0"),
    (lambda: RAA(True), "got num_features=True"),
    (lambda: ArrMemory(0, 3, 4), "ArrMemory needs positive whole numbers, got layers=0"),
    (lambda: MapLayerNorm((0, 3)), "MapLayerNorm needs positive whole numbers, got height=0"),
])
def test_layers_refuse_sizes_that_are_not_positive_whole_numbers(build, said):
    with pytest.raises(BionetsError, match=re.escape(said)):
        build()


def test_sizes_may_be_any_integer_type():
    import numpy as np
    assert QuadraticChannel(np.int64(4)).in_channels == 4 and RAA(np.int64(3)).v.numel() == 3
