import copy

import torch
import torch.nn.functional as F
from torch import nn

from essa.ssl.heads import DINOHead


def make_head(**kwargs):
    torch.manual_seed(0)
    args = dict(in_dim=16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    args.update(kwargs)
    return DINOHead(**args)


def test_layers_and_shapes():
    head = make_head()
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [32, 32, 8]
    assert head.prototypes.weight.shape == (10, 8)
    assert [type(m) for m in make_head(nlayers=1).mlp] == [nn.Linear]
    assert head(torch.randn(5, 16)).shape == (5, 10)
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 10)


def test_output_is_cosine_similarity_to_prototypes():
    head = make_head()
    x = torch.randn(5, 16)
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(head.prototypes.weight, dim=-1).T
    out = head(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.abs().max() <= 1 + 1e-6


def test_prototypes_equal_weight_norm_with_unit_g():
    head = make_head()
    ref = nn.Linear(8, 10, bias=False)
    ref.weight.data.copy_(head.prototypes.weight.data)
    ref = nn.utils.parametrizations.weight_norm(ref)
    ref.parametrizations.weight.original0.data.fill_(1.0)
    z = F.normalize(torch.randn(7, 8), dim=-1)
    assert torch.allclose(head.prototypes(z), ref(z), atol=1e-6)


def test_cancel_last_layer_gradients_freezes_prototypes_only():
    head = make_head()
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1)
    before = copy.deepcopy(head.state_dict())
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    assert head.prototypes.weight.grad is not None
    head.cancel_last_layer_gradients()
    assert head.prototypes.weight.grad is None
    assert all(p.grad is not None for p in head.mlp.parameters())
    optimizer.step()
    assert torch.equal(head.prototypes.weight, before["prototypes.weight"])
    assert not torch.equal(head.mlp[0].weight, before["mlp.0.weight"])
    assert head.prototypes.weight.requires_grad


def test_deepcopy_after_forward():
    # The EMA teacher is a deep copy of the student, made after the student ran (lightly's weight_norm head fails).
    head = make_head()
    x = torch.randn(3, 16)
    out = head(x)
    assert torch.equal(copy.deepcopy(head)(x), out)
