"""Mechanisms ``raa`` and ``arr``: DNRT's activation and regularization, on any timm/torchvision model.

``mechanisms: {raa: {variant: vector, types: [ReLU, GELU, GELUTanh, SiLU, Swish], patterns: null}}`` swaps the
activations for RAA (:mod:`bionets.layers.raa`); ``input_size: [C, H, W]`` finds the width of
every activation call by one forward pass on zeros (:mod:`bionets.layers.raa_swap`): ``auto`` (the
default) at the size the model states (timm's ``pretrained_cfg``, torchvision's 224 x 224), falling
back to the widths read from the layers where the model states none or fails on it; ``null`` reads
them from the layers only.
``mechanisms: {arr: {weight: 10, momentum: 0.1, form: paper, layers: auto, classifier: null}}`` adds ARR's loss
(:mod:`bionets.layers.arr`) through the engine's auxiliary-loss hook: ``layers: classifier``
regularizes the pooled features that feed the classifier (CNNs, MLPs); ``blocks`` the class token
after every transformer block (ViTs; the mean of the patch tokens where a block's output holds no
class token or the model pools by the mean: see :class:`ArrHook`); ``auto``
picks ``blocks`` for models with ``blocks`` and a ``cls_token``/``embed_dim``, else ``classifier``;
``classifier: NAME`` names the classifier module where the one found is not it (:func:`classifier_layer`).
Evaluation is unaffected.
"""
from __future__ import annotations

from collections import Counter
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from bionets.configbase import Section
from bionets.engine.hooks import Hook
from bionets.errors import BionetsError, one_line, require_module
from bionets.layers.arr import ArrMemory, arr_loss, class_tokens, per_sample
from bionets.layers.raa_swap import (DEFAULT_TYPES, Probe, ProbeError, eager, find_activations, probe_activations,
                                     raa_form, replace_activations)
from bionets.mechanisms.registry import Applied, Report, SgdRateNote, register_mechanism


Size = Annotated[int, Field(strict=True, gt=0)]      # (strict: true is no size)


class RaaConfig(Section):
    variant: Literal["vector", "scalar", "matrix"] = "vector"
    base: Literal["auto", "gelu", "relu"] = "auto"
    types: list[str] = list(DEFAULT_TYPES)
    patterns: list[str] | None = None
    compiled: bool = False        # fuse the whole RAA (shift and activation) with torch.compile: the fast path
    # [C, H, W] of one input: find every activation call's width by a forward pass on zeros; auto: at the
    # size the model states (stated_input_size), else from the layers; null: from the layers only
    input_size: Annotated[list[Size], Field(min_length=1)] | Literal["auto"] | None = "auto"


class ArrConfig(Section):
    weight: float = Field(10.0, ge=0)
    momentum: float = Field(0.1, ge=0, lt=1)
    form: Literal["paper", "code"] = "paper"
    layers: Literal["auto", "classifier", "blocks"] = "auto"
    # the classifier's module name (model.named_modules()), where the one found is not it: see classifier_layer
    classifier: str | None = None


# measured: resnet20_cifar with RAA on the digits, SGD lr 0.1: test loss 1e5 after the first epoch,
# then chance for all 30 epochs; 98.6% with v's multiplier and a 1-epoch warm-up (tests/test_convert.py
# trains with both multipliers). Without a warm-up (recipe_cnn_cifar), 10 epochs, ReLU form: 14.2 / 21.7%
# (seeds 0 / 1) with v's alone, 76.1 / 96.7% with c's too (the plain ReLU net: 58.6 / 59.2%).
V_RATES = {"*.v": 0.01, "*.c": 0.01}
V_LR_NOTE = SgdRateNote("v and c sum their gradients over every pixel or token (c over the features too): with SGD "
                        "at lr ~0.1 train them with optim.lr_mult: {'*.v': 0.01, '*.c': 0.01} (bionets train sets "
                        "it under SGD) or training can diverge; AdamW needs none", tuple(V_RATES))


def shift_rates(cfg: RaaConfig) -> dict[str, float]:
    """The lr multipliers a run under SGD gives RAA's shift (V_LR_NOTE: without them ResNet-20 on the
    digits fell to chance); the matrix variant's c is per feature, as a norm's bias, and takes none."""
    return {} if cfg.variant == "matrix" else dict(V_RATES)


