"""The pieces wired as the training loop will wire them: one SSA step on a tiny ViT."""

import copy

import torch
from PIL import Image
from torch import nn

from essa import backbones
from essa.ssl import DINOHead, DINOv2Loss, MultiCropTransform, collate, forward_masked, ssa_schedules

K = 16


def test_one_step_of_the_objective():
    torch.manual_seed(0)
    student = backbones.create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, dynamic_img_size=True)
    head = DINOHead(student.embed_dim, out_dim=K, hidden_dim=32, bottleneck_dim=8)
    mask_token = nn.Parameter(torch.zeros(student.embed_dim))
    teacher, teacher_head = copy.deepcopy(student).requires_grad_(False), copy.deepcopy(head).requires_grad_(False)
    loss_fn = DINOv2Loss(K)
    schedules = ssa_schedules(2, 1, lr=1e-3, freeze_prototypes="1 epoch")

    transform = MultiCropTransform(n_local=2, global_size=32, local_size=16)
    images = [Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()) for _ in range(4)]
    batch = collate([transform(im) for im in images], patch_size=8, generator=torch.Generator().manual_seed(0))
    masks, prefix = batch["masks"], student.num_prefix_tokens
    assert masks.any()

    with torch.no_grad():
        t_tokens = teacher.forward_features(batch["global_crops"])
        t_cls = teacher_head(t_tokens[:, 0])
        t_patches = teacher_head(t_tokens[:, prefix:][masks.flatten(1)])
    s_tokens = forward_masked(student, batch["global_crops"], masks, mask_token)
    s_local = student.forward_features(batch["local_crops"])[:, 0]
    terms = loss_fn(
        teacher_temp=schedules.teacher_temp[0],
        student_global=head(s_tokens[:, 0]),
        teacher_global=t_cls,
        student_local=head(s_local),
        student_patches=head(s_tokens[:, prefix:][masks.flatten(1)]),
        teacher_patches=t_patches,
        masks=masks,
        student_features=s_tokens[:, 0],
    )
    assert set(terms) == {"dino", "ibot", "koleo", "total"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    assert terms["dino"] > 0 and terms["ibot"] > 0
    terms["total"].backward()
    if schedules.freeze_prototypes[0]:
        head.cancel_last_layer_gradients()
    assert head.prototypes.weight.grad is None
    assert mask_token.grad is not None and mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in student.blocks.parameters())
    assert not loss_fn.dino.center.eq(0).all() and not loss_fn.ibot.center.value.eq(0).all()
