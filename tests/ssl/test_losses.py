"""Each term of DINOv2Loss against a direct loop over the formulas of method.md, on hand-sized tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from essa.ssl.losses import DINOv2Loss

B, K, D, N_GLOBAL, N_LOCAL = 3, 8, 5, 2, 3
TEACHER_TEMP, STUDENT_TEMP = 0.05, 0.1


def cross_entropy(teacher, student, center, teacher_temp):
    """-sum_k softmax((t - c) / T_t)_k log_softmax(s / T_s)_k for one teacher and one student row."""
    p = F.softmax((teacher - center) / teacher_temp, dim=-1)
    return -(p * F.log_softmax(student / STUDENT_TEMP, dim=-1)).sum()


def naive_dino(teacher_crops, student_crops, center, teacher_temp):
    terms = [
        cross_entropy(teacher[b], student[b], center, teacher_temp)
        for i, teacher in enumerate(teacher_crops)
        for j, student in enumerate(student_crops)
        if i != j
        for b in range(len(teacher))
    ]
    return torch.stack(terms).mean()


def naive_ibot(teacher_patches, student_patches, masks, center, teacher_temp):
    """Per crop: mean over its masked patches; then the sum over crops divided by the number of all crops."""
    total, row = torch.tensor(0.0), 0
    for mask in masks:
        m = int(mask.sum())
        if m:
            rows = range(row, row + m)
            ce = [cross_entropy(teacher_patches[r], student_patches[r], center, teacher_temp) for r in rows]
            total = total + torch.stack(ce).mean()
        row += m
    return total / len(masks)


def naive_koleo(x, eps=1e-8):
    x = F.normalize(x, dim=-1)
    dist = torch.cdist(x, x) + torch.diag(torch.full((len(x),), math.inf))
    return -torch.log(dist.min(dim=1).values + eps).mean()


def make_inputs(seed=0, masks=None):
    g = torch.Generator().manual_seed(seed)
    if masks is None:
        masks = torch.zeros(N_GLOBAL * B, 2, 3, dtype=torch.bool)
        masks[0, 0, :2] = True
        masks[2, :, 1] = True
        masks[4, 1] = True
    m = int(masks.sum())
    return dict(
        student_global=torch.randn(N_GLOBAL * B, K, generator=g),
        teacher_global=torch.randn(N_GLOBAL * B, K, generator=g),
        student_local=torch.randn(N_LOCAL * B, K, generator=g),
        student_patches=torch.randn(m, K, generator=g),
        teacher_patches=torch.randn(m, K, generator=g),
        masks=masks,
        student_features=torch.randn(N_GLOBAL * B, D, generator=g),
    )


def crops(x):
    return list(x.split(B))  # crop-major rows: crop c of image b at c * B + b


def test_terms_match_direct_formulas_and_centers_update():
    loss = DINOv2Loss(K)
    x = make_inputs()
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    zero = torch.zeros(K)
    dino = naive_dino(crops(x["teacher_global"]), crops(x["student_global"]) + crops(x["student_local"]), zero,
                      TEACHER_TEMP)
    ibot = naive_ibot(x["teacher_patches"], x["student_patches"], x["masks"], zero, TEACHER_TEMP)
    koleo = sum(naive_koleo(f) for f in crops(x["student_features"]))
    assert torch.allclose(out["dino"], dino, atol=1e-6)
    assert torch.allclose(out["ibot"], ibot, atol=1e-6)
    assert torch.allclose(out["koleo"], koleo, atol=1e-6)
    assert torch.allclose(out["total"], dino + ibot + 0.1 * koleo, atol=1e-6)
    # Centers move after the loss: c = 0.9 * 0 + 0.1 * batch mean of the teacher outputs.
    assert torch.allclose(loss.dino.center.reshape(K), 0.1 * x["teacher_global"].mean(0), atol=1e-7)
    assert torch.allclose(loss.ibot.center.value.reshape(K), 0.1 * x["teacher_patches"].mean(0), atol=1e-7)

    # Second step: the updated centers are subtracted, and move again with momentum 0.9.
    dino_center, ibot_center = loss.dino.center.reshape(K).clone(), loss.ibot.center.value.reshape(K).clone()
    y = make_inputs(seed=1)
    out = loss(teacher_temp=0.07, **y)
    dino = naive_dino(crops(y["teacher_global"]), crops(y["student_global"]) + crops(y["student_local"]),
                      dino_center, 0.07)
    ibot = naive_ibot(y["teacher_patches"], y["student_patches"], y["masks"], ibot_center, 0.07)
    assert torch.allclose(out["dino"], dino, atol=1e-6)
    assert torch.allclose(out["ibot"], ibot, atol=1e-6)
    assert torch.allclose(loss.dino.center.reshape(K), 0.9 * dino_center + 0.1 * y["teacher_global"].mean(0),
                          atol=1e-7)


def test_dino_without_local_crops():
    loss = DINOv2Loss(K)
    x = make_inputs()
    x["student_local"] = None
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    dino = naive_dino(crops(x["teacher_global"]), crops(x["student_global"]), torch.zeros(K), TEACHER_TEMP)
    assert torch.allclose(out["dino"], dino, atol=1e-6)


def test_uniform_outputs_give_log_k():
    # Constant logits: teacher and student softmax are uniform, so every cross-entropy is log K.
    loss = DINOv2Loss(K)
    x = {k: torch.zeros_like(v) if v.dtype != torch.bool else v for k, v in make_inputs().items()}
    x["student_features"] = torch.eye(N_GLOBAL * B)  # keep KoLeo finite (distinct unit vectors)
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    assert out["dino"].item() == pytest.approx(math.log(K), abs=1e-6)
    # 3 of the 6 global crops have masked patches; the other 3 count as 0 (DINOv2's normalisation).
    assert out["ibot"].item() == pytest.approx(math.log(K) * 3 / 6, abs=1e-6)


def test_koleo_by_hand():
    # Unit vectors +-e1, +-e2: each one's nearest neighbour is sqrt(2) away, so KoLeo = -log(sqrt(2)) per crop.
    square = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    loss = DINOv2Loss(K)
    x = make_inputs()
    n = len(square)
    x.update(
        student_global=torch.randn(N_GLOBAL * n, K), teacher_global=torch.randn(N_GLOBAL * n, K),
        student_local=None, masks=torch.zeros(N_GLOBAL * n, 2, 3, dtype=torch.bool),
        student_patches=torch.zeros(0, K), teacher_patches=torch.zeros(0, K),
        student_features=torch.cat([3 * square, square]),  # scale must not matter: features are normalised
    )
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    assert out["koleo"].item() == pytest.approx(2 * -0.5 * math.log(2), abs=1e-6)


def test_no_masked_patch_gives_zero_ibot_and_keeps_center():
    loss = DINOv2Loss(K)
    x = make_inputs(masks=torch.zeros(N_GLOBAL * B, 2, 3, dtype=torch.bool))
    x["student_patches"].requires_grad_(True)
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    assert out["ibot"].item() == 0.0 and out["ibot"].requires_grad
    assert torch.equal(loss.ibot.center.value, torch.zeros(1, K))


def test_weights_gradients_and_state_dict():
    loss = DINOv2Loss(K, dino_weight=0.5, ibot_weight=2.0, koleo_weight=0.0)
    x = make_inputs()
    for key in ("student_global", "teacher_global", "student_patches", "teacher_patches", "student_features"):
        x[key].requires_grad_(True)
    out = loss(teacher_temp=TEACHER_TEMP, **x)
    assert torch.allclose(out["total"], 0.5 * out["dino"] + 2.0 * out["ibot"], atol=1e-6)
    out["total"].backward()
    assert x["student_global"].grad is not None and x["student_patches"].grad is not None
    assert x["teacher_global"].grad is None and x["teacher_patches"].grad is None  # the teacher gets no gradient
    state = loss.state_dict()
    assert set(state) == {"dino.center", "ibot.center.center"}
    assert not torch.equal(state["dino.center"], torch.zeros(1, 1, K))
    fresh = DINOv2Loss(K)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dino.center, loss.dino.center)


def test_float32_under_autocast():
    x = make_inputs()
    expected = DINOv2Loss(K)(teacher_temp=TEACHER_TEMP, **x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOv2Loss(K)(teacher_temp=TEACHER_TEMP, **x)
    for key in expected:
        assert got[key].dtype == torch.float32
        assert torch.allclose(got[key], expected[key], atol=1e-6), key
    # Head outputs in bfloat16 (as under autocast) give float32 terms too.
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOv2Loss(K)(teacher_temp=TEACHER_TEMP, **half)
    assert all(v.dtype == torch.float32 for v in got.values())


def test_errors_name_the_wrong_input():
    loss = DINOv2Loss(K)
    x = make_inputs()
    with pytest.raises(ValueError, match="student_patches"):
        loss(teacher_temp=TEACHER_TEMP, **{**x, "student_patches": x["student_patches"][1:]})
    with pytest.raises(ValueError, match="student_local"):
        loss(teacher_temp=TEACHER_TEMP, **{**x, "student_local": x["student_local"][1:]})
    with pytest.raises(ValueError, match="teacher_global"):
        loss(teacher_temp=TEACHER_TEMP, **{**x, "teacher_global": x["teacher_global"][1:]})