@register_mechanism("raa", RaaConfig, order=20, sgd_lr_mult=shift_rates)
def apply_raa(model: nn.Module, cfg: RaaConfig) -> Applied:
    from bionets.layers.raa import RAA

    already = sum(isinstance(m, RAA) for m in model.modules())
    if isinstance(cfg.input_size, list) and len(cfg.input_size) != 3 and any(
            isinstance(m, nn.Conv2d) for m in model.modules()):
        raise BionetsError(f"raa input_size {cfg.input_size}: {type(model).__name__} has 2-D convolutions, which take "
                           f"one input as [C, H, W] (3 numbers), e.g. [3, 32, 32]")
    chosen = find_activations(model, tuple(cfg.types), cfg.patterns)
    size = stated_input_size(model) if cfg.input_size == "auto" else cfg.input_size
    probe, notes = Probe({}), []
    try:
        probe = probe_activations(model, chosen, _zeros(model, size)) if size else probe
    except ProbeError as err:
        if cfg.input_size != "auto":
            raise
        notes.append(f"widths read from the layers: the width probe at the model's stated input size {size} failed "
                     f"({err.cause}); if one activation module runs at several widths, give input_size: [C, H, W]")
    if cfg.input_size == "auto" and size is None and chosen:
        notes.append(f"widths read from the layers: {type(model).__name__} states no input size; if one activation "
                     "module runs at several widths, give input_size: [C, H, W]")
    functions = ", ".join(f"{call} x{n}" for call, n in probe.functions.most_common())
    # torch's and timm's activations of other types, and modules of other types that call one
    others = ", ".join(filter(None, [other_activations(model, cfg.types),
                                     ", ".join(f"{t} x{n}" for t, n in probe.activation_like.most_common())]))
    if not chosen and not already:
        typed = [n for n, m in model.named_modules() if type(m).__name__.lower() in {t.lower() for t in cfg.types}]
        shown = ", ".join(typed[:4]) + (", ..." if len(typed) > 4 else "")
        spiking = Counter(type(m).__name__ for m in model.modules()
                          if type(m).__module__.startswith("spikingjelly.activation_based.neuron"))
        hint = (f": the patterns match none of its {len(typed)} activation module(s) of these types ({shown})"
                if cfg.patterns and typed else
                f"; its neurons are spiking ({', '.join(f'{t} x{n}' for t, n in spiking.most_common())}): RAA is the "
                "activation of a network of rates, not a spiking neuron" if spiking else
                f"; it has {others}: to swap them, add their class names to types" if others else
                f"; its forward calls {functions}: functions, not modules, which RAA cannot swap" if functions else
                " (activations called as functions in forward, such as F.relu, are no modules to swap)")
        raise BionetsError(f"raa found no activation module of types {list(cfg.types)}"
                           + (f" matching {cfg.patterns}" if cfg.patterns else "") + f" in {type(model).__name__}{hint}")
    # base auto gives every activation other than a ReLU the GELU form: a SiLU's RAA starts as GELU
    recast = Counter(type(a.module).__name__ for a in chosen.values()
                     if cfg.base == "auto" and raa_form(a.module, "auto") not in type(a.module).__name__.lower())
    replaced = replace_activations(model, chosen, probe, cfg.variant, cfg.base, cfg.compiled)
    if cfg.variant != "matrix" and replaced:
        notes.insert(0, V_LR_NOTE)
    if recast:
        notes.append(", ".join(f"{t} x{n}" for t, n in recast.most_common()) + ": RAA of the GELU form, "
                     "x * Phi(x + shift), which starts as GELU, not as the activation it replaced")
    if replaced and others:
        notes.append(f"left as they are: {others} (to swap them too, add their class names to types)")
    if functions:
        notes.append(f"left as they are: activations called as functions, {functions} (no module to swap)")
    if already and not replaced:
        notes.append(f"the model carries {already} RAA module(s) already: left as they are, with their own settings")
    report = Report("raa", [f"{name}: -> RAA ({cfg.variant}), +{n}" for name, n in replaced],
                    sum(n for _, n in replaced), notes)
    return Applied(model, [], report)


