"""Writing the study's tables and figures into ``results/<profile>/``, atomically.

Every table goes out twice from one DataFrame: CSV for machines, Markdown for readers (the README and the summary
link the Markdown). Figures are PNG at a fixed DPI so re-running the study rewrites them byte-for-byte as far as
matplotlib allows.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: papermill and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sub8.io import atomic_write_bytes, atomic_write_text  # noqa: E402

FIGURE_DPI = 120


def write_table(df: pd.DataFrame, path: str | Path, float_digits: int = 4) -> Path:
    """Write ``df`` to ``path`` (``.csv``) and beside it ``.md``; return the CSV path."""
    path = Path(path).with_suffix(".csv")
    atomic_write_text(path, df.to_csv(index=False, float_format=f"%.{float_digits}g"))
    atomic_write_text(path.with_suffix(".md"), to_markdown(df, float_digits) + "\n")
    return path


def to_markdown(df: pd.DataFrame, float_digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional ``tabulate`` package)."""

    def cell(v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and v != v):
            return ""  # missing (not measured, not applicable): blank, as a reader expects, not "nan"
        if isinstance(v, float):
            return f"{v:.{float_digits}g}"
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically; the figure stays open so a notebook can still show it."""
    path = Path(path).with_suffix(".png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path
