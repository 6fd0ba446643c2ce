"""Face identification as in the paper's Tab. 4 (train on MS1M-LT, test on MegaFace): rank-1
identification over a gallery with distractors, per pseudo-shot group and per attribute group.

Protocol (docs/identification.md has the full text and the paper's numbers):

* **Similarity**: cosine, i.e. the dot product of L2-normalised embeddings, in float32.
* **Hit** (``gallery_mode="all"``): each probe with at least one *mate* (a gallery image of its
  identity, itself excluded) is one trial; it is a hit when its best mate is strictly more
  similar than every *non-mate* (gallery images of other identities and all distractors).
  ``gallery_mode="megaface"`` (MegaFace challenge 1, Kemelmacher-Shlizerman et al., CVPR 2016):
  each (probe, mate) pair is one trial whose gallery is that one mate plus the distractors;
  it is a hit when the mate is strictly more similar than every distractor. The rank-1 rate
  is hits / trials, pooled over trials. Without a gallery, the probes are their own gallery,
  each probe left out of its own search (FaceScrub + MegaFace: the 3,530 FaceScrub images are
  both the probes and the mates).
* **Ties** (``ties="miss"``, default): an exact tie between a mate and a non-mate is a miss
  (the top-1 is not unambiguously right); a tie between two mates is harmless. So the result
  does not depend on the order of the gallery, the distractors or the chunk size.
  ``ties="hit"`` counts such a tie as a hit instead, as the MegaFace devkit's comparison
  ``mate score >= best distractor score`` does (FaceX-Zoo's Python port of it); exact ties
  arise from duplicated images, e.g. a mate that is also among the distractors.
* **Pseudo-shots** (paper §4, App. D.1): a probe's pseudo-shot count is the number of training
  images whose similarity to it is *greater than* ``threshold`` (0.7), computed with
  embeddings from a reference face model (the paper: ArcFace) or the trained model itself,
  passed as ``shot_probes`` (the probes) and ``train`` (the training set). Groups, inclusive
  integer ranges (Tab. 4's header "> 5; < 5 & > 2; < 2 & > 1; = 0" leaves 2 and 5 in no
  group): many ≥ 6, few 2–5, one = 1, zero = 0 (configurable, see :func:`shot_groups`).
* **Streaming**: the probes are held in memory (P × d); the gallery, distractors and training
  set are read in blocks of ``chunk_size`` rows (memory-mapped ``.npy`` or sliced
  ``.safetensors``, :mod:`oltr.evaluation.vectors`) and compared with blocks of
  ``probe_chunk_size`` probes, keeping only running maxima and counts per probe; the largest
  similarity block is ``probe_chunk_size × chunk_size`` floats, never probes × gallery.
* **Tolerance**: similarities are float32 dot products of unit vectors, accurate to about
  1e-6; two candidates (or a candidate and the threshold) closer than that may be ordered
  differently on another device, BLAS or chunk size — the rules above apply to the computed
  values.

The module is one protocol (about 530 lines: the streamed trials, the pseudo-shot groups and
the protocol object share their checks); the probes' attribute file is read by
:mod:`oltr.evaluation.attributes`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oltr.errors import InputError
from oltr.evaluation.attributes import attribute_values
from oltr.evaluation.vectors import Vectors, as_vectors, check_same_dim, load_labels

GALLERY_MODES = ("all", "megaface")
TIE_RULES = ("miss", "hit")
DEFAULT_THRESHOLD = 0.7
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_PROBE_CHUNK_SIZE = 2048


# --------------------------------------------------------------------------- shot groups


@dataclass(frozen=True)
class ShotGroup:
    """Probes whose pseudo-shot count lies in ``[low, high]`` (inclusive; ``high`` None: no
    upper bound)."""

    name: str
    low: int
    high: int | None

    def contains(self, counts: np.ndarray) -> np.ndarray:
        inside = counts >= self.low
        return inside if self.high is None else inside & (counts <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f">= {self.low}"
        return f"= {self.low}" if self.high == self.low else f"{self.low}-{self.high}"


#: Tab. 4's groups in its column order, with 2 and 5 assigned to "few".
DEFAULT_SHOT_GROUPS: tuple[ShotGroup, ...] = (
    ShotGroup("many", 6, None), ShotGroup("few", 2, 5), ShotGroup("one", 1, 1),
    ShotGroup("zero", 0, 0),
)


def shot_groups(spec: Any = DEFAULT_SHOT_GROUPS) -> tuple[ShotGroup, ...]:
    """Checked pseudo-shot groups from ``ShotGroup``s, ``(name, low, high)`` triples or a
    mapping ``name → (low, high)`` (``high`` None = unbounded), kept in the given order.

    The ranges must partition the counts 0, 1, 2, …: every count in exactly one group.
    Raises :class:`InputError` otherwise (naming the gap or overlap).
    """
    items = spec.items() if isinstance(spec, Mapping) else spec
    groups: list[ShotGroup] = []
    for item in items:
        if isinstance(item, ShotGroup):
            groups.append(item)
            continue
        if isinstance(spec, Mapping):
            name, bounds = item
            item = (name, *bounds)
        if not (isinstance(item, Sequence) and len(item) == 3):
            raise InputError("a shot group is (name, low, high)", value=item)
        name, low, high = item
        if not (isinstance(name, str) and name and _is_int(low) and low >= 0
                and (high is None or (_is_int(high) and high >= low))):
            raise InputError("a shot group is (name, low >= 0, high >= low or None), integers",
                             value=item)
        groups.append(ShotGroup(name, int(low), None if high is None else int(high)))
    names = [group.name for group in groups]
    if len(set(names)) != len(names):
        raise InputError("shot group names must be unique", value=names)
    rule = "shot groups must cover the counts 0, 1, 2, ... exactly once"
    listed = [(g.name, g.low, g.high) for g in groups]
    expected: int | None = 0
    previous = None
    for group in sorted(groups, key=lambda g: g.low):
        if expected is None or group.low < expected:
            raise InputError(f"{rule}: '{previous}' and '{group.name}' overlap", value=listed)
        if group.low > expected:
            gap = f"{expected}" if group.low == expected + 1 else f"{expected}-{group.low - 1}"
            raise InputError(f"{rule}: no group covers {gap}", value=listed)
        expected = None if group.high is None else group.high + 1
        previous = group.name
    if expected is not None:
        raise InputError(f"{rule}: no group covers {expected} and above", value=listed)
    return tuple(groups)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- streaming


def _check_chunk(name: str, value: Any) -> int:
    if not (_is_int(value) and value >= 1):
        raise InputError(f"{name} must be an integer >= 1", value=value)
    return int(value)


def _load_probes(probes: Vectors, device: torch.device) -> torch.Tensor:
    return torch.cat([block for _, block in probes.blocks(DEFAULT_CHUNK_SIZE, device)])


def pseudo_shot_counts(
    probes: Any,
    train: Any,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    probe_chunk_size: int = DEFAULT_PROBE_CHUNK_SIZE,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Pseudo-shot count of each probe (paper §4): ``#{train images t : cos(p, t) > threshold}``.

    ``probes`` (P, d) and ``train`` (N, d): embeddings from the same model (a reference face
    model such as ArcFace, or the trained model), as paths (``.npy`` / ``.safetensors``),
    arrays, tensors or :class:`Vectors`. Streams ``train`` in blocks of ``chunk_size`` rows.
    Returns int64 (P,). Raises :class:`InputError` for bad files, shapes, dimensions, NaN.
    """
    probes_v, train_v = as_vectors(probes, "shot probes"), as_vectors(train, "train")
    check_same_dim(("shot probe", probes_v), ("train", train_v))
    threshold = _check_threshold(threshold)
    chunk_size = _check_chunk("chunk_size", chunk_size)
    probe_chunk_size = _check_chunk("probe_chunk_size", probe_chunk_size)
    device = torch.device(device)
    queries = _load_probes(probes_v, device)
    counts = torch.zeros(len(queries), dtype=torch.int64, device=device)
    for _, block in train_v.blocks(chunk_size, device):
        for p0 in range(0, len(queries), probe_chunk_size):
            similarity = queries[p0:p0 + probe_chunk_size] @ block.t()
            counts[p0:p0 + probe_chunk_size] += (similarity > threshold).sum(dim=1)
    return counts.cpu().numpy()


