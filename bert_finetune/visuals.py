"""Pictures of an evaluation: the confusion matrix as an image, per-class PR curves, misclassified examples.

Drawing uses matplotlib's Agg canvas directly (no pyplot: no GUI backend, no global figure state).
`log_evaluation` writes them all to TensorBoard through reporting.Writer; the evaluate CLI saves the
same confusion matrix as a PNG.

Label names are drawn with a font that really has their glyphs (checked character by character, not
by font name): DejaVu Sans, matplotlib's own, for Latin, Greek and Cyrillic, and for what it lacks
(Chinese, Japanese, Korean, ...) an installed font that has it, even one installed after matplotlib
built its font cache. Where no font has them the matrix shows the labels by id, with an id-to-name
legend beside it and in the text summaries, and the log says once which labels and what to install.
"""
import io
import logging
import os
import unicodedata
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BASE_FONT = "DejaVu Sans"  # ships with matplotlib: always there
# tried first, in this order, for characters the base font lacks; any other installed font that has them comes after
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "SimHei", "Microsoft YaHei", "PingFang SC",
             "Heiti SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Arial Unicode MS")
CJK_PACKAGE = "fonts-noto-cjk"
MAX_TEXT_CHARS = 300  # per misclassified example shown in TensorBoard
MAX_LABEL_CHARS = 40  # a longer name is cut on the axes (the legend and the text summaries keep it whole)
ELLIPSIS = "\u2026"


@dataclass(frozen=True)
class LabelFonts:
    """How some text can be drawn: `families` for matplotlib's font.family (the base font first, then fonts for
    what it lacks, used glyph by glyph), and `missing`, the characters no installed font has."""
    families: tuple
    missing: frozenset


_choices = {}  # frozenset of characters -> LabelFonts, for this process
_state = {"system_scanned": False, "warned": False}


def reset_font_cache():
    """Forget the fonts chosen, the system-font scan and the warning given (for tests, or after installing fonts)."""
    _choices.clear()
    _state.update(system_scanned=False, warned=False)


def _system_font_paths() -> list:
    """Every font file in the usual system folders (and fc-list's, where there is one)."""
    from matplotlib import font_manager
    return font_manager.findSystemFonts()


def _coverage(path: str, index: int, chars: frozenset) -> frozenset:
    """Those of chars that the font face at path has a glyph for."""
    from matplotlib import ft2font
    try:
        font = ft2font.FT2Font(path, face_index=index) if index else ft2font.FT2Font(path)  # face_index: mpl >= 3.10
        charmap = font.get_charmap()
    except Exception:  # unreadable, or not a font after all
        return frozenset()
    return frozenset(c for c in chars if ord(c) in charmap)


def _weight(entry) -> int:
    from matplotlib import font_manager
    w = entry.weight
    return w if isinstance(w, int) else font_manager.weight_dict.get(str(w).lower(), 400)


def _candidate_faces() -> list:
    """(family, path, face index) of each font family matplotlib knows, its regular face; preferred families first."""
    from matplotlib import font_manager
    best = {}
    for e in font_manager.fontManager.ttflist:
        if e.name == BASE_FONT or e.name.startswith("Last Resort"):  # Last Resort draws every character as a box
            continue
        score = (e.style != "normal", e.stretch != "normal", abs(_weight(e) - 400))
        if e.name not in best or score < best[e.name][0]:
            best[e.name] = (score, e.fname, getattr(e, "index", 0))
    rank = {name: i for i, name in enumerate(CJK_FONTS)}
    names = sorted(best, key=lambda n: (rank.get(n, len(rank)), n))
    return [(n, best[n][1], best[n][2]) for n in names]


