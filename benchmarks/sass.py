"""Static analysis of the code an H200 would run: every kernel variant compiled for sm_90, read from its SASS.

    python -m benchmarks.sass [--cc 90] [--only SUBSTRING] [--markdown]

Per variant (the full matrix of ``benchmarks.aot``, launches captured at the real launch sites): registers, spill
bytes, the widths of the global loads and stores on the full-block path, SASS thread-instructions per element,
Philox calls per thread, and a roofline estimate for the H200. These are ESTIMATES FROM STATIC ANALYSIS, not
measurements: ``benchmarks/run_gpu.sh`` measures on a GPU.

Instructions per element: SASS instructions along the shortest path from entry to exit (the full-block path: the
tail path with masked scalar accesses is longer; 128-bit accesses inside loop bodies do not steer it), loop bodies
counted once per iteration, divided by the elements a thread owns (BLOCK / (32 * num_warps)). A LowRank guide has
two rank loops on the full-block path (whole chunks of ``LOWRANK_UNROLL`` ranks: ``rank // LOWRANK_UNROLL``
iterations, the one that loads the most bits; the remaining ranks: ``rank % LOWRANK_UNROLL``) and two on the tail
path (their loads are predicated), which are not counted.

Roofline: an element costs ``bytes / 4.26e12`` s of copy bandwidth (H200 ``copy_`` measured by the prototype) and
``instructions / 3.3e13`` s of issue (132 SMs x 4 schedulers x 32 lanes x ~1.98 GHz, one instruction per lane per
clock). ``% of copy`` is reported for perfect overlap (``t_mem / max(t_mem, t_issue)``, the roofline) and for none
(``t_mem / (t_mem + t_issue)``, a floor).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

COPY_BYTES_PER_S = 4.26e12
THREAD_INSTR_PER_S = 3.3e13

_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,6})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def parse(sass: str) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operands) per SASS instruction."""
    return [(int(a, 16), bool(p), op, rest.strip()) for a, p, op, rest in _LINE.findall(sass)]


def _branch_target(op: str, operands: str):
    if op.startswith("BRA"):
        m = re.search(r"0x([0-9a-f]+)", operands)
        return int(m.group(1), 16) if m else None
    return None


def _succ(instrs, index, i):
    """Forward successors of instruction i (back edges excluded) and whether it ends the kernel."""
    _, pred, op, operands = instrs[i]
    target = _branch_target(op, operands)
    ends = op.startswith(("EXIT", "RET"))
    succ = [i + 1] if (not (ends or target is not None) or pred) and i + 1 < len(instrs) else []
    j = index.get(target) if target is not None else None
    if j is not None and j > i:
        succ.append(j)
    return succ, ends and not pred


def path_and_loops(instrs) -> tuple[set, list[tuple[int, int, bool]]]:
    """(indices of the instructions on the full-block path, [(loop head, loop end, head on that path?)]).

    The full-block path: from entry to exit over forward edges, the one with the most 128-bit global accesses
    (the unmasked branches, and the branch that loads a guide rather than skipping it), then the shortest."""
    index = {a: i for i, (a, _, _, _) in enumerate(instrs)}
    n = len(instrs)
    loops = []
    for i, (_, _, op, operands) in enumerate(instrs):
        j = index.get(_branch_target(op, operands))
        if j is not None and j <= i:
            loops.append((j, i))
    # wide accesses inside a loop body do not steer the path (loop bodies are counted per iteration, apart)
    in_loop = {k for j, i in loops for k in range(j, i + 1)}
    best = [None] * n  # (-wide accesses, length) from i to an exit
    nxt = [None] * n
    for i in range(n - 1, -1, -1):
        succ, ends = _succ(instrs, index, i)
        wide = int(instrs[i][2].startswith(("LDG", "STG")) and ".128" in instrs[i][2] and i not in in_loop)
        if ends:
            best[i] = (-wide, 1)
            continue
        options = [(best[s], s) for s in succ if best[s] is not None]
        if options:
            (w, length), s = min(options)
            best[i], nxt[i] = (w - wide, length + 1), s
    on_path, i = set(), 0
    while i is not None:
        on_path.add(i)
        i = nxt[i]
    return on_path, [(j, i, j in on_path) for j, i in loops]


def _loop_counts(instrs, loops, meta) -> list[tuple[int, int, bool]]:
    """(body length, iterations, head on the full-block path?) per loop. Without rank facts every loop counts once
    (the trailing ``BRA`` to itself after ``EXIT``); a LowRank kernel's loops with predicated loads belong to the tail
    path and count 0, of the others the one that loads the most bits runs ``main_iterations`` times, the rest
    ``rest_iterations``."""
    if "main_iterations" not in meta:
        return [(i - j + 1, 1, on_path) for j, i, on_path in loops]
    loads = [sum(_width(op) for _, _, op, _ in instrs[j:i + 1] if op.startswith("LDG")) for j, i, _ in loops]
    masked = [any(pred and op.startswith("LDG") for _, pred, op, _ in instrs[j:i + 1]) for j, i, _ in loops]
    most = max((n for n, m in zip(loads, masked) if not m), default=0)
    out = []
    for (j, i, on_path), n, m in zip(loops, loads, masked):
        iters = 0 if m else meta["main_iterations"] if n == most and n else meta["rest_iterations"] if n else 1
        out.append((i - j + 1, iters, on_path))
    return out


