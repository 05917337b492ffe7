"""When autocast applies to a layer's input: the one rule the layers' own dtype handling follows."""
import torch


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (``False`` on devices without autocast, e.g. 'meta')."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def autocast_casts(x: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether autocast casts x (and weights of ``dtypes``) to its own dtype: on for x's device, and
    none of them float64, which autocast leaves alone."""
    return autocast_on(x) and torch.float64 not in (x.dtype, *dtypes)
