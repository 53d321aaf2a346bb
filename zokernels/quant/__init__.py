"""Zeroth-order steps on bitsandbytes-quantised weights, in place on bitsandbytes' own storage.

Two formats, each a small structure that checks its invariants (:class:`NF4Weight`, :class:`Int8Weight`), and
three ways to move a quantised weight, none of which ever holds a dequantised copy of a whole weight (the torch
references work in chunks of ``_common.TORCH_CHUNK`` elements, the Triton kernels in blocks of registers):

* **scale space** (:func:`scale_params`, :func:`scale_perturb_`): the continuous parameters are the fp32 scales
  (NF4 block absmax, or the nested absmax of a double-quantised NF4 weight; int8 row scales ``SCB``); codes stay.
  They are plain float tensors, so :func:`zokernels.perturb_` moves them; :func:`scale_guide` carries a
  weight-space guide (dense or LowRank) into scale space, so targeted directions reach the scales too.
* **int8 code space** (:func:`int8_code_perturb_`): ``codes += times * delta`` with ``delta`` a seeded stochastic
  rounding of ``eps * z * 127 / SCB[row]`` to whole code steps, saturating at ±127. ``delta`` does not depend on
  ``times``, so ``times=+1`` then ``times=-1`` (or SPSA's +1, -2, +1) restores every unsaturated code bit for bit.
* **NF4 code space** (:func:`nf4_code_update_`): per element, dequantise (code book value x block absmax), add
  ``coef * z``, requantise into the 16-value code book by seeded stochastic rounding between the two neighbouring
  code values (unbiased), absmax kept fixed.

Both code-space ops take the guide terms of :func:`zokernels.guided_perturb_` (``guides=[(guide_list, coef)]``,
dense or :class:`~zokernels.guided.LowRank`): the step rounded to codes is ``eps*z + sum coef*guide``, so ZOPrO's
targeted and rank-guided directions reach quantised storage (:mod:`~zokernels.quant.guides`).

One file per piece, each read top to bottom: :mod:`~zokernels.quant.formats` (the two formats and their storage),
:mod:`~zokernels.quant.scale` (scale space), :mod:`~zokernels.quant.int8` and :mod:`~zokernels.quant.nf4` (each
code-space op: its torch reference, its Triton kernel and launcher, the public op).
"""

from zokernels.quant.formats import (
    INT8_MAX,
    INV127,
    SUPPORTED_BLOCKSIZES,
    Int8Weight,
    NF4Weight,
    pack_nibbles,
    unpack_nibbles,
)
from zokernels.quant.int8 import int8_code_perturb_
from zokernels.quant.nf4 import nf4_code_update_
from zokernels.quant.scale import scale_guide, scale_params, scale_perturb_

__all__ = ["NF4Weight", "Int8Weight", "scale_params", "scale_perturb_", "scale_guide", "int8_code_perturb_",
           "nf4_code_update_",
           "pack_nibbles", "unpack_nibbles", "SUPPORTED_BLOCKSIZES", "INT8_MAX", "INV127"]