def stated_input_size(model: nn.Module) -> list[int] | None:
    """[C, H, W] of one input as the model states it, or None: timm's ``pretrained_cfg`` input size
    read as the model was built (timm keeps the registered config when ``img_size`` or ``in_chans``
    change): the channels of its ``in_chans`` (else of its first convolution), the height and width
    of the first module with an ``img_size`` (the model's own, a patch embedding's; timm's LeViT:
    its first attention's ``resolution`` times its stem's stride); torchvision's
    classifiers, segmentation and detection models: 3 x 224 x 224 (a ViT's own ``image_size``).
    A wrapper states what the model it calls states (DataParallel's and DDP's ``module``,
    torch.compile's ``_orig_mod``, a Sequential's first module)."""
    inner = _called_model(model)
    if inner is not None:
        return stated_input_size(inner)
    stated = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    module = type(model).__module__.split(".")
    if stated is None and module[:2] == ["torchvision", "models"] and (
            len(module) == 3 or module[2] in ("segmentation", "detection")):
        stated = (3, getattr(model, "image_size", 224), getattr(model, "image_size", 224))
    if stated is None or len(stated) != 3:
        return None
    channels = getattr(model, "in_chans", None)
    if not isinstance(channels, int):
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else stated[0]
    hw = list(stated[1:])
    for m in model.modules():
        size = getattr(m, "img_size", None)
        if isinstance(size, int) or isinstance(size, tuple | list) and len(size) == 2:
            hw = [size, size] if isinstance(size, int) else list(size)
            break
    else:
        stride = getattr(getattr(model, "stem", None), "stride", None)
        if type(model).__module__ == "timm.models.levit" and isinstance(stride, int):
            # LeViT keeps no img_size: its attention's token grid (fixed by its biases) times its stem's stride
            grid = next((m.resolution for m in model.modules() if isinstance(getattr(m, "resolution", None), tuple)),
                        None)
            hw = [r * stride for r in grid] if grid is not None else hw
    return [channels, *hw]


def _called_model(model: nn.Module) -> nn.Module | None:
    """The model a wrapper calls on the wrapper's own input, or None for a model that is no wrapper."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module
    if eager(model) is not model:             # torch.compile's
        return eager(model)
    return model[0] if isinstance(model, nn.Sequential) and len(model) else None


def _zeros(model: nn.Module, size: list[int]) -> torch.Tensor:
    """A batch of two zero inputs of ``size``, on the model's device (in its dtype if floating)."""
    p = next(model.parameters(), None)
    try:
        return torch.zeros(2, *size, device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None and p.is_floating_point() else None)
    except RuntimeError as err:     # more memory than there is
        raise BionetsError(f"RAA's width probe cannot make an input of shape {[2, *size]} ({one_line(err, 120)}): give "
                           "a smaller input_size (the widths do not depend on the image size of a CNN)") from None


# torch's and timm's modules there that are gates, normalizers or layers, not a neuron's activation
_NOT_ACTIVATIONS = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "Identity", "Sigmoid",
                    "Hardsigmoid", "HardSigmoid", "LogSigmoid", "Tanh", "GLU", "Threshold", "GateMlp"}


def other_activations(model: nn.Module, types: list[str]) -> str:
    """The activation modules (torch's and timm's) of other types than ``types`` in ``model``, as
    'Hardswish x19, ReLU6 x2'; '' if none."""
    wanted = {t.lower() for t in types}
    counts = Counter(type(m).__name__ for m in model.modules()
                     if type(m).__module__.startswith(("torch.nn.modules.activation", "timm.layers.activations"))
                     and type(m).__name__ not in _NOT_ACTIVATIONS and type(m).__name__.lower() not in wanted)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def _is_vit(model: nn.Module) -> bool:
    """A transformer whose blocks carry tokens of one width (CrossViT's two branches have two: a list)."""
    return (isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList)
            and isinstance(getattr(model, "embed_dim", None), int))


