"""Tensor lists the kernel benchmarks run over: the weights (or LoRA adapters) of real model shapes.

A list is a :class:`TensorList`: a name, a dtype and the ``(name, shape)`` of every tensor in the order the model
registers its parameters. Only shapes matter to a bandwidth benchmark, so :meth:`TensorList.build` allocates with
``torch.empty`` on the target device (no host-side init, no transfer) and zero-fills: uninitialised memory may hold
NaN or subnormal patterns, and subnormal arithmetic is far slower on x86 CPUs, which would make CPU figures depend on
whatever the allocator handed back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorList:
    name: str
    dtype: torch.dtype
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def build(self, device) -> list[torch.Tensor]:
        return [torch.empty(shape, dtype=self.dtype, device=device).zero_() for _, shape in self.shapes]


@dataclass(frozen=True)
class Decoder:
    """The parameter shapes of a Llama-style decoder (GQA attention, SwiGLU MLP, RMSNorm, tied embedding)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def linears(self) -> list[tuple[str, int, int]]:
        """``(name, out_features, in_features)`` of one layer's seven linear layers, in registration order."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("q_proj", q, self.hidden), ("k_proj", kv, self.hidden), ("v_proj", kv, self.hidden),
                ("o_proj", self.hidden, q), ("gate_proj", self.intermediate, self.hidden),
                ("up_proj", self.intermediate, self.hidden), ("down_proj", self.hidden, self.intermediate)]

    def weight_shapes(self):
        shapes = [("embed_tokens", (self.vocab, self.hidden))]  # tied with lm_head: counted once
        for i in range(self.layers):
            shapes += [(f"layers.{i}.{name}", (out, inp)) for name, out, inp in self.linears()]
            shapes += [(f"layers.{i}.input_layernorm", (self.hidden,)),
                       (f"layers.{i}.post_attention_layernorm", (self.hidden,))]
        shapes.append(("norm", (self.hidden,)))
        return tuple(shapes)

    def lora_shapes(self, r: int):
        """LoRA on every linear layer: ``A`` is ``(r, in)``, ``B`` is ``(out, r)``."""
        shapes = []
        for i in range(self.layers):
            for name, out, inp in self.linears():
                shapes += [(f"layers.{i}.{name}.lora_A", (r, inp)), (f"layers.{i}.{name}.lora_B", (out, r))]
        return tuple(shapes)


LLAMA_3_2_1B = Decoder(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64)
SMOLLM2_135M = Decoder(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64)

LLAMA_1B_BF16 = TensorList("llama-3.2-1b-bf16", torch.bfloat16, LLAMA_3_2_1B.weight_shapes())
LLAMA_1B_LORA64 = TensorList("llama-3.2-1b-lora64-fp32", torch.float32, LLAMA_3_2_1B.lora_shapes(64))
SMOLLM2_LORA8 = TensorList("smollm2-135m-lora8-fp32", torch.float32, SMOLLM2_135M.lora_shapes(8))
# The full-weights path on CPU: a small decoder (vocab 4096, hidden 256, intermediate 1024, 3 layers) whose
# 4.2 M fp32 elements kept one torch-reference Gaussian pass near 26 ms (2-core CPU, commit 6a6d325).
TINY_4M = Decoder(vocab=4096, hidden=256, intermediate=1024, layers=3, heads=4, kv_heads=4, head_dim=64)
TINY_4M_FP32 = TensorList("tiny-4m-fp32", torch.float32, TINY_4M.weight_shapes())

# The published size of Llama-3.2-1B is 1.24 B parameters (1,235,814,400 with the embedding counted once).
assert round(LLAMA_1B_BF16.numel / 1e9, 2) == 1.24, LLAMA_1B_BF16.numel
assert len(LLAMA_1B_LORA64.shapes) == 16 * 7 * 2 == 224
assert len(SMOLLM2_LORA8.shapes) == 30 * 7 * 2
assert 3.5e6 < TINY_4M_FP32.numel < 4.5e6, TINY_4M_FP32.numel

LISTS = {"cuda": (LLAMA_1B_BF16, LLAMA_1B_LORA64), "cpu": (SMOLLM2_LORA8, TINY_4M_FP32)}
