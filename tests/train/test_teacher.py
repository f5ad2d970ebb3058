import torch

from essa import tuners
from essa.ssl.teacher import ema_pairs, ema_update, make_teacher


def test_teacher_shares_frozen_weights_and_copies_trainable_ones(make_vit, images):
    student = tuners.apply(make_vit(), "apla", r=8)
    teacher = make_teacher(student)
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    frozen = {id(p) for p in student.parameters() if not p.requires_grad}
    assert shared == frozen
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher(images), student.eval()(images))  # teacher == student at the start
    t_params, s_params = ema_pairs(student, teacher)
    assert sum(p.numel() for p in t_params) == tuners.count_parameters(student)[0]
    assert all(torch.equal(t, s) and t is not s for t, s in zip(t_params, s_params))


def test_momentum_update_moves_only_the_copies_by_the_formula(make_vit):
    student = tuners.apply(make_vit(), "apla", r=8)
    teacher = make_teacher(student)
    t_params, s_params = ema_pairs(student, teacher)
    before = [t.clone() for t in t_params]
    frozen_before = {n: p.clone() for n, p in teacher.named_parameters() if not any(p is t for t in t_params)}
    with torch.no_grad():
        for s in s_params:
            s.add_(torch.randn_like(s))
    ema_update(t_params, s_params, 0.9)
    for t, b, s in zip(t_params, before, s_params):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)
    for n, p in teacher.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])
