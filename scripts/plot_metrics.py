"""Plot the metrics.jsonl of one or more runs side by side: one PNG, one panel per metric.

    python scripts/plot_metrics.py outputs/run_a outputs/run_b --out curves.png [--labels a,b] [--smooth 20]

RUN is a dump folder (its metrics.jsonl; under fault tolerance, where each replica group writes
replica_<id>/metrics.jsonl, the lowest replica id's, usually replica_0) or a metrics.jsonl path. Panels, each
drawn only where some run has data: training loss (--smooth N adds an N-point moving average over the raw
curve), validation loss, one per downstream/* metric (downstream evaluations), and throughput (tokens per
second per device). Prints one line per panel drawn with its number of runs. Bad input is one line on stderr
and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

EXIT_BAD_INPUT = 2
PANEL_INCHES = (6.0, 4.0)  # per panel
DPI = 100
COLUMNS = 2


class BadInput(Exception):
    """A RUN or option that cannot be plotted; the message names it."""


def metrics_file(run: str) -> tuple[str, str | None]:
    """The metrics.jsonl of RUN and, for a fault-tolerance run, a note saying which replica group's."""
    if os.path.isfile(run):
        return run, None
    if not os.path.isdir(run):
        raise BadInput(f"{run}: no such file or folder")
    path = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(path):
        return path, None
    replicas = sorted((int(m.group(1)), name) for name in os.listdir(run)
                      if (m := re.fullmatch(r"replica_(\d+)", name))
                      and os.path.isfile(os.path.join(run, name, "metrics.jsonl")))
    if not replicas:
        raise BadInput(f"{run}: no metrics.jsonl (nor replica_*/metrics.jsonl) in this folder")
    # Replica groups train the same model on different data and log their own step records; replica 0 is the
    # one that always exists (the others may come and go), so it stands for the run.
    name = replicas[0][1]
    return (os.path.join(run, name, "metrics.jsonl"),
            f"{run}: fault-tolerance run, plotting {name}'s metrics ({len(replicas)} replica groups logged)")


def read_records(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
    if not records:
        raise BadInput(f"{path}: empty (no records with a step)")
    if not any("loss" in r for r in records):
        raise BadInput(f"{path}: no training records (lines with step and loss)")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, in step order. A resumed run appends to the same file and may repeat the steps
    after its checkpoint; the later record of a step is the one the run continued from, so it wins."""
    by_step = {}
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_step[rec["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over up to n points (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def build_panels(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, str, str]]:
    """(title, metrics.jsonl key, y label) of each panel that some run has data for, in drawing order."""
    downstream = sorted({k for _, recs in runs for r in recs for k in r if k.startswith("downstream/")})
    candidates = ([("training loss", "loss", "loss"), ("validation loss", "validation_loss", "loss")]
                  + [(k, k, k.rsplit("/", 1)[-1]) for k in downstream]
                  + [("throughput", "tps", "tokens/s per device")])
    return [p for p in candidates if any(series(recs, p[1])[0] for _, recs in runs)]


def plot(runs: list[tuple[str, list[dict]]], out: str, smooth: int = 0) -> tuple[list[tuple[str, int]], tuple]:
    """Draw the panels into `out`; returns [(title, runs drawn)] and the image size in pixels."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    panels = build_panels(runs)
    cols = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows), dpi=DPI,
                             squeeze=False)
    drawn = []
    for ax, (title, key, ylabel) in zip(axes.flat, panels):
        n = 0
        for i, (label, recs) in enumerate(runs):
            steps, values = series(recs, key)
            if not steps:
                continue
            color = f"C{i % 10}"  # one color per run in every panel
            if key == "loss" and smooth > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, label=label)
            else:
                ax.plot(steps, values, color=color, label=label, marker="o" if len(steps) < 20 else None,
                        markersize=3)
            n += 1
        ax.set_title(title + (f" (mean of {smooth})" if key == "loss" and smooth > 1 else ""))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        drawn.append((title, n))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)  # an odd panel count leaves one grid cell empty
    fig.tight_layout()
    fig.savefig(out)
    size = tuple(int(v) for v in fig.get_size_inches() * fig.dpi)
    plt.close(fig)
    return drawn, size


def default_label(run: str) -> str:
    folder = os.path.dirname(os.path.abspath(run)) if os.path.isfile(run) else os.path.abspath(run)
    return os.path.basename(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="dump folder or metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--labels", default="", help="comma-separated legend labels, one per RUN (default: the "
                                                     "run folder names)")
    parser.add_argument("--smooth", type=int, default=0, metavar="N",
                        help="moving average over N logged points for the training loss (0: raw only)")
    args = parser.parse_args(argv)
    try:
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else [default_label(r) for r in args.runs]
        if len(labels) != len(args.runs):
            raise BadInput(f"--labels has {len(labels)} labels for {len(args.runs)} runs")
        if args.smooth < 0:
            raise BadInput(f"--smooth {args.smooth}: must be 0 or more points")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise BadInput(f"--out {args.out}: folder {out_dir} does not exist")
        runs = []
        for run, label in zip(args.runs, labels):
            path, note = metrics_file(run)
            if note:
                print(note)
            runs.append((label, read_records(path)))
    except BadInput as e:
        print(f"plot_metrics.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    drawn, (width, height) = plot(runs, args.out, args.smooth)
    for title, n in drawn:
        print(f"panel {title}: {n} runs")
    print(f"wrote {args.out} ({width}x{height} px, {len(drawn)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
