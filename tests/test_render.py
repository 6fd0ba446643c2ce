"""The report's figures and page (oltr.evaluation.plots, oltr.evaluation.html): known-answer
tests of the numbers behind the figures (threshold sweep vs open_set_at_threshold, the tail/open
confusion counts, the histogram bins), every figure written as a readable PNG of sensible size
on ordinary and edge inputs, HTML escaping, and the page loaded in a real headless Chromium."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oltr import metrics
from oltr.errors import InputError
from oltr.evaluation import html as H
from oltr.evaluation.open_set import open_set_at_threshold
from oltr.evaluation.plots import classes as C
from oltr.evaluation.plots import embeddings as E
from oltr.evaluation.plots import scores as S

NASTY = '<b>&"x"'


@pytest.fixture(autouse=True)
def one_native_thread():
    """One OpenMP/BLAS thread: scikit-learn's t-SNE spins its OpenMP threads, and on a busy
    2-core machine that is ten times slower than one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def assert_png(path: Path, *, min_size=(400, 250), max_size=(1800, 1400),
               max_bytes=300_000) -> tuple[int, int]:
    """The file is a PNG that Pillow decodes, of a size meant for a page."""
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        width, height = image.size
    assert min_size[0] <= width <= max_size[0], (path.name, width)
    assert min_size[1] <= height <= max_size[1], (path.name, height)
    assert path.stat().st_size <= max_bytes, (path.name, path.stat().st_size)
    return width, height


def toy_inputs(num_classes: int = 6, per_class: int = 12, n_open: int = 30, d: int = 16,
               *, meta: bool = True, concepts: bool = True, seed: int = 0) -> H.ReportInputs:
    """Synthetic outputs of an OLTR run: counts 300 → 5 (many, medium and few classes)."""
    rng = np.random.default_rng(seed)
    counts = np.round(300 * (5 / 300) ** (np.arange(num_classes) / max(num_classes - 1, 1)))
    counts = counts.astype(np.int64)
    labels = np.repeat(np.arange(num_classes), per_class)
    right = rng.random(len(labels)) < np.linspace(0.9, 0.4, num_classes)[labels]
    closed = np.where(right, labels, rng.integers(0, num_classes, len(labels)))
    known_scores = rng.normal(0.3, 0.15, len(labels))
    open_scores = rng.normal(0.7, 0.15, n_open)
    threshold = 0.55
    centres = rng.normal(size=(num_classes, d)) * 3
    features = centres[labels] + rng.normal(size=(len(labels), d))
    n = 3
    names = [f"class {i}" for i in range(num_classes)]
    names[-1] = NASTY
    return H.ReportInputs(
        class_names=names, train_counts=counts, known_labels=labels,
        known_closed_predictions=closed,
        known_predictions=np.where(known_scores > threshold, -1, closed),
        known_scores=known_scores,
        open_predictions=np.where(open_scores > threshold, -1,
                                  rng.integers(0, num_classes, n_open)),
        open_scores=open_scores, threshold=threshold, score_name="msp",
        external_scores={"svhn": rng.normal(0.8, 0.1, 20)},
        features=features, meta=(centres[labels] + 0.3 * rng.normal(size=features.shape)
                                 if meta else None),
        thumbnails=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if concepts else None,
        coefficients=rng.dirichlet(np.ones(num_classes), n) if concepts else None,
        selector=np.tanh(rng.normal(size=(n, d))) if concepts else None,
        concept_labels=labels[:n] if concepts else None,
        concept_predictions=closed[:n] if concepts else None,
        embedding_method="tsne",
    )


# --------------------------------------------------------------------------- numbers


