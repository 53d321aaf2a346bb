"""Messages of the libraries underneath that are not the user's business, silenced exactly (by their text) and only
where they arise: a run that quantises nothing must not print what looks like an error.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


class _DropBnbCpuKernelMessage(logging.Filter):
    """peft imports bitsandbytes whenever it is installed (``peft/helpers.py``, at ``import peft``), and bitsandbytes
    0.50 then asks the optional ``kernels`` package for a 4-bit CPU kernel on CPUs with AVX512-BF16; it falls back to
    its own when that fails, so a run that quantises nothing printed what looked like errors: bitsandbytes' "Failed to
    load CPU gemm_4bit_forward from kernels-community" and, offline, ``kernels``' (>= 0.19, a dependency of
    transformers >= 5.25) "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'". Only
    the message starting with ``prefix`` is dropped."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# installed on import, by zopro.train.models, before anything imports peft (imports of peft are lazy, inside functions)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropBnbCpuKernelMessage("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    _DropBnbCpuKernelMessage("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))


@contextlib.contextmanager
def peft_wrapping():
    """Around our calls that wrap a base in a ``PeftModel``: peft 0.21's ``PeftModel.__init__`` reads transformers'
    deprecated ``is_gradient_checkpointing`` (a FutureWarning on every run, from peft's line, not ours), so exactly
    that message is silenced for the call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
