"""convert_se_modules: make the SE modules of an existing model FusedSE, in place."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from .flavours import UnsupportedSE, describe, same_output
from .functional import check_options
from .modules import FusedSE

logger = logging.getLogger(__name__)


def convert_se_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every recognised SE submodule of `model` by an equivalent FusedSE
    and return the model (the convention of nn.SyncBatchNorm.convert_sync_batchnorm: if
    `model` itself is an SE module, the FusedSE is returned).

    Each FusedSE holds the original's parameter layers themselves (same Parameter objects, at
    the same state_dict keys), so optimizers built before the conversion keep working and
    checkpoints load both ways. Before a module is replaced, both are run on a small random
    input (with a private generator); one that does not give the same output is left as it
    is. Modules that are not SE modules are left as they are; SE modules with features FusedSE
    does not compute (e.g. timm's add_maxpool or a norm layer inside) are left as they are,
    with one warning line per reason naming them. Logs (logger "se_kernels.convert") how many were converted.
    """
    check_options("relu", "sigmoid", None, backend)
    report = ConversionReport()
    fused = _fused_replacement("", model, backend, report)
    if fused is None:
        _replace_children("", model, backend, report)
    _log(report)
    return fused if fused is not None else model


@dataclass
class ConversionReport:
    """What a conversion did: how many modules of each SE flavour it replaced, and the
    (qualified name, reason) of each SE module it left alone."""

    converted: Counter = field(default_factory=Counter)
    skipped: List[Tuple[str, str]] = field(default_factory=list)


def _fused_replacement(name: str, module: nn.Module, backend: str, report: ConversionReport) -> Optional[FusedSE]:
    """The FusedSE equivalent to `module`, or None: not an SE module, already fused, or an SE
    module FusedSE does not compute or whose fused output differs (recorded in `report`)."""
    if isinstance(module, FusedSE):
        return None
    try:
        flavour = describe(module)
    except UnsupportedSE as reason:
        report.skipped.append((name, str(reason)))
        return None
    if flavour is None:
        return None
    fused = FusedSE.from_flavour(flavour, backend=backend)
    if not same_output(module, fused):
        report.skipped.append((name, f"{flavour.kind}: the fused module's output differs from the original's"))
        return None
    report.converted[flavour.kind] += 1
    return fused


def _replace_children(prefix: str, parent: nn.Module, backend: str, report: ConversionReport) -> None:
    """Replace each convertible child of `parent` by its FusedSE; descend into the others."""
    for child_name, child in list(parent.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        fused = _fused_replacement(name, child, backend, report)
        if fused is not None:
            setattr(parent, child_name, fused)
        elif not isinstance(child, FusedSE):
            _replace_children(name, child, backend, report)


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
