"""The report you look at (``oltr report``): a self-contained HTML page that shows a run's PNG
figures (:mod:`oltr.evaluation.plots`) with their captions and summary tables.

:func:`write_report_page` writes ``index.html`` (figures linked by relative paths, inline CSS,
no script, nothing fetched from the network; every text is HTML-escaped);
:func:`render_report` draws every figure the given arrays allow and writes the page. The
figures, each a pure function of numpy arrays that writes one file:

1. :func:`~oltr.evaluation.plots.classes.plot_per_class_accuracy` — per-class closed-set and
   open-set accuracy against the train-set frequency, classes ordered head to tail,
   many/medium/few boundaries (paper §4, shot groups; cf. Fig. 1);
2. :func:`~oltr.evaluation.plots.scores.plot_open_score_histograms` — open-score histograms of
   known test vs open images (and external open sets) with the threshold;
3. :func:`~oltr.evaluation.plots.scores.plot_threshold_sweep` — open-set F-measure (paper
   §D.4), open-set overall accuracy, known acceptance and open rejection rates against the
   threshold (:func:`~oltr.evaluation.plots.scores.threshold_sweep`), the chosen threshold
   marked (cf. Fig. 8b);
4. :func:`~oltr.evaluation.plots.embeddings.plot_embeddings` — 2-D t-SNE (or UMAP) of direct
   features vs meta-embeddings of the same images (paper Fig. 3);
5. :func:`~oltr.evaluation.plots.embeddings.plot_memory_concepts` — per test image, the memory
   concepts that contributed most: the top-k hallucinator coefficients o (Eq. 1) and the
   concept selector e (Eq. 4) (Fig. 7);
6. :func:`~oltr.evaluation.plots.classes.plot_tail_open_confusion` — where tail-class test
   images and open images end up
   (:func:`~oltr.evaluation.plots.classes.tail_open_confusion`).

Conventions as in :mod:`oltr.metrics`: open scores are *higher = more open*; an image is
rejected ("unknown", label −1) iff its score exceeds the threshold.
"""
from __future__ import annotations

import html
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oltr import metrics
from oltr.errors import InputError
from oltr.evaluation.plots.classes import (
    plot_per_class_accuracy,
    plot_tail_open_confusion,
    tail_open_confusion,
)
from oltr.evaluation.plots.common import rule_text, same_length, vector
from oltr.evaluation.plots.embeddings import (
    MAX_EMBEDDING_POINTS,
    plot_embeddings,
    plot_memory_concepts,
)
from oltr.evaluation.plots.scores import plot_open_score_histograms, plot_threshold_sweep
from oltr.io import atomic_write_text
from oltr.ownership import marker_kind

#: File names :func:`render_report` gives the figures (inside its output directory).
FIGURE_FILES = {
    "per_class": "per_class_accuracy.png",
    "histograms": "open_score_histograms.png",
    "threshold": "threshold_sweep.png",
    "embeddings": "embeddings.png",
    "concepts": "memory_concepts.png",
    "confusion": "tail_open_confusion.png",
}
PAGE_FILE = "index.html"


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class ReportFigure:
    """A PNG inside the page's directory and the caption saying what it shows."""

    path: str | os.PathLike[str]
    caption: str


@dataclass(frozen=True)
class ReportTable:
    """A summary table. ``rows``: a mapping (one "key | value" row per item), a list of
    mappings (columns = their keys, in first-seen order) or a list of sequences (with
    ``columns``). Floats print with 4 significant digits, None as "–"."""

    title: str
    rows: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]]
    columns: Sequence[str] | None = None


