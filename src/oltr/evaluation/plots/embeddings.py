"""Figures about the learned representation: 2-D maps of the direct features vs the
meta-embeddings (4, paper Fig. 3) and the memory concepts behind a few test images (5, Fig. 7)."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oltr import metrics
from oltr.errors import InputError
from oltr.evaluation.plots.common import (
    GROUP_MARKERS,
    class_name_list,
    head_to_tail,
    labels_in_range,
    matrix,
    new_figure,
    plot_text,
    same_length,
    save_png,
    shot_groups_of,
    vector,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: At most this many points go into the 2-D embedding (a seeded random subsample).
MAX_EMBEDDING_POINTS = 2000


# --------------------------------------------------------------------------- 4. embeddings


def embed_2d(vectors: Any, *, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D embedding of ``vectors`` (N, d) → ((N, 2), name of the method used).

    ``method``: ``"umap"`` (the ``umap-learn`` package, ``UMAP(random_state=seed)``),
    ``"tsne"`` (scikit-learn's ``TSNE``, seeded, PCA-initialised, after ``PCA`` to 50
    dimensions where d > 50; perplexity min(30, (N − 1)/3)), or ``"auto"``: UMAP where
    ``umap`` is installed, else t-SNE. Fewer than 5 points, or a single distinct vector:
    PCA (padded with zeros) — t-SNE needs more. Raises ``InputError`` for an unknown method
    or when scikit-learn is missing.
    """
    x = matrix("vectors", vectors)
    n, d = x.shape
    if method not in ("auto", "umap", "tsne"):
        raise InputError("embedding method must be auto, umap or tsne", value=method)
    if n == 0:
        raise InputError("nothing to embed: no vector")
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:  # pragma: no cover - scikit-learn is a dev dependency
        raise InputError("the embedding plot needs scikit-learn (pip install scikit-learn)") \
            from None
    centred = x - x.mean(axis=0)
    if n < 5 or not np.any(np.abs(centred) > 1e-12 * (1 + np.abs(x).max())):
        out = np.zeros((n, 2))
        if n > 1 and d > 0 and np.abs(centred).max() > 0:
            parts = min(2, n, d)
            out[:, :parts] = PCA(n_components=parts, random_state=seed).fit_transform(x)
        return out, "PCA"
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise InputError("method 'umap' needs the umap-learn package") from None
        else:
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
            return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP"
    if d > 50:
        x = PCA(n_components=min(50, n), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "t-SNE"


def plot_embeddings(
    path: str | os.PathLike[str],
    features: Any,
    labels: Any,
    meta: Any | None = None,
    *,
    train_counts: Any | None = None,
    class_names: Sequence[str] | None = None,
    max_points: int = MAX_EMBEDDING_POINTS,
    seed: int = 0,
    method: str = "auto",
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> Path:
    """Paper Fig. 3: 2-D embedding (:func:`embed_2d`) of the direct features v_direct (N, d)
    and, beside it, of the meta-embeddings v_meta (N, d) of the same images (rows aligned with
    ``labels`` (N,)); for a model without meta-embedding (``meta`` None) the direct panel only.

    At most ``max_points`` images, a seeded random subsample, the same in both panels. Colour
    = class (a legend of names up to 10 classes; beyond, a colour bar of the class's train
    frequency rank, 0 = head); marker = shot group from ``train_counts`` (K,) (○ many, △
    medium, ★ few, drawn on top with a black edge), all ○ without counts (K is then the
    number of ``class_names``, else the largest label + 1). Raises
    ``InputError`` for mismatched shapes or labels outside ``0 … K − 1``.
    """
    direct = matrix("features", features)
    labels = vector("labels", labels, kind="int")
    same_length(features=direct, labels=labels)
    panels = [("direct features v_direct", direct)]
    if meta is not None:
        panels.append(("meta-embeddings v_meta", matrix("meta", meta, rows=len(direct))))
    groups, rank = _groups_and_ranks(train_counts, class_names, labels, many_threshold,
                                     few_threshold, strict)
    k = len(groups)
    labels_in_range("labels", labels, k, allow_unknown=False)
    names = class_name_list(class_names, k)
    if max_points < 1:
        raise InputError("max_points must be >= 1", value=max_points)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = (np.sort(rng.choice(len(labels), size=max_points, replace=False))
              if len(labels) > max_points else np.arange(len(labels)))
    labels = labels[chosen]
    present = np.unique(labels)
    colours, colour_of, scalar = _class_colours(labels, present, rank)
    figure = new_figure(5.2 * len(panels) + 1.6, 5.0)
    axes = figure.subplots(1, len(panels), squeeze=False).ravel()
    used = ""
    for axis, (title, vectors) in zip(axes, panels):
        points, used = embed_2d(vectors[chosen], seed=seed, method=method)
        for group in ("many", "medium", "few"):
            members = groups[labels] == group
            if not members.any():
                continue
            axis.scatter(points[members, 0], points[members, 1], c=colours[members],
                         marker=GROUP_MARKERS[group], s=40 if group == "few" else 14,
                         linewidths=0.4 if group == "few" else 0,
                         edgecolors="black" if group == "few" else "none",
                         alpha=0.9, zorder=3 if group == "few" else 2)
        axis.set_title(f"{title} ({used})", fontsize="medium")
        axis.set_xticks([])
        axis.set_yticks([])
    _class_legend(figure, axes, present, colour_of, scalar, names,
                  groups[labels] if train_counts is not None else None)
    figure.suptitle(f"2-D {used} embedding of {len(chosen)} test images"
                    + (f" (random subsample of {len(direct)})" if len(chosen) < len(direct)
                       else "") + ", coloured by class", fontsize="medium")
    return save_png(figure, path)



def _groups_and_ranks(train_counts: Any | None, class_names: Sequence[str] | None,
                      labels: np.ndarray, many_threshold: int, few_threshold: int,
                      strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per class (K of ``train_counts``, else of ``class_names``, else the largest label + 1):
    its shot group (all "many" without counts) and its rank by train images (0 = head; the
    class index without counts)."""
    if train_counts is not None:
        counts = vector("train_counts", train_counts, kind="int")
        k = len(counts)
        groups = shot_groups_of(counts, many_threshold, few_threshold, strict)
        rank = np.empty(k, dtype=np.int64)
        rank[head_to_tail(counts)] = np.arange(k)
    else:
        k = len(class_names) if class_names is not None else int(labels.max()) + 1
        groups = np.full(k, "many", dtype="<U6")
        rank = np.arange(k)
    return groups, rank


def _class_colours(labels: np.ndarray, present: np.ndarray, rank: np.ndarray,
                   ) -> tuple[np.ndarray, dict[int, Any], tuple[Any, Any] | None]:
    """Each point's colour: one tab10 colour per class up to 10 classes present (and the
    class → colour map); beyond, viridis by train-frequency rank (and (colour map, norm) for
    the colour bar)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    if len(present) <= 10:
        palette = colormaps["tab10"]
        colour_of = {int(c): palette(i) for i, c in enumerate(present)}
        return np.array([colour_of[int(c)] for c in labels]), colour_of, None
    norm = Normalize(0, max(len(rank) - 1, 1))
    return colormaps["viridis"](norm(rank[labels])), {}, (colormaps["viridis"], norm)


def _class_legend(figure: Figure, axes: Any, present: np.ndarray, colour_of: dict[int, Any],
                  scalar: tuple[Any, Any] | None, names: list[str],
                  point_groups: np.ndarray | None) -> None:
    """The legend (class names where coloured by class; the shot-group markers where
    ``point_groups`` are known) or the colour bar of the class rank."""
    from matplotlib.lines import Line2D

    handles, texts = [], []
    if scalar is None:
        for c in present:
            handles.append(Line2D([], [], marker="s", linestyle="", color=colour_of[int(c)]))
            texts.append(plot_text(names[int(c)], 24))
    if point_groups is not None:
        for group in ("many", "medium", "few"):
            if (point_groups == group).any():
                handles.append(Line2D([], [], marker=GROUP_MARKERS[group], linestyle="",
                                      color="0.4", markeredgecolor="black" if group == "few"
                                      else "0.4"))
                texts.append(f"{group}-shot classes")
    if handles:
        figure.legend(handles, texts, loc="outside right center", fontsize="small",
                      frameon=False)
    if scalar is not None:
        from matplotlib.cm import ScalarMappable

        bar = figure.colorbar(ScalarMappable(norm=scalar[1], cmap=scalar[0]), ax=list(axes),
                              location="right", shrink=0.8)
        bar.set_label("class rank by train images (0 = head)" if point_groups is not None
                      else "class index")


# --------------------------------------------------------------------------- 5. concepts


def plot_memory_concepts(
    path: str | os.PathLike[str],
    thumbnails: Any,
    coefficients: Any,
    selector: Any,
    class_names: Sequence[str],
    *,
    labels: Any | None = None,
    predictions: Any | None = None,
    top_k: int = 3,
) -> Path:
    """Paper Fig. 7: for each of a few test images, the memory concepts that contributed most.

    ``thumbnails`` uint8 (n, H, W) or (n, H, W, 3); ``coefficients`` (n, K) the hallucinator's
    o = softmax(T_hal(v_direct)) (Eq. 1: v_memory = Σ o_i c_i, so o_i is the weight of class
    i's centroid); ``selector`` (n, d) the concept selector e = tanh(T_sel(v_direct)) (Eq. 4,
    the weight of v_memory per dimension). One row per image: the thumbnail (titled with its
    true class and prediction, −1 = "unknown", where given), a bar of its ``top_k`` largest
    o_i with their class names, and e over the d dimensions (in dimension order, so rows
    compare) with mean |e| and the share of dimensions where e > 0.
    """
    images = np.asarray(thumbnails)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4
                                                              and images.shape[3] == 3)):
        raise InputError("thumbnails must be uint8 (n, H, W) or (n, H, W, 3)",
                         value=(str(images.dtype), tuple(images.shape)))
    n = len(images)
    if n == 0:
        raise InputError("no thumbnail given")
    o = matrix("coefficients", coefficients, rows=n)
    e = matrix("selector", selector, rows=n)
    k = o.shape[1]
    names = class_name_list(class_names, k)
    if top_k < 1:
        raise InputError("top_k must be >= 1", value=top_k)
    top_k = min(top_k, k)
    truth = None if labels is None else vector("labels", labels, kind="int")
    guess = None if predictions is None else vector("predictions", predictions, kind="int")
    for name, values in (("labels", truth), ("predictions", guess)):
        if values is not None:
            same_length(thumbnails=images, **{name: values})
            labels_in_range(name, values, k, allow_unknown=name == "predictions")

    def named(c: int) -> str:
        return "unknown" if c == metrics.OPEN_LABEL else plot_text(names[c], 20)

    tops = np.argsort(-o, axis=1, kind="stable")[:, :top_k]
    largest = float(np.take_along_axis(o, tops, axis=1).max())
    o_limit = min(1.0, largest * 1.25) if largest > 0 else 1.0  # shared: rows compare
    figure = new_figure(10.0, 0.4 + 1.45 * n)
    grid = figure.add_gridspec(n, 3, width_ratios=[1.0, 3.2, 3.6])
    for row in range(n):
        _thumbnail_panel(figure.add_subplot(grid[row, 0]), images[row], row,
                         None if truth is None else int(truth[row]),
                         None if guess is None else int(guess[row]), named)
        _coefficient_panel(figure.add_subplot(grid[row, 1]), o[row], tops[row],
                           None if truth is None else int(truth[row]), named, o_limit,
                           first=row == 0, last=row == n - 1)
        _selector_panel(figure.add_subplot(grid[row, 2]), e[row], first=row == 0,
                        last=row == n - 1)
    figure.suptitle("Memory concepts infused into the meta-embedding (cf. paper Fig. 7)",
                    fontsize="medium")
    return save_png(figure, path)


