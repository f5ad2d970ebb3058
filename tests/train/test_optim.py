"""AdamW parameter groups: which parameters get weight decay."""

import torch

from essa import backbones, tuners
from essa.train.optim import decay_groups


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_weight_decay_on_weight_matrices_only():
    torch.manual_seed(0)
    model = backbones.create("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             num_classes=3)
    decay, spared = decay_groups(model)
    assert (decay["apply_decay"], spared["apply_decay"], spared["weight_decay"]) == (True, False, 0.0)
    assert _names(model, decay) == ["blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
                                    "blocks.0.mlp.fc2.weight", "head.weight", "patch_embed.proj.weight"]
    # biases, norms, the class token and the position embedding (timm's no_weight_decay() names) are spared
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.norm1.weight"} <= set(_names(model, spared))
    assert model.no_weight_decay() - {"dist_token", "reg_token"} <= set(_names(model, spared))
    # VPT's prompts are tokens: spared; frozen parameters are in neither group (the classifier head trains)
    tuners.apply(model, "vpt", tokens=2, deep=True)
    decay, spared = decay_groups(model)
    assert _names(model, decay) == ["head.weight"] and _names(model, spared) == ["blocks.0.vpt_prompts", "head.bias"]
    # (name, parameter) pairs, as the SSA stage passes them, follow the same rule
    pairs = [("student.backbone.pos_embed", torch.nn.Parameter(torch.zeros(1, 5, 8))),
             ("student.mask_token", torch.nn.Parameter(torch.zeros(1, 8))),
             ("head.mlp.0.weight", torch.nn.Parameter(torch.zeros(8, 8)))]
    decay, spared = decay_groups(pairs)
    assert [p.shape for p in decay["params"]] == [(8, 8)] and len(spared["params"]) == 2