def test_threshold_sweep_equals_the_metrics_at_every_threshold():
    rng = np.random.default_rng(3)
    known = np.round(rng.normal(size=40), 1)  # rounded: ties between known and open scores
    opened = np.round(rng.normal(0.5, 1, size=15), 1)
    labels = rng.integers(0, 3, 40)
    predictions = np.where(rng.random(40) < 0.7, labels, (labels + 1) % 3)
    sweep = S.threshold_sweep(known, predictions == labels, opened)
    np.testing.assert_array_equal(sweep["threshold"], np.unique(np.r_[known, opened]))
    for i, t in enumerate(sweep["threshold"]):  # the one open-set-at-a-threshold function
        f = accuracy = open_set_at_threshold(predictions, labels, known,
                                             np.zeros(15, dtype=np.int64), opened, t,
                                             np.array([500, 50, 5]), {})
        assert sweep["f_measure"][i] == pytest.approx(f["f_measure"])
        assert sweep["precision"][i] == pytest.approx(f["precision"])
        assert sweep["recall"][i] == pytest.approx(f["recall"])
        assert sweep["overall"][i] == pytest.approx(accuracy["overall"])
        assert sweep["known_acceptance_rate"][i] == pytest.approx(
            accuracy["known_acceptance_rate"])
        assert sweep["open_rejection_rate"][i] == pytest.approx(
            accuracy["open_rejection_rate"])


