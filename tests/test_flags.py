"""Flags that no run can use, or that would make a run do something other than asked, are refused before anything
loads; a new run does not mix its checkpoints with an earlier run's; --resume continues the run it resumes, unchanged."""
import os
import shutil

import pytest

import common
from conftest import read_metrics, run_script

FAST = ["--preprocessing_num_workers", "1", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"]

# Each ran before these checks: a batch of 0 died of ZeroDivisionError after tokenizing; --warmup_ratio 2 never reached
# the peak rate; --keep_last_n_checkpoints 0 kept every checkpoint; a negative DPO beta (or label smoothing 0.5 and past
# it) trained toward the rejected answers while the logged loss fell; RLVR's temperature 0 made every weight NaN,
# --max_steps 0 saved the untouched model as trained, a negative clip range clamped every ratio to 0.8.
BAD_FLAGS = {
    "sft.py": {"--per_device_train_batch_size": 0, "--gradient_accumulation_steps": 0, "--warmup_ratio": 2.0,
               "--keep_last_n_checkpoints": 0, "--learning_rate": -1e-5, "--num_train_epochs": 0,
               "--checkpointing_steps": "abc"},
    "dpo.py": {"--beta": -5, "--warmup_ratio": -0.5, "--max_tokens_per_micro_batch": -5},
    "rlvr.py": {"--temperature": 0, "--max_steps": 0, "--beta": -0.05, "--cliprange": -0.2, "--num_epochs": 0,
                "--response_length": 0, "--self_check_tolerance": 0},
}


@pytest.mark.parametrize("script", BAD_FLAGS)
def test_flags_out_of_range_are_refused_before_anything_loads(script, tmp_path):
    args = [f"{flag}={value}" for flag, value in BAD_FLAGS[script].items()]  # (= so that argparse takes "-1e-5")
    # a model path that does not exist: refusing the flags must come first, before any model or data is looked at
    result = run_script(script, *args, "--model_name_or_path", tmp_path / "no_model", "--output_dir", tmp_path / "out",
                        check=False)
    assert result.returncode == 2, result.stderr[-2000:]  # argparse's usage error
    for flag in BAD_FLAGS[script]:
        assert f"{flag} must be" in result.stderr, (flag, result.stderr[-2000:])
    assert not (tmp_path / "out").exists()


def test_dpo_label_smoothing_past_one_half_is_refused(tmp_path):
    result = run_script("dpo.py", "--label_smoothing", 0.5, "--model_name_or_path", tmp_path / "none",
                        "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2 and "--label_smoothing must be in [0, 0.5)" in result.stderr


def test_ppo_flags_under_grpo_are_refused(tmp_path):
    """--gamma, --lam, --vf_coef, --cliprange_value set PPO's value model and GAE: under GRPO they did nothing, silently."""
    none = ["--model_name_or_path", tmp_path / "none", "--output_dir", tmp_path / "out"]
    result = run_script("rlvr.py", "--lam", 0.9, "--vf_coef", 0.5, *none, check=False)
    assert result.returncode == 2 and "GRPO has no value model: --lam, --vf_coef are PPO's (--algo ppo)" in result.stderr
    result = run_script("rlvr.py", "--num_samples_per_prompt", 1, *none, check=False)
    assert result.returncode == 2 and "--num_samples_per_prompt must be >= 2" in result.stderr


def test_a_new_run_does_not_take_over_an_earlier_runs_checkpoints(tiny_model_dir, sft_data, tmp_path):
    """Before: a new run into a used --output_dir sorted its checkpoints in with the old run's and deleted its own first;
    a later --resume continued the OLD run. Now the new run is refused, and so is --resume with nothing to resume."""
    out = tmp_path / "out"
    os.makedirs(out / "checkpoint-3")
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", *FAST, "--output_dir", out]
    result = run_script("sft.py", *args, check=False)
    assert result.returncode == 2 and "holds an earlier run's checkpoints (checkpoint-3)" in result.stderr
    result = run_script("sft.py", *args, "--resume", check=False)  # checkpoint-3 has no `done`: a save killed midway
    assert result.returncode == 2 and "--resume: no complete checkpoint in" in result.stderr
    shutil.rmtree(out)
    result = run_script("sft.py", *args, "--resume", check=False)
    assert result.returncode == 2 and "--resume: no complete checkpoint in" in result.stderr


def test_resume_refuses_a_changed_run_and_accepts_a_longer_one(tiny_model_dir, sft_data, tmp_path):
    """A resume that changed the data, seed, learning rate or global batch was accepted without a word and logged as one
    run (a smaller global batch trained some examples twice and others never). The run's length may change."""
    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", *FAST,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--output_dir", out]
    run_script("sft.py", *args, "--learning_rate", 1e-3, "--max_steps", 2, "--checkpointing_steps", 1)
    changed = run_script("sft.py", *args, "--learning_rate", 1e-4, "--max_steps", 2, "--resume", "--seed", 7, check=False)
    assert changed.returncode != 0
    assert "learning_rate: 0.001 -> 0.0001" in changed.stderr and "seed: 123 -> 7" in changed.stderr
    smaller = run_script("sft.py", *args[:-6], "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 2,
                         "--output_dir", out, "--learning_rate", 1e-3, "--max_steps", 2, "--resume", check=False)
    assert smaller.returncode != 0 and "global_batch: 4 -> 2" in smaller.stderr
    # the same global batch split otherwise under --reduce_loss sum: the gradient is the summed loss / (accumulation x
    # ranks), so 2 x 2 -> 1 x 4 halved it (logged grad_norm halved, Adam and the clip at another scale): refused
    split = run_script("sft.py", *args[:-6], "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 4,
                       "--output_dir", out, "--learning_rate", 1e-3, "--max_steps", 3, "--resume", check=False)
    assert split.returncode != 0 and "sum_loss_divisor: 2 -> 4" in split.stderr
    # a longer run: resumed
    longer = run_script("sft.py", *args, "--learning_rate", 1e-3, "--max_steps", 3, "--resume")
    assert "resumed from" in longer.stdout and [m["step"] for m in read_metrics(out)] == [1, 2, 3]


def test_a_run_resumes_on_more_ranks(tiny_model_dir, sft_data, tmp_path):
    """The same global batch on more ranks resumes (as fewer ranks did): rank 1 looked for a trainer state the 1-rank
    run never wrote, and died with FileNotFoundError while rank 0 said it had resumed."""
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", *FAST, "--learning_rate", 1e-3,
            "--max_steps", 2, "--per_device_train_batch_size", 2]
    full = tmp_path / "full"
    run_script("sft.py", *args, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 1, "--output_dir", full)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted, ignore=shutil.ignore_patterns("*.safetensors"))
    (interrupted / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    result = run_script("sft.py", *args, "--gradient_accumulation_steps", 1, "--output_dir", interrupted, "--resume", nproc=2)
    assert "resumed from" in result.stdout
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(full)
    assert [m["step"] for m in resumed] == [1, 2]
    assert resumed[1]["loss"] == pytest.approx(uninterrupted[1]["loss"], rel=1e-5)


def test_a_resume_compares_only_what_the_checkpoint_stored():
    """A flag added (or a default changed) after a run started is not held against its resume, nor a flag that changes
    nothing trained; a changed flag is named with both values."""
    saved = {"learning_rate": 1e-3, "seed": 1, "logging_steps": None}
    assert common.check_resumed_run(saved, {"learning_rate": 1e-3, "seed": 1, "logging_steps": 5, "model_revision": "main"}) == []
    assert common.check_resumed_run(saved, {"learning_rate": 2e-3, "seed": 1}) == ["learning_rate: 0.001 -> 0.002"]
    assert common.check_resumed_run(None, {"learning_rate": 2e-3}) == []  # a checkpoint from before the check


def test_resume_auto_starts_a_run_or_resumes_it(tmp_path):
    """A requeued job repeats one command: without --resume its second start is refused (checkpoints there), with
    --resume its first start is (none yet). --resume auto starts when there is no complete checkpoint, else resumes."""
    import argparse

    import torch

    parser = argparse.ArgumentParser()
    args = lambda resume: argparse.Namespace(output_dir=str(tmp_path), resume=resume, checkpointing_steps="1", lr=1e-3)
    assert common.check_args(parser, args("auto"), {"lr": 1e-3}) is None  # nothing yet: a new run
    with pytest.raises(SystemExit):
        common.check_args(parser, args("yes"), {"lr": 1e-3})
    os.makedirs(tmp_path / "checkpoint-2")  # a save killed midway (no `done`): auto starts anew
    assert common.check_args(parser, args("auto"), {"lr": 1e-3}) is None
    torch.save({"step": 2, "run": {"lr": 1e-3}}, tmp_path / "checkpoint-2" / "trainer_state_rank0.pt")
    (tmp_path / "checkpoint-2" / "done").touch()  # now complete
    assert common.check_args(parser, args("auto"), {"lr": 1e-3}) == str(tmp_path / "checkpoint-2")
    assert common.check_args(parser, args("yes"), {"lr": 1e-3}) == str(tmp_path / "checkpoint-2")
    with pytest.raises(SystemExit):  # the checkpointed run's settings still hold
        common.check_args(parser, args("auto"), {"lr": 2e-3})
    with pytest.raises(SystemExit):  # and a new run without --resume is refused
        common.check_args(parser, args(None), {"lr": 1e-3})


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_incomplete_ones(tmp_path):
    """A run killed while saving checkpoint-9 left it without `done`; resumed from checkpoint-6 with
    --keep_last_n_checkpoints 1, its save of checkpoint-8 kept checkpoint-9 (the highest step) and deleted checkpoint-6
    and checkpoint-8 itself: nothing complete was left, and a later --resume auto started over from step 0. A stray
    checkpoint-2.bak stopped the run at its first save (int('2.bak'))."""
    for name in ("checkpoint-6", "checkpoint-8", "checkpoint-9", "checkpoint-2.bak", "checkpoint-10"):
        os.makedirs(tmp_path / name)
    for name in ("checkpoint-6", "checkpoint-8", "checkpoint-10"):
        (tmp_path / name / "done").write_text("")
    common.prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2.bak", "checkpoint-8"]
    common.prune_checkpoints(str(tmp_path), -1)  # -1: every complete one kept
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2.bak", "checkpoint-8"]
    common.prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2.bak"]


def test_a_checkpoint_is_on_the_disk_before_done_and_whole_when_resumed(tmp_path, monkeypatch):
    """finish_checkpoint: each rank's trainer state fsync'd (file and directory) before `done` is written, and `done`
    itself; a full disk an error naming the file (torch.save said "unexpected pos") and no `done`. load_trainer_state:
    the RNG restored; a rank the saved run lacked takes rank 0's, but a file missing for a rank it had is an error."""
    import torch
    import torch.distributed as dist

    synced = []  # (path fsync'd, whether `done` existed then)
    real_fsync = os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: synced.append(
        (os.readlink(f"/proc/self/fd/{fd}"), (tmp_path / "checkpoint-3" / "done").exists())) or real_fsync(fd))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        os.makedirs(tmp_path / "checkpoint-3")  # (dcp.save made it, its shards fsync'd: FileSystemWriter's sync_files)
        torch.manual_seed(7)
        saved_rng = torch.get_rng_state()
        common.finish_checkpoint(str(tmp_path / "checkpoint-3"), {"step": 3}, keep=2)
        state_file, directory, done = (str(tmp_path / "checkpoint-3" / name) for name in ("trainer_state_rank0.pt", "", "done"))
        assert synced == [(state_file, False), (directory.rstrip("/"), False), (done, True), (directory.rstrip("/"), True),
                          (str(tmp_path), True)]
        torch.manual_seed(8)
        assert common.load_trainer_state(str(tmp_path / "checkpoint-3"))["step"] == 3
        assert torch.equal(torch.get_rng_state(), saved_rng)

        monkeypatch.setattr(dist, "get_rank", lambda: 1)  # a resume on two ranks of a one-rank run: rank 0's state
        assert common.load_trainer_state(str(tmp_path / "checkpoint-3"))["step"] == 3
        state = torch.load(state_file, weights_only=False)
        torch.save(state | {"world_size": 2}, state_file)  # a two-rank run's checkpoint without its rank 1 file
        with pytest.raises(SystemExit, match="trainer_state_rank1.pt is missing, though 2 ranks saved"):
            common.load_trainer_state(str(tmp_path / "checkpoint-3"))
        monkeypatch.setattr(dist, "get_rank", lambda: 0)

        os.makedirs(tmp_path / "checkpoint-4")
        os.symlink("/dev/full", tmp_path / "checkpoint-4" / "trainer_state_rank0.pt")  # writes to it: ENOSPC
        with pytest.raises(OSError, match=r"could not write .*checkpoint-4/trainer_state_rank0.pt \(.* GiB free"):
            common.finish_checkpoint(str(tmp_path / "checkpoint-4"), {"step": 4}, keep=2)
        assert not (tmp_path / "checkpoint-4" / "done").exists()
    finally:
        dist.destroy_process_group()


