"""The timm model families essa adapts, and the few steps of a forward pass where they differ.

- ``VisionTransformer`` (``timm.models.vision_transformer``): supervised ViTs, MAE, CLIP, DINOv2 and DINOv2 with
  registers (``vit_small_patch14_reg4_dinov2``).
- ``Eva`` (``timm.models.eva``): DINOv3 (``vit_small_patch16_dinov3``) and EVA-02 (``eva02_tiny_patch14_224``):
  rotary position embeddings (RoPE), a fused ``qkv`` or separate ``q_proj``/``k_proj``/``v_proj``, SwiGLU MLPs,
  layer scale as ``gamma_1``/``gamma_2``, register tokens.

Both put the class token first, then the register tokens, then the patches: ``num_prefix_tokens`` counts the
tokens before the patches. Eva's blocks take the RoPE embedding of the patch grid as ``rope=``, and each attention
rotates the queries and keys after its own ``attn.num_prefix_tokens`` with it: :func:`embed` returns the tokens with
their RoPE embedding (None for a ViT), :func:`keep_rope` the embedding of a subset of the patches (timm's own
patch-dropout mechanism), and :func:`run_blocks` passes it to every block.
"""

from __future__ import annotations

import contextlib

import torch
from timm.layers import apply_keep_indices_nlc
from timm.models import checkpoint, checkpoint_seq
from timm.models import eva as timm_eva
from timm.models import vision_transformer as timm_vit
from torch import nn

#: What essa accepts, for messages.
FAMILIES = ("timm VisionTransformer (ViT, DeiT, MAE, CLIP, DINOv2, DINOv2 with registers) or timm Eva "
            "(DINOv3, EVA-02)")
#: The timm modules whose architectures essa builds (``timm.list_models(module=...)``).
MODULES = ("vision_transformer", "eva")


def is_eva(model: nn.Module) -> bool:
    return isinstance(model, timm_eva.Eva)


def unsupported(model: nn.Module) -> str | None:
    """Why essa cannot adapt ``model`` (None: it can)."""
    if isinstance(model, timm_vit.VisionTransformer):
        return None
    if not is_eva(model):
        return f"a {type(model).__name__}, not a {FAMILIES}"
    if getattr(model, "rope_mixed", False):
        return "an Eva with mixed (per-block) RoPE, which essa does not support"
    if model.attn_pool is not None:
        return "an Eva with attention pooling (global_pool='map'), which essa does not support"
    for i, block in enumerate(model.blocks):
        if type(block) is not timm_eva.EvaBlock or not isinstance(block.attn, timm_eva.EvaAttention):
            return (f"an Eva whose block {i} is a {type(block).__name__} with {type(block.attn).__name__}; essa "
                    "supports pre-norm EvaBlocks with EvaAttention (DINOv3, EVA-02)")
    return None


def check(model: nn.Module, error: type[Exception], what: str) -> None:
    """Raise ``error`` naming the supported families when ``model`` is not one essa adapts."""
    reason = unsupported(model)
    if reason is not None:
        raise error(f"{what} apply to a {FAMILIES}; this model is {reason}")


def prepare(model: nn.Module) -> nn.Module:
    """Make an Eva's fused ``qkv`` layer compute the whole projection as a module call: with q/v biases timm calls
    ``F.linear`` on ``attn.qkv.weight`` directly, past any wrapper or hook a tuner puts on ``attn.qkv`` (LoRA, SSF).
    With ``qkv_bias_separate`` it calls ``attn.qkv(x)`` and adds the biases after: the same sum. Nothing for a ViT."""
    if is_eva(model):
        for block in model.blocks:
            attn = block.attn
            if isinstance(attn, timm_eva.EvaAttention) and attn.qkv is not None and attn.q_bias is not None:
                attn.qkv_bias_separate = True
    return model


@contextlib.contextmanager
def _without_patch_drop(vit: nn.Module):
    saved = vit.patch_drop
    vit.patch_drop = None
    try:
        yield
    finally:
        vit.patch_drop = saved


def embed(vit: nn.Module, x: torch.Tensor, patch_drop: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm's position-embedding step on patch embeddings ``x`` ((B, H, W, D) with ``dynamic_img_size``, else
    (B, N, D)): (tokens (B, prefix + N, D), the RoPE embedding of the patches or None). ``patch_drop``: apply the
    model's patch dropout (identity in eval mode or without one)."""
    if is_eva(vit):
        if patch_drop or vit.patch_drop is None:
            return vit._pos_embed(x)
        with _without_patch_drop(vit):
            return vit._pos_embed(x)
    x = vit._pos_embed(x)
    return (vit.patch_drop(x) if patch_drop else x), None


def keep_rope(rope: torch.Tensor | None, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """The RoPE embedding of the patches ``keep`` (int64 (B, K), indices on the patch grid) of each row of ``x``,
    as timm's Eva gathers it after patch dropout: (B, 1, K, dim) from (N, dim)."""
    if rope is None:
        return None
    return apply_keep_indices_nlc(x, rope, keep).unsqueeze(1)


def run_blocks(vit: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
    """``vit.blocks`` on tokens ``x``, with activation checkpointing when ``vit.grad_checkpointing``; an Eva's
    blocks get ``rope``. Each block is called as a module, so its hooks (VPT's prompts) run."""
    ckpt = vit.grad_checkpointing and not torch.jit.is_scripting()
    if not is_eva(vit):
        return checkpoint_seq(vit.blocks, x) if ckpt else vit.blocks(x)
    for block in vit.blocks:
        x = checkpoint(block, x, rope=rope) if ckpt else block(x, rope=rope)
    return x


def _final_norm_on_tokens(model: nn.Module) -> bool:
    """Whether an Eva normalises every token at the end (``norm``) rather than the pooled features (``fc_norm``)."""
    return isinstance(model.fc_norm, nn.Identity) and not isinstance(model.norm, nn.Identity)


def adopt_pooling(model: nn.Module, target: nn.Module) -> None:
    """Give an Eva built as its pretrained checkpoint lays out (timm's default pooling: EVA-02 normalises the
    pooled mean, ``fc_norm``) the pooling and final-norm placement of ``target`` (the same architecture built with
    essa's arguments, e.g. on the meta device): afterwards its modules and state-dict keys are ``target``'s."""
    if _final_norm_on_tokens(target) and isinstance(model.norm, nn.Identity):
        model.norm, model.fc_norm = model.fc_norm, nn.Identity()
    elif not _final_norm_on_tokens(target) and isinstance(model.fc_norm, nn.Identity):
        model.fc_norm, model.norm = model.norm, nn.Identity()
    model.global_pool = target.global_pool


def _eva_checkpoint_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's Eva filter, then the final norm where ``model`` has it: timm moves a masked-image-modelling
    checkpoint's ``norm`` to ``fc_norm`` (EVA-02's default mean pooling normalises there); with the final norm on
    every token (essa's CLS pooling) it goes back to ``norm``."""
    out = timm_eva.checkpoint_filter_fn(state_dict, model)
    if _final_norm_on_tokens(model) and "norm.weight" not in out and "fc_norm.weight" in out:
        out = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v for k, v in out.items()}
    return out


def checkpoint_filter(model: nn.Module):
    """The function that maps a checkpoint's keys and shapes onto ``model``'s family (timm's, for an Eva with the
    final norm put back where the model has it)."""
    return _eva_checkpoint_filter if is_eva(model) else timm_vit.checkpoint_filter_fn
