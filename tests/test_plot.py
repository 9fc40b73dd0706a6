"""data/plot_metrics.py: a PNG from metrics.jsonl files, and errors that name the file (and line)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SCRIPT_ENV

pytest.importorskip("matplotlib")
PLOT = os.path.join(ROOT, "data", "plot_metrics.py")


def write_metrics(path, last_step, eval_every):
    """An RLVR-like log: reward and kl every step, eval/reward only every eval_every steps (and at step 1)."""
    with open(path, "w") as f:
        for step in range(1, last_step + 1):
            row = {"step": step, "reward": 1 - 1 / step, "kl": 0.01 * step}
            if step == 1 or step % eval_every == 0:
                row["eval/reward"] = 0.5 + 0.01 * step
            f.write(json.dumps(row) + "\n")
    return str(path)


def plot(*args):
    return subprocess.run([sys.executable, PLOT, *map(str, args)], capture_output=True, text=True, env=SCRIPT_ENV,
                          cwd=ROOT, timeout=60)


def test_png_from_two_runs_with_a_sparse_metric(tmp_path):
    run_a = write_metrics(tmp_path / "a.jsonl", 30, eval_every=10)
    run_b = write_metrics(tmp_path / "b.jsonl", 20, eval_every=5)
    out = tmp_path / "curves" / "rlvr.png"  # a directory that does not exist yet
    result = plot(run_a, run_b, "--labels", "a", "b", "--metrics", "reward", "kl", "eval/reward", "--out", out)
    assert result.returncode == 0, result.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert png[12:16] == b"IHDR" and int.from_bytes(png[20:24], "big") > int.from_bytes(png[16:20], "big")  # 3 rows: tall


def test_missing_metric_and_bad_line_name_the_file(tmp_path):
    run = write_metrics(tmp_path / "metrics.jsonl", 5, eval_every=2)
    result = plot(run, "--metrics", "reward", "eval/rewrad", "--out", tmp_path / "x.png")
    assert result.returncode != 0 and not (tmp_path / "x.png").exists()
    assert f"{run}: metric 'eval/rewrad' is on none of its 5 lines; it has: eval/reward, kl, reward" in result.stderr
    with open(run, "a") as f:
        f.write('{"step": 6, "reward": 0.9\n')  # a line cut off, as by a killed run
    result = plot(run, "--metrics", "reward", "--out", tmp_path / "x.png")
    assert result.returncode != 0 and f"{run}:6: not JSON" in result.stderr