def _pick(needed: frozenset):
    """Families that together have the needed characters (one that has them all if any), and what none has."""
    chosen, left, covers = [], set(needed), []
    for name, path, index in _candidate_faces():
        has = _coverage(path, index, needed)
        if has >= needed:
            return [name], frozenset()
        if has:
            covers.append((name, has))
    while left and covers:  # no single font has them all: the fewest fonts that have the most (e.g. mixed scripts)
        name, has = max(covers, key=lambda c: len(c[1] & left))  # max keeps the first (preferred) of a tie
        if not has & left:
            break
        chosen.append(name)
        left -= has
        covers = [c for c in covers if c[0] != name]
    return chosen, frozenset(left)


def _add_system_fonts() -> int:
    """Once per process: font files in the system folders that matplotlib's cached font list lacks (installed after
    that cache was built) are added to it. Returns how many."""
    if _state["system_scanned"]:
        return 0
    _state["system_scanned"] = True
    from matplotlib import font_manager
    known = {os.path.realpath(e.fname) for e in font_manager.fontManager.ttflist}
    added = 0
    for path in _system_font_paths():
        if os.path.realpath(path) in known:
            continue
        try:
            font_manager.fontManager.addfont(path)
            added += 1
        except Exception as e:  # a broken font file is skipped, as matplotlib's own scan does
            logger.debug("font %s skipped: %s", path, e)
    if added:
        logger.info("%d font file(s) in the system folders were missing from matplotlib's font cache; added", added)
    return added


def _drawable_chars(text: str) -> set:
    return {c for c in text if c.isprintable() and not c.isspace()}


def label_fonts(texts) -> LabelFonts:
    """The fonts that draw these texts, chosen by their glyphs; the answer is kept for the process."""
    chars = frozenset().union(*(_drawable_chars(str(t)) for t in texts))
    if chars in _choices:
        return _choices[chars]
    from matplotlib import font_manager
    base = font_manager.findfont(font_manager.FontProperties(family=BASE_FONT))
    needed = chars - _coverage(str(base), getattr(base, "face_index", 0), chars)
    chosen, missing = _pick(needed) if needed else ([], frozenset())
    if missing and _add_system_fonts():
        chosen, missing = _pick(needed)
    if chosen:
        logger.debug("label characters %r drawn with %s", "".join(sorted(needed)), ", ".join(chosen))
    _choices[chars] = LabelFonts((BASE_FONT, *chosen), missing)
    return _choices[chars]


def names_drawable(names) -> bool:
    """Whether some installed font has every character of the label names: if not, pictures show them by id."""
    return not label_fonts([str(n) for n in names]).missing


def _shown(text: str, missing=frozenset()) -> str:
    """text as it can be drawn: non-printing characters dropped, each run of undrawable ones one '…'."""
    out = []
    for c in str(text):
        if not c.isprintable() and not c.isspace():
            continue
        if c in missing:
            if not out or out[-1] != ELLIPSIS:
                out.append(ELLIPSIS)
        else:
            out.append(" " if c.isspace() else c)
    return "".join(out)


def _cut(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + ELLIPSIS


def label_legend(names, markdown: bool = False) -> str:
    """Which id is which label: '0 = 书籍' lines, or a markdown table; for pictures that show labels by id."""
    if not markdown:
        return "\n".join(f"{i} = {name}" for i, name in enumerate(names))
    rows = [f"| {i} | {str(name).replace(chr(92), chr(92) * 2).replace('|', chr(92) + '|')} |"
            for i, name in enumerate(names)]
    return "\n".join(["| id | label |", "|---|---|", *rows])


def _install_hint(missing) -> str:
    east_asian = any(unicodedata.name(c, "").split(" ")[0] in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO")
                     or unicodedata.east_asian_width(c) in "WF" for c in missing)
    return (f"install a CJK font, e.g. `apt-get install {CJK_PACKAGE}`" if east_asian else
            "install a font that has them, e.g. `apt-get install fonts-noto`")


def _warn_once(names, missing):
    if _state["warned"]:
        return
    _state["warned"] = True
    bad = [str(n) for n in names if _drawable_chars(str(n)) & missing]
    listed = ", ".join(bad[:12]) + (f" and {len(bad) - 12} more" if len(bad) > 12 else "")
    logger.warning("no installed font has the characters %s of the labels %s: the confusion matrix shows the labels "
                   "by id, with an id-to-name legend beside it and in the text summary; %s (then restart) to see "
                   "the names", "".join(sorted(missing)), listed, _install_hint(missing))


def _width_em(text: str) -> float:
    """Rough width of text in ems: CJK characters are square, the rest about 0.6 em."""
    return sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.62 for c in text)


