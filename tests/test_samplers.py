from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from oltr.data.samplers import ClassAwareSampler
from oltr.errors import InputError

# long-tailed toy labels: class 0: 100 images, 1: 10, 2: 3, 3: none, 4: 1
LABELS = np.array([0] * 100 + [1] * 10 + [2] * 3 + [4] * 1)
np.random.default_rng(0).shuffle(LABELS)


def _groups(indices: list[int], n: int) -> np.ndarray:
    return np.asarray(indices).reshape(-1, n)


def test_every_class_gets_the_same_number_of_groups():
    sampler = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=400)
    assert len(sampler) == 400
    groups = LABELS[_groups(list(sampler), 4)]
    assert (groups == groups[:, :1]).all()  # each group of 4 shares a class
    assert Counter(groups[:, 0].tolist()) == {0: 25, 1: 25, 2: 25, 4: 25}  # class 3 skipped


def test_class_counts_differ_by_at_most_one_group():
    sampler = ClassAwareSampler(LABELS, samples_per_class=2, num_samples=2 * 103)
    counts = Counter(LABELS[list(sampler)[::2]].tolist())
    assert sum(counts.values()) == 103 and max(counts.values()) - min(counts.values()) <= 1


def test_classes_are_drawn_in_shuffled_passes():
    sampler = ClassAwareSampler(LABELS, samples_per_class=1, num_samples=40)
    classes = LABELS[list(sampler)].reshape(10, 4)
    assert all(sorted(row) == [0, 1, 2, 4] for row in classes.tolist())


def test_images_of_a_class_are_all_used_before_any_repeats():
    sampler = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=400)
    indices = np.asarray(list(sampler))
    of_class_1 = indices[LABELS[indices] == 1]  # 100 draws from 10 images
    members = set(np.flatnonzero(LABELS == 1).tolist())
    for start in range(0, 100, 10):
        assert set(of_class_1[start : start + 10].tolist()) == members


def test_length_is_num_samples_even_when_not_a_multiple_of_the_group():
    sampler = ClassAwareSampler(LABELS, samples_per_class=4, num_samples=10)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 10
    assert len(ClassAwareSampler(LABELS)) == len(LABELS)


def test_deterministic_per_seed_and_epoch():
    a = ClassAwareSampler(LABELS, seed=3)
    b = ClassAwareSampler(LABELS, seed=3)
    assert list(a) == list(b) == list(a)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ClassAwareSampler(LABELS, seed=4)) != list(ClassAwareSampler(LABELS, seed=3))
    assert list(ClassAwareSampler(torch.tensor(LABELS), seed=3)) == list(ClassAwareSampler(LABELS, seed=3))


@pytest.mark.parametrize("num_samples", [240, 250])
def test_distributed_ranks_are_disjoint_slices_of_the_global_sequence(num_samples):
    replicas, n = 3, 4
    ranks = [
        ClassAwareSampler(LABELS, samples_per_class=n, num_samples=num_samples, seed=1,
                          num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    for sampler in ranks:
        sampler.set_epoch(2)
    streams = [list(s) for s in ranks]
    per_rank = -(-num_samples // replicas)
    assert all(len(s) == len(stream) == per_rank for s, stream in zip(ranks, streams))
    global_groups = ranks[0].global_groups()
    for r, stream in enumerate(streams):
        own = global_groups[r::replicas].reshape(-1)[:per_rank]  # groups r, r + R, …
        assert stream == own.tolist()
        whole_groups = LABELS[np.asarray(stream[: len(stream) // n * n])].reshape(-1, n)
        assert (whole_groups == whole_groups[:, :1]).all()
    if num_samples % (replicas * n) == 0:  # then the ranks cover the global sequence exactly
        interleaved = np.stack([_groups(s, n) for s in streams], axis=1).reshape(-1)
        single = ClassAwareSampler(LABELS, samples_per_class=n, num_samples=num_samples, seed=1)
        single.set_epoch(2)
        assert interleaved.tolist() == list(single)


def test_bad_arguments():
    with pytest.raises(InputError, match=">= 0"):
        ClassAwareSampler([0, 1, -1])
    with pytest.raises(InputError, match="non-empty"):
        ClassAwareSampler([])
    with pytest.raises(InputError, match="samples_per_class"):
        ClassAwareSampler([0, 1], samples_per_class=0)
    with pytest.raises(InputError, match="rank"):
        ClassAwareSampler([0, 1], num_replicas=2, rank=2)
    with pytest.raises(InputError, match="integers"):
        ClassAwareSampler([0.5, 1.0])


def test_balance_power_allocates_groups_by_count_power():
    # counts 400, 100, 4 → q = 0.5: weights 20, 10, 2 → 64 groups split 40 / 20 / 4 exactly.
    labels = np.repeat([0, 1, 2], [400, 100, 4])
    sampler = ClassAwareSampler(labels, samples_per_class=4, num_samples=256, seed=3,
                                balance_power=0.5)
    groups = sampler.global_groups()
    group_classes = labels[groups[:, 0]]
    assert (labels[groups] == group_classes[:, None]).all()  # groups stay within one class
    assert np.bincount(group_classes, minlength=3).tolist() == [40, 20, 4]
    # q = 1 follows the instance proportions (400:100:4 of 64 groups → 51 / 13 / 0, rounded).
    sampler = ClassAwareSampler(labels, samples_per_class=4, num_samples=256, seed=3,
                                balance_power=1.0)
    assert np.bincount(labels[sampler.global_groups()[:, 0]], minlength=3).tolist() == [51, 13, 0]


def test_balance_power_out_of_range_is_refused():
    with pytest.raises(InputError, match="balance_power"):
        ClassAwareSampler([0, 1], balance_power=1.5)


def test_instance_sampler_ranks_split_one_global_permutation():
    from oltr.data.samplers import InstanceSampler

    single = InstanceSampler(10, seed=3)
    single.set_epoch(2)
    ranks = [InstanceSampler(10, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    streams = [list(sampler) for sampler in ranks]
    assert sorted(streams[0] + streams[1]) == list(range(10))  # disjoint, together every image
    assert [streams[i % 2][i // 2] for i in range(10)] == list(single)
    again = InstanceSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == list(single)
    again.set_epoch(3)
    assert list(again) != list(single)
    longer = InstanceSampler(4, num_samples=10, seed=0)
    assert len(longer) == 10 and sorted(list(longer)[:4]) == [0, 1, 2, 3]


def test_streams_give_each_sample_its_global_position():
    """Two ranks' streams are disjoint positions of one global stream, and at each position
    the item a single process draws there."""
    from oltr.data.samplers import InstanceSampler

    labels = np.repeat(np.arange(3), [7, 3, 2])
    makers = (lambda world, rank: ClassAwareSampler(labels, samples_per_class=2, num_samples=12,
                                                    seed=1, num_replicas=world, rank=rank),
              lambda world, rank: InstanceSampler(12, seed=1, num_replicas=world, rank=rank))
    for make in makers:
        streams = [make(2, r).stream() for r in range(2)]
        positions = np.concatenate([p for p, _ in streams])
        assert sorted(positions.tolist()) == list(range(12))
        order = np.empty(12, dtype=np.int64)
        order[positions] = np.concatenate([i for _, i in streams])
        single_positions, single = make(1, 0).stream()
        assert single_positions.tolist() == list(range(12))
        assert single.tolist() == order.tolist()
