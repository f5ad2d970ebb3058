"""Building blocks of the SSA objectives: pure pieces that know nothing about tuners. DINOv2's are below; MAE's are
in :mod:`essa.ssl.mae`, SimMIM's in :mod:`essa.ssl.simmim`, and what those two share (patches, the one-crop view,
the masked collate, the reconstruction picture) in :mod:`essa.ssl.mim`.

- ``heads.DINOHead(in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3)``: (..., in_dim) ->
  (..., out_dim) prototype logits, ``prototypes(bottleneck(x))``; ``cancel_last_layer_gradients()`` freezes the
  prototypes for a step.
- ``losses.DINOv2Loss(out_dim, n_global=2, ..., chunk_size=64)``: DINO + iBOT + KoLeo terms and their weighted
  total, with the centers as buffers; from logits, or from bottleneck features and the prototype layers'
  ``scorer()`` (then the (rows x out_dim) logits are formed ``chunk_size`` rows at a time and recomputed in the
  backward pass: ``losses.pair_cross_entropy``).
- ``masking.block_masks(n, grid, ratio=(0.1, 0.5), probability=0.5, generator=None)``: bool (n, H, W) iBOT masks;
  ``masking.block_mask(grid, num_masked, rng)``: one (H, W) mask.
- ``masking.forward_masked(vit, images, masks, mask_token)``: (B, prefix + N, D) tokens of a timm ViT whose masked
  patches were replaced by ``mask_token``.
- ``patch_dropout.draw_kept(n, num_patches, drop, generator)``: PatchDropout's kept patch indices (n, kept);
  ``patch_dropout.collate_kept(samples, collate=..., patch_size=..., drop=...)``: a batch with them.
- ``prefix.tokens_before(vit, images, k, kept=None)`` / ``prefix.tokens_after(vit, tokens, k)``: a timm ViT's
  ``forward_features`` split at block k (optionally of kept patches only).
- ``views.MultiCropTransform(n_global=2, n_local=8, global_size=224, local_size=98, ...)``: PIL image -> list of
  crops; ``views.collate(samples, patch_size=..., n_global=2)``: crop-major batches and masks (on the patch grid of
  the crops' size); ``views.low_resolution_sizes(global_size, local_size, patch_size)``: the crop sizes of a
  low-resolution phase (FastDINOv2's curriculum).
- ``heads.HeadInputNorm(dim)``: backbone tokens standardised per feature with running statistics (CLS and patch
  tokens apart) before the head.
- ``schedules.cosine(start, end, total_iters, warmup_iters=0, warmup_start=0)``: (total_iters,) array;
  ``schedules.ssa_schedules(epochs, iters_per_epoch, lr, head_warmup=..., ...)``: ``SSASchedules`` of per-step
  arrays (backbone and head lr, head warm-up, the low-resolution steps); ``schedules.length_steps(value, total,
  iters_per_epoch)``: a length given as a fraction of the run, steps or epochs, in steps.
- ``collapse.head_stats(...)`` and ``collapse.CollapseWatch``: the teacher's entropy, its batch-mean entropy, the
  student's KL from uniform and the prototypes in use; a count of consecutive uniform or one-hot steps.
"""

from essa.ssl.heads import DINOHead
from essa.ssl.losses import DINOv2Loss
from essa.ssl.masking import block_mask, block_masks, forward_masked
from essa.ssl.schedules import SSASchedules, cosine, ssa_schedules
from essa.ssl.views import MultiCropTransform, collate

__all__ = [
    "DINOHead",
    "DINOv2Loss",
    "MultiCropTransform",
    "SSASchedules",
    "block_mask",
    "block_masks",
    "collate",
    "cosine",
    "forward_masked",
    "ssa_schedules",
]
