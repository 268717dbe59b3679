"""A live ``torch.nn.Module`` -> LoadedModel: the exact conv layers of a network the caller already trusts.

Unlike a bare state_dict (torch_checkpoint.py), a module says what each conv is: ``groups``, ``stride``,
``padding`` and ``dilation`` come from the ``nn.Conv2d`` itself, so ``kind_inferred`` is False and grouped
convs are told from regular ones.  Only 2-D convolutions are extracted: Conv1d / Conv3d and the transposed
convs are listed in ``LoadedModel.warnings`` as skipped.  Weights are the ones the network computes with:
``weight_norm`` / ``spectral_norm`` (hooks or parametrisations) are applied, quantised convs dequantised.

``order``: the conv's position in ``module.named_modules()`` (registration order), or, when the caller passes
``example_input``, the order in which the convs first run on it (a forward hook on each conv; the module runs
once in eval mode under ``no_grad`` and every submodule's train/eval flag is restored afterwards).  Convs that
did not run are ordered after those that did.

BatchNorm folding (``fold_bn=True``): ``w' = w * gamma / sqrt(running_var + eps)`` per output channel, done
in float64 and stored as float32; ``bn_folded`` is set on the folded layers.  A conv -> BatchNorm2d pair is
found (a) by position: a conv directly followed by a BatchNorm2d inside an ``nn.Sequential`` whose ``forward``
is not overridden (Sequential feeds child i's output to child i + 1, so the pairing is exact), and (b) when
``example_input`` is given, by a forward trace: the BatchNorm's input is the very tensor the conv returned,
not modified in place since (its version counter is unchanged, so conv -> ReLU(inplace) -> BN is not a pair).
The trace finds the attribute-style pairs that (a) cannot (ResNet's ``conv1``/``bn1``: registration order is
not data flow, so it is never used to pair).  A pair must be one-to-one with matching channels, and the
BatchNorm must have running statistics; BatchNorms left unpaired are reported in the warnings.  Folding is
for kernel analysis: it does not check whether the conv's raw output is also used elsewhere.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np

from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel, LoaderError, classify_kind

__all__ = ["load_module"]

_MAX_NAMES = 10  # names listed per warning; the rest are counted


def load_module(module: Any, *, name: str, fold_bn: bool = False, example_input: Any = None) -> LoadedModel:
    """Read the 2-D conv layers of ``module`` (a ``torch.nn.Module``) into a :class:`LoadedModel` named
    ``name`` (``format = "module"``, ``source_path = name``).

    ``example_input``: a tensor, a tuple of positional arguments or a dict of keyword arguments for one
    forward pass; when given, layer order is execution order and BatchNorm folding can pair convs with the
    BatchNorms they feed outside ``nn.Sequential`` containers.  ``fold_bn``: fold each paired BatchNorm2d's
    eval-mode scale into its conv's weight (module docstring).  The module itself is left unchanged.
    """
    import torch
    from torch import nn

    if not isinstance(module, nn.Module):
        raise LoaderError(f"{name}: expected a torch.nn.Module, got {type(module).__name__}")
    warns: list[str] = []
    # Any, not nn.Module: torch types a module's attributes as Tensor | Module, and these are Conv2d-like
    # (groups, out_channels) and BatchNorm2d-like (running_var, eps) modules, checked by _is_conv2d / _is_bn2d
    convs: list[tuple[str, Any]] = []
    skipped: dict[str, list[str]] = {}
    bns: dict[str, Any] = {}
    for qual, m in module.named_modules():
        label = qual or "(root)"
        if _is_conv2d(m):
            convs.append((label, m))
        elif isinstance(m, nn.modules.conv._ConvNd) or _is_quantized_conv(m):
            skipped.setdefault(type(m).__name__, []).append(label)
        elif _is_bn2d(m):
            bns[label] = m
    for cls, names in skipped.items():
        warns.append(f"{name}: {len(names)} {cls} layer(s) skipped (not 2-D convolutions): {_listing(names)}")

    order = {label: float(i) for i, (label, _) in enumerate(convs)}
    traced_pairs: list[tuple[str, str]] = []
    order_from = "module walk"
    if example_input is not None:
        run_order, traced_pairs = _trace(module, name, example_input, convs, bns)
        not_run = [label for label, _ in convs if label not in run_order]
        order = {label: float(i) for i, label in enumerate(run_order)}
        order.update({label: float(len(run_order) + i) for i, label in enumerate(not_run)})
        order_from = "forward trace"
        if not_run:
            warns.append(f"{name}: {len(not_run)} conv(s) did not run on example_input, ordered after the "
                         f"others: {_listing(not_run)}")

    pairs: dict[str, str] = {}
    if fold_bn:
        pairs = _pairs(module, name, convs, bns, traced_pairs, warns)
        unpaired = [b for b in bns if b not in set(pairs.values())]
        if unpaired:
            hint = "" if example_input is not None else " (pass example_input to pair them by a trace)"
            warns.append(f"{name}: {len(unpaired)} BatchNorm2d layer(s) not folded into a conv{hint}: "
                         f"{_listing(unpaired)}")

    layers: list[ConvLayer] = []
    with torch.no_grad():
        for label, m in convs:
            try:
                w = _effective_weight(m)
            except _Skip as e:
                warns.append(f"{name}: layer {label}: {e}")
                continue
            folded = False
            if label in pairs:
                bn = bns[pairs[label]]
                scale = bn.running_var.detach().double().cpu().add(bn.eps).rsqrt()
                if bn.weight is not None:
                    scale = scale * bn.weight.detach().double().cpu()
                w = (w.double() * scale.reshape(-1, 1, 1, 1)).float()
                folded = True
            weight = _to_numpy(w)
            if weight is None:
                warns.append(f"{name}: layer {label}: weight dtype {w.dtype} is not a float dtype; skipped")
                continue
            groups = int(m.groups)
            c_out, c_in = int(weight.shape[0]), int(weight.shape[1])
            bad = int((~np.isfinite(weight.reshape(c_out * c_in, -1)).all(axis=1)).sum())
            if bad:
                warns.append(f"{name}: layer {label}: {bad} of {c_out * c_in} kernels hold NaN/Inf (kept; "
                             f"the engine labels them -1)")
            padding = m.padding if isinstance(m.padding, str) else tuple(int(p) for p in _pair(m.padding))
            extra = {
                "stride": tuple(int(s) for s in _pair(m.stride)),
                "padding": padding,
                "dilation": tuple(int(d) for d in _pair(m.dilation)),
                "module_type": type(m).__name__,
            }
            if folded:
                extra["bn"] = pairs[label]
            layers.append(ConvLayer(name=label, weight=weight, groups=groups,
                                    kind=classify_kind(c_out, c_in, groups), kind_inferred=False,
                                    order=order[label], bn_folded=folded, extra=extra))
    return LoadedModel(source_path=name, format="module", layers=layers,
                       meta={"name": name, "order_from": order_from}, warnings=warns)


class _Skip(Exception):
    """A conv whose weight cannot be read (the message says why)."""


def _is_conv2d(m: Any) -> bool:
    from torch import nn

    return isinstance(m, nn.Conv2d) or _is_quantized_conv(m, two_d=True)


def _is_quantized_conv(m: Any, two_d: bool = False) -> bool:
    try:
        from torch.ao.nn.quantized.modules import conv as qconv
    except ImportError:  # pragma: no cover - torch without the quantized modules
        return False
    if two_d:
        return isinstance(m, qconv.Conv2d)
    return isinstance(m, qconv._ConvNd)


def _is_bn2d(m: Any) -> bool:
    from torch import nn

    if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return True
    # torchvision.ops.FrozenBatchNorm2d and look-alikes: BatchNorm statistics without the class
    return type(m).__name__ == "FrozenBatchNorm2d" and hasattr(m, "running_var")


def _pair(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" ... ({len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _effective_weight(m: Any) -> Any:
    """The weight the conv computes with, detached, on the CPU."""
    from torch.nn.parameter import UninitializedParameter
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    if _is_quantized_conv(m):
        return m.weight().dequantize().detach().cpu()
    # legacy weight_norm / spectral_norm keep .weight as a plain attribute refreshed only by a forward
    # pre-hook: after load_state_dict it can be stale, so compute it from the stored pieces as eval does
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return hook.compute_weight(m).detach().cpu()
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return hook.compute_weight(m, do_power_iteration=False).detach().cpu()
    w = m.weight  # parametrisations (nn.utils.parametrize) are applied on access
    if isinstance(w, UninitializedParameter):
        raise _Skip("a lazy conv that has not run yet (its weight is uninitialised); run one forward first")
    if w.is_meta:
        raise _Skip("weight is on the meta device (no values); materialise the module first")
    return w.detach().cpu()


def _to_numpy(w: Any) -> np.ndarray | None:
    import torch

    if w.dtype in (torch.float32, torch.float16):
        return w.contiguous().numpy()
    if w.dtype in (torch.bfloat16, torch.float64):
        return w.to(torch.float32).contiguous().numpy()
    return None


def _trace(module: Any, name: str, example_input: Any, convs: list,
           bns: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Run one forward pass: the convs in first-call order, and the (conv, BN) pairs seen in the data flow:
    a BN every call of which took a conv's untouched output, always the same conv's."""
    import torch

    run_order: list[str] = []
    produced: dict[int, tuple[str, Any, int]] = {}  # id(output) -> (conv, weakref(output), version)
    bn_inputs: dict[str, set] = {b: set() for b in bns}

    def conv_hook(label: str):
        def hook(_m: Any, _inp: Any, out: Any) -> None:
            if label not in run_order:
                run_order.append(label)
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (label, weakref.ref(out), out._version)

        return hook

    def bn_hook(label: str):
        def hook(_m: Any, inp: Any) -> None:
            x = inp[0] if inp else None
            source = None
            if isinstance(x, torch.Tensor):
                rec = produced.get(id(x))
                if rec is not None and rec[1]() is x and x._version == rec[2]:
                    source = rec[0]
            bn_inputs[label].add(source)

        return hook

    handles = [m.register_forward_hook(conv_hook(label)) for label, m in convs]
    handles += [m.register_forward_pre_hook(bn_hook(label)) for label, m in bns.items()]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()  # running stats must not move, dropout must not fire
        with torch.no_grad():  # not inference_mode: inference tensors have no version counter
            if isinstance(example_input, dict):
                module(**example_input)
            elif isinstance(example_input, tuple):
                module(*example_input)
            else:
                module(example_input)
    except Exception as e:
        raise LoaderError(f"{name}: the forward pass on example_input failed ({type(e).__name__}: {e}); "
                          f"pass an input the module accepts, or none") from e
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    pairs = [(next(iter(src)), b) for b, src in bn_inputs.items() if len(src) == 1 and None not in src]
    return run_order, pairs


