"""Training memory: recompute the frozen parts of a ViT's blocks in the backward pass instead of keeping their
activations.

A frozen layer still keeps activations when a gradient must flow through it to something trainable below it
(APLA's ``attn.proj`` in every block): the MLP keeps its GELU input (4 x width per token) and the LayerNorm its
input, in every block. :func:`recompute_frozen` runs such frozen stretches under ``torch.utils.checkpoint``
(non-reentrant), which keeps only the stretch's input and recomputes the rest when the backward pass needs it:

- the MLP stretch ``act(fc1(norm2(x)))`` (SwiGLU: ``act(fc1_g(h)) * fc1_x(h)``) when ``norm2``, ``mlp.fc1`` (or
  ``fc1_g``, ``fc1_x``) and ``mlp.act`` have no trainable parameter
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

:func:`plan_recompute` chooses the blocks to recompute for a memory budget (``optim.recompute_frozen: auto``, the
default, with ``trainer.memory_budget``): none when the step's activations fit, else as few as make them fit. It
measures what one block keeps for the backward pass per image with and without the recomputation
(:class:`SavedActivations` on one block's forward, for each kind of view) and adds what else the step holds.

:func:`release_free_heap` hands the pages of freed CPU memory back to the operating system (glibc keeps them
resident otherwise): called between the forward and the backward pass of an SSA step on CPU, it keeps the
forward's freed transients (the recomputed stretches free nearly everything they compute) out of the resident
memory of the backward pass.
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, GluMlp, Mlp, SwiGLU, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


class SavedActivations:
    """Context manager: MiB of the tensors autograd keeps for the backward pass while it is active (distinct
    storages, parameters excluded; a checkpointed region counts only what it keeps: its inputs)."""

    def __init__(self, parameters):
        self._params = {p.untyped_storage().data_ptr() for p in parameters}
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def mib(self) -> float:
        return sum(self._storages.values()) / 2**20

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


#: The MLPs whose stretch before ``fc2`` is recomputed (their own ``forward``: hidden, drop1, norm, fc2, drop2).
_MLPS = (Mlp, GluMlp, SwiGLU)


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


def _mlp_hidden(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward on ``norm2(x)`` up to its ``drop1``: ``act(fc1)``, or the gated product of SwiGLU
    (``act(fc1_g) * fc1_x``) and of a packed GLU (``fc1`` split in two halves)."""
    mlp, h = block.mlp, block.norm2(x)
    if isinstance(mlp, SwiGLU):
        return mlp.act(mlp.fc1_g(h)) * mlp.fc1_x(h)
    h = mlp.fc1(h)
    if isinstance(mlp, GluMlp):
        x1, x2 = h.chunk(2, dim=mlp.chunk_dim)
        return x1 * mlp.act(x2) if mlp.gate_last else mlp.act(x1) * x2
    return mlp.act(h)


def _hidden_layers(mlp: nn.Module) -> tuple[nn.Module, ...]:
    """The MLP's modules inside :func:`_mlp_hidden`'s stretch (besides ``norm2``)."""
    return (mlp.fc1_g, mlp.fc1_x, mlp.act) if isinstance(mlp, SwiGLU) else (mlp.fc1, mlp.act)


def _mlp_rest(mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))


def _checkpointed_mlp(block: nn.Module, x: torch.Tensor, grad: bool) -> torch.Tensor:
    if grad and not _trains(block.norm2, *_hidden_layers(block.mlp)):
        hidden = checkpoint(_mlp_hidden, block, x, use_reentrant=False)
    else:
        hidden = _mlp_hidden(block, x)
    return _mlp_rest(block.mlp, hidden)


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
    return x + block.drop_path2(block.ls2(_checkpointed_mlp(block, x, grad)))


def _eva_attention(block: EvaBlock, x: torch.Tensor, rope, attn_kwargs: dict) -> torch.Tensor:
    return block.attn(block.norm1(x), rope=rope, **attn_kwargs)