def confusion_figure(cm: np.ndarray, names, title: str = ""):
    """A matplotlib Figure: cells coloured by the share of their true class, annotated with counts.

    It grows with the number of classes and the longest name; the numbers in the cells shrink as classes are added.
    Names that no installed font can draw are shown by id, with a legend beside the matrix."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    labels = _axis_labels([str(n) for n in names], title)
    k = len(labels.ticks)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows != 0)

    tick_pt = 10.0 if k <= 15 else 8.0 if k <= 40 else 6.0
    annotate = k <= 30  # past that the numbers no longer fit in their cells
    matrix = max(3.5, k * (0.45 if annotate else max(0.15, 1.6 * tick_pt / 72)))  # inches
    longest = max((_width_em(t) for t in labels.ticks), default=1.0) * tick_pt / 72  # a rough guess
    rotation = 0 if longest <= 0.8 * matrix / max(k, 1) else 45 if k <= 10 else 90

    # the parts are made first and measured, then placed side by side: the figure is as big as they need
    fig = Figure(figsize=(8, 8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.1, 0.6, 0.6))
    cax = fig.add_axes((0.8, 0.1, 0.05, 0.6))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, cax=cax, label="share of the true class", ticks=np.linspace(0.0, 1.0, 6))
    x_align = {0: dict(ha="center"), 45: dict(ha="right", rotation_mode="anchor"), 90: dict(ha="center")}[rotation]
    ax.set_xticks(range(k), labels=labels.ticks, rotation=rotation, fontsize=tick_pt, family=labels.family, **x_align)
    ax.set_yticks(range(k), labels=labels.ticks, fontsize=tick_pt, family=labels.family)
    ax.set_xlabel("predicted label" + (" (id)" if labels.by_id else ""))
    ax.set_ylabel("true label" + (" (id)" if labels.by_id else ""))
    if labels.title:
        ax.set_title(labels.title, family=labels.family)
    if annotate:
        cell_pt = max(5.0, min(10.0, 10.0 - (k - 10) * 0.2))  # 10 pt up to 10 classes, 6 at 30
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=cell_pt,
                        color="white" if share[i, j] > 0.5 else "black")
    side = None
    if labels.legend:
        lines = labels.legend + ["", "Names need a font with", "their characters, e.g.", f"{CJK_PACKAGE}; all names",
                                 "are in the text summary."]
        side = fig.text(0, 0, "\n".join(lines), va="top", ha="left", fontsize=min(tick_pt, 9.0),
                        family=labels.family, linespacing=1.3)
    _place(fig, ax, cax, side, matrix, bool(labels.title))
    return fig


@dataclass
class _AxisLabels:
    ticks: list  # the names, or their ids where no font draws them
    legend: list  # "id = name" lines where the ticks are ids
    title: str
    family: list  # the font families, in order of preference
    by_id: bool


def _axis_labels(names: list, title: str) -> _AxisLabels:
    """What the axes show: the names where a font has their characters, else ids (warned about once)."""
    fonts = label_fonts(names + [title])
    by_id = not names_drawable(names)
    if by_id:
        _warn_once(names, label_fonts(names).missing)
        ticks = [str(i) for i in range(len(names))]
        legend = [f"{i} = {_cut(_shown(n, fonts.missing), 24)}" for i, n in enumerate(names)]
    else:
        ticks, legend = [_cut(_shown(n)) for n in names], []
    return _AxisLabels(ticks, legend, _shown(title, fonts.missing), list(fonts.families), by_id)


def _place(fig, ax, cax, side, matrix: float, titled: bool):
    """Measure the rendered tick labels, axis labels, title and legend, and size the figure around them:
    the matrix `matrix` inches square, the colour bar to its right, the legend (`side`) after it."""
    dpi = fig.dpi
    renderer = fig.canvas.get_renderer()

    def size(texts):  # the largest width and height among texts, in inches
        boxes = [t.get_window_extent(renderer) for t in texts if t is not None and t.get_text()]
        return (max((b.width for b in boxes), default=0.0) / dpi, max((b.height for b in boxes), default=0.0) / dpi)

    tick_pad = 0.12  # tick mark and the gap after it
    margin, gap = 0.15, 0.08
    left = margin + size([ax.yaxis.label])[0] + gap + size(ax.get_yticklabels())[0] + tick_pad
    bottom = margin + size([ax.xaxis.label])[1] + gap + size(ax.get_xticklabels())[1] + tick_pad
    top = margin + (size([ax.title])[1] + 0.1 if titled else 0.0)
    bar_x = left + matrix + 0.25
    legend_x = bar_x + 0.2 + 0.9  # the colour bar, its tick labels and its label
    legend_w, legend_h = size([side])
    width = legend_x + (legend_w + margin if side is not None else 0.0)
    height = max(bottom + matrix + top, legend_h + 2 * margin)
    fig.set_size_inches(width, height)
    ax.set_position((left / width, bottom / height, matrix / width, matrix / height))
    cax.set_position((bar_x / width, bottom / height, 0.2 / width, matrix / height))
    if side is not None:
        side.set_position((legend_x / width, (bottom + matrix) / height if legend_h <= matrix + top
                           else 1.0 - margin / height))


def _render(figure, matrix, names, title, render):
    """render(figure(matrix, names, title)) with fonts that have the glyphs of the names and the title."""
    import matplotlib
    # no warning is silenced: every text is drawn with fonts that have its glyphs, or shown another way
    with matplotlib.rc_context({"font.family": list(label_fonts([str(n) for n in names] + [title]).families)}):
        return render(figure(matrix, names, title))


def _rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _png_writer(path: str):
    def write(fig):
        buffer = io.BytesIO()  # written whole, so a failed draw leaves no half file
        fig.savefig(buffer, format="png")
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    return write


def confusion_image(cm: np.ndarray, names, title: str = "") -> np.ndarray:
    """The confusion matrix drawn as an RGB image, height x width x 3, uint8."""
    return _render(confusion_figure, cm, names, title, _rgb)


def save_confusion_png(cm: np.ndarray, names, path: str, title: str = "") -> bool:
    """The confusion matrix as a PNG at path. Returns whether it shows the label names (False: by id, see
    label_legend)."""
    _render(confusion_figure, cm, names, title, _png_writer(path))
    return names_drawable(names)


def misclassified_markdown(texts, indices, labels, probs, names, k: int = 10) -> str:
    """The k misclassified examples the model was surest about, as a markdown table."""
    indices, labels, probs = np.asarray(indices), np.asarray(labels), np.asarray(probs)
    preds = probs.argmax(-1) if len(probs) else np.zeros(0, dtype=np.int64)
    wrong = np.flatnonzero(preds != labels)
    if len(wrong) == 0:
        return f"No misclassified examples among {len(labels)}."
    confidence = probs[wrong, preds[wrong]]
    chosen = wrong[np.lexsort((indices[wrong], -confidence))[:k]]  # surest first; ties by position
    lines = [f"{len(wrong)} of {len(labels)} examples misclassified; the {len(chosen)} the model was surest about:", "",
             "| true | predicted | probability | text |", "|---|---|---|---|"]
    for i in chosen:
        text = " ".join(str(texts[indices[i]]).split())
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS] + "…"
        text = text.replace("\\", "\\\\").replace("|", "\\|")
        lines.append(f"| {names[labels[i]]} | {names[preds[i]]} | {probs[i, preds[i]]:.4f} | {text} |")
    return "\n".join(lines)


def log_evaluation(writer, step: int, cm: np.ndarray, names, shares, texts, k: int = 10):
    """Confusion-matrix image, one PR curve per class, and the surest mistakes, in TensorBoard; where the image
    shows the labels by id (no font has their characters), also the id-to-name legend as text (eval/labels).

    `shares`: every rank's (dataset indices, true labels, probabilities), e.g. from distributed.gather.
    """
    if not writer.enabled:
        return
    indices = np.concatenate([s[0] for s in shares])
    labels = np.concatenate([s[1] for s in shares])
    probs = np.concatenate([s[2] for s in shares])
    writer.image("eval/confusion_matrix", confusion_image(cm, names, f"step {step}"), step)
    if not names_drawable(names):  # the image shows ids: which is which
        writer.text("eval/labels", "No installed font has the characters of these label names, so the confusion "
                    f"matrix image shows them by id (install {CJK_PACKAGE} or another font that has them):\n\n"
                    + label_legend(names, markdown=True), step)
    for c, name in enumerate(names):
        writer.pr_curve(f"eval_pr/{name}", labels == c, probs[:, c], step)
    writer.text("eval/misclassified", misclassified_markdown(texts, indices, labels, probs, names, k), step)


# ---------------------------------------------------------------- multi-label

def multi_label_confusion_figure(mcm: np.ndarray, names, title: str = ""):
    """One small 2x2 matrix per label ([[tn, fp], [fn, tp]]: rows true no/yes, columns predicted no/yes), cells
    coloured by the share of their true row, four to a row of the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mcm = np.asarray(mcm, dtype=np.int64)
    names = [str(n) for n in names]
    by_id = not names_drawable(names)
    if by_id:
        _warn_once(names, label_fonts(names).missing)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows + (0.4 if title else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, cm) in enumerate(zip(names, mcm)):
        ax = fig.add_subplot(rows, cols, i + 1)
        totals = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals != 0)
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for r in range(2):
            for c in range(2):
                ax.text(c, r, f"{cm[r, c]}\n{share[r, c]:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if share[r, c] > 0.5 else "black")
        ax.set_xticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_yticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_title(str(i) if by_id else _cut(_shown(name), 24), fontsize=10)
        if i % cols == 0:
            ax.set_ylabel("true", fontsize=8)
        if i >= len(names) - cols:
            ax.set_xlabel("predicted", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def multi_label_confusion_image(mcm: np.ndarray, names, title: str = "") -> np.ndarray:
    """The per-label matrices drawn as an RGB image, height x width x 3, uint8."""
    return _render(multi_label_confusion_figure, mcm, names, title, _rgb)


def save_multi_label_confusion_png(mcm: np.ndarray, names, path: str, title: str = "") -> bool:
    """The per-label matrices as a PNG at path; returns whether the names are shown (False: by id)."""
    _render(multi_label_confusion_figure, mcm, names, title, _png_writer(path))
    return names_drawable(names)


def log_multi_label_evaluation(writer, step: int, result, names, shares):
    """Per label: PR curve, F1 and threshold; the per-label confusion image (micro/macro F1 are eval/ scalars)."""
    if not writer.enabled:
        return
    labels = np.concatenate([s[1] for s in shares])
    probs = np.concatenate([s[2] for s in shares])
    writer.image("eval/confusion_per_label", multi_label_confusion_image(result.confusion, names, f"step {step}"),
                 step)
    for i, name in enumerate(names):
        writer.pr_curve(f"eval_pr/{name}", labels[:, i] == 1, probs[:, i], step)
    writer.scalars({name: float(result.per_label["f1"][i]) for i, name in enumerate(names)}, step, "eval_label_f1/")
    writer.scalars({name: float(t) for name, t in zip(names, result.thresholds)}, step, "eval_threshold/")
