"""Compile every kernel variant the launchers produce for real NVIDIA targets, on a machine without a GPU.

The Triton wheel ships ``ptxas`` and ``cuobjdump``, so ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` runs the whole pipeline (ttir, ttgir, llir, PTX, cubin) with no GPU or driver. Nothing here is a hand-kept copy
of a kernel signature: :func:`capture` calls the public ops on CPU tensors with each kernel's launch intercepted, and
:func:`compile_launch` derives signature, constexprs, specialisation and options exactly as ``JITFunction.run``
does (its binder and ``_pack_args``), so a new constexpr or launch option at a launch site is compiled as the GPU
would compile it.

Used by ``tests/zokernels/test_compile.py`` (a representative subset, ``--ci``) and ``benchmarks/sass.py`` (the full
matrix, SASS statistics and a roofline estimate). Must run in a process WITHOUT ``TRITON_INTERPRET=1``: the kernels
must be compiled JITFunctions.

    python -m benchmarks.aot [--ci] [--cc 80,90] [--only SUBSTRING]

prints one line per (variant, target) and exits 1 if any variant fails to compile, spills registers, or contains
a fused multiply-add where the torch reference rounds twice (:data:`NO_FMA`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

# Kernels whose torch reference multiplies then adds (two roundings), so their PTX must hold no fused form.
# guide_dot is left out on purpose: its reference sums in float64 and is compared with a tolerance.
NO_FMA = ("_perturb_kernel", "_guided_perturb_kernel", "_int8_kernel", "_nf4_kernel")
_FMA = re.compile(r"\bfma\.rn(?:\.ftz)?\.f32\b")


@dataclass
class Launch:
    variant: str  # what the launcher was asked to do, e.g. "perturb2_ bf16/radem SR"
    kernel: str   # the kernel's name in its module, e.g. "_perturb_kernel"
    args: tuple
    kwargs: dict
    meta: dict = field(default_factory=dict)  # facts the variant knows (e.g. rank) for the SASS report


@dataclass
class Compiled:
    launch: Launch
    cc: int
    ptx: str
    cubin: bytes
    constexprs: dict
    options: dict
    regs: int
    spill_bytes: int  # spill stores + spill loads, from ptxas -v
    stack: int
    seconds: float

    @property
    def threads(self) -> int:
        return 32 * self.options["num_warps"]

    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} bytes of register spills")
        if self.launch.kernel in NO_FMA and _FMA.search(self.ptx):
            out.append(f"fused multiply-add in the PTX ({len(_FMA.findall(self.ptx))}x) where the reference rounds "
                       "twice: launch it with enable_fp_fusion=False")
        return out


def kernels() -> dict:
    from zokernels import guided, perturb
    from zokernels.quant import int8, nf4

    return {"_perturb_kernel": perturb._perturb_kernel, "_guide_dot_kernel": guided._guide_dot_kernel,
            "_guided_perturb_kernel": guided._guided_perturb_kernel, "_int8_kernel": int8._int8_kernel,
            "_nf4_kernel": nf4._nf4_kernel}


# ---------------------------------------------------------------------------------------------------------------------
# The variants: each calls a public op as a user would; (name, in the CI subset?, meta, call).
def _w(n, dtype, shape=None):
    t = (torch.randn(n) * 0.02).to(dtype)
    return t.reshape(shape) if shape else t


def _loop_meta(rank: int) -> dict:
    """What the SASS report needs to count a LowRank kernel's rank loops: the iterations of the loop over whole
    chunks of LOWRANK_UNROLL ranks and of the loop over the remaining ranks."""
    from zokernels import guided

    return {"rank": rank, "main_iterations": rank // guided.LOWRANK_UNROLL,
            "rest_iterations": rank % guided.LOWRANK_UNROLL}


def variants() -> list[tuple[str, bool, dict, object]]:
    from zokernels import guided, perturb, quant

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    names = {f32: "fp32", bf16: "bf16", f16: "fp16"}
    n = 3 * 4096 + 5
    out = []
    for dt in (f32, bf16, f16):
        for dist in ("gaussian", "rademacher"):
            tag = f"{names[dt]}/{dist[:5]}"
            out.append((f"perturb_ {tag}", False, {},
                        lambda dt=dt, dist=dist: perturb.perturb_([_w(n, dt), _w(300, dt)], 1, 1e-3, dist=dist)))
            out.append((f"perturb2_ {tag}", False, {},
                        lambda dt=dt, dist=dist: perturb.perturb2_([_w(n, dt)], 1, 1e-3, 2, -1e-4, dist=dist)))
            if dt != f32:
                out.append((f"perturb2_ {tag} SR", dt == bf16 and dist == "rademacher", {},
                            lambda dt=dt, dist=dist: perturb.perturb2_([_w(n, dt)], 1, 1e-3, 2, -1e-4, dist=dist,
                                                                       rounding_seed=5)))
            out.append((f"perturb_ {tag} decay", dt == f32 and dist == "gaussian", {},
                        lambda dt=dt, dist=dist: perturb.perturb_([_w(n, dt)], 1, 1e-3, dist=dist, decay=0.99)))
        out.append((f"perturb_ {names[dt]}/gauss unaligned", dt == f16, {},
                    lambda dt=dt: perturb.perturb_([_w(n + 1, dt)[1:]], 1, 1e-3)))
    # global element offsets (sharded parameters, zopro.dtensor): the OFFSETS variants, shard starts a whole vector
    for dt, rounding, ci in ((f32, None, True), (bf16, None, False), (bf16, 5, False)):
        out.append((f"perturb2_ {names[dt]}/gauss{' SR' if rounding else ''} offsets", ci, {},
                    lambda dt=dt, rounding=rounding: perturb.perturb2_(
                        [_w(n, dt), _w(300, dt)], 1, 1e-3, 2, -1e-4, rounding_seed=rounding, offsets=[4096, 8])))
    for gdt in (f32, bf16):
        for dist in ("gaussian", "rademacher"):
            out.append((f"guide_dot dense {names[gdt]}guide/{dist[:5]}", False, {},
                        lambda gdt=gdt, dist=dist: guided.guide_dot(
                            [_w(64 * 96, f32, (64, 96)), _w(96, f32)], [_w(64 * 96, gdt, (64, 96)), None], 3,
                            dist=dist)))
    for rank in (1, 8, 64):
        lr = guided.LowRank(torch.randn(64, rank), torch.randn(96, rank))
        out.append((f"guide_dot lowrank r{rank}", rank == 64, _loop_meta(rank),
                    lambda lr=lr: guided.guide_dot([torch.zeros(64, 96)], [lr], 3)))
    c = torch.ones(2)
    for wdt in (f32, bf16):
        ws = [_w(64 * 96, wdt, (64, 96)), _w(96, wdt)]
        g1 = [_w(64 * 96, f32, (64, 96)), None]
        out.append((f"guided_perturb_ {names[wdt]} 2noise 2dense", wdt == f32, {},
                    lambda ws=ws, g1=g1: guided.guided_perturb_(ws, noise=[(1, c), (2, c)],
                                                                guides=[(g1, c), (g1, c)])))
        out.append((f"guided_perturb_ {names[wdt]} 1noise 0guide", False, {},
                    lambda ws=ws: guided.guided_perturb_(ws, noise=[(1, c)])))
        for rank in (1, 8, 64):
            lr = guided.LowRank(torch.randn(64, rank), torch.randn(96, rank))
            out.append((f"guided_perturb_ {names[wdt]} 1noise 2lowrank r{rank}", wdt == bf16 and rank == 64,
                        _loop_meta(rank),
                        lambda ws=ws, lr=lr: guided.guided_perturb_(ws[:1], noise=[(1, c[:1])],
                                                                    guides=[([lr], c[:1]), ([lr], c[:1])])))
    ws, gs = [_w(64 * 96, f32, (64, 96)), _w(96, f32)], [_w(64 * 96, f32, (64, 96)), None]
    out.append(("guide_dot dense fp32guide/gauss offsets", False, {},
                lambda: guided.guide_dot(ws, gs, 3, offsets=[96 * 8, 0])))
    out.append(("guided_perturb_ fp32 2noise 2dense offsets", True, {},
                lambda: guided.guided_perturb_(ws, noise=[(1, c), (2, c)], guides=[(gs, c), (gs, c)],
                                               offsets=[96 * 8, 0])))
    lr = guided.LowRank(torch.randn(64, 64), torch.randn(96, 64))
    out.append(("guided_perturb_ bf16 1noise 2lowrank r64 offsets", False, _loop_meta(64),
                lambda lr=lr: guided.guided_perturb_([_w(64 * 96, bf16, (64, 96))], noise=[(1, c[:1])],
                                                     guides=[([lr], c[:1]), ([lr], c[:1])], offsets=[96 * 8])))
    for dist in ("gaussian", "rademacher"):
        iw = quant.Int8Weight(torch.randint(-127, 128, (64, 96), dtype=torch.int8), torch.rand(64) + 0.1)
        out.append((f"int8_code_perturb_ {dist[:5]}", dist == "gaussian", {},
                    lambda iw=iw, dist=dist: quant.int8_code_perturb_(iw, 1, 1e-3, rounding_seed=2, dist=dist)))
        for rank in (0, 64):  # rank 0: a dense guide
            g = [guided.LowRank(torch.randn(64, rank), torch.randn(96, rank)) if rank else _w(64 * 96, f32, (64, 96))]
            out.append((f"int8_code_perturb_ {dist[:5]} {'lowrank r64' if rank else 'dense'}",
                        dist == "gaussian" and rank == 64, _loop_meta(rank) if rank else {},
                        lambda iw=iw, dist=dist, g=g: quant.int8_code_perturb_(
                            iw, 1, 1e-3, rounding_seed=2, dist=dist, guides=[(g, torch.ones(1))])))
    for nested in (False, True):
        m = 64 * 64
        kw, absmax = {}, torch.rand(m // 64) + 0.1
        if nested:
            absmax = torch.randint(0, 256, (m // 64,), dtype=torch.uint8)
            # dequantised block scales code * nested_absmax + offset stay positive, as nf4_code_update_ requires
            kw = dict(nested_absmax=torch.rand(1), nested_code=torch.linspace(0, 1, 256),
                      nested_offset=torch.tensor(0.1), nested_blocksize=256)
        nw = quant.NF4Weight(codes=torch.randint(0, 256, (m // 2,), dtype=torch.uint8), absmax=absmax,
                             code=torch.linspace(-1, 1, 16), blocksize=64, shape=(64, 64), **kw)
        out.append((f"nf4_code_update_ {'nested' if nested else 'plain'}", nested, {},
                    lambda nw=nw: quant.nf4_code_update_(nw, 1, 1e-3, rounding_seed=2)))
        lr = guided.LowRank(torch.randn(64, 8), torch.randn(64, 8))
        for g, tag in ((lr, "lowrank r8"), (_w(m, f32, (64, 64)), "dense")):
            out.append((f"nf4_code_update_ {'nested' if nested else 'plain'} {tag}", not nested and tag != "dense",
                        {}, lambda nw=nw, g=g: quant.nf4_code_update_(nw, 1, 1e-3, rounding_seed=2,
                                                                      guides=[([g], torch.ones(1))])))
    return out


@contextlib.contextmanager
def _intercepted(sink: list, current: list):
    """Every kernel launch appends (variant, kernel, args, kwargs) instead of running; launchers resolve ``impl`` to
    Triton and fast math on, as they would for CUDA tensors. Everything is restored on exit."""
    from zokernels import _common

    ks = kernels()
    saved = {name: k.run for name, k in ks.items()}
    saved_common = (_common.resolve_impl, _common.fast_math)

    def interceptor(name):
        def run(*args, grid, warmup, **kwargs):
            sink.append(Launch(current[0][0], name, args, dict(kwargs), current[0][1]))
        return run

    try:
        for name, k in ks.items():
            k.run = interceptor(name)
        _common.resolve_impl = lambda impl, device: "triton"
        _common.fast_math = lambda device: True  # what a CUDA device (not ROCm, not interpreted) gets
        yield
    finally:
        for name, k in ks.items():
            k.run = saved[name]
        _common.resolve_impl, _common.fast_math = saved_common


def capture(ci_only: bool = False, only: str = "") -> list[Launch]:
    """The launches of every variant (or of the CI subset), from the real launch sites."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be compiled JITFunctions, not interpreted")
    launches, current = [], [("", {})]
    with _intercepted(launches, current), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, ci, meta, call in variants():
            if (ci_only and not ci) or (only and only not in name):
                continue
            current[0] = (name, meta)
            call()
    return launches