def _eva_attention_core(block: EvaBlock, x: torch.Tensor, rope, attn_kwargs: dict) -> torch.Tensor:
    """timm's ``EvaAttention.forward`` (fused attention) on ``norm1(x)`` up to the input of ``attn.proj``."""
    attn = block.attn
    x = block.norm1(x)
    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (layer(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
                   for layer in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    x = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_kwargs.get("attn_mask"), dropout_p=attn.attn_drop.p if attn.training else 0.0,
        is_causal=attn_kwargs.get("is_causal", False),
    )
    x = attn.norm(x.transpose(1, 2).reshape(B, N, C))
    return x if gate is None else x * gate


def _eva_splittable(attn: nn.Module) -> bool:
    return (type(attn).forward is EvaAttention.forward and attn.fused_attn
            and not (attn._forward_hooks or attn._forward_pre_hooks))


def _eva_recomputing_forward(block: EvaBlock, x: torch.Tensor, rope=None, **attn_kwargs) -> torch.Tensor:
    """timm's ``EvaBlock.forward`` (layer scale ``gamma_1``/``gamma_2``, the ``rope`` embedding) with the frozen
    stretches checkpointed, as :func:`_recomputing_forward`."""
    grad = torch.is_grad_enabled()
    a = block.attn
    beside_proj = [p for n, p in a.named_parameters() if not n.startswith("proj.")]
    if grad and not _trains(block.norm1, a):
        attn = checkpoint(_eva_attention, block, x, rope, attn_kwargs, use_reentrant=False)
    elif grad and _eva_splittable(a) and not _trains(block.norm1) and not any(p.requires_grad for p in beside_proj):
        attn = a.proj_drop(a.proj(checkpoint(_eva_attention_core, block, x, rope, attn_kwargs, use_reentrant=False)))
    else:
        attn = _eva_attention(block, x, rope, attn_kwargs)
    if block.gamma_1 is not None:
        attn = block.gamma_1 * attn
    x = x + block.drop_path1(attn)
    mlp = _checkpointed_mlp(block, x, grad)
    if block.gamma_2 is not None:
        mlp = block.gamma_2 * mlp
    return x + block.drop_path2(mlp)


def _eligible_forward(block: nn.Module):
    """The recomputing forward for ``block``, or None when it does not run timm's own block and MLP forwards."""
    mlp = getattr(block, "mlp", None)
    forward = None
    if isinstance(block, Block) and type(block).forward is Block.forward:
        forward = _recomputing_forward
    elif isinstance(block, EvaBlock) and type(block).forward is EvaBlock.forward:
        forward = _eva_recomputing_forward
    eligible = (
        forward is not None and any(isinstance(mlp, c) and type(mlp).forward is c.forward for c in _MLPS)
        and not (mlp._forward_hooks or mlp._forward_pre_hooks)
    )
    return forward if eligible else None


def recompute_frozen(backbone: nn.Module, blocks: list[int] | None = None) -> list[str]:
    """Make every block of ``backbone.blocks`` (or those of index in ``blocks``) recompute its frozen stretches in
    the backward pass (see the module docstring). Call after the tuner is applied (``essa.tuners.apply``); calling
    again changes nothing.

    Applies to blocks that run timm's own ``Block.forward`` (ViT) or ``EvaBlock.forward`` (DINOv3, EVA-02: its
    ``rope=`` argument and layer scale ``gamma_1``/``gamma_2``) with a timm ``Mlp``, ``GluMlp`` or ``SwiGLU`` that
    has no forward hooks (a hook on the MLP, such as AdaptFormer's adapter, needs the MLP called whole); other
    blocks are left as they are. The stretch before an Eva's ``attn.proj`` (APLA) is recomputed for timm's
    ``EvaAttention`` with fused attention and no hooks.

    Returns the names of the blocks that recompute (``blocks.0``, ...), whatever they currently freeze.
    """
    names = []
    for i, block in enumerate(getattr(backbone, "blocks", [])):
        forward = _eligible_forward(block)
        if forward is not None and (blocks is None or i in blocks):
            if "forward" not in vars(block):
                block.forward = partial(forward, block)
            names.append(f"blocks.{i}")
    return names


# ----- a memory budget: which blocks to recompute -------------------------------------------------------------

#: The share of the memory free when the run starts that ``trainer.memory_budget: auto`` lets a step use: of the
#: device's on CUDA; of the machine's available memory on a CPU (data loaders, the page cache and other processes
#: share it).
AUTO_SHARE = {"cuda": 0.9, "cpu": 0.5}


@dataclasses.dataclass
class RecomputePlan:
    """Which blocks recompute their frozen stretches, and why: ``blocks`` (indices), ``budget_mib`` (the memory
    a step may use), ``base_mib`` (what it holds besides the blocks' activations: weights, gradients, optimizer
    states, the heads' logits), ``kept_mib`` (the blocks' activations with the plan) and ``all_kept_mib`` (without
    any recomputation). ``fits``: whether ``base_mib + kept_mib`` is within the budget."""

    blocks: list[int]
    budget_mib: float
    base_mib: float
    kept_mib: float
    all_kept_mib: float

    @property
    def fits(self) -> bool:
        return self.base_mib + self.kept_mib <= self.budget_mib

    def record(self) -> dict:
        return {"blocks": self.blocks, "budget_mib": round(self.budget_mib, 1), "base_mib": round(self.base_mib, 1),
                "kept_mib": round(self.kept_mib, 1), "all_kept_mib": round(self.all_kept_mib, 1), "fits": self.fits}


def available_mib(device: str) -> float:
    """The memory free now: on ``cuda``, the current device's (``torch.cuda.mem_get_info``); on ``cpu``, the
    machine's available memory (``MemAvailable`` of /proc/meminfo; else the physical memory)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def block_costs(backbone: nn.Module, views: list[tuple[int, int]]) -> dict[int, tuple[float, float]]:
    """MiB that each recomputable block (index -> (kept, recomputed)) keeps for the backward pass in one step,
    without and with the recomputation, for ``views``: (images, tokens per image) of each kind of view the
    step's student runs (e.g. ``[(2 * batch, 257), (8 * batch, 50)]``). Measured on one image of each kind
    (activations grow with the batch), once per kind of block (its class and which of its parameters train)."""
    costs: dict[int, tuple[float, float]] = {}
    known: dict[tuple, tuple[float, float]] = {}
    dim = backbone.embed_dim
    for i, block in enumerate(getattr(backbone, "blocks", [])):
        forward = _eligible_forward(block)
        if forward is None:
            continue
        kind = (type(block), tuple((n, p.requires_grad, tuple(p.shape)) for n, p in block.named_parameters()))
        if kind not in known:
            kept = recomputed = 0.0
            for images, tokens in views:
                x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(0), requires_grad=True)
                kept += images * _saved_mib(block, type(block).forward, x)
                recomputed += images * _saved_mib(block, forward, x)
            known[kind] = (kept, recomputed)
        costs[i] = known[kind]
    return costs


def _saved_mib(block: nn.Module, forward, x: torch.Tensor) -> float:
    """MiB that ``forward(block, x)`` keeps for the backward pass."""
    with SavedActivations(block.parameters()) as saved:
        forward(block, x)
    return saved.mib


def plan_recompute(costs: dict[int, tuple[float, float]], base_mib: float, budget_mib: float) -> RecomputePlan:
    """The fewest blocks to recompute for ``base_mib`` plus the blocks' activations (``costs``: index -> MiB
    (kept, recomputed), :func:`block_costs`) to fit ``budget_mib``: none when all fit kept, else the blocks that
    save the most first (the first of equals first); every block when even that does not fit
    (:attr:`RecomputePlan.fits` False)."""
    all_kept = sum(kept for kept, _ in costs.values())
    total, chosen = all_kept, []
    for i in sorted(costs, key=lambda i: (-(costs[i][0] - costs[i][1]), i)):
        if base_mib + total <= budget_mib:
            break
        if costs[i][0] > costs[i][1]:
            chosen.append(i)
            total -= costs[i][0] - costs[i][1]
    return RecomputePlan(sorted(chosen), budget_mib, base_mib, total, all_kept)
