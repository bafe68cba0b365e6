"""The training report's figures, drawn with matplotlib's Agg canvas (no display needed).

Every function takes plain numbers and returns a `Figure`; `png_bytes` renders one. Figures are
built with `matplotlib.figure.Figure` rather than `pyplot`, so no global state or interactive
backend is involved and the functions are safe to call from a server or a test process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

#: Maps drawn per stage: an 8 x 8 grid, as in the original pictures.
MAX_MAPS = 64
#: Bottleneck entries annotated with their index.
TOP_ENTRIES = 10
#: Marker shapes cycled together with the colours, so classes stay apart in greyscale and for
#: readers who confuse some of the hues.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DPI = 100
#: A feature map's longer side on the page, the gap between maps and the room for a map's
#: channel number above it, in inches.
TILE_IN = 1.2
GAP_IN = 0.08
LABEL_IN = 0.18


def png_bytes(figure: Figure) -> bytes:
    """Render a figure as PNG bytes (without matplotlib's `Software` text chunk)."""
    FigureCanvasAgg(figure)  # attach the Agg canvas explicitly: no backend selection
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def label_styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A (colour, marker) for each label, in the order given.

    Every label has its own colour: the ten `tab10` colours, five dark `tab20b` ones, the
    first seven `Dark2` ones, then evenly spaced `turbo` hues. The marker shape changes from
    one label to the next as well, so two labels whose colours look alike differ in shape.
    """
    palette = _listed_colours("tab10")
    palette += [_listed_colours("tab20b")[i] for i in (0, 4, 8, 12, 16)]
    palette += _listed_colours("Dark2")[:7]  # not its grey
    extra = len(labels) - len(palette)
    if extra > 0:
        turbo = matplotlib.colormaps["turbo"]
        palette += [to_hex(turbo(x)) for x in np.linspace(0.05, 0.95, extra)]
    return {label: (palette[i], MARKERS[i % len(MARKERS)]) for i, label in enumerate(labels)}


def _listed_colours(name: str) -> list[str]:
    """The colours of one of matplotlib's qualitative (listed) colormaps, as hex strings."""
    colormap = matplotlib.colormaps[name]
    if not isinstance(colormap, ListedColormap):
        raise ValueError(f"{name} is not a listed colormap")
    return [to_hex(c) for c in np.asarray(colormap.colors)]


def _text_colour(value: float) -> str:
    """Black text on the light end of viridis-like maps, white on the dark end."""
    return "black" if value > 0.55 else "white"


def no_match_figure(
    curve: Sequence[Mapping[str, Any]],
    threshold: float,
    title: str = "No match: what each threshold rejects and lets through",
) -> Figure:
    """False rejects and false accepts against the threshold, the chosen one marked; with a
    curve's `impostor_accept`, the catalogue photos that stood in for outside ones too."""
    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = figure.add_subplot()
    thresholds = [point["threshold"] for point in curve]
    ax.plot(
        thresholds, [point["false_reject"] for point in curve], label="correct matches rejected"
    )
    accepts = [point["false_accept"] for point in curve]
    if all(value is not None for value in accepts):
        ax.plot(thresholds, accepts, label="outside photos accepted")
    if curve and all(point.get("impostor_accept") is not None for point in curve):
        ax.plot(
            thresholds,
            [point["impostor_accept"] for point in curve],
            linestyle=":",
            label="stand-ins accepted (catalogue photos as outside ones)",
        )
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("threshold on the similarity to the nearest catalogue view")
    ax.set_ylabel("share of photos")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(loc="center right")
    return figure


def confusion_figure(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> Figure:
    """Heatmap of the confusion matrix (rows: truth, columns: predicted), counts written in.

    Colours are row-normalised (the share of each true class's images), so classes with
    different numbers of held-out images read alike; the numbers are the raw counts.
    """
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(labels)
    side = max(5.0, 0.55 * n + 3.0)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("Hold-out confusion matrix (counts; colour = share of the true class)")
    font = 10 if n <= 15 else 7
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]:.0f}",
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=font,
                )
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return figure


def _grid_axes(candidates: Sequence[Mapping[str, Any]]) -> tuple[list, list] | None:
    """Rows (C values) and columns (RBF gammas, high to low, then "linear") of the grid."""
    kernels = {c["params"].get("kernel") for c in candidates}
    if not kernels <= {"linear", "rbf"}:
        return None  # another grid than ours: the table alone describes it
    c_values = sorted({c["params"]["C"] for c in candidates})
    gammas = sorted(
        {c["params"]["gamma"] for c in candidates if c["params"].get("kernel") == "rbf"},
        reverse=True,
    )
    columns: list = [*gammas, *(["linear"] if "linear" in kernels else [])]
    return c_values, columns


