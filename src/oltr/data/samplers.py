"""Class-aware sampling (Shen et al. 2016), the stage-2 sampler of OLTR (paper §4, docs/method.md).

The epoch samplers are registered by name in :data:`SAMPLERS` (``train.sampler``), each as a
builder ``(labels, train_cfg, *, num_samples, seed, num_replicas, rank)``; the config's allowed
values are its names.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from oltr.errors import InputError
from oltr.registry import Registry


class ClassAwareSampler(Sampler[int]):
    """Draw a class, then ``samples_per_class`` images of it; repeat until ``num_samples``.

    Classes are drawn by cycling through a class list reshuffled at every pass (as the
    original code does), so over an epoch every class gets the same number of groups ±1.
    Within a class, images are taken by cycling through a list reshuffled at every pass, so
    all of a class's images are used before any repeats. Classes without images are skipped.

    The order depends only on ``(seed, epoch)`` (call :meth:`set_epoch` each epoch); unlike
    the original, the cycles restart at every epoch. For distributed training, the global
    sequence of groups is dealt out group by group: rank r takes groups r, r + R, r + 2R, …
    (R = ``num_replicas``), so each rank's stream still consists of whole same-class groups,
    the ranks' positions in the global sequence are disjoint and, together, cover it. Each
    rank yields ``ceil(num_samples / R)`` indices (``num_samples`` defaults to ``len(labels)``).

    ``balance_power`` q softens the balancing: class c receives a share n_c^q / Σ_k n_k^q of the
    epoch's groups (largest-remainder rounding, then shuffled), n_c being its image count.
    q = 0 is class-aware sampling (every class alike), q = 0.5 square-root sampling, q = 1 the
    instance-balanced proportions.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        samples_per_class: int = 4,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        balance_power: float = 0.0,
    ) -> None:
        labels_array = np.asarray(labels)
        if labels_array.ndim != 1 or labels_array.size == 0:
            raise InputError("labels must be a non-empty 1-D sequence", value=labels_array.shape)
        if not np.issubdtype(labels_array.dtype, np.integer):
            raise InputError("labels must be integers", value=str(labels_array.dtype))
        if labels_array.min() < 0:
            raise InputError("training labels must be >= 0 (open images, -1, cannot be sampled)")
        if samples_per_class < 1:
            raise InputError("samples_per_class must be >= 1", value=samples_per_class)
        if num_samples is not None and num_samples < 1:
            raise InputError("num_samples must be >= 1", value=num_samples)
        if not 0.0 <= balance_power <= 1.0:
            raise InputError("balance_power must lie in [0, 1]", value=balance_power)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InputError("need num_replicas >= 1 and 0 <= rank < num_replicas",
                             value=(num_replicas, rank))
        order = np.argsort(labels_array, kind="stable")
        classes, counts = np.unique(labels_array[order], return_counts=True)
        self.classes = classes
        self.balance_power = balance_power
        self.class_counts = counts
        self.class_indices = np.split(order, np.cumsum(counts)[:-1])
        self.samples_per_class = samples_per_class
        self.num_samples = len(labels_array) if num_samples is None else num_samples
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self.samples_per_rank = math.ceil(self.num_samples / num_replicas)
        self.groups_per_rank = math.ceil(self.samples_per_rank / samples_per_class)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_groups(self) -> np.ndarray:
        """This epoch's global sequence of groups, (groups, samples_per_class) dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        num_groups = self.groups_per_rank * self.num_replicas
        num_classes = len(self.classes)
        if self.balance_power == 0.0:
            passes = math.ceil(num_groups / num_classes)
            class_order = np.concatenate([rng.permutation(num_classes) for _ in range(passes)])
            class_order = class_order[:num_groups]
        else:
            class_order = rng.permutation(np.repeat(np.arange(num_classes), self._group_shares(
                num_groups)))
        groups = np.empty((num_groups, self.samples_per_class), dtype=np.int64)
        slots_by_class = np.argsort(class_order, kind="stable")
        slot_counts = np.bincount(class_order, minlength=num_classes)
        for pool, slots in zip(
            self.class_indices, np.split(slots_by_class, np.cumsum(slot_counts)[:-1])
        ):
            need = len(slots) * self.samples_per_class
            if need == 0:
                continue
            cycles = math.ceil(need / len(pool))
            stream = np.concatenate([rng.permutation(pool) for _ in range(cycles)])
            groups[slots] = stream[:need].reshape(len(slots), self.samples_per_class)
        return groups

    def _group_shares(self, num_groups: int) -> np.ndarray:
        """Groups per class ∝ n_c^q, rounded by largest remainder so they sum to num_groups."""
        weights = self.class_counts.astype(np.float64) ** self.balance_power
        exact = num_groups * weights / weights.sum()
        shares = np.floor(exact).astype(np.int64)
        remainder_order = np.argsort(-(exact - shares), kind="stable")
        shares[remainder_order[: num_groups - shares.sum()]] += 1
        return shares

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(positions, indices)``: where each of its samples sits in the epoch's
        global stream (the flattened groups), and which dataset item it is."""
        groups = self.global_groups()
        positions = (np.arange(len(groups))[self.rank :: self.num_replicas, None]
                     * self.samples_per_class + np.arange(self.samples_per_class)).reshape(-1)
        positions = positions[: self.samples_per_rank]
        return positions, groups.reshape(-1)[positions]

    def __iter__(self) -> Iterator[int]:
        return iter(self.stream()[1].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


class InstanceSampler(Sampler[int]):
    """Instance-balanced sampling: every image equally likely, each epoch a fresh permutation
    (the stage-1 sampler of OLTR, paper §3.3), DDP-aware like :class:`ClassAwareSampler`.

    The global stream of an epoch is ``ceil(num_samples / N)`` permutations of the N dataset
    indices drawn from ``numpy.random.default_rng([seed, epoch])`` and concatenated, cut to
    ``num_replicas · ceil(num_samples / num_replicas)`` entries; rank r takes entries r, r + R,
    r + 2R, … (R = ``num_replicas``). The ranks' streams are disjoint positions of one global
    stream, so each image appears once per epoch over all ranks (while ``num_samples <= N``),
    and one process with the same ``seed`` sees the same images as R ranks together. Call
    :meth:`set_epoch` before each epoch (the order depends only on ``(seed, epoch)``, so a
    resumed run sees the same order). ``num_samples`` defaults to the dataset size.
    """

    def __init__(
        self,
        num_items: int,
        *,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if num_items < 1:
            raise InputError("cannot sample from an empty dataset", value=num_items)
        if num_samples is not None and num_samples < 1:
            raise InputError("num_samples must be >= 1", value=num_samples)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InputError("need num_replicas >= 1 and 0 <= rank < num_replicas",
                             value=(num_replicas, rank))
        self.num_items = num_items
        self.num_samples = num_items if num_samples is None else num_samples
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self.samples_per_rank = math.ceil(self.num_samples / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        """This epoch's global index stream, ``num_replicas · samples_per_rank`` entries."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.samples_per_rank * self.num_replicas
        passes = math.ceil(total / self.num_items)
        return np.concatenate([rng.permutation(self.num_items) for _ in range(passes)])[:total]

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's ``(positions, indices)`` in the epoch's global stream."""
        order = self.global_order()
        positions = np.arange(len(order))[self.rank :: self.num_replicas]
        return positions, order[positions]

    def __iter__(self) -> Iterator[int]:
        return iter(self.stream()[1].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


#: ``train.sampler``: the epoch samplers by name. A builder takes the train labels (N,), the
#: config's ``train`` section (for the sampler's own options) and keyword arguments
#: ``num_samples`` (this epoch's global count), ``seed``, ``num_replicas`` and ``rank``, and
#: returns a sampler with ``set_epoch``, ``stream`` (this rank's positions in the epoch's global
#: stream and their indices) and ``__len__`` (the samples of this rank), as the two here.
SAMPLERS: Registry[Callable[..., Any]] = Registry(
    "sampler", unknown="train.sampler must be {names_or}")


@SAMPLERS.register("instance")
def instance_sampler(labels: np.ndarray, train_cfg: Mapping[str, Any], *, num_samples: int,
                     seed: int, num_replicas: int, rank: int) -> InstanceSampler:
    """``instance``: every image alike (:class:`InstanceSampler`); no options."""
    return InstanceSampler(len(labels), num_samples=num_samples, seed=seed,
                           num_replicas=num_replicas, rank=rank)


@SAMPLERS.register("class_aware")
def class_aware_sampler(labels: np.ndarray, train_cfg: Mapping[str, Any], *, num_samples: int,
                        seed: int, num_replicas: int, rank: int) -> ClassAwareSampler:
    """``class_aware``: :class:`ClassAwareSampler` with ``train.samples_per_class`` and
    ``train.balance_power``."""
    return ClassAwareSampler(labels, samples_per_class=train_cfg["samples_per_class"],
                             num_samples=num_samples, seed=seed, num_replicas=num_replicas,
                             rank=rank, balance_power=train_cfg["balance_power"])
