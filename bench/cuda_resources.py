"""What the CUDA kernels cost a GPU, read from the compiler without one: registers, spills, shared
memory, the occupancy they allow, and the width of their global loads and stores in the SASS.

    .venv/bin/python bench/cuda_resources.py                 # sm_90 and sm_80, Markdown table
    .venv/bin/python bench/cuda_resources.py --arch 90 --json out.json

Compiles ``csrc/cuda/dfa_cuda.cu`` with the extension's flags (setup.py) and ``-Xptxas -v`` once per
architecture (about a minute each on 2 cores), then disassembles it with ``cuobjdump -sass`` (the
toolkit's, or the one triton ships with torch).

Load and store counts are static (instructions in the code, not executed ones). Occupancy is what
the registers and shared memory allow a 256-thread block (``kThreads``), per SM:
65,536 registers allocated per warp in units of 256 (a thread's count rounded up to 8), at most
2,048 threads and 32 blocks, 228 KB (sm_90) or 164 KB (sm_80) of shared memory. Loads are counted
per width (``LDG.E.128`` = 16 B per thread), asynchronous copies to shared memory (``LDGSTS``,
cp.async) among them and also apart; a map kernel's hot loop should load 128-bit vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "dfa_cuda.cu"
# setup.py's nvcc flags and torch's extension defines (build/temp*/build.ninja shows them)
NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", "-lineinfo", "-DDFA_WITH_CUDA",
              "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20"]
MAP_THREADS = 256     # kThreads of csrc/cuda/map_kernels.cuh (the map kernels)
# the finishing column sums: kSumThreads (column_sums.cuh) and, in the old kernel set, kReduceThreads
REDUCE_THREADS = {"column_sums_kernel": 256, "segment_column_sums_kernel": 128}
SHARED_PER_SM = {"90": 228 * 1024, "80": 164 * 1024}
# The kernels that stream the feature maps (the hot ones); the rest finish reductions over B or K.
MAP_KERNELS = tuple(f"{op}_{direction}_kernel" for op in ("aggregate", "bridge", "partial_l2")
                    for direction in ("forward", "backward"))


@dataclass
class KernelResources:
    arch: str
    kernel: str
    dtype: str
    vec: int | None
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    threads: int | None
    blocks_per_sm: int | None
    loads: dict = field(default_factory=dict)   # SASS global load width (bits) -> count
    stores: dict = field(default_factory=dict)
    async_copies: int = 0  # LDGSTS (cp.async global -> shared), also counted in loads


def cuda_home() -> str:
    for candidate in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    sys.exit("no CUDA toolkit: set CUDA_HOME (nvcc, cuobjdump and cu++filt are needed)")


def include_flags(home: str) -> list[str]:
    os.environ.setdefault("CUDA_HOME", home)  # before torch guesses it (and warns)
    from torch.utils import cpp_extension

    paths = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    return [f"-I{p}" for p in paths]


def blocks_per_sm(registers: int, shared: int, threads: int, arch: str) -> int:
    """Resident blocks per SM the registers, shared memory and thread limits allow."""
    warps = -(-threads // 32)
    warp_registers = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (65536 // warp_registers) // warps
    by_threads = 2048 // (warps * 32)
    by_shared = SHARED_PER_SM[arch] // shared if shared else 32
    return min(by_registers, by_threads, by_shared, 32)


def tool(name: str, home: str) -> str:
    """A CUDA binary tool: the toolkit's, else the copy triton ships (pip's torch brings it), else PATH."""
    candidates = [Path(home) / "bin" / name]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    found = next((str(c) for c in candidates if c.exists()), None) or shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found in {home}/bin, triton's nvidia backend or PATH")
    return found


def demangle(names: list[str], home: str) -> dict[str, str]:
    """Itanium-mangled kernel names, demangled (CUDA's cu++filt, else GNU c++filt: the same ABI)."""
    filt = next((f for f in (str(Path(home) / "bin" / "cu++filt"), shutil.which("c++filt")) if f and Path(f).exists()),
                None)
    if filt is None:
        return {n: n for n in names}
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, done.stdout.splitlines()))