def grid_figure(candidates: Sequence[Mapping[str, Any]], best: Mapping[str, Any]) -> Figure | None:
    """Heatmap of mean CV accuracy over C x gamma (RBF) plus a linear-kernel column.

    Each cell reads "mean ± std" over the folds; the chosen parameters are boxed in red.
    None when the grid is not the linear/RBF grid over C and gamma.
    """
    axes = _grid_axes(candidates)
    if axes is None or not candidates:
        return None
    c_values, columns = axes
    means = np.full((len(c_values), len(columns)), np.nan)
    stds = np.full_like(means, np.nan)
    for candidate in candidates:
        params = candidate["params"]
        col = "linear" if params["kernel"] == "linear" else params["gamma"]
        i, j = c_values.index(params["C"]), columns.index(col)
        means[i, j], stds[i, j] = candidate["mean_accuracy"], candidate["std_accuracy"]
    figure = Figure(
        figsize=(1.5 * len(columns) + 2.5, 0.8 * len(c_values) + 2.0), layout="constrained"
    )
    ax = figure.add_subplot()
    low, high = np.nanmin(means), np.nanmax(means)
    image = ax.imshow(
        np.ma.masked_invalid(means),
        cmap="viridis",
        vmin=low,
        vmax=high if high > low else low + 1e-6,
        aspect="auto",
    )
    ax.set_xticks(range(len(columns)), [f"γ={g:g}" if g != "linear" else "linear" for g in columns])
    ax.set_yticks(range(len(c_values)), [f"C={c:g}" for c in c_values])
    ax.set_xlabel("RBF gamma (left) / linear kernel (right)")
    ax.set_title("Mean cross-validation accuracy (± spread over folds)", pad=10)
    if "linear" in columns and len(columns) > 1:
        ax.axvline(len(columns) - 1.5, color="white", linewidth=4)  # RBF | linear
    scale = (means - low) / (high - low) if high > low else np.ones_like(means)
    for (i, j), mean in np.ndenumerate(means):
        if not np.isnan(mean):
            ax.text(
                j,
                i,
                f"{mean:.3f}\n±{stds[i, j]:.3f}",
                ha="center",
                va="center",
                fontsize=9,
                color=_text_colour(float(scale[i, j])),
            )
    best_col = "linear" if best.get("kernel") == "linear" else best.get("gamma")
    if best.get("C") in c_values and best_col in columns:
        i, j = c_values.index(best["C"]), columns.index(best_col)
        # clip_on=False: a cell on the edge of the grid keeps its whole frame.
        frame = Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3)
        frame.set_clip_on(False)
        ax.add_patch(frame)
    figure.colorbar(image, ax=ax, label="mean CV accuracy")
    return figure


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of the feature vectors (PCA initialisation, fixed seed: reproducible)."""
    from sklearn.manifold import TSNE  # imported here: only this figure needs it
    from threadpoolctl import threadpool_limits

    n = len(features)
    tsne = TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30, (n - 1) / 3))
    # One thread: for a few hundred points a single core needs well under a second, while
    # the OpenMP gradient loop (1000 synchronised iterations) slows down many times over as
    # soon as another process holds one of its cores, as on a shared CI machine.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(np.asarray(features, dtype=np.float32))


def tsne_figure(
    embedding: np.ndarray, labels: Sequence[str] | np.ndarray, holdout: np.ndarray, title: str
) -> Figure:
    """Scatter of the 2-D embedding: one colour and shape per label, held-out points hollow."""
    label_array = np.asarray(labels)
    holdout = np.asarray(holdout, dtype=bool)
    names = sorted(set(label_array.tolist()))
    styles = label_styles(names)
    figure = Figure(figsize=(10.5, 7.5), layout="constrained")
    ax = figure.add_subplot()
    for name in names:
        colour, marker = styles[name]
        train = (label_array == name) & ~holdout
        held = (label_array == name) & holdout
        x, y = embedding[train].T
        ax.scatter(x, y, s=36, c=colour, marker=marker, edgecolors="none", alpha=0.85)
        # Hollow and drawn on top, so a held-out point inside its cluster is still visible.
        x, y = embedding[held].T
        ax.scatter(
            x,
            y,
            s=64,
            facecolors="none",
            edgecolors=colour,
            marker=marker,
            linewidths=1.8,
            zorder=3,
        )
    handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker=styles[name][1],
            color=styles[name][0],
            markersize=8,
            label=name,
        )
        for name in names
    ]
    handles += [
        Line2D([], [], linestyle="", label=""),
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            color="grey",
            markersize=8,
            label="filled: training split",
        ),
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markerfacecolor="none",
            markeredgecolor="grey",
            markeredgewidth=1.8,
            markersize=8,
            label="hollow: held out",
        ),
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9
    )
    ax.set_xticks([])
    ax.set_yticks([])  # t-SNE axes carry no units; only neighbourhoods mean something
    ax.set_title(title)
    return figure


def top_indices(vector: np.ndarray, count: int = TOP_ENTRIES) -> list[int]:
    """Indices of the `count` largest entries, largest first."""
    order = np.argsort(-np.asarray(vector), kind="stable")
    return [int(i) for i in order[:count]]


def _label_rows(indices: Sequence[int], min_gap: float) -> dict[int, int]:
    """A text row for each annotated index: indices closer than `min_gap` go to other rows."""
    rows: dict[int, int] = {}
    for index in sorted(indices):
        taken = {row for other, row in rows.items() if index - other < min_gap}
        rows[index] = next(row for row in range(len(indices) + 1) if row not in taken)
    return rows


def bottleneck_figure(vector: np.ndarray, title: str) -> Figure:
    """Every entry of one feature vector as a thin bar; the ten largest annotated.

    The indices of the ten largest entries are written in a row above the tallest bar, each
    joined to its bar by a dotted line; neighbours too close to be read apart are moved to a
    second row, so no two numbers print over each other whatever the vector.
    """
    vector = np.asarray(vector, dtype=float)
    figure = Figure(figsize=(13.0, 4.5), layout="constrained")
    ax = figure.add_subplot()
    # One-pixel-wide bars for ~1000-2000 entries: vlines draws them faster than bar().
    ax.vlines(np.arange(vector.size), 0, vector, colors="#1f77b4", linewidth=0.8)
    top = top_indices(vector)
    ax.plot(top, vector[top], linestyle="", marker="o", markersize=4, color="#d62728")
    low, high = min(0.0, float(vector.min())), float(vector.max())
    row_height = 0.08 * ((high - low) or 1.0)
    # A four-digit index at 8 pt is about 3 % of the axis width.
    rows = _label_rows(top, min_gap=0.035 * vector.size)
    for index, row in rows.items():
        ax.annotate(
            str(index),
            xy=(index, vector[index]),
            # Kept inside the axes, so an index near either end is not cut off by the edge.
            xytext=(
                np.clip(index, 0.02 * vector.size, 0.98 * vector.size),
                high + (row + 0.4) * row_height,
            ),
            ha="center",
            va="bottom",
            fontsize=8,
            color="#d62728",
            arrowprops={"arrowstyle": "-", "color": "#d62728", "linestyle": ":", "lw": 0.8},
        )
    ax.set_xlim(-0.5, vector.size - 0.5)
    ax.set_ylim(low, high + (max(rows.values(), default=0) + 1.6) * row_height)
    ax.set_xlabel("feature index")
    ax.set_ylabel("value")
    ax.set_title(title)
    return figure


def _normalised(feature_map: np.ndarray) -> np.ndarray:
    """One map scaled to 0..1 by its own range (a constant map becomes all zeros)."""
    low, high = float(feature_map.min()), float(feature_map.max())
    if high <= low:
        return np.zeros_like(feature_map, dtype=float)
    return (feature_map - low) / (high - low)


def feature_map_title(stage: int, name: str, maps: np.ndarray) -> str:
    """ "stage k: <name>, C maps of HxW (first 64 shown)" for maps of shape [H, W, C]."""
    height, width, channels = maps.shape
    shown = f"first {MAX_MAPS} shown" if channels > MAX_MAPS else "all shown"
    return f"stage {stage}: {name}, {channels} maps of {height}x{width} ({shown})"


def feature_map_figure(maps: np.ndarray, title: str) -> Figure:
    """A grid of up to 64 maps of one stage ([H, W, C]), 8 per row, each on its own scale.

    The maps are tiled into one image with white gaps (one `imshow` instead of 64 axes: the
    same picture, drawn several times faster), each tile headed by its channel number.
    """
    height, width = maps.shape[:2]
    count = min(maps.shape[-1], MAX_MAPS)
    columns = min(8, count)
    rows = math.ceil(count / columns)
    scale = TILE_IN / max(height, width)  # inches per map pixel
    gap_x = max(1, round(GAP_IN / scale))
    gap_y = max(1, round(LABEL_IN / scale))  # room above each tile for its number
    mosaic = np.full((rows * (height + gap_y), columns * (width + gap_x) - gap_x), np.nan)
    corners = []
    for k in range(count):
        row, column = divmod(k, columns)
        y, x = row * (height + gap_y) + gap_y, column * (width + gap_x)
        mosaic[y : y + height, x : x + width] = _normalised(maps[..., k])
        corners.append((y, x))
    margin, top = 0.1, 0.5
    mosaic_w, mosaic_h = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    fig_w, fig_h = mosaic_w + 2 * margin, mosaic_h + margin + top
    figure = Figure(figsize=(fig_w, fig_h))
    ax = figure.add_axes((margin / fig_w, margin / fig_h, mosaic_w / fig_w, mosaic_h / fig_h))
    ax.set_axis_off()
    # Default interpolation: smoothed where large maps are shrunk, crisp pixels where small
    # ones (14x14) are enlarged, so each square shows what the network computed.
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=0, vmax=1)
    for k, (y, x) in enumerate(corners):
        channel = maps[..., k]
        flat = " (flat)" if float(channel.max()) <= float(channel.min()) else ""
        ax.text(x + width / 2, y - gap_y / 2, f"#{k}{flat}", ha="center", va="center", fontsize=7)
    figure.suptitle(title, fontsize=11, y=1 - 0.25 / fig_h, va="center")
    return figure