def _pairs(module: Any, name: str, convs: list, bns: dict, traced: list[tuple[str, str]],
           warns: list[str]) -> dict[str, str]:
    """conv label -> BatchNorm label for the pairs that can be folded (module docstring)."""
    from torch import nn

    label_of = {id(m): label for label, m in module.named_modules()}
    conv_by_label = dict(convs)
    candidates: dict[str, set[str]] = {}
    for container in module.modules():
        if not isinstance(container, nn.Sequential) or type(container).forward is not nn.Sequential.forward:
            continue
        children = list(container.children())
        for first, second in itertools.pairwise(children):
            ca, cb = label_of.get(id(first)), label_of.get(id(second))
            if ca is not None and cb is not None and ca in conv_by_label and cb in bns:
                candidates.setdefault(ca, set()).add(cb)
    for conv_label, bn_label in traced:
        candidates.setdefault(conv_label, set()).add(bn_label)

    users: dict[str, list[str]] = {}
    for conv_label, bn_labels in candidates.items():
        for b in bn_labels:
            users.setdefault(b, []).append(conv_label)
    pairs: dict[str, str] = {}
    for conv_label, bn_labels in candidates.items():
        if len(bn_labels) != 1:
            warns.append(f"{name}: layer {conv_label}: feeds several BatchNorms "
                         f"({', '.join(sorted(bn_labels))}); not folded")
            continue
        (b,) = bn_labels
        bn, conv = bns[b], conv_by_label[conv_label]
        if len(users[b]) != 1:
            warns.append(f"{name}: BatchNorm {b} follows several convs ({', '.join(users[b])}); not folded")
        elif getattr(bn, "running_var", None) is None:
            warns.append(f"{name}: BatchNorm {b} keeps no running statistics (track_running_stats=False); "
                         f"layer {conv_label} not folded")
        elif int(bn.running_var.numel()) != int(conv.out_channels):
            warns.append(f"{name}: BatchNorm {b} has {bn.running_var.numel()} channels but layer "
                         f"{conv_label} has {conv.out_channels}; not folded")
        else:
            pairs[conv_label] = b
    return pairs