@dataclass(frozen=True)
class ReportSection:
    """A heading, optional paragraphs of text, tables and figures (in that order)."""

    heading: str
    text: Sequence[str] | str = ()
    tables: Sequence[ReportTable] = ()
    figures: Sequence[ReportFigure] = ()


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; border-bottom: 2px solid #ccc; padding-bottom: .3em; }
h2 { font-size: 1.2em; margin-top: 2em; }
nav ul { columns: 2; font-size: .95em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f1f3f5; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .92em; color: #444; max-width: 70em; margin-top: .4em; }
footer { margin-top: 3em; font-size: .85em; color: #666; }
""".strip()


def _cell(value: Any) -> tuple[str, bool]:
    """(escaped text, is numeric) of a table value."""
    if value is None:
        return "–", False
    if isinstance(value, bool):
        return html.escape(str(value)), False
    if isinstance(value, (int, np.integer)):
        return f"{int(value)}", True
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return ("–" if math.isnan(value) else f"{value:.4g}"), True
    return html.escape(str(value)), False


def _table_html(table: ReportTable) -> str:
    rows = table.rows
    if isinstance(rows, Mapping):
        columns: list[str] = list(table.columns or ("", "value"))
        body = [[key, value] for key, value in rows.items()]
    elif rows and all(isinstance(row, Mapping) for row in rows):
        mappings: list[Mapping[str, Any]] = list(rows)  # type: ignore[arg-type]
        columns = list(table.columns or dict.fromkeys(k for row in mappings for k in row))
        body = [[row.get(k) for k in columns] for row in mappings]
    else:
        body = [list(row) for row in rows]  # type: ignore[arg-type]
        columns = list(table.columns or [])
        if columns and any(len(row) != len(columns) for row in body):
            raise InputError(f"table '{table.title}': every row must have {len(columns)} "
                             "cells", value=table.title)
    out = ["<table>", f"<caption>{html.escape(table.title)}</caption>"]
    if columns:
        out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
                   + "</tr></thead>")
    out.append("<tbody>")
    for row in body:
        cells = []
        for value in row:
            text, numeric = _cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure_html(figure: ReportFigure, out_dir: Path, number: int) -> str:
    path = Path(figure.path)
    resolved = path if path.is_absolute() else out_dir / path
    try:
        relative = resolved.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raise InputError("a report figure must lie inside the report directory "
                         f"{out_dir}", path=figure.path) from None
    if not resolved.is_file():
        raise InputError("report figure not found", path=resolved)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(resolved) as image:
            size = f' width="{image.width}" height="{image.height}"'
    except (OSError, UnidentifiedImageError):
        raise InputError("report figure is not a readable image", path=resolved) from None
    source = html.escape(urllib.parse.quote(relative.as_posix()), quote=True)
    caption = html.escape(figure.caption)
    return (f'<figure id="figure-{number}">\n<img src="{source}" alt="{caption}"{size}>\n'
            f"<figcaption><strong>Figure {number}.</strong> {caption}</figcaption>\n</figure>")


def write_report_page(
    out_dir: str | os.PathLike[str],
    title: str,
    sections: Sequence[ReportSection],
    *,
    footer: str | None = None,
) -> Path:
    """Write ``out_dir/index.html``: the ``title``, a table of contents, then each section's
    text, tables and figures (numbered, captioned), and return its path.

    Self-contained: the figures are linked by relative, URL-quoted paths (each must lie
    inside ``out_dir``; ``InputError`` otherwise or when missing), the style is inline, there
    is no script and no network address. Every text (title, headings, captions, table cells,
    class names, paths) is HTML-escaped. An existing ``index.html`` is replaced atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>\n{_STYLE}\n</style>", "</head>",
             "<body>", f"<h1>{html.escape(title)}</h1>"]
    if len(sections) > 1:
        parts.append("<nav><ul>" + "".join(
            f'<li><a href="#section-{i}">{html.escape(s.heading)}</a></li>'
            for i, s in enumerate(sections, 1)) + "</ul></nav>")
    number = 0
    for i, section in enumerate(sections, 1):
        parts.append(f'<section id="section-{i}">')
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        paragraphs = [section.text] if isinstance(section.text, str) else section.text
        parts.extend(f"<p>{html.escape(p)}</p>" for p in paragraphs if p)
        parts.extend(_table_html(table) for table in section.tables)
        for figure in section.figures:
            number += 1
            parts.append(_figure_html(figure, out_dir, number))
        parts.append("</section>")
    if footer:
        parts.append(f"<footer>{html.escape(footer)}</footer>")
    parts += ["</body>", "</html>", ""]
    page = out_dir / PAGE_FILE
    atomic_write_text(page, "\n".join(parts))
    return page


# --------------------------------------------------------------------------- all at once


@dataclass
class ReportInputs:
    """Everything :func:`render_report` draws, as arrays (the caller runs the model).

    Known test images (N): ``known_labels``, ``known_closed_predictions`` (argmax of the
    decision logits), ``known_predictions`` (after the threshold, −1 = unknown),
    ``known_scores`` (open scores, higher = more open); ``features`` / ``meta`` (N, d)
    the direct features and meta-embeddings (``meta`` None for a non-OLTR model). Open images
    (M): ``open_predictions``, ``open_scores`` (None: no open split); ``external_scores``:
    external open set name → scores. ``threshold`` None: a closed-set rule. Memory concepts
    (Fig. 7) for a few images: ``thumbnails`` (n, H, W[, 3]) uint8, ``coefficients`` (n, K),
    ``selector`` (n, d), ``concept_labels`` / ``concept_predictions`` (n,). Shot-group rule:
    ``many_threshold``, ``few_threshold``, ``strict`` (as ``metrics.shot_groups``).
    """

    class_names: Sequence[str]
    train_counts: Any
    known_labels: Any
    known_closed_predictions: Any
    known_predictions: Any
    known_scores: Any | None = None
    open_predictions: Any | None = None
    open_scores: Any | None = None
    threshold: float | None = None
    score_name: str = "open score"
    external_scores: Mapping[str, Any] = field(default_factory=dict)
    features: Any | None = None
    meta: Any | None = None
    thumbnails: Any | None = None
    coefficients: Any | None = None
    selector: Any | None = None
    concept_labels: Any | None = None
    concept_predictions: Any | None = None
    many_threshold: int = 100
    few_threshold: int = 20
    strict: bool = True
    embedding_seed: int = 0
    embedding_method: str = "auto"


def render_report(
    out_dir: str | os.PathLike[str],
    inputs: ReportInputs,
    *,
    title: str = "oltr report",
    tables: Sequence[ReportTable] = (),
    text: Sequence[str] = (),
) -> Path:
    """Draw every figure ``inputs`` allow into ``out_dir`` (names: :data:`FIGURE_FILES`) and
    write ``index.html`` (:func:`write_report_page`) with a summary section (``text``,
    ``tables``, e.g. the evaluation report's closed and open figures) and one section per
    figure; return the page's path. Figures without their inputs are left out (the
    histograms and sweep need ``known_scores``; the embedding ``features``; the concepts
    ``thumbnails``, ``coefficients`` and ``selector``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group_kw = {"many_threshold": inputs.many_threshold, "few_threshold": inputs.few_threshold,
                "strict": inputs.strict}
    names = list(inputs.class_names)
    counts = vector("train_counts", inputs.train_counts, kind="int")
    labels = vector("known_labels", inputs.known_labels, kind="int")
    closed = vector("known_closed_predictions", inputs.known_closed_predictions, kind="int")
    final = vector("known_predictions", inputs.known_predictions, kind="int")
    same_length(known_labels=labels, known_closed_predictions=closed, known_predictions=final)
    rule = rule_text(inputs.many_threshold, inputs.few_threshold, inputs.strict)
    has_open = inputs.open_predictions is not None and len(np.asarray(inputs.open_predictions))
    sections = [ReportSection("Summary", list(text), list(tables))]
    closed_report = metrics.closed_set_accuracy(closed, labels, counts, **group_kw)
    open_per_class = None
    if inputs.threshold is not None:
        open_per_class = metrics.closed_set_accuracy(final, labels, counts,
                                                     **group_kw)["per_class"]
    sections.append(_figure_section("Accuracy per class", plot_per_class_accuracy(
        out_dir / FIGURE_FILES["per_class"], counts, closed_report["per_class"],
        open_per_class, class_names=names, **group_kw),
        "Test accuracy of each known class against its number of train images (black line, "
        "log scale, right axis); classes ordered from the most to the least frequent (head → "
        "tail). Blue: closed-set accuracy; orange: open-set accuracy, where a known image "
        "rejected as unknown counts as an error. Shaded spans and dashed boundaries: the "
        f"many/medium/few shot groups ({rule}); horizontal lines: each group's mean per-class "
        "accuracy (the report's many/medium/few figures)."))
    if inputs.known_scores is not None:
        sections += _score_sections(out_dir, inputs, labels, closed == labels,
                                    inputs.open_scores if has_open else None)
    sections += _representation_sections(out_dir, inputs, labels, counts, names, group_kw)
    table = tail_open_confusion(labels, final, counts, names,
                                inputs.open_predictions if has_open else None, **group_kw)
    sections.append(_figure_section("Tail classes and open images", plot_tail_open_confusion(
        out_dir / FIGURE_FILES["confusion"], labels, final, counts, names,
        inputs.open_predictions if has_open else None, **group_kw),
        "Final answers (after the threshold) for the test images of the tail classes and for "
        f"the open images ({table.tail_rule}): rows = true class, columns = answer; the "
        "many/medium (non-tail) classes are pooled into one column. Cells give image counts, "
        "colour the share of the row: the tail diagonal is correct, a tail image in "
        "'unknown' was wrongly rejected, an open image anywhere but 'unknown' wrongly "
        "accepted."))
    _remove_figures_not_drawn(out_dir, sections)
    return write_report_page(out_dir, title, sections,
                             footer="Written by oltr report; figures are PNG files next to "
                                    "this page.")


def _figure_section(heading: str, path: Path, caption: str) -> ReportSection:
    return ReportSection(heading, figures=[ReportFigure(path.name, caption)])


def _score_sections(out_dir: Path, inputs: ReportInputs, labels: np.ndarray,
                    known_correct: np.ndarray, open_scores: Any | None) -> list[ReportSection]:
    """The open-score histograms and the threshold sweep (2, 3)."""
    scores = vector("known_scores", inputs.known_scores)
    same_length(known_labels=labels, known_scores=scores)
    histograms = _figure_section("Open-score distributions", plot_open_score_histograms(
        out_dir / FIGURE_FILES["histograms"], scores, open_scores,
        threshold=inputs.threshold, external=inputs.external_scores,
        score_name=inputs.score_name),
        f"Histograms of the open score ({inputs.score_name}; higher = more open) of the "
        "known test images and of the open images" + (" and each external open set"
                                                      if inputs.external_scores else "")
        + ", each normalised to fractions of its own images. "
        + ("The dashed line is the threshold: images to its right are answered "
           "'unknown'; the legend gives the share of each set accepted (known) or "
           "rejected (open)." if inputs.threshold is not None else
           "The decision rule has no threshold (closed set): no image is rejected."))
    sweep = _figure_section("Threshold sweep", plot_threshold_sweep(
        out_dir / FIGURE_FILES["threshold"], scores, known_correct, open_scores,
        threshold=inputs.threshold, score_name=inputs.score_name),
        "Open-set figures if the threshold were moved over every observed score (an "
        "image is rejected when its score exceeds the threshold; left end: everything "
        "rejected). Left: F-measure (TP = known and correct, FP = other known, FN = open "
        "accepted) and open-set overall accuracy; right: share of known test images "
        "accepted and of open images rejected. Dashed line: the chosen threshold (fitted "
        "on val, never on test); grey dot: the best F-measure on these test images, for "
        "reference only.")
    return [histograms, sweep]


def _representation_sections(out_dir: Path, inputs: ReportInputs, labels: np.ndarray,
                             counts: np.ndarray, names: list[str],
                             group_kw: dict[str, Any]) -> list[ReportSection]:
    """The feature embeddings (4) and the memory concepts (5), where ``inputs`` have them."""
    sections = []
    if inputs.features is not None:
        both = inputs.meta is not None
        sections.append(_figure_section("Feature embeddings (paper Fig. 3)", plot_embeddings(
            out_dir / FIGURE_FILES["embeddings"], inputs.features, labels, inputs.meta,
            train_counts=counts, class_names=names, seed=inputs.embedding_seed,
            method=inputs.embedding_method, **group_kw),
            ("2-D embedding of the direct features (left) and of the meta-embeddings (right) "
             "of the same known test images" if both else
             "2-D embedding of the direct features of known test images (this model has no "
             "meta-embedding)")
            + f" (at most {MAX_EMBEDDING_POINTS}, a seeded random subsample), by t-SNE after "
            "PCA to 50 dimensions, or UMAP where installed; colour = class, marker = shot "
            "group (★ few-shot, drawn on top). Compact, separated clusters for the tail "
            "classes mean the embedding discriminates them; the axes have no units."))
    if (inputs.thumbnails is not None and inputs.coefficients is not None
            and inputs.selector is not None):
        sections.append(_figure_section("Memory concepts (paper Fig. 7)", plot_memory_concepts(
            out_dir / FIGURE_FILES["concepts"], inputs.thumbnails, inputs.coefficients,
            inputs.selector, names, labels=inputs.concept_labels,
            predictions=inputs.concept_predictions),
            "For a few test images (frame: green = answered correctly, red = wrong): the "
            "classes whose memory centroids weigh most in the memory feature v_memory = Σ o_i "
            "c_i (the hallucinator's coefficients o, Eq. 1; green bar = the true class), and "
            "the concept selector e (Eq. 4), the per-dimension weight of v_memory in the "
            "meta-embedding (orange: e > 0, grey: e ≤ 0)."))
    return sections


def _remove_figures_not_drawn(out_dir: Path, sections: Sequence[ReportSection]) -> None:
    """In a directory oltr claimed for reports (its ``.oltr`` marker says ``report``), remove
    the figures of an earlier report that this one does not draw (e.g. the embedding of a run
    re-evaluated without features), so the folder never shows a stale PNG beside the page.
    Elsewhere nothing is removed (a figure file there may be the user's)."""
    if marker_kind(out_dir) != "report":
        return
    drawn = {str(figure.path) for section in sections for figure in section.figures}
    for name in FIGURE_FILES.values():
        if name not in drawn and (out_dir / name).is_file():
            (out_dir / name).unlink()