def test_threshold_sweep_known_answer_and_without_open_images():
    # known: scores 0.1 (right), 0.5 (wrong), 0.9 (right); open: 0.5, 1.0
    sweep = S.threshold_sweep([0.1, 0.5, 0.9], [True, False, True], [0.5, 1.0])
    np.testing.assert_allclose(sweep["threshold"], [0.1, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(sweep["known_acceptance_rate"], [1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(sweep["open_rejection_rate"], [1, 0.5, 0.5, 0])
    # t = 0.5: TP 1, FN 1 → P 1/3, R 1/2, F 0.4; correct: 1 known + 1 open of 5
    assert sweep["f_measure"][1] == pytest.approx(0.4)
    assert sweep["overall"][1] == pytest.approx(2 / 5)
    closed = S.threshold_sweep([0.2, 0.2, 0.7], [True, True, False], None, [0.0, 0.2, 5.0])
    assert closed["open_rejection_rate"] is None
    np.testing.assert_allclose(closed["recall"], [0, 1, 1])
    np.testing.assert_allclose(closed["f_measure"], [0, 0.8, 0.8])
    with pytest.raises(InputError, match="known_scores must be finite"):
        S.threshold_sweep([0.1, np.nan], [True, False])
    with pytest.raises(InputError, match="same length"):
        S.threshold_sweep([0.1, 0.2], [True])


def test_histogram_bins_put_the_threshold_on_an_edge_and_ties_on_the_accepted_side():
    scores = np.array([0.0, 0.37, 0.37, 1.0])
    edges = S.score_bin_edges(scores, 0.37)
    assert np.isclose(edges, 0.37).any()
    assert edges[0] <= 0.0 and edges[-1] >= 1.0
    bins = S._right_closed_bins(scores, edges)
    at = int(np.argmin(np.abs(edges - 0.37)))
    assert (edges[bins[1:3] + 1] <= 0.37 + 1e-12).all()  # tied scores: bin ending at t
    assert bins[1] == at - 1
    equal = S.score_bin_edges(np.full(5, 2.0), 2.0)
    assert equal[0] < 2.0 < equal[-1] and len(equal) > 5


def test_tail_open_confusion_counts():
    counts = [200, 50, 10, 5]  # many, medium, few, few (< 20)
    labels = np.array([0, 2, 2, 2, 3, 3, 1])
    predictions = np.array([0, 2, 3, -1, 3, 0, 1])
    table = C.tail_open_confusion(labels, predictions, counts, ["a", "b", "c", "d"],
                                  np.array([-1, -1, 2, 0]))
    assert table.rows == ["c", "d", "open"]
    assert table.columns == ["c", "d", "head/medium classes", "unknown"]
    np.testing.assert_array_equal(table.counts, [[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 1, 2]])
    assert "few-shot" in table.tail_rule
    pooled = C.tail_open_confusion(labels, predictions, counts, None, None, max_tail_classes=1)
    assert pooled.rows == ["3", "other tail"]  # the rarest class alone, the rest pooled
    assert pooled.columns == ["3", "other tail", "head/medium classes", "unknown"]
    np.testing.assert_array_equal(pooled.counts, [[1, 0, 1, 0], [1, 1, 0, 1]])
    fallback = C.tail_open_confusion([0, 1, 2], [0, 0, 2], [100, 90, 80])  # no few class
    assert fallback.rows == ["2"] and "rarest third" in fallback.tail_rule
    np.testing.assert_array_equal(fallback.counts, [[1, 0, 0]])
    given = C.tail_open_confusion(labels, predictions, counts, tail_classes=[0])
    assert given.rows == ["0"] and given.counts.tolist() == [[1, 0, 0]]
    with pytest.raises(InputError, match="known_predictions must lie in"):
        C.tail_open_confusion([0], [7], [10, 10])


# --------------------------------------------------------------------------- figures


def test_per_class_plot_few_and_one_class_and_errors(tmp_path):
    inputs = toy_inputs()
    accuracy = metrics.closed_set_accuracy(inputs.known_closed_predictions,
                                           inputs.known_labels, inputs.train_counts)
    per_class = list(accuracy["per_class"])
    per_class[2] = None  # a class without test images: a gap and a marker
    path = C.plot_per_class_accuracy(tmp_path / "a.png", inputs.train_counts, per_class,
                                     np.asarray(per_class, dtype=float) * 0.9,
                                     class_names=inputs.class_names)
    assert path == tmp_path / "a.png"
    assert_png(path)
    assert_png(C.plot_per_class_accuracy(tmp_path / "one.png", [7], [0.5],
                                         class_names=[NASTY + "$x$"]))
    with pytest.raises(InputError, match="same length"):
        C.plot_per_class_accuracy(tmp_path / "x.png", [5, 6], [0.5])
    with pytest.raises(InputError, match=r"fractions in \[0, 1\]"):
        C.plot_per_class_accuracy(tmp_path / "x.png", [5], [50.0])
    with pytest.raises(InputError, match="one name per class"):
        C.plot_per_class_accuracy(tmp_path / "x.png", [5], [0.5], class_names=["a", "b"])


def test_per_class_plot_with_1000_classes_is_fast_and_small(tmp_path):
    rng = np.random.default_rng(0)
    counts = np.round(500 * (2 / 500) ** (np.arange(1000) / 999)).astype(int)
    accuracy = rng.random(1000)
    start = time.perf_counter()
    path = C.plot_per_class_accuracy(tmp_path / "k1000.png", counts, accuracy, accuracy * 0.8,
                                     class_names=[f"n{i:04d}" for i in range(1000)])
    assert time.perf_counter() - start < 20
    width, _ = assert_png(path)
    assert width <= 1400  # no 1000 class names widening it


def test_open_score_histograms(tmp_path):
    rng = np.random.default_rng(1)
    assert_png(S.plot_open_score_histograms(
        tmp_path / "h.png", rng.normal(size=100), rng.normal(1, 1, 40), threshold=0.5,
        external={NASTY: rng.normal(2, 1, 30), "empty": []}, score_name="energy"))
    assert_png(S.plot_open_score_histograms(tmp_path / "no_open.png", rng.normal(size=10)))
    assert_png(S.plot_open_score_histograms(tmp_path / "equal.png", np.ones(20), np.ones(3),
                                            threshold=1.0))
    with pytest.raises(InputError, match="open_scores must be finite"):
        S.plot_open_score_histograms(tmp_path / "x.png", [0.1], [np.inf])
    with pytest.raises(InputError, match="known_scores is empty"):
        S.plot_open_score_histograms(tmp_path / "x.png", [])
    with pytest.raises(InputError, match="threshold must be finite"):
        S.plot_open_score_histograms(tmp_path / "x.png", [0.1], threshold=float("nan"))


def test_threshold_sweep_plot(tmp_path):
    rng = np.random.default_rng(2)
    assert_png(S.plot_threshold_sweep(tmp_path / "s.png", rng.normal(size=80),
                                      rng.random(80) < 0.7, rng.normal(1, 1, 30),
                                      threshold=0.4))
    assert_png(S.plot_threshold_sweep(tmp_path / "equal.png", np.zeros(10),
                                      np.ones(10, bool), np.zeros(4), threshold=0.0))
    assert_png(S.plot_threshold_sweep(tmp_path / "closed.png", rng.normal(size=10),
                                      np.ones(10, bool)))  # no open images, no threshold


def test_embed_2d_is_seeded_and_handles_tiny_inputs(monkeypatch):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 60))  # d > 50: PCA to 50 first
    a, method = E.embed_2d(x, seed=1, method="tsne")
    b, _ = E.embed_2d(x, seed=1, method="tsne")
    assert method == "t-SNE" and a.shape == (40, 2)
    np.testing.assert_array_equal(a, b)
    tiny, method = E.embed_2d(x[:3], method="tsne")
    assert method == "PCA" and tiny.shape == (3, 2)
    same, method = E.embed_2d(np.ones((10, 4)))
    assert method == "PCA" and not same.any()
    with pytest.raises(InputError, match="auto, umap or tsne"):
        E.embed_2d(x, method="isomap")

    class FakeUMAP:  # the UMAP branch, without the package
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit_transform(self, data):
            return np.asarray(data)[:, :2] * self.kwargs["random_state"]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    points, method = E.embed_2d(x, seed=2)
    assert method == "UMAP"
    np.testing.assert_array_equal(points, x[:, :2] * 2)


def test_embedding_plot_subsamples_the_same_points_in_both_panels(tmp_path, monkeypatch):
    inputs = toy_inputs(num_classes=12, per_class=10)
    seen = []

    def fake_embed(vectors, *, seed, method):
        seen.append(np.asarray(vectors))
        return np.asarray(vectors)[:, :2], "fake"

    monkeypatch.setattr(E, "embed_2d", fake_embed)
    path = E.plot_embeddings(tmp_path / "e.png", inputs.features, inputs.known_labels,
                             inputs.meta, train_counts=inputs.train_counts,
                             class_names=inputs.class_names, max_points=50, seed=3)
    assert_png(path)
    assert [len(v) for v in seen] == [50, 50]
    rows = [np.flatnonzero((inputs.features == row).all(axis=1))[0] for row in seen[0]]
    np.testing.assert_array_equal(seen[1], np.asarray(inputs.meta)[rows])  # same images


def test_embedding_plot_real_tsne_direct_only_and_errors(tmp_path):
    inputs = toy_inputs(num_classes=4, per_class=10, meta=False)
    width, _ = assert_png(E.plot_embeddings(
        tmp_path / "direct.png", inputs.features, inputs.known_labels,
        train_counts=inputs.train_counts, class_names=inputs.class_names, method="tsne"))
    both = toy_inputs(num_classes=4, per_class=10)
    wide, _ = assert_png(E.plot_embeddings(
        tmp_path / "both.png", both.features, both.known_labels, both.meta,
        train_counts=both.train_counts, method="tsne"))
    assert wide > width + 300  # a second panel
    assert_png(E.plot_embeddings(tmp_path / "one.png", np.ones((2, 3)), [0, 0]))
    with pytest.raises(InputError, match="meta must have 40 rows"):
        E.plot_embeddings(tmp_path / "x.png", both.features, both.known_labels,
                          both.meta[:5])
    with pytest.raises(InputError, match=r"labels must lie in \[0, 3\]"):
        E.plot_embeddings(tmp_path / "x.png", both.features, both.known_labels + 1,
                          train_counts=both.train_counts)


def test_memory_concepts_plot(tmp_path):
    rng = np.random.default_rng(5)
    names = [f"n{i}" for i in range(1000)]
    assert_png(E.plot_memory_concepts(
        tmp_path / "gray.png", rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        rng.dirichlet(np.ones(1000), 3), np.tanh(rng.normal(size=(3, 512))), names,
        labels=[0, 1, 2], predictions=[0, -1, 5], top_k=3))
    assert_png(E.plot_memory_concepts(
        tmp_path / "rgb.png", rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8),
        [[1.0]], [[0.5, -0.5]], [NASTY], top_k=5), min_size=(400, 150))
    with pytest.raises(InputError, match="uint8"):
        E.plot_memory_concepts(tmp_path / "x.png", np.zeros((1, 8, 8)), [[1.0]], [[0.0]],
                               ["a"])
    with pytest.raises(InputError, match="coefficients must have 1 rows"):
        E.plot_memory_concepts(tmp_path / "x.png", np.zeros((1, 8, 8), np.uint8),
                               [[1.0], [1.0]], [[0.0]], ["a"])
    with pytest.raises(InputError, match=r"predictions must lie in \[-1, 0\]"):
        E.plot_memory_concepts(tmp_path / "x.png", np.zeros((1, 8, 8), np.uint8), [[1.0]],
                               [[0.0]], ["a"], predictions=[3])


def test_tail_open_confusion_plot(tmp_path):
    rng = np.random.default_rng(6)
    counts = np.round(500 * (2 / 500) ** (np.arange(1000) / 999)).astype(int)
    labels = rng.integers(0, 1000, 3000)
    assert_png(C.plot_tail_open_confusion(tmp_path / "k1000.png", labels, labels, counts,
                                          None, rng.integers(-1, 1000, 100)))
    assert_png(C.plot_tail_open_confusion(tmp_path / "one.png", [0, 0, 0], [0, -1, 0], [7],
                                          [NASTY]))  # one class, no open images
    assert_png(C.plot_tail_open_confusion(tmp_path / "empty.png", [], [], [7, 3], ["a", "b"],
                                          [-1, 0]))  # no known image at all


# --------------------------------------------------------------------------- the page


def test_page_escapes_text_and_links_figures_relatively(tmp_path):
    figure = tmp_path / "my fig&1.png"
    Image.new("RGB", (20, 10)).save(figure)
    page = H.write_report_page(tmp_path, f"run {NASTY}", [
        H.ReportSection(f"closed {NASTY}", text=[f"about {NASTY}"], tables=[
            H.ReportTable(f"metrics {NASTY}", {NASTY: 0.123456, "few": None}),
            H.ReportTable("per class", [{"class": NASTY, "accuracy": 0.5, "n": 3}]),
            H.ReportTable("rows", [[NASTY, 1]], columns=["class", "n"]),
        ], figures=[H.ReportFigure(figure, f"caption {NASTY}")]),
    ], footer=NASTY)
    text = page.read_text(encoding="utf-8")
    assert page == tmp_path / "index.html"
    assert NASTY not in text and "<b>" not in text
    escaped = html.escape(NASTY)
    for fragment in (f"<title>run {escaped}</title>", f"<h1>run {escaped}</h1>",
                     f"closed {escaped}</h2>", f"<p>about {escaped}</p>",
                     f"<td>{escaped}</td>", f"caption {escaped}</figcaption>",
                     '<td class="num">0.1235</td>', "<td>–</td>",
                     '<th>class</th><th>accuracy</th><th>n</th>',
                     'src="my%20fig%261.png"', 'width="20" height="10"'):
        assert fragment in text, fragment
    assert "<script" not in text and "http://" not in text and "https://" not in text
    with pytest.raises(InputError, match="inside the report directory"):
        H.write_report_page(tmp_path / "sub", "t", [
            H.ReportSection("s", figures=[H.ReportFigure(figure, "c")])])
    with pytest.raises(InputError, match="report figure not found"):
        H.write_report_page(tmp_path, "t", [
            H.ReportSection("s", figures=[H.ReportFigure("missing.png", "c")])])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        H.write_report_page(tmp_path, "t", [
            H.ReportSection("s", figures=[H.ReportFigure("bad.png", "c")])])
    with pytest.raises(InputError, match="every row must have 2 cells"):
        H.write_report_page(tmp_path, "t", [
            H.ReportSection("s", tables=[H.ReportTable("t", [[1]], columns=["a", "b"])])])


def test_render_report_of_a_plain_model_without_open_images(tmp_path):
    inputs = toy_inputs(meta=False, concepts=False)
    inputs.open_predictions = inputs.open_scores = None
    inputs.threshold = None
    inputs.external_scores = {}
    inputs.known_predictions = inputs.known_closed_predictions
    page = H.render_report(tmp_path, inputs, title="plain")
    text = page.read_text(encoding="utf-8")
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(H.FIGURE_FILES[k] for k in ("per_class", "histograms", "threshold",
                                                         "embeddings", "confusion"))
    for name in written:
        assert f'src="{name}"' in text
        assert_png(tmp_path / name)
    assert "this model has no meta-embedding" in text
    assert "no threshold" in text



def test_a_report_folder_keeps_no_figure_the_new_report_does_not_draw(tmp_path):
    """Re-rendering into oltr's report folder removes figures of the earlier report that the
    new one leaves out; in a folder without the report marker nothing is removed."""
    from oltr.ownership import write_marker

    def render(folder, *, concepts):
        folder.mkdir(exist_ok=True)
        H.render_report(folder, toy_inputs(meta=True, concepts=concepts), title="t")
        return {p.name for p in folder.glob("*.png")}

    owned = tmp_path / "report"
    owned.mkdir()
    write_marker(owned, "report")
    assert H.FIGURE_FILES["concepts"] in render(owned, concepts=True)
    assert H.FIGURE_FILES["concepts"] not in render(owned, concepts=False)
    assert H.FIGURE_FILES["per_class"] in render(owned, concepts=False)
    mine = tmp_path / "mine"
    assert H.FIGURE_FILES["concepts"] in render(mine, concepts=True)
    assert H.FIGURE_FILES["concepts"] in render(mine, concepts=False)  # not oltr's: kept

# --------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth};
  });
  var out = document.createElement("pre");
  out.id = "oltr-image-check";
  out.textContent = JSON.stringify(images);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed "
                    "(apt-get install -y chromium chromium-driver)")
def test_report_page_loads_every_figure_in_headless_chromium(tmp_path):
    out = tmp_path / "report"
    page = H.render_report(out, toy_inputs(), title=f"report {NASTY}",
                           tables=[H.ReportTable("closed", {"overall": 0.5})])
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == sorted(H.FIGURE_FILES.values())
    # a copy of the page with a checking script and one image that must fail to load (so a
    # check that always passed would be caught); the report itself holds no script
    check = out / "check.html"
    check.write_text(page.read_text(encoding="utf-8").replace(
        "</body>", '<img src="missing.png" alt="control">' + CHECK_SCRIPT + "</body>"),
        encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
        check=False, capture_output=True, text=True, timeout=60)
    found = re.search(r'<pre id="oltr-image-check">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no result in Chromium's DOM (rc {result.returncode}): {result.stderr[-800:]}"
    images = json.loads(html.unescape(found.group(1)))
    loaded = {image["src"]: image["width"] for image in images}
    assert loaded.pop("missing.png") == 0
    assert sorted(loaded) == figures
    assert all(width > 0 for width in loaded.values()), loaded
    assert all(image["complete"] for image in images)