def _check_threshold(threshold: Any) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not -1.0 <= value <= 1.0:
        raise InputError("the pseudo-shot similarity threshold must be a cosine in [-1, 1]",
                         value=threshold)
    return value


def identification_trials(
    probes: Any,
    probe_labels: Any,
    *,
    gallery: Any = None,
    gallery_labels: Any = None,
    distractors: Any = None,
    gallery_mode: str = "all",
    ties: str = "miss",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    probe_chunk_size: int = DEFAULT_PROBE_CHUNK_SIZE,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-1 identification trials and hits per probe: ``(hits, trials)``, int64 (P,) each.

    ``probes`` (P, d) with integer identities ``probe_labels`` (P,); ``gallery`` (G, d) with
    ``gallery_labels`` (G,), or None: the probes are their own gallery, each left out of its
    own search; ``distractors`` (D, d) without identity, or None. Embeddings as paths
    (``.npy`` / ``.safetensors``), arrays, tensors or :class:`Vectors`; labels as paths or
    integer sequences. ``gallery_mode`` (module docstring): ``"all"`` — one trial per probe
    with a mate, a hit when the best mate beats every non-mate strictly; ``"megaface"`` — one
    trial per (probe, mate), a hit when the mate beats every distractor strictly. With
    ``ties="hit"``, "beats" means "is at least as similar as". A probe without a mate has 0
    trials. Raises :class:`InputError` for bad inputs.
    """
    _check_modes(gallery_mode, ties)
    beats = torch.gt if ties == "miss" else torch.ge
    chunk_size = _check_chunk("chunk_size", chunk_size)
    probe_chunk_size = _check_chunk("probe_chunk_size", probe_chunk_size)
    device = torch.device(device)
    probes_v, labels, gallery_v, gallery_np, distractors_v = _trial_inputs(
        probes, probe_labels, gallery, gallery_labels, distractors)
    leave_one_out = gallery is None
    queries = _load_probes(probes_v, device)
    best_distractor = _best_distractor(queries, distractors_v, chunk_size, probe_chunk_size)
    scan = _GalleryScan(queries, torch.from_numpy(labels).to(device),
                        best_distractor=best_distractor, leave_one_out=leave_one_out,
                        all_mode=gallery_mode == "all", beats=beats)
    gallery_ids = torch.from_numpy(gallery_np).to(device)
    for g0, block in gallery_v.blocks(chunk_size, device):
        for p0 in range(0, len(queries), probe_chunk_size):
            scan.update(p0, probe_chunk_size, g0, block, gallery_ids[g0:g0 + len(block)])
    hits, trials = scan.result()
    return hits.cpu().numpy(), trials.cpu().numpy()


def _trial_inputs(probes: Any, probe_labels: Any, gallery: Any, gallery_labels: Any,
                  distractors: Any) -> tuple[Vectors, np.ndarray, Vectors, np.ndarray,
                                             Vectors | None]:
    """The checked embeddings and labels of :func:`identification_trials`: probes, their
    labels, the gallery (the probes themselves without one) and its labels, the distractors."""
    probes_v = as_vectors(probes, "probe")
    labels = load_labels(probe_labels, "probe")
    _check_length("probe labels", labels, len(probes_v))
    if gallery is None:
        if gallery_labels is not None:
            raise InputError("gallery labels were given without a gallery")
        gallery_v, gallery_np = probes_v, labels
    else:
        if gallery_labels is None:
            raise InputError("the gallery needs its identity labels (gallery_labels)")
        gallery_v = as_vectors(gallery, "gallery")
        gallery_np = load_labels(gallery_labels, "gallery")
        _check_length("gallery labels", gallery_np, len(gallery_v))
    distractors_v = None if distractors is None else as_vectors(distractors, "distractor")
    check_same_dim(("probe", probes_v), ("gallery", gallery_v), ("distractor", distractors_v))
    return probes_v, labels, gallery_v, gallery_np, distractors_v


def _best_distractor(queries: torch.Tensor, distractors: Vectors | None, chunk_size: int,
                     probe_chunk_size: int) -> torch.Tensor:
    """Each probe's highest similarity to a distractor (P,), −inf without distractors."""
    best = torch.full((len(queries),), -math.inf, device=queries.device)
    if distractors is not None:
        for _, block in distractors.blocks(chunk_size, queries.device):
            for p0 in range(0, len(queries), probe_chunk_size):
                similarity = queries[p0:p0 + probe_chunk_size] @ block.t()
                rows = slice(p0, p0 + len(similarity))
                best[rows] = torch.maximum(best[rows], similarity.max(dim=1).values)
    return best


class _GalleryScan:
    """Running per-probe counts and maxima over streamed gallery blocks: mates, the best mate
    and the best non-mate (``gallery_mode="all"``) or the (probe, mate) pairs that beat every
    distractor (``"megaface"``)."""

    def __init__(self, queries: torch.Tensor, probe_ids: torch.Tensor, *,
                 best_distractor: torch.Tensor, leave_one_out: bool, all_mode: bool,
                 beats: Any) -> None:
        n_probes, device = len(queries), queries.device
        self.queries, self.probe_ids = queries, probe_ids
        self.best_distractor, self.leave_one_out = best_distractor, leave_one_out
        self.all_mode, self.beats = all_mode, beats
        minus_inf = torch.full((n_probes,), -math.inf, device=device)
        self.best_mate, self.best_other = minus_inf.clone(), minus_inf.clone()
        self.mates = torch.zeros(n_probes, dtype=torch.int64, device=device)
        self.pair_hits = torch.zeros(n_probes, dtype=torch.int64, device=device)

    def update(self, p0: int, probe_chunk_size: int, g0: int, block: torch.Tensor,
               block_ids: torch.Tensor) -> None:
        """Take the similarities of probes ``p0 …`` to the gallery rows ``g0 …`` (``block``)."""
        device = self.queries.device
        similarity = self.queries[p0:p0 + probe_chunk_size] @ block.t()
        rows = slice(p0, p0 + len(similarity))
        mate = self.probe_ids[rows].unsqueeze(1) == block_ids.unsqueeze(0)
        other = ~mate
        if self.leave_one_out:
            probe_index = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
            gallery_index = torch.arange(g0, g0 + len(block), device=device).unsqueeze(0)
            self_pair = probe_index == gallery_index
            mate &= ~self_pair
            other &= ~self_pair
        self.mates[rows] += mate.sum(dim=1)
        if self.all_mode:
            self.best_mate[rows] = torch.maximum(
                self.best_mate[rows], similarity.masked_fill(~mate, -math.inf).max(dim=1).values)
            self.best_other[rows] = torch.maximum(
                self.best_other[rows],
                similarity.masked_fill(~other, -math.inf).max(dim=1).values)
        else:
            wins = self.beats(similarity, self.best_distractor[rows].unsqueeze(1))
            self.pair_hits[rows] += (wins & mate).sum(dim=1)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hits, trials)`` per probe, int64 (P,)."""
        if self.all_mode:
            trials = (self.mates > 0).long()
            rival = torch.maximum(self.best_other, self.best_distractor)
            hits = (trials.bool() & self.beats(self.best_mate, rival)).long()
            return hits, trials
        return self.pair_hits, self.mates


def _check_modes(gallery_mode: str, ties: str) -> None:
    if gallery_mode not in GALLERY_MODES:
        raise InputError(f"unknown gallery mode (valid: {', '.join(GALLERY_MODES)})",
                         value=gallery_mode)
    if ties not in TIE_RULES:
        raise InputError(f"unknown tie rule (valid: {', '.join(TIE_RULES)})", value=ties)


def _check_length(name: str, array: np.ndarray, expected: int) -> None:
    if len(array) != expected:
        raise InputError(f"{name} have {len(array)} entries but there are {expected} "
                         "embeddings")


# --------------------------------------------------------------------------- the protocol


def _summary(hits: np.ndarray, trials: np.ndarray, members: np.ndarray) -> dict[str, Any]:
    n_hits, n_trials = int(hits[members].sum()), int(trials[members].sum())
    return {
        "rank1": n_hits / n_trials if n_trials else None,
        "hits": n_hits,
        "trials": n_trials,
        "probes": int((members & (trials > 0)).sum()),
    }


def _attribute_figures(hits: np.ndarray, trials: np.ndarray, attributes: Any,
                       labels: np.ndarray) -> dict[str, Any]:
    """``attribute`` (its name), ``attributes`` (value → figures) and
    ``probes_without_attribute`` of :meth:`IdentificationProtocol.evaluate`; None each
    without attributes."""
    if attributes is None:
        return {"attribute": None, "attributes": None, "probes_without_attribute": None}
    name, values = attribute_values(attributes, labels)
    present = sorted({value for value in values if value is not None})
    column = np.array([value if value is not None else "" for value in values], dtype=object)
    return {"attribute": name,
            "attributes": {value: _summary(hits, trials, column == value) for value in present},
            "probes_without_attribute": sum(value is None for value in values)}


class IdentificationProtocol:
    """Face identification benchmark of the paper's Tab. 4 (MegaFace identification rate by
    pseudo-shot group and by attribute), as an object with :meth:`evaluate` (the shape of
    pytorch-ood's ``benchmark/base.py``: settings in the constructor, data in ``evaluate``).

    ``gallery_mode``: ``"all"`` or ``"megaface"``, ``ties``: ``"miss"`` or ``"hit"``
    (:func:`identification_trials`);
    ``threshold``: pseudo-shot similarity threshold (0.7, paper); ``groups``: pseudo-shot
    groups (:func:`shot_groups`; default many ≥ 6, few 2–5, one = 1, zero = 0);
    ``chunk_size`` / ``probe_chunk_size``: rows per streamed block; ``device``: where the
    similarities are computed. Raises :class:`InputError` for a bad setting.
    """

    def __init__(
        self,
        *,
        gallery_mode: str = "all",
        ties: str = "miss",
        threshold: float = DEFAULT_THRESHOLD,
        groups: Any = DEFAULT_SHOT_GROUPS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        probe_chunk_size: int = DEFAULT_PROBE_CHUNK_SIZE,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_modes(gallery_mode, ties)
        self.gallery_mode, self.ties = gallery_mode, ties
        self.threshold = _check_threshold(threshold)
        self.groups = shot_groups(groups)
        self.chunk_size = _check_chunk("chunk_size", chunk_size)
        self.probe_chunk_size = _check_chunk("probe_chunk_size", probe_chunk_size)
        self.device = torch.device(device)

    def evaluate(
        self,
        probes: Any,
        probe_labels: Any,
        *,
        gallery: Any = None,
        gallery_labels: Any = None,
        distractors: Any = None,
        train: Any = None,
        shot_probes: Any = None,
        pseudo_shots: Any = None,
        attributes: Any = None,
        per_probe: bool = False,
    ) -> dict[str, Any]:
        """Rank-1 identification, overall, per pseudo-shot group and per attribute value.

        Embeddings and labels as in :func:`identification_trials`. Pseudo-shot counts come
        from ``train`` (training-set embeddings) compared with ``shot_probes`` (the probes'
        embeddings by the same model; default ``probes``, i.e. the trained model itself), or
        are given directly as ``pseudo_shots`` (P,) non-negative integers; with neither,
        ``groups`` is None. ``attributes``: an attribute file (:func:`read_attributes`), a
        mapping identity → value, or one value (or None) per probe.

        Returns a JSON-able dict: ``rank1`` (hits / trials, a fraction; None without trials),
        ``hits``, ``trials``, ``probes`` (those with at least one trial: behind the rate),
        ``probes_without_mate`` (left out: no gallery image of their identity),
        ``leave_one_out`` (no gallery given: the probes are the gallery), ``gallery`` and
        ``distractors`` (sizes), ``gallery_mode``, ``ties``, ``pseudo_shots``
        (threshold, source, train size; or None), ``groups`` (name → ``min``, ``max``,
        ``rank1``, ``hits``, ``trials``, ``probes``; an empty group's ``rank1`` is None),
        ``attribute`` (its name) and ``attributes`` (value → the same figures) or None,
        ``probes_without_attribute``, and with ``per_probe`` the per-probe ``hits``,
        ``trials``, ``pseudo_shots`` and ``group`` lists.
        """
        labels = load_labels(probe_labels, "probe")
        hits, trials = identification_trials(
            probes, labels, gallery=gallery, gallery_labels=gallery_labels,
            distractors=distractors, gallery_mode=self.gallery_mode, ties=self.ties,
            chunk_size=self.chunk_size, probe_chunk_size=self.probe_chunk_size, device=self.device)
        everyone = np.ones(len(labels), dtype=bool)
        result: dict[str, Any] = {
            "protocol": "face identification, rank-1 (paper Tab. 4)",
            "gallery_mode": self.gallery_mode,
            "ties": self.ties,
            **_summary(hits, trials, everyone),
            "probes_without_mate": int((trials == 0).sum()),
            "leave_one_out": gallery is None,
            "gallery": len(labels) if gallery is None else len(as_vectors(gallery, "gallery")),
            "distractors": 0 if distractors is None else len(
                as_vectors(distractors, "distractor")),
        }
        counts = self._pseudo_shots(probes, len(labels), train, shot_probes, pseudo_shots)
        result.update(self._group_figures(hits, trials, counts, train, shot_probes,
                                          pseudo_shots))
        result.update(_attribute_figures(hits, trials, attributes, labels))
        if per_probe:
            result["per_probe"] = {
                "hits": hits.tolist(),
                "trials": trials.tolist(),
                "pseudo_shots": None if counts is None else counts.tolist(),
                "group": None if counts is None else [
                    next(group.name for group in self.groups if group.contains(count))
                    for count in counts],
            }
        return result

    def _group_figures(self, hits: np.ndarray, trials: np.ndarray, counts: np.ndarray | None,
                       train: Any, shot_probes: Any, given: Any) -> dict[str, Any]:
        """``pseudo_shots`` (where the counts came from) and ``groups`` (the figures per
        pseudo-shot group); both None without counts."""
        if counts is None:
            return {"pseudo_shots": None, "groups": None}
        return {
            "pseudo_shots": {
                "threshold": self.threshold if given is None else None,
                "source": "given" if given is not None else (
                    "train vs probes" if shot_probes is None else "train vs shot_probes"),
                "train": None if train is None else len(as_vectors(train, "train")),
            },
            "groups": {
                group.name: {"min": group.low, "max": group.high,
                             **_summary(hits, trials, group.contains(counts))}
                for group in self.groups
            },
        }

    def _pseudo_shots(self, probes: Any, n_probes: int, train: Any, shot_probes: Any,
                      given: Any) -> np.ndarray | None:
        if given is not None:
            if train is not None or shot_probes is not None:
                raise InputError("give either pseudo_shots or train (+ shot_probes), not both")
            counts = load_labels(given, "pseudo-shot")
            _check_length("pseudo-shot counts", counts, n_probes)
            if (counts < 0).any():
                raise InputError("pseudo-shot counts must be >= 0",
                                 value=int(counts[counts < 0][0]))
            return counts
        if train is None:
            if shot_probes is not None:
                raise InputError("shot_probes needs the training-set embeddings (train)")
            return None
        queries = probes if shot_probes is None else shot_probes
        if shot_probes is not None and len(as_vectors(shot_probes, "shot probe")) != n_probes:
            raise InputError(f"shot_probes have {len(as_vectors(shot_probes, 'shot probe'))} "
                             f"rows but there are {n_probes} probes")
        return pseudo_shot_counts(queries, train, threshold=self.threshold,
                                  chunk_size=self.chunk_size,
                                  probe_chunk_size=self.probe_chunk_size, device=self.device)


def evaluate_identification(
    probes: Any,
    probe_labels: Any,
    *,
    gallery_mode: str = "all",
    ties: str = "miss",
    threshold: float = DEFAULT_THRESHOLD,
    groups: Any = DEFAULT_SHOT_GROUPS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    probe_chunk_size: int = DEFAULT_PROBE_CHUNK_SIZE,
    device: torch.device | str = "cpu",
    **data: Any,
) -> dict[str, Any]:
    """``IdentificationProtocol(settings).evaluate(probes, probe_labels, **data)`` in one call
    (see :class:`IdentificationProtocol` for both)."""
    protocol = IdentificationProtocol(gallery_mode=gallery_mode, ties=ties, threshold=threshold,
                                      groups=groups, chunk_size=chunk_size,
                                      probe_chunk_size=probe_chunk_size, device=device)
    return protocol.evaluate(probes, probe_labels, **data)
