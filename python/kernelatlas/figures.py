"""Figure helpers shared by every job that draws (report, quality, shift): matplotlib's object API on the Agg
canvas, never pyplot, so a library caller's matplotlib state and backend are left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kernelatlas._files import atomic_write

__all__ = ["new_figure", "percent_formatter", "save_figure", "short_text"]

DPI = 110


def new_figure(width: float, height: float, *, constrained: bool = False) -> Any:
    """A matplotlib Figure of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path, *, tight: bool = False) -> str:
    """Write ``fig`` as a PNG on a white ground (atomically: a reader never sees half a file); returns the file
    name.  ``tight``: crop to the drawn content."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI, facecolor="white", bbox_inches="tight" if tight else None)

    atomic_write(Path(path), write)
    return Path(path).name


def percent_formatter() -> Any:
    """Axis ticks of shares in [0, 1] as whole percentages."""
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def short_text(text: str, n: int = 38) -> str:
    """``text`` cut to ``n`` characters, the last one an ellipsis when it was cut."""
    return text if len(text) <= n else text[: n - 1] + "…"
