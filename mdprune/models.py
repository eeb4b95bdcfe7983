"""Build models by name, with random weights (nothing is downloaded): torchvision, timm, or ``module:function``.

The model remembers how it was built (``model._mdprune_source``) so that a slim model can be saved as its base
model plus a plan and rebuilt by :func:`mdprune.load`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class ModelError(ValueError):
    """A model name mdprune cannot build, or a checkpoint that does not fit."""


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` with random weights.

    ``name`` is a built-in small model (``small_resnet18``, ``small_vit``: see :mod:`mdprune.zoo`), a
    torchvision model (``resnet50``), a timm model (``deit_small_patch16_224``), either with an explicit prefix
    (``torchvision:resnet50``, ``timm:vit_small_patch16_224``), or a user function ``package.module:function``.
    Keyword arguments go to the constructor (``num_classes=10``, ``img_size=32``).
    """
    model = _build(name, kwargs)
    model._mdprune_source = {"name": name, "kwargs": dict(kwargs)}
    return model


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from .zoo import ZOO

    if name in ZOO:
        return ZOO[name](**kwargs)
    prefix, _, rest = name.partition(":")
    if rest and prefix not in ("torchvision", "timm"):
        try:
            fn = getattr(importlib.import_module(prefix), rest)
        except (ImportError, AttributeError) as e:
            raise ModelError(f"cannot import model builder {name!r}: {e}") from e
        return fn(**kwargs)
    if prefix == "torchvision" or (not rest and _is_torchvision(name)):
        import torchvision

        return torchvision.models.get_model(rest or name, weights=None, **kwargs)
    if prefix == "timm" or not rest:
        import timm

        model_name = rest or name
        if not timm.is_model(model_name):
            raise ModelError(f"unknown model {name!r}: not a torchvision or timm model name, nor module:function")
        return timm.create_model(model_name, pretrained=False, **kwargs)
    raise ModelError(f"unknown model {name!r}")


def _is_torchvision(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


# constructor arguments that make a library load other files or fetch weights: a file must not ask for them
_LOADING_KWARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "weights",
                             "weights_backbone"})


def rebuild(source: Mapping[str, Any], trust_code: bool = False) -> nn.Module:
    """Build the model described by a ``_mdprune_source`` record (read from a model file).

    Only mdprune's own, torchvision and timm names are built unless ``trust_code``: a ``package.module:function``
    name would import and run that code, and arguments such as ``checkpoint_path`` would load other files.
    """
    name, kwargs = str(source["name"]), dict(source.get("kwargs", {}))
    if not trust_code:
        prefix, sep, _ = name.partition(":")
        if sep and prefix not in ("torchvision", "timm"):
            raise ModelError(
                f"the file names the model builder {name!r}: rebuilding it would import and run that code. "
                "If you trust the file, load it with trust_code=True (command line: --trust-code)")
        asked = sorted(_LOADING_KWARGS & set(kwargs))
        if asked:
            raise ModelError(f"the file asks the model builder for {asked}, which load other files or weights; "
                             "if you trust the file, load it with trust_code=True (command line: --trust-code)")
    return create_model(name, **kwargs)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model expects.

    Channels come from the model's ``in_chans`` (timm sets it; its first convolution may come after a
    space-to-depth stem, as in TResNet), else from the first convolution (a 1-channel model gets 1-channel
    inputs); the size from timm's patch embedding or pretrained config, a ``default_input_size`` attribute
    (mdprune's small models), else 224.
    """
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = getattr(model, "in_chans", None)
    if not isinstance(channels, int) or channels <= 0:
        channels = first_conv.in_channels if first_conv is not None else 3
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):
        return (channels, *patch.img_size)
    own = getattr(model, "default_input_size", None)
    if isinstance(own, tuple) and len(own) == 2:
        return (channels, *own)
    if isinstance(getattr(model, "image_size", None), int):  # torchvision's VisionTransformer
        return (channels, model.image_size, model.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    return (channels, *size[1:]) if size else (channels, 224, 224)


# constructor keywords that set the input image size: timm (img_size), torchvision ViT (image_size), MaxViT
_SIZE_KWARGS = ("img_size", "image_size", "input_size")


def create_model_for_size(name: str, size: int, **kwargs: Any) -> nn.Module:
    """Build ``name`` (as :func:`create_model`) for square ``size`` x ``size`` images.

    The size goes to the keyword the model's constructor takes (``img_size`` for timm, ``image_size`` for
    torchvision's ViT, ``input_size`` for torchvision's MaxViT), unless ``kwargs`` already sets one; a model
    without one (a CNN) is built as it is. The model is then run once at that size: a model that cannot take
    it raises :class:`ModelError` saying so.
    """
    model = create_model(name, **kwargs)
    key = next((k for k in _SIZE_KWARGS if k in kwargs), None)
    if key is None:
        key = _size_keyword(type(model))
        if key is not None:
            model = _rebuild_for_size(name, kwargs, key, size, model)
    c = default_input_size(model)[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, size, size))
    except Exception as e:  # noqa: BLE001 - any failure means the model does not take this size
        how = " (its constructor takes no image size)" if key is None else ""
        raise ModelError(f"{name} does not run on {size}x{size} images{how}: {_first_line(e)}") from None
    finally:
        model.train(was_training)
    return model


def _size_keyword(cls: type) -> str | None:
    """The image-size keyword of ``cls``'s constructor, looking through ``**kwargs`` passed on to a parent."""
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        try:
            params = inspect.signature(c.__init__).parameters
        except (TypeError, ValueError):
            return None
        key = next((k for k in _SIZE_KWARGS if k in params), None)
        if key is not None or not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return key
    return None


