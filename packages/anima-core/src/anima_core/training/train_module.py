"""The module that is trained: the DiT (with the adapter injected) plus the adapter's parameters registered as
children, so device placement, ``train()``/``eval()`` and parameter listing see everything in one place."""

from __future__ import annotations

import torch
from torch import nn

from anima_core.model.dit import AnimaDiT
from anima_core.model.text_encoder import TextBatch


class TrainModule(nn.Module):
    def __init__(self, dit: AnimaDiT, adapter: object) -> None:
        super().__init__()
        self.dit = dit
        network = getattr(adapter, "network", None)
        if isinstance(network, nn.Module):
            self.adapter_modules = network
        else:  # an adapter without a module of its own: register its parameters so they move with the model
            params = [p for g in adapter.get_param_groups(0.0) for p in g["params"]]
            self.adapter_modules = nn.ParameterList(params)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, qwen_hidden: torch.Tensor,
                text: TextBatch) -> torch.Tensor:
        # The LLM adapter runs inside the forward so an adapter LoRA trains and DDP-style syncing sees one graph.
        context = self.dit.condition(qwen_hidden, text.qwen_mask, text.t5_ids, text.t5_mask, text.t5_weights)
        return self.dit(noisy, t, context)
