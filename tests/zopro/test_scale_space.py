"""ZOOptimizer on bitsandbytes scale-space parameters (NF4 absmax, int8 SCB) with every sampler."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="quantised formats need bitsandbytes")

from zokernels.quant import Int8Weight, NF4Weight, scale_params  # noqa: E402
from zopro import Isotropic, RankGuided, Targeted, ZOOptimizer  # noqa: E402


def _layer(kind):
    torch.manual_seed(0)
    if kind == "nf4":
        lin = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compress_statistics=False)
        lin.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64, quant_type="nf4",
                                       compress_statistics=False, module=lin)
        lin = lin.to("cpu")  # quantises; kept in train mode (an eval-mode forward would repack for CPU inference)
        return lin, NF4Weight.from_bnb(lin)
    lin = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False).to("cpu")
    return lin, Int8Weight.from_bnb(lin)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("sampler", ["isotropic", "targeted", "rank_guided"])
def test_scale_space_zo_lowers_the_loss(kind, sampler):
    lin, weight = _layer(kind)
    (scales,) = scale_params(weight)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=g)
    with torch.no_grad():
        target = lin(x) * 1.3 + 0.1 * torch.randn(128, 32, generator=g)  # reachable mostly by rescaling
        lin(x)  # bitsandbytes moves int8 storage into module state on the first forward; scales stay the same

    def loss():
        return ((lin(x) - target) ** 2).mean()

    guide = {"scales": 0.05 * scales.detach().clone()}  # "previous update": grow every scale
    samplers = {"isotropic": Isotropic(),
                "targeted": Targeted(guide, {"scales": torch.randn(scales.shape, generator=g)}, d0=0.5,
                                     schedule="constant", scale="numel"),
                "rank_guided": RankGuided(guide, None, rank=2, d0=0.5, schedule="constant", scale="numel")}
    # lr 1e-2 halves the loss in 40 isotropic steps for both formats; 1e-1 diverges (measured)
    opt = ZOOptimizer({"scales": scales}, lr=1e-2, eps=1e-2,
                      sampler=samplers[sampler], seed=4)
    with torch.no_grad():
        start = loss().item()
        for _ in range(40):
            opt.step(loss)
        assert loss().item() < 0.8 * start
