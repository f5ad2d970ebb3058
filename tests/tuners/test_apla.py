import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from essa import tuners
from essa.tuners.apla import APLAProjection, choose_rows


def _rows(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("attn.proj.rows")}


def test_whole_projection_trains_weight_and_bias_of_every_block(make_vit):
    model = tuners.apply(make_vit(), "apla")
    expected = {f"blocks.{i}.attn.proj.{p}" for i in range(4) for p in ("weight", "bias")}
    assert set(tuners.trainable_parameters(model)) == expected
    assert all(isinstance(b.attn.proj, nn.Linear) for b in model.blocks)  # nothing added


def test_row_subset_parameters_and_blocks_option(make_vit):
    model = tuners.apply(make_vit(), "apla", r=16, blocks=[1, 3])
    assert set(tuners.trainable_parameters(model)) == {
        f"blocks.{i}.attn.proj.{p}" for i in (1, 3) for p in ("weight_rows", "bias_rows")
    }
    assert tuners.count_parameters(model)[0] == 2 * (16 * 192 + 16)
    assert isinstance(model.blocks[0].attn.proj, nn.Linear)
    assert isinstance(model.blocks[1].attn.proj, APLAProjection)
    # the attention module itself is untouched: timm's fused attention stays in use
    assert type(model.blocks[1].attn).__name__ == "Attention" and model.blocks[1].attn.fused_attn


def test_blocks_last_n_is_the_models_last_n_blocks_whatever_its_depth(make_vit):
    by_name = tuners.apply(make_vit(), "apla", blocks="last:2")
    by_index = tuners.apply(make_vit(), "apla", blocks=[2, 3])
    assert set(tuners.trainable_parameters(by_name)) == set(tuners.trainable_parameters(by_index)) == {
        f"blocks.{i}.attn.proj.{p}" for i in (2, 3) for p in ("weight", "bias")}


def test_rows_are_seeded_sorted_distinct_and_differ_per_block(make_vit):
    a = _rows(tuners.apply(make_vit(), "apla", r=32, seed=7))
    b = _rows(tuners.apply(make_vit(), "apla", r=32, seed=7))
    c = _rows(tuners.apply(make_vit(), "apla", r=32, seed=8))
    assert len(a) == 4
    for name, rows in a.items():
        assert rows.dtype == torch.long and rows.shape == (32,)
        assert torch.equal(rows, rows.sort().values) and rows.unique().numel() == 32
        assert 0 <= rows.min() and rows.max() < 192
        assert torch.equal(rows, b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)
    per_block = list(a.values())
    assert all(not torch.equal(per_block[0], other) for other in per_block[1:])


def test_rows_are_identical_across_processes():
    code = "from essa.tuners.apla import choose_rows; print(choose_rows(768, 64, 3, 5).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == choose_rows(768, 64, 3, 5).tolist()


def test_equal_to_base_at_init_and_after_merge(make_vit, images):
    base = make_vit().eval()
    model = tuners.apply(copy.deepcopy(base), "apla", r=24).eval()
    with torch.no_grad():
        assert torch.equal(model(images), base(images))
        for p in tuners.trainable_parameters(model).values():
            p.add_(torch.randn_like(p) * 0.05)
        tuned = model(images)
        merged = tuners.merge(model).eval()
        assert (merged(images) - tuned).abs().max() <= 1e-5
    assert not any(isinstance(m, APLAProjection) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())


