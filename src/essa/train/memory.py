"""Training memory: recompute the frozen parts of a ViT's blocks in the backward pass instead of keeping their
activations.

A frozen layer still keeps activations when a gradient must flow through it to something trainable below it
(APLA's ``attn.proj`` in every block): the MLP keeps its GELU input (4 x width per token) and the LayerNorm its
input, in every block. :func:`recompute_frozen` runs such frozen stretches under ``torch.utils.checkpoint``
(non-reentrant), which keeps only the stretch's input and recomputes the rest when the backward pass needs it:

- the MLP stretch ``act(fc1(norm2(x)))`` when ``norm2``, ``mlp.fc1`` and ``mlp.act`` have no trainable parameter
  (``fc2`` may train: its input is the stretch's output). The stretch stops before ``fc2`` so that the
  recomputation costs one ``fc1`` (a third of a block's forward matmuls), not the whole MLP;
- the attention stretch ``attn(norm1(x))`` when ``norm1`` and ``attn`` have no trainable parameter;
- when only the attention's output projection trains (APLA), the stretch before it: ``norm1``, ``qkv`` and
  scaled-dot-product attention (queries, keys, values: 3 x width per token), for timm's fused ``Attention``
  without gate or hooks. ``attn.proj`` keeps its input for its weight gradient, as without recomputation.

Which stretches are frozen is decided on every forward pass from ``requires_grad``, so a model whose parameters
are later unfrozen (``essa.tuners.merge``, ``bake``) recomputes nothing, and without gradients (the EMA teacher,
inference) nothing changes. The numbers are the same with and without recomputation; module names, parameters and
``state_dict`` keys are untouched (the block's ``forward`` is replaced on the instance), so checkpoints, tuner
state and exports are unaffected.

:func:`release_free_heap` hands the pages of freed CPU memory back to the operating system (glibc keeps them
resident otherwise): called between the forward and the backward pass of an SSA step on CPU, it keeps the
forward's freed transients (the recomputed stretches free nearly everything they compute) out of the resident
memory of the backward pass.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


def _trains(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def _attention(block: Block, x: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    return block.attn(block.norm1(x), **attn_kwargs)


def _attention_core(block: Block, x: torch.Tensor, attn_kwargs: dict) -> torch.Tensor:
    """timm's fused ``Attention.forward`` on ``norm1(x)`` up to the input of ``attn.proj``: (B, N, attn_dim)."""
    attn = block.attn
    x = block.norm1(x)
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_kwargs.get("attn_mask"), dropout_p=attn.attn_drop.p if attn.training else 0.0,
        is_causal=attn_kwargs.get("is_causal", False),
    )
    return attn.norm(x.transpose(1, 2).reshape(B, N, attn.attn_dim))


def _splittable(attn: nn.Module) -> bool:
    """Whether :func:`_attention_core` computes what ``attn`` computes before its projection."""
    return (type(attn).forward is Attention.forward and attn.fused_attn and getattr(attn, "gate", None) is None
            and not (attn._forward_hooks or attn._forward_pre_hooks))


def _mlp_hidden(block: Block, x: torch.Tensor) -> torch.Tensor:
    return block.mlp.act(block.mlp.fc1(block.norm2(x)))


def _recomputing_forward(block: Block, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
    """timm's ``Block.forward`` and ``Mlp.forward``, step for step, with the frozen stretches checkpointed."""
    grad = torch.is_grad_enabled()
    a = block.attn
    if grad and not _trains(block.norm1, a):
        attn = checkpoint(_attention, block, x, attn_kwargs, use_reentrant=False)
    elif grad and _splittable(a) and not _trains(block.norm1, a.qkv, a.q_norm, a.k_norm, a.norm):
        attn = a.proj_drop(a.proj(checkpoint(_attention_core, block, x, attn_kwargs, use_reentrant=False)))
    else:
        attn = _attention(block, x, attn_kwargs)
    x = x + block.drop_path1(block.ls1(attn))
    mlp = block.mlp
    if grad and not _trains(block.norm2, mlp.fc1, mlp.act):
        hidden = checkpoint(_mlp_hidden, block, x, use_reentrant=False)
    else:
        hidden = _mlp_hidden(block, x)
    return x + block.drop_path2(block.ls2(mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))))


def recompute_frozen(backbone: nn.Module) -> list[str]:
    """Make every block of ``backbone.blocks`` recompute its frozen stretches in the backward pass (see the module
    docstring). Call after the tuner is applied (``essa.tuners.apply``); calling again changes nothing.

    Applies to blocks that run timm's own ``Block.forward`` with a timm ``Mlp`` that has no forward hooks (a hook
    on the MLP, such as AdaptFormer's adapter, needs the MLP called whole); other blocks are left as they are.

    Returns the names of the blocks that recompute (``blocks.0``, ...), whatever they currently freeze.
    """
    names = []
    for i, block in enumerate(getattr(backbone, "blocks", [])):
        mlp = getattr(block, "mlp", None)
        eligible = (
            isinstance(block, Block) and type(block).forward is Block.forward
            and isinstance(mlp, Mlp) and type(mlp).forward is Mlp.forward
            and not (mlp._forward_hooks or mlp._forward_pre_hooks)
        )
        if eligible:
            if "forward" not in vars(block):
                block.forward = partial(_recomputing_forward, block)
            names.append(f"blocks.{i}")
    return names