TWO_RANKS = """
import datetime, os, sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
import common

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))  # (a rank left waiting: stopped at 20 s)
rank, path = dist.get_rank(), {path!r}
if {case!r} == "full disk" and rank == 1:
    os.symlink("/dev/full", os.path.join(path, "trainer_state_rank1.pt"))
if {case!r} == "full disk at the final save":
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained({model!r}), AutoTokenizer.from_pretrained({model!r})
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if rank == 0:  # files of at most 1 MB, as a quota would cut them (a write past it: EFBIG); the model is ~6 MB
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
dist.barrier()
start = time.time()
try:
    if {case!r} == "full disk":
        common.finish_checkpoint(path, {{"step": 1}}, keep=2)
    elif {case!r} == "full disk at the final save":
        common.save_model(model, tokenizer, path, torch.bfloat16)
    # (rank 1 is given a directory, a log of its own that it could take: only rank 0's refusal can stop it; the stages
    # called these on rank 0 alone)
    elif {case!r} == "another run's --output_dir":
        common.claim_output_dir(path if rank == 0 else path + "_rank1", {model!r})
    elif {case!r} == "a bad line in the log at a resume":
        common.start_log(os.path.join(path, "metrics.jsonl" if rank == 0 else "metrics_rank1.jsonl"), 2)
    elif {case!r} == "full disk writing the log":  # (rank 0's log on /dev/full: ENOSPC)
        common.append_log(os.path.join(path, "full.jsonl" if rank == 0 else "metrics_rank1.jsonl"), [{{"step": 2}}])
    elif {case!r} == "a tracker that cannot start":  # ("tensorboard", a file: no directory there; or no package)
        common.start_tracking("tensorboard", path if rank == 0 else path + "_rank1", "sft", {{}})
    else:
        common.agree_on_resume(path)  # (as the stages do, before anything loads)
    line = f"rank {{rank}} went on"
except BaseException as error:  # (caught: the run exits 0, so the launcher stops no rank that is still waiting)
    line = f"rank {{rank}} stopped after {{time.time() - start:.0f}} s: {{error}}"
os.write(1, (line + "\\n").encode())  # one write: the two ranks share stdout, and a line must not be split by the other's
"""


