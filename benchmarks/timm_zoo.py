"""convert_se_modules over timm's model zoo: what converts, what is left and why, and whether the
converted model computes what the original does.

    python benchmarks/timm_zoo.py [--filter PATTERN[,PATTERN...]] [--limit N] [--max-params M] [--meta-only]
                                  [--out PATH]

For each name in timm.list_models() matching a PATTERN (fnmatch, default all; --limit N stops
after N models that have a channel-attention module), the model is first built on the meta
device (no memory, no time) to see whether any of its modules is channel-attention-like
(se_kernels.convert.channel_attention_modules: a FusedSE / FusedChannelAttention flavour, or a
class name with SE / Se / ESE / Ese / ECA / Eca / Ceca, Squeeze or Excit, innermost only: an
SEBottleneck holding an SEModule counts once). Those that have one are built with random weights
(no pretrained weights: nothing is downloaded), in float64, eval mode, and converted; every
parameter other than a bias that timm initialises to one value under 1e-3 (zeros: the last
BatchNorm of a residual block, NF-nets' skipinit gains; 1e-6: layer scales) is set to ones (1-D)
or random values (others), since otherwise the attention modules behind it compute on zeros (or
hardly reach the output) and no difference can show.

Per model: the channel-attention modules found, how many converted (FusedSE / the generic
FusedChannelAttention), the ones left with their reasons, and on a random 2x3x64x64 input (the
model's own input size if 64x64 fails) the float64 relative output difference
max|y_conv - y_orig| / max|y_orig|, beside the model's own sensitivity: the same measure between
the original on x and on x * (1 + 1e-15 u), u uniform in [-1, 1]. "ok" is diff <= max(10 *
sensitivity, 1e-10) (the bound tests/test_channel_attention_convert.py uses). "reach": how far
scaling the channels of the converted modules' outputs by 1 +- 1e-6 (alternating signs, which a
norm layer after them cannot undo) moves the model's output, over 1e-6 (near 0: the attention
modules hardly matter to the output, and the comparison shows little).

Models over --max-params million parameters (default 100), and every model with --meta-only,
are converted on the meta device instead: what converts and what is left, without numbers.

Writes a markdown table (default benchmarks/results/timm_zoo.md) with the command line at the top.
Exits 1 if a model run gave a different output or left a channel-attention module unconverted.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import logging
import math
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from se_kernels.channel_attention import FusedChannelAttention  # noqa: E402
from se_kernels.convert import channel_attention_modules, convert_with_report  # noqa: E402
from se_kernels.modules import FusedSE  # noqa: E402

PERTURBATION = 1e-15
REACH = 1e-6  # the converted modules' output channels scaled by 1 +- REACH: how far that moves the model's output
SENSITIVITY_FACTOR = 10.0
FLOOR = 1e-10


def repo_command(argv) -> str:
    """The command line, with the script path relative to the repository root."""
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in argv[1:]])


def meta_model(timm, name):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def wake_zero_parameters(model: nn.Module, generator: torch.Generator) -> int:
    """Set every parameter that is not a bias and holds one value of magnitude under 1e-3 (zero:
    the last norm of a residual block, skipinit gains; 1e-6 / 1e-5: layer scales) to ones (1-D and
    scalars) or to random values of a fan-in scale; returns how many were set."""
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or p.numel() == 0:
                continue
            first = p.reshape(-1)[0]
            if first.abs() >= 1e-3 or not (p == first).all():
                continue
            if p.dim() <= 1:
                p.fill_(1.0)
            else:
                fan_in = max(1, p[0].numel())
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / math.sqrt(fan_in))
            count += 1
    return count


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (a, b: float64 tensors, or tuples/lists/dicts of them, flattened)."""
    a, b = flatten(a), flatten(b)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def flatten(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t.detach().double().reshape(-1)
    if isinstance(t, dict):
        t = list(t.values())
    return torch.cat([flatten(v) for v in t])


def input_sizes(model):
    sizes = [(64, 64)]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size and tuple(size[1:]) != (64, 64) and max(size[1:]) <= 320:
        sizes.append(tuple(size[1:]))
    return sizes


def nudge(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
    """A forward hook: the module's output with channel c scaled by 1 + REACH (-1)^c (a pattern a
    following norm layer cannot normalise away, as it would a uniform scale)."""
    signs = 1 - 2 * (torch.arange(out.shape[1], device=out.device) % 2)
    return out * (1 + REACH * signs.to(out.dtype).reshape(1, -1, 1, 1))


def reason_of(name, report) -> str:
    for skipped, reason in report.skipped:
        if skipped == name:
            return reason
    return "not recognised by se_kernels.flavours (no describe / describe_attention flavour)"


def check_model(timm, name: str, max_params: float, meta_only: bool = False) -> dict:
    row = {"model": name}
    try:
        meta = meta_model(timm, name)
    except Exception:  # noqa: BLE001 - some initialisations cannot run on meta tensors: build it for real
        meta = timm.create_model(name, pretrained=False)
    found = channel_attention_modules(meta)
    if not found:
        return {}
    params = sum(p.numel() for p in meta.parameters())
    row["found"] = len(found)
    row["classes"] = ", ".join(sorted(Counter(type(m).__name__ for _, m in found)))
    row["params"] = params
    if meta_only or params > max_params * 1e6:
        original = meta  # conversion on the meta device: what converts, no numbers (same_output cannot run)
        if not meta_only:
            row["error"] = f"not run: {params / 1e6:.0f}M parameters > --max-params {max_params:g}M"
    else:
        torch.manual_seed(0)
        original = timm.create_model(name, pretrained=False).to(torch.float64).eval()
        row["woken"] = wake_zero_parameters(original, torch.Generator().manual_seed(1))
    converted, report = convert_with_report(original if original is meta else copy.deepcopy(original))
    after = channel_attention_modules(converted)
    row["fused_se"] = sum(isinstance(m, FusedSE) for _, m in after)
    row["generic"] = sum(isinstance(m, FusedChannelAttention) for _, m in after)
    left = [(n, m) for n, m in after if not isinstance(m, (FusedSE, FusedChannelAttention))]
    reasons = Counter(f"{type(m).__name__}: {reason_of(n, report)}" for n, m in left)
    row["left"] = len(left)
    row["reasons"] = "; ".join(f"{n}x {r}" if n > 1 else r for r, n in sorted(reasons.items()))
    row["kinds"] = ", ".join(f"{n} {k}" for k, n in sorted(report.converted.items()))
    if original is meta:
        return row
    g = torch.Generator().manual_seed(2)
    last_error = None
    for size in input_sizes(original):
        x = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
        u = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1
        try:
            with torch.no_grad():
                y0 = original(x)
                y_perturbed = original(x * (1 + PERTURBATION * u))
                y1 = converted(x)
        except Exception as error:  # noqa: BLE001 - a model that cannot run this input: try the next size
            last_error = error
            continue
        row["size"] = f"{size[0]}x{size[1]}"
        row["diff"] = rel_max(y1, y0)
        row["sensitivity"] = rel_max(y_perturbed, y0)
        row["ok"] = row["diff"] <= max(SENSITIVITY_FACTOR * row["sensitivity"], FLOOR)
        hooks = [m.register_forward_hook(nudge) for _, m in after if isinstance(m, (FusedSE, FusedChannelAttention))]
        try:
            with torch.no_grad():
                row["reach"] = rel_max(converted(x), y1) / REACH
        finally:
            for hook in hooks:
                hook.remove()
        if row["reach"] < 1e-3:
            row["error"] = ("the attention modules barely reach the output (their outputs' channels x (1 +- 1e-6) "
                            f"move it by {row['reach'] * REACH:.1e}): the comparison shows little")
        return row
    row["error"] = f"forward failed: {type(last_error).__name__}: {str(last_error).splitlines()[0][:160]}"
    return row


def clean(text: str) -> str:
    """For a markdown table cell: no pipes, no machine paths."""
    return str(text).replace("|", "\\|").replace(str(ROOT), ".").replace("\n", " ")


def write_markdown(path: Path, command: str, rows, elapsed: float, scanned: int, args) -> None:
    fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else str(v)  # noqa: E731
    done = [r for r in rows if "diff" in r]
    lines = [
        "# convert_se_modules over timm's zoo",
        "",
        f"Command: `{command}`",
        "",
        f"timm {__import__('timm').__version__}, torch {torch.__version__}; {scanned} model names scanned "
        f"(built on the meta device), {len(rows)} with a channel-attention module, in {elapsed:.0f} s "
        f"(torch threads {torch.get_num_threads()}).",
        "",
        "Columns: channel-attention modules found (innermost SE / ESE / ECA / Squeeze / Excit modules, and any "
        "module se_kernels.flavours recognises); converted to FusedSE and to the generic FusedChannelAttention; "
        "left, with the reason; float64 eval-mode output difference max|y_conv - y_orig| / max|y_orig| on a "
        "random 2x3xHxW input, beside the original's own sensitivity (the same measure for x perturbed by "
        f"{PERTURBATION:g} relative); ok: diff <= max({SENSITIVITY_FACTOR:g} x sensitivity, {FLOOR:g}); reach: how "
        f"far scaling the channels of every converted module's output by 1 +- {REACH:g} (alternating) moves the "
        f"model's output, over {REACH:g} (near 0: the attention modules hardly matter to the output, and the "
        "comparison shows little). Non-bias "
        "parameters initialised to one value under 1e-3 (zero-initialised last norms, skipinit gains, 1e-6 layer "
        "scales) are set to ones or random values first (column 'woken'), or no difference could show behind them.",
        "",
        f"Summary: {sum(r.get('found', 0) for r in rows)} modules found, "
        f"{sum(r.get('fused_se', 0) for r in rows)} to FusedSE, {sum(r.get('generic', 0) for r in rows)} to "
        f"FusedChannelAttention, {sum(r.get('left', 0) for r in rows)} left; outputs ok in "
        f"{sum(bool(r.get('ok')) for r in done)} of {len(done)} models run "
        f"({len(rows) - len(done)} not run: see their notes).",
        "",
        "| model | classes | found | FusedSE | generic | left | input | diff | sensitivity | ok | reach | woken "
        "| notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        notes = "; ".join(x for x in (r.get("reasons"), r.get("error")) if x)
        lines.append("| " + " | ".join(clean(c) for c in (
            r["model"], r.get("classes", ""), r.get("found", ""), r.get("fused_se", ""), r.get("generic", ""),
            r.get("left", ""), r.get("size", ""), fmt(r["diff"]) if "diff" in r else "",
            fmt(r["sensitivity"]) if "sensitivity" in r else "", ("yes" if r["ok"] else "**no**") if "ok" in r else "",
            fmt(r["reach"]) if "reach" in r else "", r.get("woken", ""), notes,
        )) + " |")
    kinds = Counter()
    for r in rows:
        for part in filter(None, (r.get("kinds") or "").split(", ")):
            n, kind = part.split(" ", 1)
            kinds[kind] += int(n)
    lines += ["", "Converted, per kind (over all models above):", ""]
    lines += [f"- {n} {clean(kind)}" for kind, n in sorted(kinds.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--filter", default="*",
                   help="fnmatch pattern(s) over timm.list_models(), comma-separated: a name matching any is taken "
                        "(default: all)")
    p.add_argument("--limit", type=int, default=None, help="stop after N models that have a channel-attention module")
    p.add_argument("--max-params", type=float, default=100.0,
                   help="models with more parameters than this, in millions, are converted on the meta device "
                        "only (counts, no output comparison; default 100)")
    p.add_argument("--meta-only", action="store_true",
                   help="convert on the meta device only: what converts and what is left, no output comparison "
                        "(the whole zoo in minutes)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "timm_zoo.md"))
    args = p.parse_args(argv[1:])
    import timm

    logging.getLogger("se_kernels.convert").setLevel(logging.ERROR)
    patterns = [p.strip() for p in args.filter.split(",") if p.strip()]
    names = [n for n in timm.list_models() if any(fnmatch.fnmatch(n, p) for p in patterns)]
    rows, scanned, start = [], 0, time.perf_counter()
    for name in names:
        if args.limit is not None and len(rows) >= args.limit:
            break
        scanned += 1
        t0 = time.perf_counter()
        try:
            row = check_model(timm, name, args.max_params, args.meta_only)
        except Exception as error:  # noqa: BLE001 - one model's failure is a row, not the end of the run
            row = {"model": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        if not row:
            continue
        rows.append(row)
        diff = f"diff {row['diff']:.1e} sens {row['sensitivity']:.1e} ok={row['ok']}" if "diff" in row else ""
        print(f"{name:40s} found {row.get('found', '?'):>3} FusedSE {row.get('fused_se', '-'):>3} generic "
              f"{row.get('generic', '-'):>3} left {row.get('left', '-'):>3} {diff} {row.get('error', '')} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    write_markdown(out, repo_command(argv), rows, elapsed, scanned, args)
    print(f"{len(rows)} models with channel attention out of {scanned} scanned in {elapsed:.0f} s; wrote "
          f"{os.path.relpath(out, Path.cwd())}")
    return 0 if all(r.get("ok", True) and not r.get("left") for r in rows if "error" not in r) else 1


if __name__ == "__main__":
    sys.exit(main())
