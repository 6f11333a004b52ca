"""Confusion-matrix pictures whose labels can be read on any machine (issue 17).

Two worlds are simulated. With a CJK font: no such font is on a bare machine, so the tests make one, a real
TrueType file built with fontTools (matplotlib's own dependency) that has glyphs for exactly the characters
asked, and put it in a temporary "system font folder" that matplotlib's cached font list does not know. Without
one: matplotlib's font list is cut down to the fonts matplotlib ships (none has CJK glyphs) and the system
folders are empty.
"""
import logging
import os
import warnings

import numpy as np
import pytest

import matplotlib
from matplotlib import font_manager

from bert_finetune import visuals

ZH = ["书籍", "平板", "手机", "水果", "洗发水", "热水器", "蒙牛", "衣服", "计算机", "酒店"]
ZH_CHARS = "".join(sorted(set("".join(ZH))))


def make_font(path, family: str, chars: str):
    """A TrueType font named family with a glyph (a filled box) for each of chars, and a space."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    glyphs = {ord(c): f"uni{ord(c):04X}" for c in chars if c != " "}
    order = [".notdef", "space", *glyphs.values()]

    def box():
        pen = TTGlyphPen(None)
        pen.moveTo((100, 0)), pen.lineTo((100, 800)), pen.lineTo((900, 800)), pen.lineTo((900, 0)), pen.closePath()
        return pen.glyph()

    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({32: "space", **glyphs})
    fb.setupGlyf({name: TTGlyphPen(None).glyph() if name == "space" else box() for name in order})
    fb.setupHorizontalMetrics({name: (1000, 100) for name in order})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(str(path))
    return str(path)


@pytest.fixture
def bare_fonts(monkeypatch):
    """A machine without CJK fonts: matplotlib knows only the fonts it ships, the system folders hold none.
    Returns the list the system folders are read from, for a test to put font files in."""
    shipped = os.path.realpath(matplotlib.get_data_path())
    only_shipped = [e for e in font_manager.fontManager.ttflist if os.path.realpath(e.fname).startswith(shipped)]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", only_shipped)  # restored after the test
    system = []
    monkeypatch.setattr(visuals, "_system_font_paths", lambda: list(system))
    logger = logging.getLogger("bert_finetune")  # reporting.setup_logging may have stopped it propagating
    monkeypatch.setattr(logger, "propagate", True)
    visuals.reset_font_cache()
    font_manager.fontManager._findfont_cached.cache_clear()
    yield system
    visuals.reset_font_cache()
    font_manager.fontManager._findfont_cached.cache_clear()


def glyph_warnings(record):
    return [str(w.message) for w in record if "missing from font" in str(w.message)]


def draw(fig):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fig.canvas.draw()
    return glyph_warnings(record)


def cm_for(k, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, (k, k)) + np.eye(k, dtype=np.int64) * 100


def tick_texts(ax):
    return [t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()]


def test_without_the_font_matplotlib_would_draw_boxes(bare_fonts):
    # the control for what follows: the labels drawn the old way, in DejaVu Sans alone, lose glyphs loudly
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure()
    FigureCanvasAgg(fig)
    fig.text(0.1, 0.5, " ".join(ZH), family="DejaVu Sans")
    assert len(set(draw(fig))) == len(ZH_CHARS)  # one per character it lacks


def test_cjk_font_installed_after_the_cache_is_found_by_its_glyphs(bare_fonts, tmp_path, caplog):
    font = make_font(tmp_path / "TestHan.ttf", "Test Han Sans", ZH_CHARS + "评测")
    # named like the most preferred CJK font, yet without the glyphs: a name alone must not choose it
    impostor = make_font(tmp_path / "Impostor.ttf", "Noto Sans CJK SC", "abcdefg")
    bare_fonts += [impostor, font]
    assert not any(e.name in ("Test Han Sans", "Noto Sans CJK SC") for e in font_manager.fontManager.ttflist)
    caplog.set_level(logging.INFO, logger="bert_finetune.visuals")

    fonts = visuals.label_fonts(ZH)
    assert fonts.families == ("DejaVu Sans", "Test Han Sans") and not fonts.missing
    assert visuals.names_drawable(ZH)
    # matplotlib's font list now has it, so its font lookup finds the file
    assert os.path.samefile(font_manager.findfont(font_manager.FontProperties(family="Test Han Sans"),
                                                  fallback_to_default=False), font)

    fig = visuals.confusion_figure(cm_for(10), ZH, "评测.csv")
    assert draw(fig) == []  # every glyph was found: no box, nothing to warn about
    ax = fig.axes[0]
    assert tick_texts(ax) == (ZH, ZH)
    assert ax.get_title() == "评测.csv" and visuals.ELLIPSIS not in ax.get_title()
    assert all("Test Han Sans" in t.get_fontfamily() for t in ax.get_xticklabels() + ax.get_yticklabels())
    assert len(fig.texts) == 0  # no id legend
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    # the drawn glyphs are the font's filled boxes: the first y tick label is mostly ink
    renderer = fig.canvas.get_renderer()
    box = ax.get_yticklabels()[0].get_window_extent(renderer)
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    height = pixels.shape[0]
    patch = pixels[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    assert (patch.mean(axis=-1) < 100).mean() > 0.3

    # the whole pipeline: the PNG shows names, and says so
    assert visuals.save_confusion_png(cm_for(10), ZH, str(tmp_path / "cm.png"), "评测.csv") is True


def test_fonts_already_known_are_used_without_a_scan_and_mixed_scripts_combine(bare_fonts, tmp_path, monkeypatch):
    half = len(ZH_CHARS) // 2  # no one font has them all: two together do
    for name, chars in (("Han One", ZH_CHARS[:half]), ("Han Two", ZH_CHARS[half:])):
        font_manager.fontManager.addfont(make_font(tmp_path / f"{name}.ttf", name, chars))
    scans = []
    monkeypatch.setattr(visuals, "_system_font_paths", lambda: scans.append(1) or [])
    names = ZH + ["Ελληνικά"]  # Greek: DejaVu Sans has it
    fonts = visuals.label_fonts(names)
    assert fonts.families[0] == "DejaVu Sans" and set(fonts.families[1:]) == {"Han One", "Han Two"}
    assert not fonts.missing and scans == []  # the fonts matplotlib knows sufficed: no scan of the system folders
    fig = visuals.confusion_figure(cm_for(11), names)
    assert draw(fig) == [] and tick_texts(fig.axes[0])[0] == names
    assert visuals.label_fonts(names) is fonts  # the answer is kept for the process


def test_system_folders_are_scanned_once_per_process(bare_fonts, monkeypatch):
    scans = []
    monkeypatch.setattr(visuals, "_system_font_paths", lambda: scans.append(1) or [])
    assert not visuals.names_drawable(ZH)
    assert not visuals.names_drawable(["한국어"])  # other characters, still no font: no second scan
    assert visuals.names_drawable(["plain", "Ελληνικά"]) and scans == [1]


def test_no_font_labels_by_id_with_a_legend_and_one_warning(bare_fonts, tmp_path, caplog):
    bare_fonts.append(make_font(tmp_path / "Latin.ttf", "Only Latin", "abcdefghijklmnopqrstuvwxyz"))
    caplog.set_level(logging.WARNING, logger="bert_finetune.visuals")
    names = ZH + ["iPhone 手机"]
    assert not visuals.names_drawable(names)
    assert visuals.label_fonts(names).missing == frozenset(ZH_CHARS)

    figs = [visuals.confusion_figure(cm_for(11), names, "评测.csv") for _ in range(2)]
    for fig in figs:
        assert draw(fig) == []  # nothing drawn that no font has, so nothing to silence
        ax = fig.axes[0]
        ids = [str(i) for i in range(11)]
        assert tick_texts(ax) == (ids, ids)
        assert ax.get_xlabel() == "predicted label (id)" and ax.get_ylabel() == "true label (id)"
        assert ax.get_title() == "….csv"
        legend = fig.texts[0].get_text().splitlines()
        assert legend[:11] == [f"{i} = …" for i in range(10)] + ["10 = iPhone …"]
        assert "fonts-noto-cjk" in fig.texts[0].get_text().replace("\n", " ")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert visuals.save_confusion_png(cm_for(11), names, str(tmp_path / "cm.png"), "评测.csv") is False
        image = visuals.confusion_image(cm_for(11), names)
    assert glyph_warnings(record) == [] and image.ndim == 3 and image.shape[2] == 3
    from PIL import Image
    with Image.open(tmp_path / "cm.png") as png:
        assert png.format == "PNG" and png.width > 300

    warned = [r for r in caplog.records if r.name == "bert_finetune.visuals" and r.levelno == logging.WARNING]
    assert len(warned) == 1  # once per process, however many pictures
    message = warned[0].getMessage()
    assert "书籍" in message and "iPhone 手机" in message and "fonts-noto-cjk" in message and "\n" not in message

    # the full mapping, for the text summaries
    assert visuals.label_legend(names).splitlines() == [f"{i} = {n}" for i, n in enumerate(names)]
    table = visuals.label_legend(["a|b", "书籍"], markdown=True)
    assert table.splitlines() == ["| id | label |", "|---|---|", "| 0 | a\\|b |", "| 1 | 书籍 |"]


class FakeWriter:
    enabled = True

    def __init__(self):
        self.images, self.texts, self.curves = {}, {}, []

    def image(self, tag, rgb, step):
        self.images[tag] = rgb

    def pr_curve(self, tag, is_positive, scores, step):
        self.curves.append(tag)

    def text(self, tag, markdown, step):
        self.texts[tag] = markdown


def shares_for(k, n=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    probs = rng.dirichlet(np.ones(k), size=n)
    return [(np.arange(n), labels, probs)]


def test_log_evaluation_writes_the_legend_only_when_the_image_shows_ids(bare_fonts, tmp_path):
    texts = [f"text {i}" for i in range(40)]
    writer = FakeWriter()
    visuals.log_evaluation(writer, 7, cm_for(10), ZH, shares_for(10), texts)
    assert "| 0 | 书籍 |" in writer.texts["eval/labels"] and "| 9 | 酒店 |" in writer.texts["eval/labels"]
    assert "fonts-noto-cjk" in writer.texts["eval/labels"] and "eval/misclassified" in writer.texts

    visuals.reset_font_cache()
    bare_fonts.append(make_font(tmp_path / "TestHan.ttf", "Test Han Sans", ZH_CHARS))
    writer = FakeWriter()
    visuals.log_evaluation(writer, 8, cm_for(10), ZH, shares_for(10), texts)
    assert "eval/labels" not in writer.texts and writer.images["eval/confusion_matrix"].shape[2] == 3


def overlaps(boxes):
    return [(a, b) for a, b in zip(boxes, boxes[1:]) if a.overlaps(b)]


def test_many_classes_with_long_names_stay_legible(bare_fonts):
    small = visuals.confusion_figure(cm_for(2), ["neg", "pos"])
    names = [f"category {i:02d} with long name"[:25].ljust(25, "x") for i in range(30)]
    assert all(len(n) == 25 for n in names)
    big = visuals.confusion_figure(cm_for(30), names, "many.csv")
    assert draw(small) == [] and draw(big) == []

    (sw, sh), (bw, bh) = small.get_size_inches(), big.get_size_inches()
    assert bw > 2 * sw and bh > 2 * sh  # the figure grows with the classes
    ax = big.axes[0]
    renderer = big.canvas.get_renderer()
    cells = [t for t in ax.texts]
    assert len(cells) == 900
    assert max(t.get_fontsize() for t in cells) < min(t.get_fontsize() for t in small.axes[0].texts)
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {90.0}
    assert tick_texts(ax) == (names, names)

    x_boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    y_boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert overlaps(x_boxes) == [] and overlaps(y_boxes) == []
    # the names fit on the picture, clear of the matrix and of the axis titles
    width, height = big.canvas.get_width_height()
    matrix = ax.get_window_extent(renderer)
    for box in x_boxes + y_boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height
        assert not box.overlaps(matrix.shrunk(0.999, 0.999))
    for label in (ax.xaxis.label, ax.yaxis.label, ax.title):
        assert not any(label.get_window_extent(renderer).overlaps(b) for b in x_boxes + y_boxes)
    # each count fits inside its cell
    cell = matrix.width / 30
    assert max(t.get_window_extent(renderer).width for t in cells) < cell
    assert max(t.get_window_extent(renderer).height for t in cells) < cell

    # more than 30: the numbers go, the ticks still fit
    huge = visuals.confusion_figure(cm_for(60), [f"c{i}" for i in range(60)])
    assert draw(huge) == [] and len(huge.axes[0].texts) == 0
    assert overlaps([t.get_window_extent(huge.canvas.get_renderer()) for t in huge.axes[0].get_yticklabels()]) == []


def test_evaluate_report_prints_the_legend_when_the_png_shows_ids(bare_fonts, tmp_path, capsys):
    from bert_finetune import evaluate, metrics
    cm = cm_for(10)
    result = evaluate.EvalResult({**metrics.from_confusion(cm), "loss": 0.5}, cm, np.zeros(0), np.zeros(0),
                                 np.zeros((0, 10)))
    evaluate.write_report(result, ZH, str(tmp_path), {"data": "test.csv"})
    out = capsys.readouterr().out
    assert f"{tmp_path / 'confusion_matrix.png'} shows the labels by id:" in out
    assert "\n".join(f"{i} = {n}" for i, n in enumerate(ZH)) in out
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
