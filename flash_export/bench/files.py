"""The files a benchmark report is written to: CSV rows and a PNG of latency and memory."""

import io
from typing import Any, Dict, List

from flash_export.bench.benchmark import PathLike
from flash_export.bench.report import CSV_FIELDS, BenchReport, BenchRow
from flash_export.core.errors import FlashExportError
from flash_export.core.install import pip_install_line


def csv_text(report: BenchReport) -> str:
    """The rows as CSV text (columns CSV_FIELDS)."""
    import csv

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS))
    writer.writeheader()
    for row in report.csv_rows():
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def require_matplotlib() -> None:
    """Raise a one-line FlashExportError when the optional plot extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise FlashExportError(f"--plot needs matplotlib: {pip_install_line('plot')}") from exc


def plot_report(report: BenchReport, path: PathLike) -> None:
    """Save a PNG: p50 latency and peak memory against length, a line per backend and batch."""
    fig = figure(report)  # first: it says in one line when matplotlib is missing
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def figure(report: BenchReport) -> Any:
    """The matplotlib figure `plot_report` saves; its x axes are labelled with the lengths run."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: Dict[str, List[BenchRow]] = {}
    for r in report.rows:
        label = r.backend + ("" if r.device == "cpu" else f":{r.device}") + (
            "" if r.chunk is None else f" chunk {r.chunk}") + (
            f" B={r.batch}" if len(report.config.batches) > 1 else "")
        series.setdefault(label, []).append(r)
    for label, rows in series.items():
        ok = [r for r in rows if r.p50_ms is not None]
        if ok:
            ax_t.plot([r.seq_q for r in ok], [r.p50_ms for r in ok], marker="o", label=label)
        mem = [r for r in rows if r.peak_rss_mb is not None]
        if mem:
            ax_m.plot([r.seq_q for r in mem], [r.peak_rss_mb for r in mem], marker="o",
                      label=label)
    ax_t.set(xlabel="sequence length L (Lq = Lk)", ylabel="p50 latency (ms)", xscale="log",
             yscale="log", title=f"latency, batch {','.join(map(str, report.config.batches))}, "
                                 f"{report.config.threads} thread(s)")
    ax_m.set(xlabel="sequence length L (Lq = Lk)", ylabel="peak RSS growth of one forward (MB)",
             xscale="log", title="memory")
    lengths = sorted({r.seq_q for r in report.rows})
    for ax in (ax_t, ax_m):  # a log axis would label 6x10^2, 10^3, 2x10^3: name the lengths run
        ax.xaxis.set_major_locator(ticker.FixedLocator(lengths))
        ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(n) for n in lengths]))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"flash-export bench, E={report.spec.get('embed')} H={report.spec.get('heads')}"
                 f" {report.config.dtype}, {report.environment.get('date')}", fontsize=9)
    fig.tight_layout()
    return fig
