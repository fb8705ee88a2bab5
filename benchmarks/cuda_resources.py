"""Regenerate benchmarks/results/cuda_ptxas.md: ptxas' resource usage of csrc/cuda/se_cuda.cu's
kernels, and fail (exit 1) if any kernel spills or has a stack frame; and the SASS instructions
per element of the element-wise kernels (scale, grad_input), failing if a float32 16-byte-vector
variant needs more than MAX_SASS_PER_ELEMENT.

    python benchmarks/cuda_resources.py            # sm_80 and sm_90, rewrites the table
    python benchmarks/cuda_resources.py --check    # the same, but leaves the file alone

No GPU is needed. se_cuda.cu is compiled once with nvcc (`nvcc -c`, host code included, into a
temporary object) with the flags the extension build uses: torch.utils.cpp_extension's include
paths, COMMON_NVCC_FLAGS, -fPIC, -std=c++20, the TORCH_EXTENSION defines, setup.py's nvcc flags
(-O3 -lineinfo --expt-relaxed-constexpr) and one -gencode per arch; plus `-Xptxas -v`. Where a
build tree from `make build` exists (build/temp*/build.ninja), the flags it used are compared
with these and any difference is printed. --device-only compiles the device code alone (nvcc
-cubin, one arch at a time): the same ptxas numbers in about half the time.

Instructions per element (sm_90): cuobjdump (the CUDA toolkit's, else the one in the triton
wheel) disassembles each variant twice, built with its tiles 4 steps long (as shipped) and 2
(-DSE_TILE_STEPS; the steps are unrolled). (instructions at 4 - instructions at 2) / (2 steps x
the elements of a lane's step) is the cost of one element in the shipped tile: loads, math,
stores, mask bits, bounds, address arithmetic (2 vs 4 rather than 4 vs 8: eight steps of
prefetched data raise register pressure, and ptxas then rematerialises addresses it keeps at 4).
The per-tile setup (the tile's row and sample: two divisions per warp) is
reported apart, amortised over a full tile of 4 steps. Static counts: every runtime option
(residual, relu mask, which outputs) is in the code, so one call executes at most this many.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "se_cuda.cu"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cuda_ptxas.md"
# setup.py's extra nvcc args (no debug)
SETUP_NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler=-Werror=switch"]
MAX_SASS_PER_ELEMENT = 12  # float32, 16-byte vectors: the issue rate allows ~56 per 32 elements at 4.8 TB/s
# the element-wise kernels, and the streamed plan's persistent kernels, whose element-wise items are
# the same tiles (the other stages do not depend on the tile length: their difference is the tiles')
# (substrings of the mangled names: flat_scale_kernel and flat_grad_input_kernel are matched too)
ELEMENTWISE = ("scale_kernel", "grad_input_kernel", "streamed_forward_kernel", "streamed_backward_kernel")
# the split plan's element-wise kernels, whose float32 16-byte variants are held to MAX_SASS_PER_ELEMENT
CHECKED = ("scale_kernel", "grad_input_kernel", "flat_scale_kernel", "flat_grad_input_kernel")


def find_nvcc() -> Path:
    """$CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc (the Makefile's CUDA_HOME, which `make`
    builds the extension with), else the toolkit of the nvcc on PATH."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    if shutil.which("nvcc"):  # may be a wrapper script: ask it where its toolkit is
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "e.cu").write_text("")
            out = subprocess.run(["nvcc", "--dryrun", "-c", "e.cu"], capture_output=True, text=True, cwd=tmp).stderr
        here = re.search(r"^#\$ _HERE_=(\S+)", out, flags=re.MULTILINE)
        if here:
            candidates.append(Path(here.group(1)) / "nvcc")
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError("nvcc not found (set CUDA_HOME)")


def nvcc_command(nvcc: Path, archs: Sequence[int], out: Path) -> List[str]:
    # torch.utils.cpp_extension reads CUDA_HOME when imported: point it at this nvcc's toolkit
    os.environ["CUDA_HOME"] = str(nvcc.parent.parent)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a // 10}.{a % 10}" for a in archs)
    from torch.utils import cpp_extension as ce

    includes = ce.include_paths("cuda") + [os.path.join(sys.prefix, "include"), sysconfig.get_paths()["include"]]
    return ([str(nvcc), "-c", str(SOURCE), "-o", str(out)] + [f"-I{p}" for p in includes]
            + ce.COMMON_NVCC_FLAGS + ["--compiler-options", "'-fPIC'"] + SETUP_NVCC_FLAGS
            + ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
            + ce._get_cuda_arch_flags() + ["-std=c++20", "-Xptxas", "-v"])


