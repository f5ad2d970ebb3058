"""VPT: learned prompt tokens that the blocks attend to.

Shallow (``deep=False``): ``tokens`` prompts are inserted once, after the class/register tokens, before the first
block. Deep: every block gets its own prompts, replacing the previous block's prompt outputs. Before the final
norm the prompt tokens are removed again, so the model's outputs keep timm's token layout (class token first,
patch tokens after ``num_prefix_tokens``) and pooling, kNN and patch-level losses see what they expect.

In an Eva (DINOv3, EVA-02) every attention applies RoPE to the tokens after its ``attn.num_prefix_tokens``, the
patches: the prompts sit before the patches, so each attention counts them as prefix tokens, and they get no
rotation, as the class and register tokens.

Prompts cannot be folded into ViT weights: a merged model keeps them and its export records the tuner.
"""

from __future__ import annotations

import torch
from torch import nn

from essa import families
from essa.tuners.base import Tuner, TunerError, positive_int, register


def _insert_prompts(block: nn.Module, args):
    x, rest = args[0], args[1:]
    start, prompts = block.vpt_start, block.vpt_prompts
    prompts = prompts.to(x.dtype).expand(x.shape[0], -1, -1)
    end = start + prompts.shape[1] if block.vpt_replace else start
    return (torch.cat([x[:, :start], prompts, x[:, end:]], dim=1), *rest)


def _strip_prompts(norm: nn.Module, args):
    x, rest = args[0], args[1:]
    start, count = norm.vpt_strip
    return (torch.cat([x[:, :start], x[:, start + count :]], dim=1), *rest)


@register("vpt")
class VPT(Tuner):
    """Options: ``tokens`` (prompts per block), ``deep`` (prompts in every block or only the first)."""

    mergeable = False

    tokens: int = 10
    deep: bool = True

    def __post_init__(self):
        positive_int(self.tokens, "tokens", "vpt")

    def inject(self, model):
        if hasattr(model.norm, "vpt_strip"):
            raise TunerError("vpt: the model already carries VPT prompts")
        start = model.num_prefix_tokens
        blocks = list(model.blocks) if self.deep else [model.blocks[0]]
        like = next(model.parameters())
        for i, block in enumerate(blocks):
            prompts = torch.empty(1, self.tokens, model.embed_dim, device=like.device, dtype=like.dtype)
            block.vpt_prompts = nn.Parameter(nn.init.trunc_normal_(prompts, std=0.02))
            block.vpt_start, block.vpt_replace = start, i > 0
            block.register_forward_pre_hook(_insert_prompts)
        if families.is_eva(model):  # RoPE starts after the prompts (shallow ones too stay up to the final norm)
            for block in model.blocks:
                block.attn.num_prefix_tokens = start + self.tokens
        model.norm.vpt_strip = (start, self.tokens)
        model.norm.register_forward_pre_hook(_strip_prompts)