def describe(pretty: str) -> tuple[str, str, int | None]:
    """(kernel, dtype, VEC) of a demangled name like dfa::cuda::aggregate_forward_kernel<c10::BFloat16, 8>(...)."""
    match = re.match(r"(?:void )?dfa::cuda::(\w+)<([^,>]+)(?:, (\d+))?>", pretty)
    if not match:
        name = re.match(r"(?:void )?(?:dfa::cuda::)?(\w+)", pretty)
        return (name[1] if name else pretty[:40]), "", None
    dtype = {"float": "fp32", "double": "fp64", "c10::BFloat16": "bf16", "c10::Half": "fp16"}.get(match[2], match[2])
    return match[1], dtype, int(match[3]) if match[3] else None


def compile_arch(arch: str, home: str, work: Path) -> tuple[str, Path]:
    obj = work / f"dfa_sm{arch}.o"
    cmd = [f"{home}/bin/nvcc", *include_flags(home), *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-c", str(SOURCE), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"nvcc failed for sm_{arch}:\n{done.stderr[-3000:]}")
    return done.stderr, obj


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per mangled entry: registers, spills, stack, shared memory (ptxas -v)."""
    found: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            current = found.setdefault(entry[1], {})
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.update(stack=int(frame[1]), spill_stores=int(frame[2]), spill_loads=int(frame[3]))
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used[1])
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(smem[1]) if smem else 0
    return found


def parse_sass(obj: Path, home: str) -> dict[str, tuple[Counter, Counter, Counter]]:
    """Per mangled function: global load and store counts by width in bits, and the asynchronous
    copies (LDGSTS) among the loads."""
    text = subprocess.run([tool("cuobjdump", home), "-sass", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    widths: dict[str, tuple[Counter, Counter]] = {}
    current = None
    for line in text.splitlines():
        function = re.search(r"Function : (\S+)", line)
        if function:
            current = widths.setdefault(function[1], (Counter(), Counter(), Counter()))
            continue
        op = re.search(r"\b(LDGSTS|LDG|STG)\.E((?:\.\w+)*)", line)
        if op and current is not None:
            suffixes = op[2].split(".")
            bits = next((int(s) for s in suffixes if s in ("64", "128")), None)
            bits = bits or next((int(s[1:]) for s in suffixes if re.fullmatch(r"[US](8|16)", s)), 32)
            current[1 if op[1] == "STG" else 0][bits] += 1
            if op[1] == "LDGSTS":
                current[2][bits] += 1
    return widths


def report(arch: str, home: str, work: Path) -> list[KernelResources]:
    ptxas, obj = compile_arch(arch, home, work)
    resources, sass = parse_ptxas(ptxas), parse_sass(obj, home)
    names = demangle(sorted(resources), home)
    rows = []
    for mangled, info in resources.items():
        kernel, dtype, vec = describe(names[mangled])
        threads = MAP_THREADS if kernel in MAP_KERNELS else REDUCE_THREADS.get(kernel)
        loads, stores, copies = sass.get(mangled, (Counter(), Counter(), Counter()))
        rows.append(KernelResources(
            arch, kernel, dtype, vec, info.get("registers", 0), info.get("spill_stores", 0), info.get("spill_loads", 0),
            info.get("stack", 0), info.get("shared", 0), threads,
            blocks_per_sm(info.get("registers", 0), info.get("shared", 0), threads, arch) if threads else None,
            dict(sorted(loads.items())), dict(sorted(stores.items())), sum(copies.values())))
    return sorted(rows, key=lambda r: (r.arch, r.kernel, r.dtype, r.vec or 0))


def markdown(rows: list[KernelResources]) -> str:
    lines = ["| sm | kernel | dtype | VEC | regs | spill st/ld B | smem B | blocks/SM (256 thr) | occupancy | "
             "global loads by bits | of them cp.async | stores by bits |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        occupancy = f"{100 * r.blocks_per_sm * r.threads / 2048:.0f} %" if r.blocks_per_sm else ""
        fmt = lambda counts: " ".join(f"{bits}:{n}" for bits, n in counts.items())  # noqa: E731
        lines.append(f"| {r.arch} | {r.kernel} | {r.dtype} | {r.vec or ''} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared} | {r.blocks_per_sm or ''} | {occupancy} | "
                     f"{fmt(r.loads)} | {r.async_copies} | {fmt(r.stores)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["90", "80"], choices=sorted(SHARED_PER_SM))
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--hot-only", action="store_true", help="only the vectorised map kernels (VEC > 1)")
    args = parser.parse_args()
    home = cuda_home()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for arch in args.arch for row in report(arch, home, Path(tmp))]
    if args.hot_only:
        rows = [r for r in rows if r.vec and r.vec > 1]
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