def compare_with_build(cmd: List[str]) -> List[str]:
    """Flags the last `make build` (build/temp*/build.ninja) passed to nvcc that this command
    lacks, and the other way round (-Xptxas -v aside)."""
    ninja = sorted(ROOT.glob("build/temp*/build.ninja"))
    if not ninja:
        return []
    text = ninja[-1].read_text()
    flags = []
    for var in ("cuda_cflags", "cuda_post_cflags"):
        m = re.search(rf"^{var} = (.*)$", text, flags=re.MULTILINE)
        if m:
            flags += shlex.split(m.group(1))
    unquote = lambda f: f.strip("'")  # noqa: E731  (ninja's and our quoting of '-fPIC')
    theirs = {unquote(f) for f in flags if f != "-c"}
    ours = {unquote(f) for f in cmd[5:] if f not in ("-Xptxas", "-v")}
    return ([f"build.ninja has {f}" for f in sorted(theirs - ours)]
            + [f"build.ninja lacks {f}" for f in sorted(ours - theirs)])


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> List[dict]:
    """One dict per (entry function, arch) of nvcc -Xptxas -v's output."""
    rows, current, props_for = [], None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"mangled": m.group(1), "sm": int(m.group(2)[3:].rstrip("a")), "stack": 0,
                       "spill_stores": 0, "spill_loads": 0}
            rows.append(current)
            props_for = None
        elif m := _PROPS.search(line):
            props_for = m.group(1)
        elif (m := _FRAME.search(line)) and current is not None and props_for == current["mangled"]:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and current is not None:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    missing = [r["mangled"] for r in rows if "registers" not in r]
    if missing or not rows:
        raise ValueError(f"could not parse ptxas -v output for {missing or 'any kernel'}:\n{log[-4000:]}")
    return rows


def short_name(demangled: str) -> str:
    """`void ns::(anonymous namespace)::k<c10::Half, float>(args...)` -> `k<c10::Half, float>`."""
    s = demangled.strip()
    if s.startswith("void "):
        s = s[5:]
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s.startswith("(anonymous namespace)", i):
            cut = i
            break
    s = s[:cut]
    depth, start = 0, 0
    for i, ch in enumerate(s):  # drop the namespaces: up to the last '::' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and s.startswith("::", i):
            start = i + 2
    return s[start:]


def demangle(names: Sequence[str]) -> Dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def find_cuobjdump(nvcc: Path) -> Optional[Path]:
    for c in (nvcc.parent / "cuobjdump",):
        if c.exists():
            return c
    try:
        import triton

        c = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return c if c.exists() else None
    except ImportError:
        return None


_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$", flags=re.MULTILINE)
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([^;]+);")


