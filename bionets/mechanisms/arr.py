"""Mechanism ``arr``: DNRT's Aggregated Response Regularization on any timm/torchvision model.

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

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from bionets.configbase import Section
from bionets.engine.hooks import Hook
from bionets.errors import BionetsError, require_module
from bionets.layers.arr import ArrMemory, arr_loss, class_tokens, per_sample
from bionets.mechanisms.registry import Applied, Report, register_mechanism


class ArrConfig(Section):
    weight: float = Field(10.0, ge=0)
    momentum: float = Field(0.1, ge=0, lt=1)
    form: Literal["paper", "code"] = "paper"
    layers: Literal["auto", "classifier", "blocks"] = "auto"
    # the classifier's module name (model.named_modules()), where the one found is not it: see classifier_layer
    classifier: str | None = None


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
