"""Regenerate benchmarks/results/cuda_ptxas.md: ptxas' resource usage of csrc/cuda/se_cuda.cu's
kernels, and fail (exit 1) if any kernel spills or has a stack frame.

    python benchmarks/cuda_resources.py            # sm_80 and sm_90, rewrites the table
    python benchmarks/cuda_resources.py --check    # the same, but leaves the file alone

No GPU is needed. se_cuda.cu is compiled once with nvcc (`nvcc -c`, host code included, into a
temporary object) with the flags the extension build uses: torch.utils.cpp_extension's include
paths, COMMON_NVCC_FLAGS, -fPIC, -std=c++20, the TORCH_EXTENSION defines, setup.py's nvcc flags
(-O3 -lineinfo --expt-relaxed-constexpr) and one -gencode per arch; plus `-Xptxas -v`. Where a
build tree from `make build` exists (build/temp*/build.ninja), the flags it used are compared
with these and any difference is printed. --device-only compiles the device code alone (nvcc
-cubin, one arch at a time): the same ptxas numbers in about half the time.
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
SETUP_NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]  # setup.py's extra nvcc args (no debug)


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


def render(rows: List[dict], nvcc_version: str, torch_version: str, threads: Optional[str]) -> str:
    lines = [
        "# ptxas resource usage of csrc/cuda/se_cuda.cu",
        "",
        "Command (here, no GPU needed): `python benchmarks/cuda_resources.py`, which runs "
        "`nvcc -c ... -gencode=arch=compute_XX,code=sm_XX -O3 -Xptxas -v csrc/cuda/se_cuda.cu` with the flags "
        f"torch.utils.cpp_extension uses (nvcc {nvcc_version}, torch {torch_version} headers), "
        f"{datetime.date.today().isoformat()}. "
        + (f"Block size {threads} for every kernel; " if threads else "")
        + "the excite kernels also take (C + S) x sizeof(acc) bytes of dynamic shared memory "
        "(checked <= 48 KiB at launch).",
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
        start = time.perf_counter()
        log = ""
        for c in cmds:
            proc = subprocess.run(c, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(" ".join(c), proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
                return proc.returncode
            log += proc.stdout + proc.stderr
        seconds = time.perf_counter() - start
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
    if not args.check:
        Path(args.out).write_text(md)
    bad = [r for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    print(f"cuda_resources: {len(rows)} kernels (sm_{', sm_'.join(map(str, sorted(args.arch)))}) in {seconds:.0f} s "
          f"of nvcc, max {max(r['registers'] for r in rows)} registers, {len(bad)} with a stack frame or spills"
          + ("" if args.check else f"; wrote {os.path.relpath(args.out, ROOT)}"))
    for r in bad:
        print(f"cuda_resources: sm_{r['sm']} {r['name']}: stack {r['stack']} B, spills "
              f"{r['spill_stores']}/{r['spill_loads']} B", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
