"""Regenerate the results block of benchmarks/README.md from the newest files in
benchmarks/results/: per (device, shape set, tag) the newest bench_se.py CSV with its markdown
report, and per run name the newest bench_model.py report ({device}_{date}_model-NAME.md).
Nothing here measures: every number comes from a file that names its command.

    python benchmarks/readme_results.py            # rewrite the block between the markers
    python benchmarks/readme_results.py --print    # print it instead
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
RESULTS, README = HERE / "results", HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
OP_FILE = re.compile(r"(?P<device>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})_(?P<set>[a-z0-9-]+(_[a-z0-9-]+)?)\.csv")
MODEL_FILE = re.compile(r"(?P<device>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})_model-(?P<set>[a-z0-9-]+)\.md")
BASELINES, MODES = ("eager", "compile"), ("forward", "backward", "full")


def newest(pattern: re.Pattern) -> List[Path]:
    """The newest file (by the date in its name) per (device, set), sorted by (device, set)."""
    found: Dict[tuple, Path] = {}
    for path in sorted(RESULTS.iterdir()):  # names start {device}_{date}: later dates sort later
        m = pattern.fullmatch(path.name)
        if m and not m["set"].startswith(("custom", "model-")):
            found[(m["device"], m["set"])] = path
    return [found[key] for key in sorted(found)]


def link(path: Path) -> str:
    return f"[{path.name}]({path.relative_to(HERE)})"


def geomean(values: List[float]) -> float:
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def table(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def by_variant(rows: List[dict]) -> Dict[tuple, List[dict]]:
    variants: Dict[tuple, List[dict]] = {}
    for r in rows:
        variants.setdefault((r["dtype"], r["layout"], r["epilogue"]), []).append(r)
    return variants


def speedups(rows: List[dict], mode: str, provider: str) -> List[str]:
    """Geometric means of the speedups over eager and over compile, or "-" without such rows."""
    of = [r for r in rows if (r["mode"], r["provider"]) == (mode, provider)]
    return [f"{geomean([float(r['speedup_vs_' + peer]) for r in of]):.2f}x" if of else "-" for peer in BASELINES]


def summary(paths: List[Path]) -> List[str]:
    """One row per (op results file, variant, fused provider): geometric means over the sites."""
    out = []
    for path in paths:
        rows = list(csv.DictReader(path.open()))
        for variant, vrows in by_variant(rows).items():
            for p in sorted({r["provider"] for r in vrows} - set(BASELINES)):
                out.append([f"[{path.stem}]({path.with_suffix('.md').relative_to(HERE)})", vrows[0]["device"],
                            ", ".join(variant), p] + [c for m in MODES for c in speedups(vrows, m, p)])
    return table(["report", "device", "variant", "provider"] + [f"{m} vs {peer}" for m in MODES
                                                                for peer in BASELINES], out) + [""]


def op_section(path: Path) -> List[str]:
    """Per-site tables of one untagged bench_se.py run, after its command and machine lines."""
    rows = list(csv.DictReader(path.open()))
    fused = sorted({r["provider"] for r in rows} - set(BASELINES))
    out = [f"**{rows[0]['device']}, shape set `{rows[0]['shape_set']}`** ({link(path)}, report beside it)", ""]
    md = path.with_suffix(".md")
    if md.exists():
        lines = md.read_text().splitlines()
        out += [f"- {line.lstrip('- ')}" for line in lines if line.startswith("Command:")] + [
            line for line in lines if re.match(r"- (date|machine|device|torch|source|malloc|others):", line)] + [""]
    for (dtype, layout, epilogue), vrows in by_variant(rows).items():
        out += [f"{dtype}, {layout}, epilogue {epilogue}: per provider, median ms / fraction of the copy floor / "
                "speedup over eager / over torch.compile", ""]
        head = ["site (NxCxHxW/S)", "mode", "eager ms", "compile ms"] + [
            f"{p} {c}" for p in fused for c in ("ms", "of floor", "vs eager", "vs compile")]
        by = {(r["site"], r["mode"], r["provider"]): r for r in vrows}
        body = []
        for mode in [m for m in MODES if any(r["mode"] == m for r in vrows)]:
            for site in dict.fromkeys(r["site"] for r in vrows):
                cells = [site, mode] + [f"{float(by[(site, mode, p)]['median_ms']):.3f}" if (site, mode, p) in by
                                        else "-" for p in BASELINES]
                for r in [by.get((site, mode, p)) for p in fused]:
                    cells += ["-"] * 4 if r is None else [
                        f"{float(r['median_ms']):.3f}", f"{float(r['fraction_of_floor']):.2f}",
                        f"{float(r['speedup_vs_eager']):.2f}x", f"{float(r['speedup_vs_compile']):.2f}x"]
                body.append(cells)
            for p in fused:
                cells = [f"**geomean, {p}**", mode, "", ""]
                for q in fused:
                    cells += ["", ""] + [f"**{s}**" for s in speedups(vrows, mode, p)] if q == p else [""] * 4
                body.append(cells)
        out += table(head, body) + [""]
    return out


def model_section(md: Path) -> List[str]:
    """bench_model.py's report from its command to the end of its headline."""
    text = md.read_text().splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith("Command:")), 1)
    headline = next((i for i, line in enumerate(text) if line.startswith("## Headline")), len(text))
    end = next((i for i in range(headline + 1, len(text)) if text[i].startswith("## ")), len(text))
    return [f"**SE overhead in whole networks** ({link(md)})", ""] + [
        "Headline:" if line.startswith("## Headline") else line for line in text[start:end]] + [""]


def block() -> str:
    ops = newest(OP_FILE)
    lines = [BEGIN, "", "Generated by `python benchmarks/readme_results.py` from the newest files in `results/`; "
             "each block names the command that produced it.", ""]
    lines += ["Geometric means of the speedups over each set's sites (per-site tables: below for the untagged "
              "runs, in the linked report for the others):", ""] + summary(ops) if ops else ["No op results yet.", ""]
    for path in ops:
        if "_" not in OP_FILE.fullmatch(path.name)["set"]:  # untagged
            lines += op_section(path)
    for path in newest(MODEL_FILE):
        lines += model_section(path)
    return "\n".join(lines + [END])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", action="store_true", help="print the block instead of rewriting benchmarks/README.md")
    text = block()
    if p.parse_args().print:
        print(text)
        return
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"benchmarks/README.md has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    README.write_text(head + text + rest.split(END, 1)[1])
    print("rewrote the results block of benchmarks/README.md")


if __name__ == "__main__":
    main()
