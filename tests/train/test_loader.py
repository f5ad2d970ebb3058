import torch

from essa.train.loader import EpochSampler, ResumableLoader, SeededDataset, mix_seed


class _Noisy(torch.utils.data.Dataset):
    """Item i plus a random draw: equal across runs only if the draw is seeded per item."""

    def __len__(self):
        return 23

    def __getitem__(self, i):
        return i + torch.rand(1).item()


def _loader(seed=0, workers=0):
    data = SeededDataset(_Noisy(), seed=seed)
    return ResumableLoader(data, EpochSampler(23, seed=seed, batch_size=4), num_workers=workers)


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [batch for batch in loader]


def test_mix_seed_is_stable_and_sensitive():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, e, i) for e in range(10) for i in range(100)}) == 1000
    assert 0 <= mix_seed(2**70, -5) < 2**63


def test_epochs_are_seeded_shuffles_without_repeats():
    loader = _loader()
    first, again, second = _epoch(loader, 0), _epoch(loader, 0), _epoch(loader, 1)
    assert len(first) == 5  # 23 items, batch 4, drop_last
    idx = [i for _, keys in first for i in keys[1].tolist()]
    assert len(set(idx)) == 20
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # augmentation is reproducible too
    assert [k[1].tolist() for _, k in first] != [k[1].tolist() for _, k in second]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    reference = _epoch(_loader(), 2)
    interrupted = _loader()
    interrupted.sampler.set_epoch(2)
    it = iter(interrupted)
    next(it), next(it)
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 2}

    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # what Lightning does at the start of the resumed epoch
    rest = list(resumed)
    assert len(rest) == 3 and resumed.state_dict() == {"epoch": 2, "batches": 5}
    for (x, kx), (y, ky) in zip(rest, reference[2:]):
        assert torch.equal(x, y) and torch.equal(kx[1], ky[1])
    assert len(_epoch(resumed, 3)) == 5  # the next epoch is whole again


def test_same_batches_with_worker_processes():
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_epoch(_loader(), 1), _epoch(_loader(workers=2), 1)))


def test_ranks_split_an_epoch_without_overlap():
    shards = [EpochSampler(23, seed=3, batch_size=2, num_replicas=2, rank=r) for r in (0, 1)]
    keys = [[i for _, i in s] for s in shards]
    assert len(keys[0]) == len(keys[1]) == 10
    assert not set(keys[0]) & set(keys[1])
