"""The quantised-storage kernels of ``zokernels.quant`` on bitsandbytes weights: time and bandwidth per pass.

Weights: the MLP matrices of one decoder layer (gate, up: out x in, down: in x out), quantised by bitsandbytes on
the device: Llama-3.2-1B's (8192 x 2048) on CUDA, SmolLM2-135M's (1536 x 576) on CPU. Ops, one pass each:

* ``int8_code_perturb_``: reads and writes the int8 codes (1 byte an element) and reads the row scales;
* ``nf4_code_update_``: reads and writes the packed NF4 codes (half a byte an element) and reads the block absmax;
* ``scale_perturb_``: ``perturb_`` over the NF4 absmax (the scale-space parameters: 4 bytes per 64 elements);
* ``copy``: ``dst.copy_(src)`` over the int8 codes' bytes, the bandwidth reference.

"% of copy" is each op's bandwidth over the bytes it must touch, as a fraction of the copy's (conftest.derive).
"""

import pytest
import torch

from benchmarks.common import copy_pass
from benchmarks.shapes import TensorList

bnb = pytest.importorskip("bitsandbytes", reason="the quantised formats need bitsandbytes")

from zokernels.quant import Int8Weight, NF4Weight, int8_code_perturb_, nf4_code_update_, scale_perturb_  # noqa: E402

HIDDEN, INTER = (2048, 8192) if torch.cuda.is_available() else (576, 1536)
SHAPES = [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
OPS = ("copy", "int8_code_perturb_", "nf4_code_update_", "scale_perturb_")


def _layers(device):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        int8 = [bnb.nn.Linear8bitLt(i, o, bias=False, has_fp16_weights=False).to(device) for o, i in SHAPES]
        nf4 = [bnb.nn.Linear4bit(i, o, bias=False, quant_type="nf4", compress_statistics=False).to(device)
               for o, i in SHAPES]
    return [Int8Weight.from_bnb(m) for m in int8], [NF4Weight.from_bnb(m) for m in nf4]


@pytest.fixture(scope="module")
def quantised(device):
    return _layers(device)


def _bytes(op: str, int8, nf4) -> int:
    """Bytes an op must touch in one pass (read + write of what it rewrites, read of what it only reads)."""
    if op == "copy":
        return sum(2 * w.codes.numel() for w in int8)
    if op == "int8_code_perturb_":
        return sum(2 * w.codes.numel() + w.scb.numel() * 4 for w in int8)
    if op == "nf4_code_update_":
        return sum(2 * w.codes.numel() + w.absmax.numel() * 4 for w in nf4)
    return sum(2 * w.absmax.numel() * 4 for w in nf4)


@pytest.mark.parametrize("op", OPS)
def test_quant_pass(op, device, quantised, measure, record):
    int8, nf4 = quantised
    name = f"mlp-{INTER}x{HIDDEN}-x3"
    listing = TensorList(name, torch.int8, tuple((f"w{i}", s) for i, s in enumerate(SHAPES)))
    if op == "copy":
        fn = copy_pass(sum(w.codes.numel() for w in int8), device)
    elif op == "int8_code_perturb_":
        counter = iter(range(10**9))

        def fn():  # alternate +1 / -1 so the codes stay where they started, pass after pass
            t = next(counter)
            int8_code_perturb_(int8, 7, 1e-3, rounding_seed=11, times=1 if t % 2 == 0 else -1)
    elif op == "nf4_code_update_":
        def fn():
            for i, w in enumerate(nf4):
                nf4_code_update_(w, 5, 1e-4, rounding_seed=13, stream=i)
    else:
        def fn():
            scale_perturb_(nf4, 3, 1e-3)
    record(listing, op, measure(fn), impl="copy" if op == "copy" else "auto", bytes_moved=_bytes(op, int8, nf4))
