"""The SSA objective: DINO loss on CLS tokens, iBOT loss on masked patch tokens, KoLeo on student CLS features.

KoLeo and the two centers (buffers and momentum updates) are lightly's (``lightly.loss.KoLeoLoss``, ``DINOLoss``,
``IBOTPatchLoss``, MIT licence). The two cross-entropies are computed here by :func:`pair_cross_entropy`, chunk by
chunk with recomputation, so that no (rows x K) tensor of logits or probabilities (K = 65,536 prototypes) is kept
whole for the backward pass; tests/ssl/test_losses.py checks the terms against a direct loop over the formulas of
method.md, and tests/ssl/test_chunked_loss.py against lightly's own ``DINOLoss`` and ``IBOTPatchLoss``.
``DINOv2Loss`` adds the glue: crop-major tensors in, per-term weights, teacher outputs detached, float32 under
autocast, KoLeo per global crop.

Notation: B images per batch, n_g global and n_l local crops per image, K prototypes, D backbone width,
(H, W) patch grid of a global crop, M masked patches in the batch. Crop-major order: row ``c * B + b`` holds crop
``c`` of image ``b`` (essa.ssl.views.collate produces it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from torch import nn
from torch.utils.checkpoint import checkpoint

Scorer = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _chunk_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    weights: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    student_scorer: Scorer,
    teacher_scorer: Scorer,
) -> torch.Tensor:
    log_q = F.log_softmax(student_scorer(student.index_select(0, student_rows)).float() / student_temp, dim=-1)
    with torch.no_grad():
        t = teacher_scorer(teacher.index_select(0, teacher_rows)).float()  # a fresh tensor: edited in place
        p = F.softmax(t.sub_(center).div_(teacher_temp), dim=-1)
    return -((p * log_q).sum(-1) * weights).sum()


@torch.no_grad()
def _mean_logits(rows: torch.Tensor, scorer: Scorer | None) -> torch.Tensor:
    """(1, K) float32 mean of the logits of ``rows`` (N, F), as the logits of the mean row: the same for a linear
    scorer, without scoring every row."""
    mean = rows.float().mean(0, keepdim=True).to(rows.dtype)
    return (scorer or _identity)(mean).float()


def pair_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    weights: torch.Tensor,
    *,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    student_scorer: Scorer | None = None,
    teacher_scorer: Scorer | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``sum_p weights[p] * -sum_k softmax((t_p - center) / teacher_temp)_k * log_softmax(s_p / student_temp)_k``
    over pairs p, where ``s_p = student_scorer(student[student_rows[p]])`` and
    ``t_p = teacher_scorer(teacher[teacher_rows[p]])`` are (K,) logits. The teacher side gets no gradient.

    Args:
        student, teacher: (N_s, F) and (N_t, F) rows: logits (F = K, scorers None) or the features a scorer maps to
            logits (e.g. ``PrototypeLayer.scorer()``, F = bottleneck width), called under the caller's autocast.
        student_rows, teacher_rows: int64 (P,) the rows of each pair; weights: float (P,).
        center: broadcastable to (1, K), subtracted from the teacher logits.
        chunk_size: pairs scored at a time. With gradients enabled each chunk runs under
            ``torch.utils.checkpoint`` (non-reentrant): its (chunk, K) logits and probabilities are freed after the
            forward pass and recomputed in the backward pass, so only the inputs are kept. None: all pairs at once,
            plain autograd (the reference the chunked path is tested against).

    Returns a float32 scalar.
    """
    student_scorer, teacher_scorer = student_scorer or _identity, teacher_scorer or _identity
    # A copy: the caller moves its center after the loss, and the backward pass must recompute with this value.
    center = center.reshape(1, -1).clone()
    n = student_rows.numel()
    step = n if chunk_size is None else chunk_size
    if step < 1:
        raise ValueError(f"pair_cross_entropy: chunk_size must be at least 1 or None, got {chunk_size}")
    recompute = chunk_size is not None and torch.is_grad_enabled()
    total = torch.zeros((), device=student.device)
    for start in range(0, n, step):
        chunk = slice(start, start + step)
        args = (student, teacher, student_rows[chunk], teacher_rows[chunk], weights[chunk], center,
                student_temp, teacher_temp, student_scorer, teacher_scorer)
        if recompute:
            # Nothing random inside a chunk: no RNG state to stash and restore.
            total = total + checkpoint(_chunk_cross_entropy, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _chunk_cross_entropy(*args)
    return total


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
        chunk_size: rows of (rows x K) logits scored at a time and recomputed in the backward pass
            (:func:`pair_cross_entropy`); None: all at once (more memory, the same numbers).
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
        chunk_size: int | None = 64,
    ):
        super().__init__()
        self.n_global = n_global
        self.chunk_size = chunk_size
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
        student_prototypes: Scorer | None = None,
        teacher_prototypes: Scorer | None = None,
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
            student_prototypes, teacher_prototypes: None when the head outputs above are logits (..., K). Otherwise
                the student's and the teacher's prototype layers as functions of rows (``PrototypeLayer.scorer()``),
                and the head outputs above are the features they score (``DINOHead.bottleneck``): the logits are
                then only ever formed ``chunk_size`` rows at a time. A scorer must be linear without bias (the
                centers move with the logits of the mean feature, the mean of the logits).

        Returns {'dino', 'ibot', 'koleo', 'total'}: scalar tensors; the first three unweighted.
        """
        device = student_global.device.type
        # The cross-entropies sum over K (65,536) prototypes and KoLeo compares nearby unit vectors: they run in
        # float32 under autocast. The prototype layers themselves run under the caller's autocast, as in the head.
        autocast = {"device_type": device, "dtype": torch.get_autocast_dtype(device),
                    "enabled": torch.is_autocast_enabled(device)}

        def ambient(scorer: Scorer | None) -> Scorer | None:
            if scorer is None:
                return None

            def score(x: torch.Tensor) -> torch.Tensor:
                with torch.autocast(**autocast):
                    return scorer(x)
            return score

        def logits(x: torch.Tensor | None, scorer: Scorer | None) -> torch.Tensor | None:
            return x.float() if x is not None and scorer is None else x

        with torch.autocast(device_type=device, enabled=False):
            return self._terms(
                float(teacher_temp),
                logits(student_global, student_prototypes),
                logits(teacher_global.detach(), teacher_prototypes),
                logits(student_local, student_prototypes),
                logits(student_patches, student_prototypes),
                logits(teacher_patches.detach(), teacher_prototypes),
                masks,
                student_features.float(),
                ambient(student_prototypes),
                ambient(teacher_prototypes),
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
        student_scorer: Scorer | None,
        teacher_scorer: Scorer | None,
    ) -> dict[str, torch.Tensor]:
        common = dict(student_temp=self.dino.student_temp, teacher_temp=teacher_temp, student_scorer=student_scorer,
                      teacher_scorer=teacher_scorer, chunk_size=self.chunk_size)
        B = self._crops(teacher_global, "teacher_global")[0].shape[0]
        self._crops(student_global, "student_global")
        students = student_global
        if student_local is not None:
            if student_local.shape[0] % B:
                raise ValueError(
                    f"DINOv2Loss: student_local has {student_local.shape[0]} rows, not a multiple of the batch size "
                    f"{B} (expected crop-major (n_local * B, K))"
                )
            students = torch.cat([student_global, student_local])
        # Every (teacher global crop i, student crop j != i) pair of the same image, averaged (as lightly's
        # DINOLoss, which needs at least two crops).
        i, j, b = torch.meshgrid(torch.arange(self.n_global), torch.arange(students.shape[0] // B), torch.arange(B),
                                 indexing="ij")
        pairs = (i != j).flatten()
        if not pairs.any():
            raise ValueError("DINOv2Loss: the DINO term needs at least two crops per image (global or local)")
        teacher_rows, student_rows = (i.flatten() * B + b.flatten())[pairs], (j.flatten() * B + b.flatten())[pairs]
        device = students.device
        dino = pair_cross_entropy(
            students, teacher_global, student_rows.to(device), teacher_rows.to(device),
            torch.full((len(student_rows),), 1.0 / len(student_rows), device=device), center=self.dino.center,
            **common,
        )
        self.dino.update_center(_mean_logits(teacher_global, teacher_scorer)[None])

        n_masked = int(masks.sum())
        if student_patches.shape[0] != n_masked or teacher_patches.shape[0] != n_masked:
            raise ValueError(
                f"DINOv2Loss: masks mark {n_masked} patches but student_patches has {student_patches.shape[0]} and "
                f"teacher_patches {teacher_patches.shape[0]} rows (expected the head outputs of "
                "patch_tokens[masks.flatten(1)])"
            )
        if n_masked:
            # Each crop's masked patches averaged, crops summed and divided by the number of all crops (DINOv2).
            per_crop = masks.flatten(1).sum(1, keepdim=True).clamp(min=1).expand(-1, masks[0].numel())
            weights = (1.0 / per_crop)[masks.flatten(1)].float() / masks.shape[0]
            rows = torch.arange(n_masked, device=student_patches.device)
            ibot = pair_cross_entropy(student_patches, teacher_patches, rows, rows, weights.to(rows.device),
                                      center=self.ibot.center.value, **common)
            self.ibot.center.update(_mean_logits(teacher_patches, teacher_scorer))
        else:
            # A mean over zero patches would turn the center into NaN; keep the graph connected for DDP.
            ibot = student_patches.sum() * 0.0

        koleo = sum(self.koleo(x) for x in self._crops(student_features, "student_features"))

        terms = {"dino": dino, "ibot": ibot, "koleo": koleo}
        terms["total"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms
