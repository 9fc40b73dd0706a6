"""
Training curves from the metrics.jsonl that sft.py, dpo.py and rlvr.py write (one JSON object a line: "step" and
numeric metrics): one subplot per metric, several runs overlaid, saved as a PNG.

    python data/plot_metrics.py out/rlvr/metrics.jsonl --metrics reward kl eval/reward --out data/curves/rlvr.png
    python data/plot_metrics.py out/sft_a/metrics.jsonl out/sft_b/metrics.jsonl --labels lr=2e-5 lr=5e-6 \
        --metrics loss grad_norm --out data/curves/sft.png

A metric logged on only some steps (eval/reward every N steps) is drawn over the steps where it exists, with a marker
on each point so a sparse curve reads as measurements, not as a line that was measured everywhere.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # draw to files only: no display needed, so it runs on a headless training machine
import matplotlib.pyplot as plt

parser = argparse.ArgumentParser(description="plot metrics.jsonl files, one subplot per metric")
parser.add_argument("metrics_files", nargs="+", help="one metrics.jsonl per run")
parser.add_argument("--metrics", nargs="+", required=True, help="keys to plot, e.g. loss reward kl eval/reward")
parser.add_argument("--labels", nargs="+", default=None, help="one per file; default: the file's directory")
parser.add_argument("--out", required=True, help="the PNG to write")
args = parser.parse_args()
if args.labels and len(args.labels) != len(args.metrics_files):
    parser.error(f"{len(args.labels)} --labels for {len(args.metrics_files)} files")
labels = args.labels or [os.path.dirname(path) or path for path in args.metrics_files]

# ----------------------------------------------------------------------------- Read

runs = []  # per file: {metric: (steps, values)} over the lines where that metric is a number, and the line count
for path in args.metrics_files:
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{line_number}: not JSON ({e.msg}): {line.strip()[:100]}")
            if not isinstance(row, dict) or "step" not in row:
                sys.exit(f"{path}:{line_number}: expected a JSON object with a \"step\": {line.strip()[:100]}")
            rows.append(row)
    curves = {}
    for metric in args.metrics:
        # null (a metric not computed that step) and non-numbers are skipped; bool is an int to Python but no curve
        points = [(row["step"], row[metric]) for row in rows
                  if isinstance(row.get(metric), (int, float)) and not isinstance(row.get(metric), bool)]
        if not points:  # a typo, or a file from another stage: say which keys the file does have
            keys = sorted({key for row in rows for key in row} - {"step"})
            sys.exit(f"{path}: metric {metric!r} is on none of its {len(rows)} lines; it has: {', '.join(keys)}")
        curves[metric] = tuple(zip(*points))
    runs.append((curves, len(rows)))

# ----------------------------------------------------------------------------- Plot

fig, axes = plt.subplots(len(args.metrics), 1, figsize=(7, 2.4 * len(args.metrics) + 0.6), sharex=True, squeeze=False)
for ax, metric in zip(axes[:, 0], args.metrics):
    for label, (curves, n_lines) in zip(labels, runs):
        steps, values = curves[metric]
        logged_every_step = len(steps) == n_lines
        ax.plot(steps, values, marker=None if logged_every_step else "o", markersize=3, linewidth=1.2, label=label)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
axes[-1, 0].set_xlabel("step")
if len(runs) > 1 or args.labels:
    axes[0, 0].legend(fontsize="small")
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=120)
print(f"wrote {args.out}: {', '.join(args.metrics)} for {len(runs)} run(s)")
