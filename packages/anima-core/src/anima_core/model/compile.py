"""Regional compilation: each DiT block's ``forward`` goes through ``torch.compile``. The blocks share one class and
one code object, so dynamo compiles one graph and reuses it for every block (parameters are graph inputs), which
takes seconds where compiling the whole DiT takes minutes. Only ``forward`` is compiled, not ``__call__``: module
hooks (block swap's onloading) and gradient checkpointing, which wrap the call, stay eager."""

from __future__ import annotations

from typing import Any

# Every block is one call site of the same code; room for the variants a run meets (train/eval, grad/no-grad,
# a few bucket shapes) before dynamo gives up and runs eagerly.
CACHE_SIZE_LIMIT = 64


def compile_blocks(dit: Any, **options: Any) -> int:
    """Compile the forward of every block of ``dit.transformer.transformer_blocks``; returns how many."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    blocks = dit.transformer.transformer_blocks
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False, **options)
    return len(blocks)