# ---------------------------------------------------------------------------------------------------------------------
# Compilation
_CACHE: dict = {}


def compile_launch(launch: Launch, cc: int) -> Compiled:
    """Compile one captured launch for ``sm_<cc>`` as ``JITFunction.run`` would; identical specialisations are
    compiled once. Raises what Triton raises on a compile error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = kernels()[launch.kernel]
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kw = dict(launch.kwargs)
    kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    key = (cc, launch.kernel, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           options.hash())
    hit = _CACHE.get(key)
    if hit is None:
        t0 = time.time()
        ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        seconds = time.time() - t0
        ptx, cubin = ck.asm["ptx"], ck.asm["cubin"]
        regs, spills, stack = _ptxas_usage(ptx, cc, options.enable_fp_fusion)
        named = {kernel.arg_names[p[0]]: v for p, v in constexprs.items()}
        hit = _CACHE[key] = (ptx, cubin, named, dict(options.__dict__), regs, spills, stack, seconds)
    return Compiled(launch, cc, *hit)


def _ptxas_usage(ptx: str, cc: int, fp_fusion: bool) -> tuple[int, int, int]:
    """(registers, spill bytes stored + loaded, stack frame bytes) from the bundled ptxas -v, Triton's flags."""
    from triton.backends.nvidia import compiler as nvc

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [nvc.get_ptxas(cc).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={nvc.sm_arch_from_capability(cc)}", src, "-o",
               os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            int(stack.group(1)) if stack else 0)


