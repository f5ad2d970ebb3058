"""The SSA objectives ``essa adapt`` runs (config key ``objective``), each an :class:`essa.train.objective.Objective`:

- ``dinov2`` (default): student and EMA teacher, DINO + iBOT + KoLeo on multi-crop views with block masks
  (:class:`essa.train.ssa.SSAModule`); exports and monitors the teacher.
- ``mae``: masked autoencoder (:mod:`essa.ssl.mae`): one random resized crop (``mae.scale``) at
  ``ssl.global_size``, ``mae.mask_ratio`` of the patches hidden per image, the encoder on the visible patches only,
  a light decoder, MSE on the masked patches' (normalised) pixels.
- ``simmim``: SimMIM (:mod:`essa.ssl.simmim`): one random resized crop (``simmim.scale``), square cells of
  ``simmim.mask_patch_size`` px masked with a learned token in the encoder, a linear decoder, L1 on masked pixels.

MAE and SimMIM (:class:`essa.train.mim.ReconstructionModule`) have no teacher: they export and monitor the
student's backbone; their decoder trains with the tuner from the first step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from essa.config import ConfigError
from essa.train.objective import Objective


def head_size(ssl, n_images: int):
    """``ssl`` (an :class:`essa.adaptation.SSLConfig`) with the DINO head's size filled in where it is None, from the
    number of SSA images N, each rounded to a power of two: prototypes N / 16 within [256, 65536] (the reference's
    65,536 from about a million images on); hidden width N / 8 within [512, 2048]; bottleneck N / 4096 within
    [16, 256] (the reference's 256 from about a million images on).

    The bottleneck sets how sharp the teacher is at the start: a fresh head's prototype scores of a unit feature
    spread by about 1 / sqrt(bottleneck), divided by the teacher temperature (0.04): 6.3 for 16, 1.6 for 256. With
    256, a short run's student flattens towards the nearly uniform targets faster than the head learns, and the
    DINO loss settles at ln K (measured on 256 chest X-rays: teacher entropy 5.08 -> 5.49 of ln 256 = 5.55 in 24
    steps, and the same with 4,096 prototypes); with 16 the DINO loss falls below ln K within 16 steps."""
    def power_of_two(x: float, low: int, high: int) -> int:
        return int(min(high, max(low, 2 ** round(math.log2(max(x, 1))))))

    return dataclasses.replace(
        ssl,
        prototypes=ssl.prototypes or power_of_two(n_images / 16, 256, 65536),
        head_hidden=ssl.head_hidden or power_of_two(n_images / 8, 512, 2048),
        head_bottleneck=ssl.head_bottleneck or power_of_two(n_images / 4096, 16, 256),
    )


class DINOv2(Objective):
    name, has_teacher = "dinov2", True

    def sized(self, cfg, n_images):
        # the head sized to the images SSA sees (a resumed run sees the same ones, so gets the same head)
        return dataclasses.replace(cfg, ssl=head_size(cfg.ssl, n_images))

    def unused_parameters(self, cfg) -> bool:
        return bool(cfg.ssl.head_warmup)  # the head warm-up's steps leave the tuner without gradients

    def check(self, cfg, patch_size):
        from essa.train.ssa import crop_sizes

        crop_sizes(cfg, patch_size)  # a bad ssl.curriculum_size fails before any work

    def transform(self, cfg, patch_size, preprocessing):
        from essa.ssl import MultiCropTransform

        ssl = cfg.ssl

        def views(global_size, local):
            return MultiCropTransform(
                n_global=ssl.n_global, n_local=ssl.n_local, global_size=global_size, local_size=local,
                global_scale=tuple(ssl.global_scale), local_scale=tuple(ssl.local_scale), mean=preprocessing.mean,
                std=preprocessing.std,
            )

        from essa.train.ssa import crop_sizes

        full, low = crop_sizes(cfg, patch_size)
        if low is None:
            return views(*full)
        from essa.train.loader import PhasedTransform

        # phase 0 before the switch step, 1 from it on: the stage keys the loader's samples by phase
        # (essa.train.loader.EpochSampler.key_phases, from the module's phase_starts)
        return PhasedTransform([views(*low), views(*full)])

    def collate(self, cfg, patch_size):
        from essa.ssl import collate

        ssl = cfg.ssl
        batch = functools.partial(collate, patch_size=patch_size, n_global=ssl.n_global,
                                  mask_ratio=tuple(ssl.mask_ratio), mask_probability=ssl.mask_probability)
        if not ssl.patch_drop:
            return batch
        from essa.ssl.patch_dropout import collate_kept

        # the kept patches drawn after the masks, from the same generator (a resumed run draws the same)
        return functools.partial(collate_kept, collate=batch, patch_size=patch_size, drop=ssl.patch_drop)

    def module(self, cfg, backbone, iters_per_epoch):
        from essa.train.ssa import SSAModule

        return SSAModule(cfg, backbone, iters_per_epoch=iters_per_epoch)


class _Reconstruction(Objective):
    """What MAE and SimMIM share: one random resized crop per image at ``ssl.global_size``, masks drawn in the
    collate function, a deterministic centre crop for the picture, and :class:`ReconstructionModule`."""

    def options(self, cfg):
        return getattr(cfg, self.name)

    def transform(self, cfg, patch_size, preprocessing):
        from essa.ssl.mim import ReconstructionTransform

        return ReconstructionTransform(cfg.ssl.global_size, scale=tuple(self.options(cfg).scale),
                                       mean=preprocessing.mean, std=preprocessing.std)

    def masks(self, cfg, patch_size):
        """``mask_fn(n, generator=...)`` -> bool (n, H, W) on the patch grid of ``ssl.global_size``."""
        raise NotImplementedError

    def collate(self, cfg, patch_size):
        from essa.ssl.mim import collate_masked

        return functools.partial(collate_masked, mask_fn=self.masks(cfg, patch_size))

    def preview_transform(self, cfg, preprocessing):
        from essa.ssl.mim import CenterTransform

        return CenterTransform(cfg.ssl.global_size, mean=preprocessing.mean, std=preprocessing.std)

    def build(self, cfg, backbone):
        raise NotImplementedError

    def module(self, cfg, backbone, iters_per_epoch):
        from essa.train.mim import ReconstructionModule

        options = self.options(cfg)
        return ReconstructionModule(cfg, self.build(cfg, backbone), iters_per_epoch, name=self.name,
                                    head_lr=options.decoder_lr, decoder_weights=options.decoder_weights,
                                    decoder_key=f"{self.name}.decoder_weights")


class MAE(_Reconstruction):
    name = "mae"

    def masks(self, cfg, patch_size):
        from essa.ssl.mae import random_masks

        grid = cfg.ssl.global_size // patch_size
        return functools.partial(random_masks, grid=(grid, grid), ratio=cfg.mae.mask_ratio)

    def build(self, cfg, backbone):
        from essa.ssl.mae import MAE as Model, MAEDecoder

        mae = cfg.mae
        decoder = MAEDecoder(backbone.embed_dim, backbone.patch_embed.patch_size[0], width=mae.decoder_width,
                             depth=mae.decoder_depth, heads=mae.decoder_heads)
        return Model(backbone, decoder.to(next(backbone.parameters()).device), norm_pix_loss=mae.norm_pix_loss)


class SimMIM(_Reconstruction):
    name = "simmim"

    def check(self, cfg, patch_size):
        from essa.ssl.simmim import mask_cell

        try:
            mask_cell(cfg.ssl.global_size, patch_size, cfg.simmim.mask_patch_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def masks(self, cfg, patch_size):
        from essa.ssl.simmim import cell_masks, mask_cell

        grid = cfg.ssl.global_size // patch_size
        cell = mask_cell(cfg.ssl.global_size, patch_size, cfg.simmim.mask_patch_size)
        return functools.partial(cell_masks, grid=(grid, grid), cell=cell, ratio=cfg.simmim.mask_ratio)

    def build(self, cfg, backbone):
        from essa.ssl.simmim import SimMIM as Model

        return Model(backbone)


#: ``objective`` -> its implementation.
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DINOv2(), MAE(), SimMIM())}


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ConfigError(f"objective={name!r}; valid choices: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
