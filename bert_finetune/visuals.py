"""Pictures of an evaluation: the confusion matrix as an image, per-class PR curves, misclassified examples.

Drawing uses matplotlib's Agg canvas directly (no pyplot: no GUI backend, no global figure state).
`log_evaluation` writes them all to TensorBoard through reporting.Writer; the evaluate CLI saves the
same confusion matrix as a PNG.
"""
import io
import warnings

import numpy as np

# label names in Chinese, Japanese or Korean need a font with those glyphs: the first of these that is installed
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")
MAX_TEXT_CHARS = 300  # per misclassified example shown in TensorBoard


def _font_families() -> list:
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in CJK_FONTS if name in installed]


def confusion_figure(cm: np.ndarray, names, title: str = ""):
    """A matplotlib Figure: cells coloured by the share of their true class, annotated with counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    k = len(names)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows != 0)
    side = min(max(4.0, 0.6 * k + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if title:
        ax.set_title(title)
    if k <= 30:  # past that the numbers no longer fit in their cells
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8 if k > 10 else 10,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def _render(cm, names, title, render):
    import matplotlib
    with matplotlib.rc_context({"font.family": _font_families()}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # no installed font has it: a box
        return render(confusion_figure(cm, names, title))


def confusion_image(cm: np.ndarray, names, title: str = "") -> np.ndarray:
    """The confusion matrix drawn as an RGB image, height x width x 3, uint8."""
    def render(fig):
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return _render(cm, names, title, render)


def save_confusion_png(cm: np.ndarray, names, path: str, title: str = ""):
    def render(fig):
        buffer = io.BytesIO()  # written whole, so a failed draw leaves no half file
        fig.savefig(buffer, format="png")
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    _render(cm, names, title, render)


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
    """Confusion-matrix image, one PR curve per class, and the surest mistakes, in TensorBoard.

    `shares`: every rank's (dataset indices, true labels, probabilities), e.g. from distributed.gather.
    """
    if not writer.enabled:
        return
    indices = np.concatenate([s[0] for s in shares])
    labels = np.concatenate([s[1] for s in shares])
    probs = np.concatenate([s[2] for s in shares])
    writer.image("eval/confusion_matrix", confusion_image(cm, names, f"step {step}"), step)
    for c, name in enumerate(names):
        writer.pr_curve(f"eval_pr/{name}", labels == c, probs[:, c], step)
    writer.text("eval/misclassified", misclassified_markdown(texts, indices, labels, probs, names, k), step)
