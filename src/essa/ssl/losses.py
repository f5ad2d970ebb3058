"""The SSA objective: DINO loss on CLS tokens, iBOT loss on masked patch tokens, KoLeo on student CLS features.

The three terms are lightly's modules (``lightly.loss.DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``, MIT licence):
tests/ssl/test_losses.py checks each against a direct loop over the formulas of method.md. ``DINOv2Loss`` adds the
glue: crop-major tensors in, per-term weights, teacher outputs detached, float32 under autocast, KoLeo per global
crop.

Notation: B images per batch, n_g global and n_l local crops per image, K prototypes, D backbone width,
(H, W) patch grid of a global crop, M masked patches in the batch. Crop-major order: row ``c * B + b`` holds crop
``c`` of image ``b`` (essa.ssl.views.collate produces it).
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from torch import nn


class DINOv2Loss(nn.Module):
    """Weighted sum of the DINO, iBOT and KoLeo terms; the DINO and iBOT centers are buffers (saved in checkpoints).

    Terms (averages over images, so the batch size does not change their scale):

    - ``dino``: cross-entropy ``-sum_k softmax((t - c) / T_t)_k * log_softmax(s / T_s)_k`` between teacher global
      crop i and student crop j for every pair with i != j (student local crops pair with every teacher global
      crop), averaged over pairs and images. Center c (1, 1, K) then moves to ``m * c + (1 - m) * mean(t)``.
    - ``ibot``: the same cross-entropy per masked patch (teacher: patch of the unmasked crop, own center
      (1, K); student: patch of the masked crop), averaged over each crop's masked patches, then summed over the
      crops and divided by the number of *all* global crops, as DINOv2's iBOTPatchLoss: crops without masked
      patches count as 0, so with half the crops masked the term is half the mean over masked crops. With no
      masked patch at all the term is 0 and its center stays put.
    - ``koleo``: ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` over L2-normalised student CLS features of the
      images of one global crop, summed over the global crops (as DINOv2).

    All terms are computed in float32, also under autocast.

    ``total = dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo``.

    Args:
        out_dim: number of prototypes K (the head's ``out_dim``).
        n_global: global crops per image (n_g).
        student_temp: student softmax temperature.
        center_momentum: momentum m of both centers.
        dino_weight, ibot_weight, koleo_weight: weights of the terms in ``total``.
    """

    def __init__(
        self,
        out_dim: int,
        n_global: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
    ):
        super().__init__()
        self.n_global = n_global
        self.weights = {"dino": dino_weight, "ibot": ibot_weight, "koleo": koleo_weight}
        self.dino = DINOLoss(output_dim=out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.ibot = IBOTPatchLoss(output_dim=out_dim, student_temp=student_temp, center_momentum=center_momentum)
        self.koleo = KoLeoLoss()

    def _crops(self, x: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Split crop-major rows (n * B, ...) into n tensors (B, ...), one per crop."""
        if x.shape[0] % self.n_global:
            raise ValueError(
                f"DINOv2Loss: {name} has {x.shape[0]} rows, not a multiple of n_global={self.n_global} "
                "(expected crop-major (n_global * B, ...))"
            )
        return list(x.chunk(self.n_global))

    def forward(
        self,
        *,
        teacher_temp: float,
        student_global: torch.Tensor,
        teacher_global: torch.Tensor,
        student_local: torch.Tensor | None,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        masks: torch.Tensor,
        student_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Compute the terms and update both centers (call once per training step).

        Args:
            teacher_temp: teacher softmax temperature for this step (a schedule).
            student_global: (n_g * B, K) head output for the student's CLS tokens of the (masked) global crops.
            teacher_global: (n_g * B, K) head output for the teacher's CLS tokens of the unmasked global crops.
            student_local: (n_l * B, K) head output for the student's CLS tokens of the local crops, or None.
            student_patches: (M, K) head output for the student's patch tokens at the masked positions.
            teacher_patches: (M, K) the same for the teacher. Rows of both follow
                ``patch_tokens[masks.flatten(1)]`` with patch_tokens (n_g * B, H * W, D): crop-major, then
                row-major over the grid.
            masks: bool (n_g * B, H, W), True = masked, M True entries.
            student_features: (n_g * B, D) the student backbone's CLS tokens of the global crops (before the head).

        Returns {'dino', 'ibot', 'koleo', 'total'}: scalar tensors; the first three unweighted.
        """
        # The cross-entropies sum over K (65,536) prototypes and KoLeo compares nearby unit vectors; under autocast
        # lightly's einsum and matmul would run in bfloat16, so the whole objective runs in float32.
        with torch.autocast(device_type=student_global.device.type, enabled=False):
            return self._terms(
                float(teacher_temp),
                student_global.float(),
                teacher_global.detach().float(),
                None if student_local is None else student_local.float(),
                student_patches.float(),
                teacher_patches.detach().float(),
                masks,
                student_features.float(),
            )

    def _terms(
        self,
        teacher_temp: float,
        student_global: torch.Tensor,
        teacher_global: torch.Tensor,
        student_local: torch.Tensor | None,
        student_patches: torch.Tensor,
        teacher_patches: torch.Tensor,
        masks: torch.Tensor,
        student_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        teacher_crops = self._crops(teacher_global, "teacher_global")
        student_crops = self._crops(student_global, "student_global")
        if student_local is not None:
            B = teacher_crops[0].shape[0]
            if student_local.shape[0] % B:
                raise ValueError(
                    f"DINOv2Loss: student_local has {student_local.shape[0]} rows, not a multiple of the batch size "
                    f"{B} (expected crop-major (n_local * B, K))"
                )
            student_crops += list(student_local.split(B))
        dino = self.dino(teacher_crops, student_crops, teacher_temp=teacher_temp)

        n_masked = int(masks.sum())
        if student_patches.shape[0] != n_masked or teacher_patches.shape[0] != n_masked:
            raise ValueError(
                f"DINOv2Loss: masks mark {n_masked} patches but student_patches has {student_patches.shape[0]} and "
                f"teacher_patches {teacher_patches.shape[0]} rows (expected the head outputs of "
                "patch_tokens[masks.flatten(1)])"
            )
        if n_masked:
            ibot = self.ibot(teacher_patches, student_patches, masks, teacher_temp=teacher_temp)
        else:
            # A mean over zero patches would turn the center into NaN; keep the graph connected for DDP.
            ibot = student_patches.sum() * 0.0

        koleo = sum(self.koleo(x) for x in self._crops(student_features, "student_features"))

        terms = {"dino": dino, "ibot": ibot, "koleo": koleo}
        terms["total"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms
