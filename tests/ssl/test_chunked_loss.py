"""The chunked cross-entropies: the same numbers as lightly's DINOLoss / IBOTPatchLoss and as one whole chunk,
the same gradients, and no (rows x prototypes) tensor kept for the backward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

from essa.bench import SavedActivations
from essa.ssl import DINOHead
from essa.ssl.heads import PrototypeLayer
from essa.ssl.losses import DINOv2Loss, pair_cross_entropy

B, K, F_DIM, N_GLOBAL, N_LOCAL = 4, 300, 16, 2, 3
TEMP = 0.05


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(N_GLOBAL * B, 3, 3, generator=g) < 0.4
    masks[1] = False  # a crop without masked patches counts as 0 in the iBOT average
    m = int(masks.sum())
    return dict(
        student_global=torch.randn(N_GLOBAL * B, F_DIM, generator=g),
        teacher_global=torch.randn(N_GLOBAL * B, F_DIM, generator=g),
        student_local=torch.randn(N_LOCAL * B, F_DIM, generator=g),
        student_patches=torch.randn(m, F_DIM, generator=g),
        teacher_patches=torch.randn(m, F_DIM, generator=g),
        masks=masks,
        student_features=torch.randn(N_GLOBAL * B, 8, generator=g),
    )


def _prototypes(seed):
    torch.manual_seed(seed)
    return PrototypeLayer(F_DIM, K)


def test_prototype_layer_scores_as_normalised_weights():
    layer, x = _prototypes(0), torch.randn(5, F_DIM)
    expected = F.linear(x, F.normalize(layer.weight, dim=1))
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(layer.scorer()(x), expected, atol=1e-6)
    head = DINOHead(12, K, hidden_dim=20, bottleneck_dim=F_DIM)
    y = torch.randn(5, 12)
    assert torch.equal(head(y), head.prototypes(head.bottleneck(y)))
    assert torch.allclose(head.bottleneck(y).norm(dim=-1), torch.ones(5), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_pair_cross_entropy_matches_a_loop_in_value_and_gradient(chunk):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, F_DIM, generator=g, requires_grad=True), torch.randn(4, F_DIM, generator=g)
    s_rows, t_rows = torch.tensor([0, 1, 2, 3, 4, 5, 0, 5, 2]), torch.tensor([0, 0, 1, 1, 2, 3, 3, 2, 1])
    weights, center = torch.rand(9, generator=g), torch.randn(1, K, generator=g)
    student, teacher = _prototypes(1), _prototypes(2).requires_grad_(False)

    got = pair_cross_entropy(s, t, s_rows, t_rows, weights, center=center, student_temp=0.1, teacher_temp=TEMP,
                             student_scorer=student.scorer(), teacher_scorer=teacher.scorer(), chunk_size=chunk)
    got.backward()
    grad_s, grad_w = s.grad.clone(), student.weight.grad.clone()
    s.grad = student.weight.grad = None
    loop = sum(
        w * -(F.softmax((teacher(t[j]) - center[0]) / TEMP, -1) * F.log_softmax(student(s[i]) / 0.1, -1)).sum()
        for i, j, w in zip(s_rows, t_rows, weights)
    )
    loop.backward()
    assert torch.allclose(got, loop, atol=1e-5)
    assert torch.allclose(grad_s, s.grad, atol=1e-5)
    assert torch.allclose(grad_w, student.weight.grad, atol=1e-5)


def _lightly_terms(x, student, teacher, dino, ibot):
    """The terms as lightly computes them from whole logits (the implementation before chunking)."""
    def crops(rows):
        return list(rows.split(B))
    t_global, s_global = teacher(x["teacher_global"]), student(x["student_global"])
    d = dino(crops(t_global), crops(s_global) + crops(student(x["student_local"])), teacher_temp=TEMP)
    i = ibot(teacher(x["teacher_patches"]), student(x["student_patches"]), x["masks"], teacher_temp=TEMP)
    k = sum(KoLeoLoss()(f) for f in crops(x["student_features"]))
    return {"dino": d, "ibot": i, "koleo": k}


@pytest.mark.parametrize("chunk", [5, 64, None])
def test_features_with_prototypes_equal_lightly_on_whole_logits_over_two_steps(chunk):
    student, teacher = _prototypes(1), _prototypes(2).requires_grad_(False)
    loss = DINOv2Loss(K, n_global=N_GLOBAL, chunk_size=chunk)
    dino, ibot = DINOLoss(K), IBOTPatchLoss(K)
    for step in range(2):  # the second step subtracts the centers the first one moved
        x = _inputs(seed=step)
        ours = loss(teacher_temp=TEMP, **x, student_prototypes=student.scorer(), teacher_prototypes=teacher.scorer())
        ours["total"].backward()
        grad = student.weight.grad.clone()
        student.weight.grad = None
        ref = _lightly_terms(x, student, teacher, dino, ibot)
        (ref["dino"] + ref["ibot"] + 0.1 * ref["koleo"]).backward()
        for key in ref:
            assert torch.allclose(ours[key], ref[key], atol=1e-5), (step, key)
        assert torch.allclose(grad, student.weight.grad, atol=1e-5, rtol=1e-4)
        student.weight.grad = None
        assert torch.allclose(loss.dino.center, dino.center, atol=1e-6)
        assert torch.allclose(loss.ibot.center.value, ibot.center.value, atol=1e-6)


def test_chunks_keep_no_rows_by_prototypes_tensor_for_the_backward():
    rows, k = 256, 4096
    student = PrototypeLayer(F_DIM, k)
    teacher = PrototypeLayer(F_DIM, k).requires_grad_(False)
    s, t = torch.randn(rows, F_DIM, requires_grad=True), torch.randn(rows, F_DIM)
    idx, w = torch.arange(rows), torch.full((rows,), 1.0 / rows)

    def kept(chunk):
        with SavedActivations(student.parameters()) as saved:
            pair_cross_entropy(s, t, idx, idx, w, center=torch.zeros(1, k), student_temp=0.1, teacher_temp=TEMP,
                               student_scorer=student.scorer(), teacher_scorer=teacher.scorer(), chunk_size=chunk)
        return saved.mib

    one = rows * k * 4 / 2**20  # MiB of one float32 (rows x prototypes) tensor
    assert kept(None) >= 2 * one  # log-probabilities and teacher probabilities
    assert kept(32) < 0.1 * one


def test_under_autocast_terms_stay_float32_and_close():
    student, teacher = _prototypes(1), _prototypes(2).requires_grad_(False)
    x = _inputs()
    expected = DINOv2Loss(K)(teacher_temp=TEMP, **x, student_prototypes=student.scorer(),
                             teacher_prototypes=teacher.scorer())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOv2Loss(K)(teacher_temp=TEMP, **x, student_prototypes=student.scorer(),
                            teacher_prototypes=teacher.scorer())
    for key in expected:
        assert got[key].dtype == torch.float32
        # the prototype scores run in bfloat16 (as the head under autocast): about 3 significant digits
        assert math.isclose(got[key].item(), expected[key].item(), rel_tol=2e-2), key
    assert got["dino"] != expected["dino"]  # ... and they did run in bfloat16, not float32