def sass_counts(cuobjdump: Path, binary: Path) -> Dict[str, int]:
    """mangled kernel name -> SASS instructions (NOP padding left out) of the sm_90 code in `binary`."""
    text = subprocess.run([str(cuobjdump), "-sass", "-arch", "sm_90", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    parts = _FUNCTION.split(text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = sum(1 for i in _INSTRUCTION.findall(body) if not i.strip().startswith("NOP"))
    return out


_ELEMENT_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}


def per_element(short: str, at2: int, at4: int) -> dict:
    """The instructions-per-element row of one element-wise variant `kernel<T, A, vector,
    pixel_rows, relu-or-masked[, residual]>` (scale_kernel has the residual flag)."""
    flat = short.startswith("flat_")
    if short.startswith("streamed_"):  # <T, A, pixel_rows, relu-or-masked[, residual]>, 16-byte tiles only
        short = re.sub(r"<([\w:]+), (\w+), ", r"<\1, \2, true, ", short, count=1)
    if flat:  # <T, A, relu-or-masked[, residual]>: 16-byte NCHW flat tiles
        short = re.sub(r"<([\w:]+), (\w+), ", r"<\1, \2, true, false, ", short, count=1)
    m = re.match(r"(\w+)<([\w:]+), \w+, (true|false), (true|false), (true|false)(?:, (true|false))?>", short)
    if m is None:
        raise ValueError(f"unexpected element-wise kernel {short!r}")
    kernel, scalar = m.group(1), m.group(2)
    vector, pixel_rows, relu = (m.group(i) == "true" for i in (3, 4, 5))
    residual = None if m.group(6) is None else m.group(6) == "true"
    per_step = 16 // _ELEMENT_BYTES[scalar] if vector else 1
    # shipped: SE_TILE_STEPS 4; flat tiles: kFlatSteps = 2 x SE_TILE_STEPS (8 against 4)
    steps = 8 if flat else 4 if vector else 4 * (16 // _ELEMENT_BYTES[scalar])
    marginal = (at4 - at2) / (steps // 2 * per_step)
    setup = at4 - marginal * steps * per_step
    return {"kernel": kernel, "scalar": scalar, "vector": vector, "pixel_rows": pixel_rows, "relu": relu,
            "residual": residual, "flat": flat,
            "at2": at2, "at4": at4, "per_element": marginal, "setup": setup,
            "setup_per_element": setup / (steps * per_step)}


def render_sass(rows: List[dict]) -> List[str]:
    lines = [
        "",
        "## SASS instructions per element (sm_90)",
        "",
        "Static instructions of each element-wise variant with tiles of 2 and of 4 steps (4: as shipped; "
        "`-DSE_TILE_STEPS`); per element: the difference over the elements of the 2 more steps "
        f"(float32 16-byte variants of scale_kernel, grad_input_kernel and their flat-tile kernels checked <= "
        f"{MAX_SASS_PER_ELEMENT}; flat tiles: kFlatSteps = 2 x the steps, so 8 against 4); "
        "setup: the rest, the once-per-tile part, also shown spread over a full tile. Every runtime option's "
        "code is counted. The streamed plan's kernels are reported, not checked: their element-wise items "
        "carry L2 eviction hints (inline assembly), and in a kernel that large the difference also holds "
        "what ptxas schedules differently elsewhere (their rows are not monotone in the options).",
        "",
        "| kernel | scalar | path | rows | relu mask | residual | instructions (2 / 4 steps) | per element "
        "| setup | setup per element of a full tile |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    yes_no = {True: "yes", False: "no", None: "-"}
    for r in sorted(rows, key=lambda r: (r["kernel"], r["scalar"], not r["vector"], r["pixel_rows"], r["relu"],
                                         bool(r["residual"]))):
        path = ("flat 16-byte" if r["flat"] else "16-byte") if r["vector"] else "scalar"
        lines.append(f"| `{r['kernel']}` | {r['scalar']} | {path} | "
                     f"{'channels_last' if r['pixel_rows'] else 'NCHW'} | {yes_no[r['relu']]} | "
                     f"{yes_no[r['residual']]} | "
                     f"{r['at2']} / {r['at4']} | {r['per_element']:.2f} | {r['setup']:.0f} | "
                     f"{r['setup_per_element']:.2f} |")
    return lines


def render(rows: List[dict], nvcc_version: str, torch_version: str, threads: Optional[str]) -> str:
    lines = [
        "# ptxas resource usage of csrc/cuda/se_cuda.cu",
        "",
        "Command (here, no GPU needed): `python benchmarks/cuda_resources.py`, which runs "
        "`nvcc -c ... -gencode=arch=compute_XX,code=sm_XX -O3 -Xptxas -v csrc/cuda/se_cuda.cu` with the flags "
        f"torch.utils.cpp_extension uses (nvcc {nvcc_version}, torch {torch_version} headers), "
        f"{datetime.date.today().isoformat()}. "
        + (f"Block size {threads} for every kernel; " if threads else "")
        + "no dynamic shared memory.",
        "",
        "| sm | kernel<scalar, acc> | registers | static smem (B) | stack (B) | spill st/ld (B) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["sm"], r["name"])):
        lines.append(f"| {r['sm']} | `{r['name']}` | {r['registers']} | {r['smem']} | {r['stack']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--check", action="store_true", help="do not rewrite the table, only check")
    p.add_argument("--device-only", action="store_true",
                   help="nvcc -cubin per arch instead of -c: no host compilation, about half the time; "
                        "the same device code and ptxas numbers")
    args = p.parse_args(argv)
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = nvcc_command(nvcc, args.arch, Path(tmp) / "se_cuda.o")
        for diff in compare_with_build(cmd):
            print(f"cuda_resources: note: {diff}", file=sys.stderr)
        if args.device_only:  # one -cubin per arch (-cubin takes a single target)
            gencodes = [f for f in cmd if f.startswith("-gencode")]
            base = [f for f in cmd if not f.startswith("-gencode")]
            base[1] = "-cubin"
            cmds = [base[:4] + [str(Path(tmp) / f"se_cuda{i}.cubin")] + base[5:] + [g] for i, g in enumerate(gencodes)]
        else:
            cmds = [cmd]
        cuobjdump = find_cuobjdump(nvcc) if 90 in args.arch else None
        if cuobjdump is not None:  # sm_90 again with 2-step tiles, for the instructions per step
            base = [f for f in cmd if not f.startswith("-gencode")]
            base[1] = "-cubin"
            cmds.append(base[:4] + [str(Path(tmp) / "steps2.cubin")] + base[5:]
                        + ["-gencode=arch=compute_90,code=sm_90", "-DSE_TILE_STEPS=2"])
        start = time.perf_counter()
        log = ""
        for c in cmds:
            proc = subprocess.run(c, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(" ".join(c), proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
                return proc.returncode
            if "-DSE_TILE_STEPS=2" not in c:
                log += proc.stdout + proc.stderr
        seconds = time.perf_counter() - start
        sass_rows = []
        if cuobjdump is not None:
            # by demangled name: the anonymous namespace's mangling differs between the builds
            def by_short_name(counts: Dict[str, int]) -> Dict[str, int]:
                names = demangle(list(counts))
                return {short_name(names[k]): v for k, v in counts.items() if any(e in k for e in ELEMENTWISE)}

            at2 = by_short_name(sass_counts(cuobjdump, Path(tmp) / "steps2.cubin"))
            at4 = {}
            for c in cmds[:-1]:
                if any(f.endswith("sm_90") for f in c):
                    at4.update(by_short_name(sass_counts(cuobjdump, Path(c[4]))))
            if set(at4) != set(at2) or not at4:
                raise ValueError(f"element-wise kernels differ between the 2- and 4-step builds: {sorted(at2)} "
                                 f"vs {sorted(at4)}")
            for name in sorted(at4):
                sass_rows.append(per_element(name, at2[name], at4[name]))
    rows = parse_ptxas(log)
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["name"] = short_name(names[r["mangled"]])
    seen = {(r["sm"], r["name"]) for r in rows}
    if len(seen) != len(rows):
        raise ValueError("two kernels with the same short name and arch")
    if {r["sm"] for r in rows} != set(args.arch):
        raise ValueError(f"ptxas reported arches {sorted({r['sm'] for r in rows})}, expected {args.arch}")
    import torch

    version = re.search(r"release ([\d.]+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                             text=True).stdout)
    threads = re.search(r"constexpr int kThreads = (\d+);", SOURCE.read_text())
    md = render(rows, version.group(1) if version else "?", torch.__version__.split("+")[0],
                threads.group(1) if threads else None)
    if sass_rows:
        md += "\n".join(render_sass(sass_rows)) + "\n"
    if not args.check:
        Path(args.out).write_text(md)
    bad = [r for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    # the check: the split plan's element-wise kernels; the streamed kernels' rows are reported (their
    # difference also holds whatever ptxas schedules differently in the rest of a large kernel)
    checked = [r for r in sass_rows if r["scalar"] == "float" and r["vector"] and r["kernel"] in CHECKED]
    slow = [r for r in checked if r["per_element"] > MAX_SASS_PER_ELEMENT]
    if sass_rows:
        worst = max(checked, key=lambda r: r["per_element"])
        print(f"cuda_resources: float32 16-byte element-wise variants: at most {worst['per_element']:.2f} SASS "
              f"instructions per element ({worst['kernel']}, pixel_rows={worst['pixel_rows']}, "
              f"relu={worst['relu']}, residual={worst['residual']}), setup {worst['setup']:.0f} per tile")
    else:
        print("cuda_resources: no cuobjdump (or no sm_90): instructions per element not counted", file=sys.stderr)
    for r in slow:
        print(f"cuda_resources: {r['kernel']}<{r['scalar']}, pixel_rows={r['pixel_rows']}, relu={r['relu']}, "
              f"residual={r['residual']}> needs "
              f"{r['per_element']:.2f} instructions per element "
              f"(> {MAX_SASS_PER_ELEMENT})", file=sys.stderr)
    print(f"cuda_resources: {len(rows)} kernels (sm_{', sm_'.join(map(str, sorted(args.arch)))}) in {seconds:.0f} s "
          f"of nvcc, max {max(r['registers'] for r in rows)} registers, {len(bad)} with a stack frame or spills"
          + ("" if args.check else f"; wrote {os.path.relpath(args.out, ROOT)}"))
    for r in bad:
        print(f"cuda_resources: sm_{r['sm']} {r['name']}: stack {r['stack']} B, spills "
              f"{r['spill_stores']}/{r['spill_loads']} B", file=sys.stderr)
    return 1 if bad or slow else 0


if __name__ == "__main__":
    sys.exit(main())