def _width(op: str) -> int:
    for bits in ("128", "64", "U16", "S16", "U8", "S8"):
        if f".{bits}" in op:
            return int(re.sub(r"\D", "", bits))
    return 32


def stats(compiled, sass: str) -> dict:
    instrs = parse(sass)
    path, loops = path_and_loops(instrs)
    executed = len(path) + sum(body * (iters - 1 if on_path else iters)
                               for body, iters, on_path in _loop_counts(instrs, loops, compiled.launch.meta))
    per_thread = compiled.constexprs["BLOCK"] / compiled.threads
    ops = [instrs[i][2] for i in sorted(path)]  # widths and Philox on the full-block path
    widths = {}
    for op in ops:
        if op.startswith(("LDG", "STG")):
            key = f"{op[:2].lower()}{_width(op)}"
            widths[key] = widths.get(key, 0) + 1
    mulhi = sum(op.startswith(("IMAD.HI.U32", "IMAD.WIDE.U32")) for op in ops)
    return dict(regs=compiled.regs, spill=compiled.spill_bytes, static=len(instrs), path=len(path),
                instr_per_elem=executed / per_thread, philox_per_thread=mulhi / 20, widths=widths,
                elems_per_thread=per_thread)


def bytes_per_element(c) -> float:
    """Bytes a pass must move per element (what ``benchmarks/`` counts for its % of copy)."""
    name, cx = c.launch.variant, c.constexprs
    wbytes = c.launch.args[0].element_size() if hasattr(c.launch.args[0], "element_size") else 4
    if c.launch.kernel == "_perturb_kernel":
        return 2 * wbytes
    if c.launch.kernel == "_guide_dot_kernel":
        return wbytes if not cx.get("LOWRANK") else 0.0  # reads only the guide (LowRank: k*(m+n), negligible)
    if c.launch.kernel == "_guided_perturb_kernel":
        guides = 0 if cx.get("LOWRANK") else cx.get("N_GUIDES", 0) * c.launch.args[1].element_size()
        return 2 * wbytes + guides
    if c.launch.kernel == "_int8_kernel":
        return 2.0
    if c.launch.kernel == "_nf4_kernel":
        return 1.0
    raise ValueError(name)


def estimate(c, st) -> tuple[float, float]:
    t_mem = bytes_per_element(c) / COPY_BYTES_PER_S
    t_issue = st["instr_per_elem"] / THREAD_INSTR_PER_S
    if t_mem == 0:
        return 0.0, 0.0
    return 100 * t_mem / max(t_mem, t_issue), 100 * t_mem / (t_mem + t_issue)


def target_of(variant: str):
    """Issue 14's target for a variant, % of copy bandwidth (None where it sets none)."""
    if variant.startswith("perturb_ "):
        return 95 if "radem" in variant else 85
    if variant.startswith("perturb2_"):
        return 75
    if "dense" in variant:
        return 80
    if "lowrank r8" in variant:
        return 60
    if variant.startswith(("int8", "nf4")):
        return 50
    return None


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, default=90)
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", action="store_true", help="a table for benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    import torch
    import triton

    from benchmarks import aot

    header = ("variant", "regs", "spill B", "ld/st widths (bits x count)", "instr/elem", "Philox calls/thread",
              "B/elem", "% copy (overlap)", "% copy (none)", "target")
    rows = []
    for launch in aot.capture(only=args.only):
        c = aot.compile_launch(launch, args.cc)
        st = stats(c, aot.sass(c.cubin))
        roof, floor = estimate(c, st)
        widths = " ".join(f"{k}x{v}" for k, v in sorted(st["widths"].items()))
        target = target_of(launch.variant)
        rows.append((launch.variant, str(st["regs"]), str(st["spill"]), widths, f"{st['instr_per_elem']:.1f}",
                     f"{st['philox_per_thread']:.1f}", f"{bytes_per_element(c):g}",
                     f"{roof:.0f}" if roof else "-", f"{floor:.0f}" if floor else "-",
                     f">= {target}" if target else ""))
        if not args.markdown:
            print("  ".join(rows[-1]), flush=True)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    print(f"\nsm_{args.cc}, triton {triton.__version__}, torch {torch.__version__}; estimates from static analysis")
    return 0


if __name__ == "__main__":
    sys.exit(main())
