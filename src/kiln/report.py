"""`report.md` for a run directory, assembled from the sections its stages push.

Every stage that has something to say about a run (prepare, the training loop, `kiln eval`, a
workload's own measurements, the speedrun's tables) pushes one named section with
`write_section`; it lands in `report.d/NN-name.md` and `report.md` is rebuilt from every section
there, in order. Nothing is spliced into or appended to `report.md` itself, so a stage that runs
again (a resumed run finishing, a second `kiln eval`) replaces its own section and keeps everyone
else's. This module knows no stage: it is the sink they all write to.
"""

from __future__ import annotations

import re
from pathlib import Path

from kiln.runs import atomic_write_text

SECTIONS = "report.d"

# Where a section goes, by name: the data first, then training, evaluation, what the workload
# itself measured (50, the default), the speedrun's post-training tables, and samples last.
ORDER = {"data": 10, "training": 20, "evaluation": 30, "post_training": 80, "samples": 90}

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def write_section(run_dir: str | Path, name: str, lines: list[str] | str, rebuild: bool = True) -> Path:
    """Push section `name` of a run's report (replacing its previous text), then rebuild
    `report.md` (unless `rebuild` is False, for a stage that pushes several sections at once).
    Returns the report's path."""
    if not _NAME.match(name):
        raise ValueError(f"report section name {name!r}: use lowercase letters, digits, '-' and '_'")
    text = lines if isinstance(lines, str) else "\n".join(lines)
    path = Path(run_dir) / SECTIONS / f"{ORDER.get(name, 50):02d}-{name}.md"
    atomic_write_text(path, text.rstrip() + "\n")
    return write_report(run_dir) if rebuild else Path(run_dir) / "report.md"


def write_report(run_dir: str | Path) -> Path:
    """`report.md` from the run's sections, in order, under one title."""
    run = Path(run_dir)
    lines = [f"# kiln run report: `{run}`", ""]
    for part in sorted((run / SECTIONS).glob("*.md")):
        lines += [part.read_text().rstrip(), ""]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def plot_over_steps(path: Path, curves: list[tuple[str, list[tuple[float, float]], bool]], ylabel: str, title: str,
                    size: tuple[float, float] = (7, 4), ylim: tuple[float, float] | None = None,
                    xlabel: str = "step", logx: bool = False) -> bool:
    """A PNG of figures against training step (or `xlabel`, on a log axis with `logx`), one curve per
    (label, [(step, value)], evaluation?[, matplotlib style]): training curves as thin lines,
    evaluations as points joined by lines; a style dict (color, linestyle, marker) overrides. False
    when nothing to plot."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, points, evaluation, *style in curves:
        kw = {"marker": "o"} if evaluation else {"lw": 1, "alpha": 0.8}
        ax.plot(*zip(*points), label=label, **{**kw, **(style[0] if style else {})})
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, **({"ylim": ylim} if ylim else {}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
