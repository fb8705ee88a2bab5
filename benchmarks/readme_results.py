"""Regenerate the README's "Measured results" section from the latest files in benchmarks/results/.

    python benchmarks/readme_results.py            # rewrite README.md between the markers
    python benchmarks/readme_results.py --print    # print the section instead

Op results: for every (device, shape set, tag) the newest bench_se.py CSV
({device-slug}_{YYYY-MM-DD}_{shape-set}[_{tag}].csv) and its markdown report (for the command, machine
and date lines). Model results: the newest {device-slug}_{YYYY-MM-DD}_model-*.md written by
bench_model.py --md (its headline lines). Nothing here measures: every number comes from a file
that names the command that produced it.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
OP_FILE = re.compile(r"(?P<device>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})_(?P<set>[a-z0-9-]+(_[a-z0-9-]+)?)\.csv")
MODEL_FILE = re.compile(r"(?P<device>[a-z0-9-]+)_(?P<date>\d{4}-\d{2}-\d{2})_model-(?P<set>[a-z0-9-]+)\.md")
BASELINES = ("eager", "compile")
MODES = ("forward", "backward", "full")


def newest(pattern: re.Pattern) -> Dict[Tuple[str, str], Path]:
    """(device, set) -> the newest file of that kind (by the date in its name)."""
    found: Dict[Tuple[str, str], Tuple[str, Path]] = {}
    for path in sorted(RESULTS.iterdir()):
        m = pattern.fullmatch(path.name)
        if not m or m["set"].startswith("custom") or m["set"].startswith("model-") and pattern is OP_FILE:
            continue
        key = (m["device"], m["set"])
        if key not in found or m["date"] >= found[key][0]:
            found[key] = (m["date"], path)
    return {k: v[1] for k, v in sorted(found.items())}


def tagged(path: Path) -> bool:
    return "_" in OP_FILE.fullmatch(path.name)["set"]


def header_lines(md: Path) -> List[str]:
    """The command and the machine lines of a bench_se/bench_model markdown report."""
    lines = md.read_text().splitlines()
    keep = [l for l in lines if l.startswith("Command:")]
    keep += [l for l in lines if re.match(r"- (date|machine|device|torch|source|malloc|others|load|setting|batches):", l)]
    return keep


def geomean(values: List[float]) -> float:
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def op_section(csv_path: Path) -> List[str]:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    fused = sorted({r["provider"] for r in rows} - set(BASELINES))
    out = [f"**{rows[0]['device']}, shape set `{rows[0]['shape_set']}`** "
           f"(`{csv_path.relative_to(ROOT)}`, report beside it)", ""]
    md = csv_path.with_suffix(".md")
    if md.exists():
        out += [f"- {l.lstrip('- ')}" for l in header_lines(md)] + [""]
    variants = defaultdict(list)
    for r in rows:
        variants[(r["dtype"], r["layout"], r["epilogue"])].append(r)
    for (dtype, layout, epilogue), vrows in variants.items():
        modes = [m for m in MODES if any(r["mode"] == m for r in vrows)]
        out.append(f"{dtype}, {layout}, epilogue {epilogue}: per provider, median ms / fraction of the "
                   "copy floor / speedup over eager / over torch.compile")
        out.append("")
        head = ["site (NxCxHxW/S)", "mode", "eager ms", "compile ms"]
        for p in fused:
            head += [f"{p} ms", f"{p} of floor", f"{p} vs eager", f"{p} vs compile"]
        out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        by = {(r["site"], r["mode"], r["provider"]): r for r in vrows}
        sites = list(dict.fromkeys(r["site"] for r in vrows))
        for mode in modes:
            for site in sites:
                cells = [site, mode]
                for p in BASELINES:
                    r = by.get((site, mode, p))
                    cells.append(f"{float(r['median_ms']):.3f}" if r else "-")
                for p in fused:
                    r = by.get((site, mode, p))
                    if r is None:
                        cells += ["-"] * 4
                        continue
                    cells += [f"{float(r['median_ms']):.3f}", f"{float(r['fraction_of_floor']):.2f}",
                              f"{float(r['speedup_vs_eager']):.2f}x", f"{float(r['speedup_vs_compile']):.2f}x"]
                out.append("| " + " | ".join(cells) + " |")
            for p in fused:
                pr = [r for r in vrows if r["mode"] == mode and r["provider"] == p]
                ge = geomean([float(r["speedup_vs_eager"]) for r in pr])
                gc = geomean([float(r["speedup_vs_compile"]) for r in pr])
                cells = [f"**geomean, {p}**", mode, "", ""]
                for q in fused:
                    cells += (["", "", f"**{ge:.2f}x**", f"**{gc:.2f}x**"] if q == p else [""] * 4)
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def model_section(md: Path) -> List[str]:
    """bench_model.py's report from its command down to the end of its headline."""
    text = md.read_text().splitlines()
    out = [f"**SE overhead in whole networks** (`{md.relative_to(ROOT)}`)", ""]
    start = next((i for i, l in enumerate(text) if l.startswith("Command:")), 1)
    headline = next((i for i, l in enumerate(text) if l.startswith("## Headline")), len(text))
    end = next((i for i in range(headline + 1, len(text)) if text[i].startswith("## ")), len(text))
    for line in text[start:end]:
        out.append("Headline:" if line.startswith("## Headline") else line)
    return out + [""]


def summary(paths: List[Path]) -> List[str]:
    """One row per (op results file, fused provider, dtype/layout/epilogue): geomean speedups."""
    out = ["| report | device | variant | provider | " + " | ".join(
        f"{m} vs eager | {m} vs compile" for m in MODES) + " |", "|" + " --- |" * (4 + 2 * len(MODES))]
    for path in paths:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        for variant in dict.fromkeys((r["dtype"], r["layout"], r["epilogue"]) for r in rows):
            vrows = [r for r in rows if (r["dtype"], r["layout"], r["epilogue"]) == variant]
            for p in sorted({r["provider"] for r in vrows} - set(BASELINES)):
                report = path.with_suffix(".md")
                cells = [f"[{path.stem}]({report.relative_to(ROOT)})", vrows[0]["device"], ", ".join(variant), p]
                for m in MODES:
                    pr = [r for r in vrows if r["mode"] == m and r["provider"] == p]
                    if not pr:
                        cells += ["-", "-"]
                        continue
                    cells += [f"{geomean([float(r['speedup_vs_eager']) for r in pr]):.2f}x",
                              f"{geomean([float(r['speedup_vs_compile']) for r in pr]):.2f}x"]
                out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def section() -> str:
    lines = [BEGIN, "",
             "Generated by `python benchmarks/readme_results.py` from the newest files in "
             "`benchmarks/results/`; each block names the command that produced it.", ""]
    ops = newest(OP_FILE)
    if not ops:
        lines += ["No op benchmark results yet.", ""]
    else:
        lines += ["Geometric means of the speedups over each set's sites (per-site tables: below for "
                  "the untagged runs, in the linked report for the others):", ""] + summary(list(ops.values()))
    for path in ops.values():
        if not tagged(path):  # tagged runs (e.g. --full --tag full): the summary rows and their report
            lines += op_section(path)
    for path in newest(MODEL_FILE).values():
        lines += model_section(path)
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--print", action="store_true", help="print the section instead of rewriting README.md")
    args = p.parse_args()
    text = section()
    if args.print:
        print(text)
        return
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        sys.exit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(head + text + tail)
    print(f"rewrote the results section of {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