def _rebuild_for_size(name: str, kwargs: dict[str, Any], key: str, size: int, model: nn.Module) -> nn.Module:
    """``name`` built again with its size keyword; ``model`` if the builder does not pass that keyword on."""
    value = (size, size) if key == "input_size" else size
    try:
        return create_model(name, **kwargs, **{key: value})
    except TypeError as e:
        if key in str(e):  # a user builder that does not take it: the model must run at this size as built
            return model
        raise ModelError(f"{name} cannot be built for {size}x{size} images ({key}={value}): {_first_line(e)}") \
            from None
    except Exception as e:  # noqa: BLE001 - any constructor failure means this size is not possible
        raise ModelError(f"{name} cannot be built for {size}x{size} images ({key}={value}): {_first_line(e)}") \
            from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load weights from a checkpoint file (a state_dict, or a dict holding one under model/state_dict).

    Read with ``weights_only=True``; a mismatch names the first missing, unexpected or differently shaped
    tensor with both shapes.
    """
    from .apply.io import read_tensors_file

    try:
        ckpt = read_tensors_file(path, what="a checkpoint (a state_dict file)")
    except ValueError as e:
        raise ModelError(str(e)) from e
    if isinstance(ckpt, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in ckpt and isinstance(ckpt[key], Mapping):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, Mapping) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ModelError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict (tensor name -> "
                         "tensor): save it with torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in ckpt.items()}
    problem = _mismatch(model.state_dict(), state, strict)
    if problem:
        raise ModelError(f"checkpoint {path} does not match the model: {problem}")
    model.load_state_dict(state, strict=strict)
    return model


def _mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], strict: bool) -> str:
    """The first difference between a model's state_dict and a checkpoint's, with a hint ('' if they fit)."""
    for k, v in own.items():
        if k in given and tuple(given[k].shape) != tuple(v.shape):
            hint = ""
            if v.dim() >= 1 and given[k].shape[1:] == v.shape[1:] and k == _last_weight(own):
                hint = f" (the classifier: pass --num-classes {given[k].shape[0]} / num_classes={given[k].shape[0]})"
            return (f"{k} has shape {tuple(given[k].shape)} in the checkpoint and {tuple(v.shape)} in the model"
                    f"{hint}; {sum(1 for j in own if j in given and given[j].shape != own[j].shape)} tensor(s) differ")
    if strict:
        missing = [k for k in own if k not in given]
        extra = [k for k in given if k not in own]
        if missing:
            return (f"{len(missing)} tensor(s) missing from the checkpoint, first {missing[0]!r}"
                    + (f"; {len(extra)} unexpected, first {extra[0]!r}" if extra else "")
                    + ": is it a checkpoint of this model (name and --model-arg)?")
        if extra:
            return f"{len(extra)} unexpected tensor(s) in the checkpoint, first {extra[0]!r}"
    return ""


def _last_weight(state: Mapping[str, torch.Tensor]) -> str | None:
    weights = [k for k in state if k.endswith(".weight")]
    return weights[-1] if weights else None