@pytest.mark.parametrize("case", ["full disk", "missing rank file", "full disk at the final save",
                                  "another run's --output_dir", "a bad line in the log at a resume",
                                  "full disk writing the log", "a tracker that cannot start"])
def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank_at_once(case, tiny_model_dir, tmp_path):
    """A rank whose trainer state cannot be written (a full disk, a quota), or whose file a resumed checkpoint lacks,
    stopped alone; the others waited in the next collective until the group's timeout (on NCCL across nodes, 10
    minutes), with a message naming nothing. Now every rank stops at once with the failing rank's error. So do the
    steps that rank 0 takes alone while the others wait for it: the final model's save, taking --output_dir (a job
    launched twice: the second is refused), restarting the log at a resume, appending a step's line to it (or to the
    tracker), starting the tracker."""
    import fcntl
    import torch

    path = tmp_path / "checkpoint-1"
    path.mkdir()
    if case == "missing rank file":  # a two-rank run's checkpoint, its rank 1 file lost in a copy
        torch.save({"step": 1, "world_size": 2}, path / "trainer_state_rank0.pt")
        (path / "done").touch()
    (path / "metrics.jsonl").write_text('{"step": 1}\n{"step": null}\n{"step": 2}\n')  # (read in that case alone)
    os.symlink("/dev/full", path / "full.jsonl")
    (path / "tensorboard").touch()
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS.format(root=common.__file__.rsplit(os.sep, 1)[0], path=str(path),
                                                            case=case, model=tiny_model_dir))
    with open(path / ".run.lock", "a") as held:
        if case == "another run's --output_dir":  # a run writing there now
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_script(str(tmp_path / "two_ranks.py"), nproc=2)
    expected = {"full disk": "could not write", "missing rank file": "trainer_state_rank1.pt is missing, though 2 ranks "
                "saved", "full disk at the final save": f"could not write the model to {path} (",
                "another run's --output_dir": f"another run is writing to {path} now",
                "a bad line in the log at a resume": "metrics.jsonl:2: not a log line",
                "full disk writing the log": f"could not append to {path}/full.jsonl (",
                "a tracker that cannot start": f"--with_tracking --report_to tensorboard: could not start in {path}: "}[case]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    for rank in (0, 1):
        line = next((line for line in lines if line.startswith(f"rank {rank} ")), "")
        assert line.startswith(f"rank {rank} stopped after 0 s") and expected in line, result.stdout[-3000:]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_the_learning_rate_is_transformers_schedule_with_the_warmup_a_step_earlier(schedule):
    """common.learning_rate against transformers' get_scheduler (open-instruct's): the same decay at every step after
    the warmup; in it, step k learns at HF's rate of step k + 1, so the first step does not learn at 0."""
    import torch
    from transformers import get_scheduler

    for total_steps, warmup_steps in [(10, 3), (7, 0), (5, 4), (4, 1)]:  # (a warmup over the whole run: no decay)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        # (HF's "constant" has no warmup: its warmup form is constant_with_warmup)
        hf = get_scheduler("constant_with_warmup" if schedule == "constant" else schedule, optimizer,
                           num_warmup_steps=warmup_steps, num_training_steps=total_steps)
        hf_rate = lambda k: 2e-5 * hf.lr_lambdas[0](k)
        ours = [common.learning_rate(k, 2e-5, warmup_steps, total_steps, schedule) for k in range(total_steps)]
        expected = [hf_rate(k + 1) if k < warmup_steps else hf_rate(k) for k in range(total_steps)]
        assert ours == pytest.approx(expected, rel=1e-12, abs=0), (total_steps, warmup_steps)
        assert ours[0] > 0