def classifier_layer(model: nn.Module, name: str | None = None) -> nn.Linear | nn.Conv2d:
    """The layer that gives the classes: the module ``name`` where given, else timm's
    ``get_classifier()`` (which decides: a timm model built with ``num_classes=0`` has none; of a
    distilled model's two heads, the class head), else ``fc``/``classifier``/``head``, else the
    model's last Linear module (torchvision's ``heads.head``); in a Sequential or a normed head, its
    last Linear or Conv2d (SqueezeNet's)."""
    timm_head = hasattr(model, "get_classifier") and name is None
    if name is not None:
        given = dict(model.named_modules()).get(name)
        if given is None:
            near = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)][-4:]
            raise BionetsError(f"arr classifier={name!r}: {type(model).__name__} has no module of that name; its "
                               f"last Linear/Conv2d modules are {near}: give one of them (or the module holding it)")
    elif timm_head:
        given = model.get_classifier()
    else:
        given = next((getattr(model, a) for a in ("fc", "classifier", "head")
                      if isinstance(getattr(model, a, None), nn.Module)), None)
    head = given[0] if isinstance(given, tuple) else given       # DeiT-distilled, LeViT: (head, head_dist)
    if isinstance(head, nn.Module) and not isinstance(head, nn.Linear | nn.Conv2d):
        head = next((m for m in reversed(list(head.modules())) if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if timm_head and head is None:
        raise BionetsError(f"arr needs the classifier of {type(model).__name__} (its class count and input), but its "
                           f"get_classifier() is {type(given).__name__}: create the model with num_classes > 0")
    if name is not None and head is None:
        raise BionetsError(f"arr classifier={name!r} is a {type(given).__name__} without a Linear or Conv2d layer: "
                           "name the layer that gives the classes")
    if head is None:
        head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if head is None:
        raise BionetsError(f"arr cannot find the classifier of {type(model).__name__} (no Linear layer): "
                           "use layers=blocks for a ViT, or give the model a Linear classifier")
    return head


class ArrHook(Hook):
    """Captures the responses with forward hooks; returns ARR's loss in training.

    ``layers='classifier'``: the classifier's input, spatially averaged; where that input is the
    output of a Dropout module beside the classifier (torchvision's ``Sequential(Dropout, Linear)``
    heads, timm's ``ClassifierHead``), the Dropout's input (a dropout applied as a function in the
    model's ``forward`` is not seen). ``'blocks'``: after every
    block, what the model's head would read of the tokens: the class token where the block's output
    holds one and the model pools by it (``global_pool='token'``), else the mean of the patch tokens.
    Whether a block's output holds prefix (class, register) tokens is read from its token count
    against the patch embedding's (CaiT and XCiT add the class token after ``blocks``; ConViT
    part-way through them).
    """

    def __init__(self, cfg: ArrConfig, layers: str):
        self.cfg, self.layers, self.responses, self.blocks, self.handles = cfg, layers, [], [], []

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (again: the earlier ones are removed, and so are those
        that a ``copy.deepcopy`` of a model carried over from the model's ARR hook)."""
        require_module(model, "ArrHook.attach")
        if not isinstance(getattr(model, "arr_memory", None), ArrMemory):
            raise BionetsError(f"ArrHook.attach: the {type(model).__name__} has no ARR memory (arr_memory): attach the "
                               "hook to the model bionets.convert(model, regularization=...) returned, or a copy of it "
                               "(before wrapping it in DDP)")
        for h in self.handles:
            h.remove()
        self.memory, self.responses, self.blocks, self.patches = model.arr_memory, [], [], None
        # a spiking net folds its time steps into the batch (SpikingJelly's multi-step mode): its
        # responses are averaged over them; any other model's rows must match the targets one to one
        self.time_folded = any(getattr(m, "step_mode", None) == "m" for m in model.modules())
        for module in model.modules():
            _drop_copied_captures(module._forward_hooks)
            _drop_copied_captures(module._forward_pre_hooks)
        if self.layers == "classifier":
            head = classifier_layer(model, self.cfg.classifier)
            self.head, self.head_name = head, next(n for n, m in model.named_modules() if m is head)
            self.classes = head.out_features if isinstance(head, nn.Linear) else head.out_channels
            parent = self.parent = model.get_submodule(self.head_name.rpartition(".")[0])
            self.handles, self.dropped = [head.register_forward_pre_hook(self._keep_input)], None
            for drop in parent.children():
                if isinstance(drop, nn.modules.dropout._DropoutNd):
                    self.handles += [drop.register_forward_pre_hook(self._before_dropout),
                                     drop.register_forward_hook(self._after_dropout)]
            return
        self.pool_token = getattr(model, "global_pool", "token") == "token" and getattr(model, "cls_token", None) is not None
        self.embed_dim = model.embed_dim
        self.handles = [block.register_forward_hook(self._keep_token) for block in model.blocks]
        if isinstance(getattr(model, "patch_embed", None), nn.Module):
            self.handles.append(model.patch_embed.register_forward_hook(self._count_patches))

    # bound methods, not lambdas: a model with the hooks attached can still be pickled (torch.save(model))
    def _count_patches(self, module: nn.Module, args: tuple, out) -> None:
        out = out[0] if isinstance(out, tuple) else out                   # XCiT: (tokens, (Hp, Wp))
        self.patches = out[0].numel() // self.embed_dim                   # any layout: [N, D], [H, W, D], [D, H, W]

    def _before_dropout(self, module: nn.Module, args: tuple):
        if self._capturing(module):
            self.dropped = (args[0], None)
            if module.inplace:                                           # (else it would drop in the input)
                return (args[0].clone(),)
        return None

    def _after_dropout(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.dropped is not None:
            self.dropped = (self.dropped[0], out)

    def _keep_input(self, module: nn.Module, args: tuple) -> None:
        if not self._capturing(module):
            return
        x, dropped, self.dropped = args[0], self.dropped, None
        if dropped is not None and x is dropped[1]:                      # the features before the dropout
            x = dropped[0]
        if x.ndim == 3:
            raise _not_the_classifier(self.head_name, f"its input is a {tuple(x.shape)} tensor (tokens, not one "
                                                      "vector a sample)")
        self._keep(x.mean((2, 3)) if x.ndim == 4 else x)

    def _keep_token(self, module: nn.Module, args: tuple, x: torch.Tensor) -> None:
        if not self._capturing(module):
            return
        if x.ndim != 3:                                                  # a block of image-shaped tokens
            self._keep(x.flatten(1, -2).mean(1))
            return
        prefix = x.shape[1] - self.patches if self.patches is not None else int(self.pool_token)
        if prefix > 0 and self.pool_token:
            # the block itself, for class_tokens (its slice taken only if needed: a view and an
            # autograd node less a block), except inside a compiled model, where the whole block
            # outputs would become the graph's outputs and Inductor fuses the slices' gradients anyway
            if torch.compiler.is_compiling():
                self._keep(x[:, 0])
            else:
                self._keep(None, block=x)
        else:
            self._keep(x[:, max(prefix, 0):].mean(1))

    def _head_replaced(self, model: nn.Module) -> bool:
        """Whether the classifier's parent is still in ``model`` but the classifier is not (not a copy of the model)."""
        modules = list(model.modules())
        return self.parent in modules and self.head not in modules

    @staticmethod
    def _capturing(module: nn.Module) -> bool:
        return torch.is_grad_enabled() and module.training     # evaluation (even with gradients) is untouched

    def _keep(self, x: torch.Tensor | None, block: torch.Tensor | None = None) -> None:
        """Keep a response, or (x None) the block output whose class token is the response."""
        self.responses.append(None if x is None else x.flatten(1))
        self.blocks.append(block)
        if len(self.responses) > len(self.memory.mean):        # forwards without aux_loss: keep the last one's
            del self.responses[0], self.blocks[0]

    def taken(self, responses: list | None = None, blocks: list | None = None) -> list[torch.Tensor]:
        """The responses kept since the last aux_loss, [N, D] each (class tokens sliced from their
        blocks here)."""
        responses, blocks = (self.responses, self.blocks) if responses is None else (responses, blocks)
        return [r if r is not None else b[:, 0] for r, b in zip(responses, blocks)]

    def aux_loss(self, model, images, logits, targets):
        if not hasattr(self, "memory"):
            raise BionetsError("ArrHook.aux_loss before attach: call hook.attach(model) once before training "
                               "(bionets' trainer does)")
        responses, blocks, self.responses, self.blocks = self.responses, self.blocks, [], []
        if not model.training or not torch.is_grad_enabled():
            return None
        if self.layers == "classifier" and isinstance(logits, torch.Tensor) and logits.shape[-1] > self.classes:
            # (more outputs than logits may be right: a spiking net's voting layer, 10 neurons a class)
            raise _not_the_classifier(self.head_name, f"it gives {self.classes} outputs where the model gives "
                                                      f"{logits.shape[-1]} logits")
        if not responses and self.layers == "classifier" and self._head_replaced(model):
            raise BionetsError(f"ARR's classifier '{self.head_name}' is no longer in the model (replaced after ARR was "
                               "applied, as by reset_classifier): apply ARR after changing the head (bionets.convert "
                               "anew), so that its memory has the new head's classes")
        if not responses:
            raise BionetsError("ARR's hook saw no training forward pass with gradients since its last aux_loss: call "
                               "aux_loss once after each forward, attach the hook to the model you train "
                               "(hook.attach(model) again for a copy.deepcopy or a reloaded model; ARR's memory is "
                               "that model's), and checkpoint activations with use_reentrant=False (the reentrant "
                               "form runs the forward without gradients)")
        if all(b is not None and b.shape == blocks[0].shape and len(b) == len(targets) for b in blocks):
            # every response a class token: taken from the blocks at once, with a backward that
            # fills and copies once for all blocks, not once a block
            responses = class_tokens(blocks)
        else:       # a spiking net's time steps averaged
            responses = self.taken(responses, blocks)
            if self.time_folded:
                responses = [per_sample(r, len(targets)) for r in responses]
        return arr_loss(self.memory, responses, targets, weight=self.cfg.weight, momentum=self.cfg.momentum,
                        form=self.cfg.form)


def _not_the_classifier(name: str, why: str) -> BionetsError:
    return BionetsError(f"ARR reads the input of '{name}' as the classifier's, but {why}: it is not the model's "
                        "classifier; name that: mechanisms.arr.classifier=NAME (convert(..., regularization="
                        "{'classifier': NAME})), or use layers=blocks for a ViT")


def _drop_copied_captures(hooks: dict) -> None:
    """Remove from a module's hook dict the captures of ARR hooks: a deep copy of a model copies its
    hooks with it, each feeding a copy of the ArrHook that no training loop reads."""
    for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), ArrHook)]:
        del hooks[key]


@register_mechanism("arr", ArrConfig, order=90, leaves_plain=True)    # (its memory dropped)
def apply_arr(model: nn.Module, cfg: ArrConfig) -> Applied:
    layers = cfg.layers if cfg.layers != "auto" else ("blocks" if _is_vit(model) else "classifier")
    if layers == "blocks" and not _is_vit(model):
        raise BionetsError(f"arr layers=blocks needs a transformer with .blocks and one token width .embed_dim; "
                           f"{type(model).__name__} has embed_dim={getattr(model, 'embed_dim', None)!r}: use "
                           "layers=classifier")
    head = classifier_layer(model, cfg.classifier)
    classes = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    dim = model.embed_dim if layers == "blocks" else head.in_features if isinstance(head, nn.Linear) else head.in_channels
    depth = len(model.blocks) if layers == "blocks" else 1
    report = Report("arr")
    settings = {"weight": cfg.weight, "momentum": cfg.momentum, "form": cfg.form, "layers": layers}
    if hasattr(model, "arr_memory"):
        have = tuple(model.arr_memory.mean.shape)
        if have != (depth, classes, dim):
            raise BionetsError(f"the model carries ARR's class memory already, {have[0]} layer(s) x {have[1]} classes "
                               f"x {have[2]} features, where arr layers={layers} needs {depth} x {classes} x {dim}: "
                               "apply ARR to a fresh model, or with the layers it had")
        # the hooks of both converts would read this one memory: other options would fill it by other rules
        had = getattr(model.arr_memory, "settings", settings)
        if had != settings:
            differ = ", ".join(f"{k} {had[k]!r} -> {settings[k]!r}" for k in settings if had[k] != settings[k])
            raise BionetsError(f"the model's ARR memory was made with other settings ({differ}): apply ARR to a fresh "
                               "model, or with the settings it had")
        report.notes.append("the model carries ARR's class memory already: kept, with its class means")
    else:
        p = next(model.parameters(), None)
        model.arr_memory = ArrMemory(depth, classes, dim).to(p.device if p is not None else None)   # float32 statistics
        model.arr_memory.settings = settings
        report.changes.append(f"class memory of {depth} layer(s) x {classes} classes x {dim} features ({layers}); "
                              f"weight {cfg.weight}, momentum {cfg.momentum}, form {cfg.form}")
    return Applied(model, [ArrHook(cfg, layers)], report)
