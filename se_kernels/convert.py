"""convert_se_modules: make the SE (channel-attention) modules of an existing model FusedSE, or
FusedChannelAttention where FusedSE does not compute them, in place."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import nn

from .channel_attention import FusedChannelAttention
from .flavours import UnsupportedSE, describe, describe_attention, same_output
from .functional import check_options
from .modules import FusedSE

FUSED_TYPES = (FusedSE, FusedChannelAttention)
GENERIC = " [generic]"  # appended to the kind of a module converted to FusedChannelAttention

logger = logging.getLogger(__name__)


def convert_se_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every recognised SE (channel-attention) submodule of `model` by an
    equivalent FusedSE, or FusedChannelAttention where FusedSE does not compute it, and return
    the model (the convention of nn.SyncBatchNorm.convert_sync_batchnorm: if `model` itself is
    such a module, its replacement is returned).

    FusedSE takes the SE modules it computes (torchvision SqueezeExcitation, timm SEModule /
    SqueezeExcite / legacy senet SEModule, senet.pytorch SELayer with its activations and
    gates). Everything else se_kernels.flavours.describe_attention recognises becomes a
    FusedChannelAttention (the generic path: fused squeeze and scale, the original's own layers
    as the excitation): those SE modules with another activation or gate, a norm layer or
    add_maxpool, timm's EffectiveSEModule, hgnet EseModule, EcaModule, CecaModule and
    GatherExcite with a global extent. Both get `backend` (every backend has the generic
    path's stage kernels).

    Each replacement holds the original's children themselves (same Parameter objects and
    buffers, at the same state_dict keys), so optimizers built before the conversion keep
    working and checkpoints load both ways. Before a module is replaced, both are run on a small
    random input (with a private generator; buffers such as BatchNorm running statistics are
    restored afterwards); one that does not give the same output is left as it is. Modules that
    are not recognised are left as they are; recognised ones that cannot be converted are left
    as they are, with one warning line per reason naming them. Logs (logger
    "se_kernels.convert") how many were converted, per kind.
    """
    return convert_with_report(model, backend)[0]


def convert_with_report(model: nn.Module, backend: str = "auto") -> Tuple[nn.Module, "ConversionReport"]:
    """convert_se_modules, also returning its ConversionReport."""
    check_options("relu", "sigmoid", None, backend)
    report = ConversionReport()
    fused = _fused_replacement("", model, backend, report)
    if fused is None:
        _replace_children("", model, backend, report)
    _log(report)
    return (fused if fused is not None else model), report


@dataclass
class ConversionReport:
    """What a conversion did: how many modules of each flavour it replaced (FusedSE kinds as
    describe names them; FusedChannelAttention kinds as describe_attention does, with
    " [generic]" appended), and the (qualified name, reason) of each module it left alone."""

    converted: Counter = field(default_factory=Counter)
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def _fused_replacement(name: str, module: nn.Module, backend: str,
                       report: ConversionReport) -> Optional[Union[FusedSE, FusedChannelAttention]]:
    """The FusedSE (or else FusedChannelAttention) equivalent to `module`, or None: not a
    recognised module, already fused, or one neither computes or whose fused output differs
    (recorded in `report`)."""
    if isinstance(module, FUSED_TYPES):
        return None
    try:
        flavour = describe(module)
    except UnsupportedSE as reason:
        return _generic_replacement(name, module, backend, report, fused_se_reason=str(reason))
    if flavour is None:
        return _generic_replacement(name, module, backend, report, fused_se_reason=None)
    fused = FusedSE.from_flavour(flavour, backend=backend)
    disagreement = _disagreement(module, fused)
    if disagreement is not None:
        report.skipped.append((name, f"{flavour.kind}: {disagreement}"))
        return None
    report.converted[flavour.kind] += 1
    return fused


def _generic_replacement(name: str, module: nn.Module, backend: str, report: ConversionReport,
                         fused_se_reason: Optional[str]) -> Optional[FusedChannelAttention]:
    try:
        flavour = describe_attention(module)
        if flavour is None:
            if fused_se_reason is not None:  # a FusedSE flavour describe_attention does not take (none today)
                report.skipped.append((name, fused_se_reason))
            return None
        fused = FusedChannelAttention.from_flavour(flavour, backend=backend)
    except UnsupportedSE as reason:
        report.skipped.append((name, str(reason)))
        return None
    disagreement = _disagreement(module, fused)
    if disagreement is not None:
        report.skipped.append((name, f"{flavour.kind}: {disagreement}"))
        return None
    report.converted[flavour.kind + GENERIC] += 1
    return fused


def _disagreement(module: nn.Module, fused: nn.Module) -> Optional[str]:
    """None if same_output says the two agree, else why not (a module that fails on the probe
    input is left alone, with the error as the reason)."""
    try:
        if same_output(module, fused):
            return None
    except (RuntimeError, ValueError, TypeError) as error:
        return f"running it on a probe input failed ({type(error).__name__}: {error})"
    return "the fused module's output differs from the original's"


def _replace_children(prefix: str, parent: nn.Module, backend: str, report: ConversionReport) -> None:
    """Replace each convertible child of `parent` by its fused module; descend into the others."""
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        fused = _fused_replacement(name, child, backend, report)
        if fused is not None:
            setattr(parent, child_name, fused)
        elif not isinstance(child, FUSED_TYPES):
            _replace_children(name, child, backend, report)


# Class names that look like channel attention: SE / Se / ESE / Ese / ECA / Eca / Ceca as a word
# part (not Sequential, Separable, Select...), Squeeze, Excit(e|ation).
SE_LIKE_NAME = re.compile(r"(?:SE|Se|ESE|Ese|ECA|Eca|Ceca)(?![a-z])|Squeeze|Excit")


def looks_like_channel_attention(module: nn.Module) -> bool:
    """Whether `module` is, or looks like, a channel-attention (SE-like) module: a FusedSE or
    FusedChannelAttention, one describe or describe_attention recognises (convertible or not),
    or one whose class name matches SE_LIKE_NAME. Blocks that hold one (SEBottleneck, BlockESE,
    SENet) match by name too: channel_attention_modules keeps the innermost."""
    if isinstance(module, FUSED_TYPES) or SE_LIKE_NAME.search(type(module).__name__):
        return True
    for recognise in (describe, describe_attention):
        try:
            if recognise(module) is not None:
                return True
        except UnsupportedSE:
            return True
    return False


def channel_attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (qualified name, module) of every channel-attention module in `model`, converted or
    not: those looks_like_channel_attention matches that hold no other such module."""
    found = [(name, m) for name, m in model.named_modules() if looks_like_channel_attention(m)]
    ids = {id(m) for _, m in found}
    return [(name, m) for name, m in found
            if isinstance(m, FUSED_TYPES) or not any(id(d) in ids for d in m.modules() if d is not m)]


def _log(report: ConversionReport) -> None:
    """One warning per reason some modules were left alone (naming up to three), then the counts."""
    by_reason: Dict[str, List[str]] = {}
    for name, reason in report.skipped:
        by_reason.setdefault(reason, []).append(name or "the model")
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        logger.warning("convert_se_modules: left %s unconverted: %s", shown, reason)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.converted.items()))
    logger.info(
        "convert_se_modules: converted %d SE module(s)%s; left %d unconverted",
        sum(report.converted.values()), f" ({kinds})" if kinds else "", len(report.skipped),
    )
