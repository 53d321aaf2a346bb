"""zokernels: fused, seeded zeroth-order perturbation kernels (Triton, with a pure-torch reference of the same spec).

Public ops take ``impl="auto" | "triton" | "torch"``; ``auto`` runs Triton on CUDA tensors and the torch reference
elsewhere. All randomness is a pure function of (seed, stream, element index): see :mod:`zokernels.rng`.
"""

from zokernels.perturb import perturb2_, perturb_

__all__ = ["perturb_", "perturb2_"]
__version__ = "0.1.0"
