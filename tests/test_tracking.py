"""--with_tracking --report_to: every stage sends metrics.jsonl's numbers, step by step, to TensorBoard event files and
an offline W&B run, read back here. A tracker whose package is missing is not read back (both missing: those tests
skip); the missing-package error is tested either way."""
import glob
import importlib.util
import json
import os

import pytest

from conftest import read_metrics, run_script, write_jsonl

HAVE = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None]


def stage_args(stage, model, tmp_path):
    """The smallest run of each stage: 2 optimizer steps (RLVR: also a held-out eval at steps 0 and 2)."""
    if stage == "sft.py":
        rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                              {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(8)]
        return ["--dataset_mixer_list", write_jsonl(tmp_path / "sft.jsonl", rows), "8", "--max_steps", 2,
                "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--preprocessing_num_workers", 1,
                "--learning_rate", 1e-3]
    if stage == "dpo.py":
        rows = [{"chosen": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}],
                 "rejected": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i + 1}."}]}
                for i in range(8)]
        return ["--dataset_mixer_list", write_jsonl(tmp_path / "dpo.jsonl", rows), "8", "--max_steps", 2,
                "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--preprocessing_num_workers", 1,
                "--learning_rate", 1e-3, "--ref_cache_dir", tmp_path / "cache"]
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "ground_truth": str(i + 1), "dataset": "gsm8k"}
            for i in range(8)]
    data = write_jsonl(tmp_path / "rlvr.jsonl", rows)
    return ["--dataset_mixer_list", data, "1.0", "--eval_dataset", data, "--eval_every", 2, "--max_steps", 2,
            "--num_unique_prompts_rollout", 2, "--num_samples_per_prompt", 2, "--response_length", 8,
            "--per_device_train_batch_size", 4, "--eval_batch_size", 8]


def read_tensorboard(output_dir):
    """{tag: [(step, value)]} from the event files, with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(output_dir, "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path):
    """The records of a .wandb file. wandb (0.31) reads them only in its Go core, so the format is read here: a 7-byte
    header (":W&B", magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each [crc32 4 | length 2 |
    type 1 | data], a record in one FULL (1) chunk or in FIRST (2), MIDDLE (3)..., LAST (4); block tails under 7 bytes
    are padding."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    records, pos, record = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # padding at the end of a block
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(record)
            record = b""
    return records


def read_wandb(output_dir):
    """{key: [(step, value)]} from the offline run's history records, parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))
    history = {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):  # _step, _runtime, _timestamp: wandb's own
                    history.setdefault(key, []).append((row["_step"], value))
    return history


@pytest.mark.skipif(not HAVE, reason="neither tensorboard nor wandb is installed")
@pytest.mark.parametrize("stage", ["sft.py", "dpo.py", "rlvr.py"])
def test_trackers_log_what_metrics_jsonl_logs(stage, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    report_to = "all" if len(HAVE) == 2 else HAVE[0]
    run_script(stage, "--model_name_or_path", tiny_model_dir, *stage_args(stage, tiny_model_dir, tmp_path),
               "--output_dir", out, "--with_tracking", "--report_to", report_to)
    metrics = read_metrics(out)
    expected = {}  # what metrics.jsonl says, as {key: [(step, value)]}
    for line in metrics:
        for key, value in line.items():
            if key != "step":
                expected.setdefault(key, []).append((line["step"], value))
    assert len(metrics) >= 2 and len(expected) >= 5
    readers = {"tensorboard": read_tensorboard, "wandb": read_wandb}
    for name in HAVE:
        logged = readers[name](out)
        assert set(logged) == set(expected), name
        for key, points in expected.items():
            assert [step for step, _ in logged[key]] == [step for step, _ in points], (name, key)
            # TensorBoard stores float32
            assert [v for _, v in logged[key]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), (name, key)


def test_without_with_tracking_nothing_is_written(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    run_script("sft.py", "--model_name_or_path", tiny_model_dir, *stage_args("sft.py", tiny_model_dir, tmp_path),
               "--output_dir", out, "--report_to", "all")
    assert not os.path.exists(out / "tensorboard") and not os.path.exists(out / "wandb")


@pytest.mark.skipif("tensorboard" not in HAVE, reason="tensorboard is not installed")
def test_resume_replaces_the_redone_steps_in_tensorboard(tiny_model_dir, tmp_path):
    """3 steps, checkpoints after 1 and 2, then --resume from checkpoint-2: step 3 is logged twice, and TensorBoard
    shows it once, with the resumed run's value, as metrics.jsonl does."""
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_model_dir, *stage_args("sft.py", tiny_model_dir, tmp_path), "--max_steps", 3,
            "--checkpointing_steps", 1, "--output_dir", out, "--with_tracking", "--report_to", "tensorboard"]
    run_script("sft.py", *args)
    run_script("sft.py", *args, "--resume")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    logged = read_tensorboard(out)
    assert [step for step, _ in logged["loss"]] == [1, 2, 3]
    assert [v for _, v in logged["loss"]] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_says_what_to_install(package, tiny_model_dir, tmp_path):
    """Runs whether or not the package is installed: a module of that name that fails to import shadows it. Refused
    before anything loads."""
    import subprocess
    import sys

    from conftest import ROOT, SCRIPT_ENV

    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / f"{package}.py").write_text("raise ImportError('not installed (simulated)')\n")
    inherited = [p for p in [SCRIPT_ENV.get("PYTHONPATH")] if p]  # packages may live there (.ci/gpu's /tmp/site)
    env = {**SCRIPT_ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), ROOT] + inherited)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), "--model_name_or_path", tiny_model_dir,
                           *map(str, stage_args("sft.py", tiny_model_dir, tmp_path)), "--output_dir", str(tmp_path / "out"),
                           "--with_tracking", "--report_to", package], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0 and f"pip install {package}" in proc.stderr, proc.stderr[-2000:]
    # before anything loads, on every rank (require_trackers): found after the tokenizing and the model's load, on rank 0
    # alone, it left the other ranks waiting in the first training collective
    assert not (tmp_path / "out").exists()