def sass(cubin: bytes) -> str:
    """The cubin's SASS, disassembled by the cuobjdump bundled with Triton."""
    from triton.backends.nvidia import compiler as nvc

    exe = os.path.join(os.path.dirname(nvc.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([exe, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--ci", action="store_true", help="only the representative subset the test suite compiles")
    ap.add_argument("--only", default="", help="substring filter on variant names")
    args = ap.parse_args(argv)
    import triton

    t_all, failures, done = time.time(), 0, set()
    launches = capture(args.ci, args.only)
    for cc in (int(c) for c in args.cc.split(",") if c):
        for launch in launches:
            if (cc, launch.variant) in done:  # a variant that launches twice (one per dtype) shows its first launch
                continue
            done.add((cc, launch.variant))
            t0 = time.time()
            try:
                c = compile_launch(launch, cc)
            except Exception as e:  # noqa: BLE001 - every compile error is a finding to report, not a crash
                failures += 1
                root = e
                while root.__cause__ is not None:
                    root = root.__cause__
                lines = [line.strip() for line in str(root).splitlines() if line.strip()] or [""]
                print(f"FAIL sm_{cc} {launch.kernel:22s} {launch.variant:40s} {type(root).__name__}: "
                      f"{lines[0][:100]} {lines[-1][:300] if len(lines) > 1 else ''}", flush=True)
                continue
            problems = c.problems()
            failures += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} sm_{cc} {launch.kernel:22s} {launch.variant:40s} regs={c.regs} "
                  f"spill={c.spill_bytes}B stack={c.stack}B compile={time.time() - t0:.1f}s"
                  + (f"  <- {'; '.join(problems)}" if problems else ""), flush=True)
    print(f"{len(_CACHE)} compilations, {failures} failed, {time.time() - t_all:.0f}s "
          f"(triton {triton.__version__}, torch {torch.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