def _thumbnail_panel(axis: Any, image: np.ndarray, row: int, truth: int | None,
                     guess: int | None, named: Callable[[int], str]) -> None:
    """One test image, titled with its true class and prediction; framed green (right) or red
    (wrong) where both are known."""
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
                interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    caption = []
    if truth is not None:
        caption.append(f"true: {named(truth)}")
    if guess is not None:
        caption.append(f"pred: {named(guess)}")
    if truth is not None and guess is not None:
        ok = truth == guess
        for spine in axis.spines.values():
            spine.set_edgecolor("tab:green" if ok else "tab:red")
            spine.set_linewidth(2.5)
    axis.set_title("\n".join(caption) or f"image {row}", fontsize="x-small")


def _coefficient_panel(axis: Any, o: np.ndarray, top: np.ndarray, truth: int | None,
                       named: Callable[[int], str], o_limit: float, *, first: bool,
                       last: bool) -> None:
    """One image's largest memory coefficients o_i (the true class's bar green), on the x
    range ``o_limit`` every row shares."""
    top_k = len(top)
    values = o[top]
    positions = np.arange(top_k)[::-1]
    colours = ["tab:green" if truth is not None and c == truth else "tab:purple" for c in top]
    axis.barh(positions, values, color=colours, height=0.7)
    axis.set_yticks(positions, [named(int(c)) for c in top], fontsize="x-small")
    axis.set_xlim(0, o_limit * 1.15)
    for position, value in zip(positions, values):
        axis.text(value + 0.015 * o_limit, position, f"{value:.3g}", va="center",
                  fontsize="x-small")
    axis.tick_params(axis="x", labelsize="x-small")
    if first:
        axis.set_title(f"top-{top_k} memory coefficients o_i (Eq. 1)", fontsize="small")
    if last:
        axis.set_xlabel("o_i (softmax over the K centroids)", fontsize="x-small")


def _selector_panel(axis: Any, e: np.ndarray, *, first: bool, last: bool) -> None:
    """One image's concept selector e over the feature dimensions, with mean |e| and the
    share of dimensions where e > 0."""
    d = len(e)
    dims = np.arange(d)
    axis.bar(dims, e, width=0.9 if d <= 128 else 1.0, linewidth=0,
             color=np.where(e > 0, "tab:orange", "tab:gray"))
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set_xlim(-0.5, d - 0.5)
    axis.set_ylim(-1.08, 1.75)  # headroom above e = 1 for the summary
    axis.set_yticks([-1, 0, 1])
    axis.tick_params(labelsize="x-small")
    axis.text(0.99, 0.96, f"mean |e| {np.abs(e).mean():.2f}, "
                          f"e > 0: {100 * (e > 0).mean():.0f} % of dims",
              transform=axis.transAxes, ha="right", va="top", fontsize="x-small",
              bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    if first:
        axis.set_title("concept selector e = tanh(T_sel(v)) per dimension (Eq. 4)",
                       fontsize="small")
    if last:
        axis.set_xlabel("feature dimension", fontsize="x-small")
    else:
        axis.set_xticklabels([])