def test_a_log_restarts_at_the_checkpoint_and_names_a_bad_line(tmp_path):
    import torch.distributed as dist

    path = str(tmp_path / "metrics.jsonl")
    lines = [f'{{"step": {step}, "loss": 1.5}}\n' for step in range(1, 6)]
    open(path, "w").writelines(lines[:4] + [lines[4][:9]])  # step 5's line cut short: the run was killed writing it
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        common.start_log(path, 3)
        assert open(path).readlines() == lines[:3]
        common.start_log(path, None)  # a new run: an empty log
        assert open(path).read() == ""
        open(path, "w").writelines(lines[:2] + ["oops\n"] + lines[2:])
        with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a log line"):
            common.start_log(path, 4)
        os.remove(path)
        common.start_log(path, 4)  # (no log yet: an empty one)
        assert open(path).read() == ""
    finally:
        dist.destroy_process_group()


def test_a_run_takes_its_output_dir(tiny_model_dir, sft_data, tmp_path):
    """A run killed before its save left the previous run's model in --output_dir beside its own metrics, and the next
    stage trained from that model without a word: a run now deletes the earlier weights when it starts. Two runs into
    one --output_dir at once both reported success, their metrics interleaved: the second is refused. A file given as
    --output_dir failed after tokenizing and loading."""
    import fcntl

    out = tmp_path / "out"
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", *FAST, "--max_steps", 1,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--output_dir", out]
    run_script("sft.py", *args)
    assert (out / "model.safetensors").exists()
    held = open(out / ".run.lock", "a")  # a run writing there now
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = run_script("sft.py", *args, check=False)
    assert result.returncode != 0 and f"another run is writing to {out} now" in result.stderr, result.stderr[-2000:]
    assert (out / "model.safetensors").exists()  # (refused before touching anything)
    held.close()
    # a run refused by a check deletes nothing either (the weights went before later checks refused the run)
    for refused in (["--label_smoothing", 0.6], ["--model_name_or_path", tmp_path / "no_model"]):
        result = run_script("dpo.py", *args[:2], "--output_dir", out, *refused, check=False)
        assert result.returncode != 0 and (out / "model.safetensors").exists(), result.stderr[-2000:]
    # a run that dies before its save (here: at the first bad row) leaves no model behind it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    result = run_script("sft.py", *[a if a != sft_data else bad for a in args], check=False)
    assert result.returncode != 0 and "removed model.safetensors, an earlier run's" in result.stdout
    assert not (out / "model.safetensors").exists()
    result = run_script("sft.py", *[a if a != out else sft_data for a in args], check=False)
    assert result.returncode == 2 and "--output_dir" in result.stderr and "is a file, not a directory" in result.stderr