def test_adamw_changes_only_the_chosen_rows(make_vit, images):
    base = make_vit()
    model = tuners.apply(copy.deepcopy(base), "apla", r=8, seed=1)
    rows = _rows(model)
    opt = torch.optim.AdamW(tuners.trainable_parameters(model).values(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(images).pow(2).mean().backward()
        opt.step()
    merged = tuners.merge(model).state_dict()
    for name, before in base.state_dict().items():
        after = merged[name]
        if name.endswith("attn.proj.weight") or name.endswith("attn.proj.bias"):
            chosen = rows[name.rsplit(".", 1)[0] + ".rows"]
            frozen = torch.ones(before.shape[0], dtype=torch.bool)
            frozen[chosen] = False
            assert torch.equal(after[frozen], before[frozen]), name
            assert (after[chosen] != before[chosen]).flatten(1).any(1).all() if after.dim() == 2 else \
                (after[chosen] != before[chosen]).all(), name
        else:
            assert torch.equal(after, before), name


def test_row_gradient_equals_full_gradient_restricted_to_rows(make_vit, images):
    full = tuners.apply(make_vit(), "apla")  # whole W_O: plain autograd through nn.Linear
    subset = tuners.apply(make_vit(), "apla", r=20, seed=3)
    full(images).sin().sum().backward()
    subset(images).sin().sum().backward()
    for i, block in enumerate(subset.blocks):
        proj, reference = block.attn.proj, full.blocks[i].attn.proj
        assert proj.weight.grad is None  # the frozen d x d weight gets no gradient
        assert (proj.weight_rows.grad - reference.weight.grad[proj.rows]).abs().max() <= 1e-5
        assert (proj.bias_rows.grad - reference.bias.grad[proj.rows]).abs().max() <= 1e-5


def test_backward_computes_only_r_rows_of_the_weight_gradient():
    torch.manual_seed(0)
    tokens, d, r = 50, 64, 8
    layer = APLAProjection(nn.Linear(d, d), choose_rows(d, r, 0, 0))
    x = torch.randn(tokens, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    forward = grad_input = 2 * tokens * d * d
    weight_grad = 2 * tokens * r * d  # a full-layer backward would cost 2 * tokens * d * d here
    assert counter.get_total_flops() == forward + grad_input + weight_grad


def test_rows_survive_deepcopy_device_and_dtype_moves(make_vit, images):
    model = tuners.apply(make_vit(), "apla", r=16, seed=5)
    rows = _rows(model)
    clone = copy.deepcopy(model)
    assert all(torch.equal(b, rows[n]) for n, b in _rows(clone).items())
    assert torch.equal(clone.eval()(images), model.eval()(images))
    clone(images).sum().backward()  # the copy's rows parameters are its own leaves
    assert clone.blocks[0].attn.proj.weight_rows.grad is not None
    assert model.blocks[0].attn.proj.weight_rows.grad is None

    moved = copy.deepcopy(model).to(torch.float64)
    assert all(b.dtype == torch.long and torch.equal(b, rows[n]) for n, b in _rows(moved).items())
    on_meta = copy.deepcopy(model).to("meta")  # the rows are module state: they move with the module
    assert all(b.device.type == "meta" for b in _rows(on_meta).values())
    if torch.cuda.is_available():
        on_gpu = copy.deepcopy(model).cuda()
        assert all(torch.equal(b.cpu(), rows[n]) for n, b in _rows(on_gpu).items())
        assert (on_gpu(images.cuda()).cpu() - model(images)).abs().max() <= 1e-4


def test_mixed_precision_computes_in_bf16_and_keeps_fp32_gradients():
    torch.manual_seed(0)
    layer = APLAProjection(nn.Linear(64, 64), choose_rows(64, 8, 0, 0))
    x = torch.randn(4, 10, 64)
    layer(x).square().sum().backward()
    reference = layer.weight_rows.grad.clone()
    layer.weight_rows.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grad = layer.weight_rows.grad
    assert grad.dtype == torch.float32
    assert torch.allclose(grad, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"r": 193}, "r=193 exceeds the projection width d=192; valid: 1..192"),
        ({"r": 0}, "r=0 must be a positive integer"),
        ({"r": -4}, "r=-4 must be a positive integer"),
        ({"blocks": [0, 4]}, r"blocks=\[0, 4\] .* valid indices: 0..3"),
        ({"blocks": "last:5"}, r"blocks='last:5': .* 'last:N' with N in 1..4 \(the model's depth\)"),
        ({"blocks": "last:0"}, r"N in 1..4"),
        ({"blocks": "first:2"}, r"blocks='first:2': give a list of block indices or 'last:N'"),
        ({"rows": 3}, "has no option 'rows'; valid options: r, blocks, seed"),
    ],
)
def test_bad_options_name_the_value_and_the_valid_range(make_vit, options, fragment):
    with pytest.raises(tuners.TunerError, match=fragment):
        tuners.apply(make_vit(), "apla", **options)
