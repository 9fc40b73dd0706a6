"""The data path at Tulu scale: tokenized once into a memory-mapped Arrow file and reused, micro-batches by tokens
balanced over ranks, a loss that never holds the full (T, V) logits, and ranks that wait for the tokenization as long
as it takes (no collective timeout)."""
import glob
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

import common
from conftest import ROOT, SCRIPT_ENV, conversation, read_metrics, run_script, write_jsonl

FAST = ["--preprocessing_num_workers", "1", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--learning_rate", "1e-3"]


def stored_path(stdout):
    """The Arrow file a stage run says it tokenized into or reused."""
    line = next(line for line in stdout.splitlines() if " rows -> " in line)
    return next(word for word in line.replace(";", " ").split() if word.endswith(".arrow"))


def varied_rows(n):
    """Conversations of very different lengths (1-3 turns, 1 to ~150 words), so balancing has something to do."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        turns = [m for m in conversation(i) if m]
        ends = [t + 1 for t, m in enumerate(turns) if m["role"] == "assistant"]  # a conversation ends on an answer
        turns = turns[: rng.choice(ends)]
        turns[-1]["content"] += " more" * rng.choice([0, 3, 40, 150])
        rows.append({"messages": turns})
    return rows


def test_stored_tokens_and_labels_equal_direct_tokenization_and_are_reused(tiny_model_dir, tokenizer, tmp_path):
    rows = varied_rows(23) + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * 400}]}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    cache = tmp_path / "cache"
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--max_seq_length", 256,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 2,
            "--checkpointing_steps", 1, "--dataset_local_cache_dir", cache, *FAST]
    first = run_script("sft.py", *args, "--output_dir", tmp_path / "a")
    path = stored_path(first.stdout)
    assert "tokenized in" in first.stdout and "0 dropped as longer than 256 tokens, 1 truncated" in first.stdout
    stored = Dataset.from_file(path)
    expected = [common.tokenize_conversation(tokenizer, row["messages"]) for row in rows]
    assert len(expected[-1][0]) > 256
    expected = [(ids[:256], labels[:256]) for ids, labels in expected]  # the overlong row is cut at --max_seq_length
    assert [(r["input_ids"], r["labels"]) for r in stored] == expected  # every row, in file order
    assert stored["length"] == [len(ids) for ids, _ in expected]

    mtime = os.stat(path).st_mtime_ns
    again = run_script("sft.py", *args, "--output_dir", tmp_path / "b")  # another run: reads the file, tokenizes nothing
    assert "reused the tokenization in" in again.stdout and stored_path(again.stdout) == path
    resumed = run_script("sft.py", *args[:-12], "--max_steps", 3, *args[-10:], "--output_dir", tmp_path / "a", "--resume")
    assert "reused the tokenization in" in resumed.stdout and stored_path(resumed.stdout) == path
    assert os.stat(path).st_mtime_ns == mtime and sorted(os.listdir(cache)) == sorted(
        os.path.basename(path) + suffix for suffix in ("", ".json", ".built_by", ".lock"))
    # a different max length is a different tokenization
    other = run_script("sft.py", *[a if a != 256 else 512 for a in args], "--output_dir", tmp_path / "c")
    assert "tokenized in" in other.stdout and stored_path(other.stdout) != path


def test_dpo_pairs_are_stored_with_labels_on_the_final_response_only(tiny_model_dir, tokenizer, tmp_path):
    rows = []
    for i in range(8):
        chosen = [m for m in conversation(i) if m]
        rejected = chosen[:-1] + [{"role": "assistant", "content": f"Maybe {i}."}]
        rows.append({"chosen": chosen, "rejected": rejected})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = run_script("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0",
                        "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 1,
                        "--dataset_local_cache_dir", tmp_path / "cache", "--ref_cache_dir", tmp_path / "ref",
                        "--output_dir", tmp_path / "out", *FAST)
    stored = Dataset.from_file(stored_path(result.stdout))
    for row, pair in zip(rows, stored, strict=True):
        for side in ("chosen", "rejected"):
            messages = row[side]
            # independently: the prompt is everything up to the generation prompt; the response runs to the last eos
            prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
            ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
            end = max(t for t, token in enumerate(ids) if token == tokenizer.eos_token_id)
            labels = [token if len(prompt) <= t <= end else -100 for t, token in enumerate(ids)]
            assert pair[f"{side}_input_ids"] == ids and pair[f"{side}_labels"] == labels


def test_every_bad_row_is_reported_with_file_line_and_field(tiny_model_dir, tmp_path):
    rows = [{"messages": [m for m in conversation(i) if m]} for i in range(6)]
    rows[1] = {"messages": [{"role": "robot", "content": "hi"}]}
    rows[3] = {"conversation": []}
    rows[5] = {"messages": [{"role": "user", "content": "no answer"}]}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    result = run_script("sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0",
                        "--dataset_local_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "out", *FAST,
                        check=False)
    assert result.returncode != 0
    assert "3 bad rows" in result.stderr
    assert f"{data}:2: field 'messages[0].role'" in result.stderr
    assert f"{data}:4: field 'messages'" in result.stderr
    assert f"{data}:6: field 'messages' has no assistant turn" in result.stderr
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".arrow")]  # nothing half-made is kept


def test_balanced_micro_batches():
    rng = random.Random(0)
    for trial in range(200):
        world_size, max_tokens = rng.choice([1, 2, 3, 8]), rng.choice([64, 300, 1000])
        lengths = [rng.randint(1, max_tokens) for _ in range(rng.randint(1, 40))]
        shares = common.balanced_micro_batches(lengths, world_size, max_tokens)
        assert len(shares) == world_size and len({len(share) for share in shares}) == 1  # same micro-steps everywhere
        every = sorted(i for share in shares for micro_batch in share for i in micro_batch)
        assert every == list(range(len(lengths)))  # each example exactly once
        assert all(sum(lengths[i] for i in mb) <= max_tokens for share in shares for mb in share)
        loads = [sum(lengths[i] for mb in share for i in mb) for share in shares]
        assert max(loads) - min(loads) <= max(lengths)  # longest-first greedy: within one example of balanced
        # a micro-batch is empty only where the rank has fewer examples than micro-steps (splitting came first)
        assert all(sum(map(len, share)) < len(share) for share in shares if [] in share)
    # rank 0 gets 10 + 1 tokens in two micro-batches; rank 1's one example cannot be split: an empty micro-batch
    assert common.balanced_micro_batches([10, 10, 1], 2, 10) == [[[0], [2]], [[1], []]]


def test_token_balanced_micro_batches_match_the_fixed_split_on_one_and_two_ranks(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "varied.jsonl", varied_rows(32))
    for reduce_loss in ("sum", "mean"):
        base = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--max_seq_length", 256,
                "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 4, "--max_steps", 2,
                "--reduce_loss", reduce_loss, "--dataset_local_cache_dir", tmp_path / "cache", *FAST]
        fixed = tmp_path / f"fixed_{reduce_loss}"
        run_script("sft.py", *base, "--output_dir", fixed)  # 1 process: 8 micro-steps of 2 examples
        one, two = tmp_path / f"one_{reduce_loss}", tmp_path / f"two_{reduce_loss}"
        run_script("sft.py", *base, "--max_tokens_per_micro_batch", 512, "--output_dir", one)
        # 2 ranks, half the accumulation: the same global batch of 16 examples
        two_args = [a if a != 4 else 2 for a in base]
        run_script("sft.py", *two_args, "--max_tokens_per_micro_batch", 512, "--output_dir", two, nproc=2)
        reference = read_metrics(fixed)
        for run in (read_metrics(one), read_metrics(two)):
            assert [m["tokens"] for m in run] == [m["tokens"] for m in reference]
            assert [m["loss"] for m in run] == pytest.approx([m["loss"] for m in reference], rel=1e-5)
            assert [m["grad_norm"] for m in run] == pytest.approx([m["grad_norm"] for m in reference], rel=1e-4)
        assert all(m["micro_steps"] < 8 for m in read_metrics(one))  # packed by tokens: fewer, fuller micro-batches
        fixed_two = tmp_path / f"fixed_two_{reduce_loss}"
        if reduce_loss == "sum":
            run_script("sft.py", *two_args, "--output_dir", fixed_two, nproc=2)
            balanced, unbalanced = read_metrics(two), read_metrics(fixed_two)
            assert all(b["rank_token_imbalance"] <= u["rank_token_imbalance"] for b, u in zip(balanced, unbalanced))
            assert all(b["rank_token_imbalance"] < 1.05 for b in balanced)


def test_token_losses_equal_full_logits_losses_and_gradients(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    common.register_packed_attention()
    examples = [common.tokenize_conversation(tokenizer, [m for m in conversation(i) if m]) for i in range(1, 6)]
    inputs, targets = common.collate(examples, True, 0, "cpu")  # (1, T) packed, T ~ 150
    results = []
    for chunk_elements in (None, 7 * len(tokenizer)):  # the full logits; then 7-position chunks, recomputed in backward
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="packed")
        if chunk_elements is None:
            losses = F.cross_entropy(model(**inputs).logits[0].float(), targets[0], ignore_index=-100, reduction="none")
        else:
            losses = -common.token_logps(model, inputs, targets, 1.0, chunk_elements)[0]
        losses.sum().backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (chunked, chunked_grads) = results
    assert full.shape == chunked.shape and ((full == 0) == (chunked == 0)).all() and (full == 0).any()  # -100: 0
    assert torch.allclose(full, chunked, atol=1e-6)
    # float sums in another order: equal to ~1e-6 of each gradient's scale
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item()) for a, b in zip(full_grads, chunked_grads))


def test_token_logps_at_a_temperature_with_entropies(tiny_model_dir, tokenizer):
    """What RLVR uses: log-probs under logits / temperature and the entropies of those distributions, at the target
    positions, from chunks; against the full logits computed directly."""
    from transformers import AutoModelForCausalLM

    common.register_packed_attention()
    examples = [common.tokenize_conversation(tokenizer, [m for m in conversation(i) if m]) for i in range(1, 4)]
    inputs, targets = common.collate(examples, True, 0, "cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="packed")
    with torch.no_grad():
        logps, entropies = common.token_logps(model, inputs, targets, 0.7, 5 * len(tokenizer))
        logprobs = (model(**inputs).logits[0].float() / 0.7).log_softmax(-1)  # (T, V)
    scored = targets[0] != -100
    expected = logprobs[scored].gather(-1, targets[0][scored][:, None])[:, 0]
    assert torch.allclose(logps[scored], expected, atol=1e-5) and (logps[~scored] == 0).all()
    assert torch.allclose(entropies[scored], -(logprobs.exp() * logprobs).sum(-1)[scored], atol=1e-4)


# Loaded by every Python process of a test run (it is on PYTHONPATH): torch's default process-group timeout, read when
# init_process_group is called without one (30 minutes for gloo, 10 for NCCL), becomes $SHORT_DEFAULT_PG_TIMEOUT_S.
# The stage scripts are unchanged: every collective they issue on the default group now times out within seconds.
SHORT_TIMEOUT_SITECUSTOMIZE = """
import datetime, os
if os.environ.get("SHORT_DEFAULT_PG_TIMEOUT_S"):
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = datetime.timedelta(seconds=float(os.environ["SHORT_DEFAULT_PG_TIMEOUT_S"]))
"""


def test_ranks_waiting_for_tokenization_outlast_the_default_group_timeout(tiny_model_dir, tmp_path):
    """Local rank 0 tokenizes for 3x the default group's timeout (a slow source: a named pipe fed one row a second) while
    rank 1 waits for the file; the run must finish. Waiting at a barrier of the default group instead (dist.barrier())
    kills rank 1 after the timeout: the multi-node failure mode, here in seconds instead of 10-30 minutes."""
    timeout_s = 6
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SHORT_TIMEOUT_SITECUSTOMIZE)
    env = dict(SCRIPT_ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / "site")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))

    # The mechanism is real: at a bare barrier on the default group, a rank 2.5x the timeout late kills the run.
    (tmp_path / "late.py").write_text("import time, torch.distributed as dist\ndist.init_process_group('gloo')\n"
                                      "time.sleep(5 if dist.get_rank() == 0 else 0)\ndist.barrier()\n")
    control = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              tmp_path / "late.py"], capture_output=True, text=True,
                             env=dict(env, SHORT_DEFAULT_PG_TIMEOUT_S="2"))
    assert control.returncode != 0 and "timed out" in control.stderr.lower(), control.stderr[-3000:]

    rows = [{"messages": [m for m in conversation(i) if m]} for i in range(3 * timeout_s)]
    source = tmp_path / "slow.jsonl"
    os.mkfifo(source)

    fifo = os.path.realpath(source)  # what /proc/PID/fd links to it read

    def opened_anywhere():  # does any process hold the FIFO open? (Linux: the /proc/PID/fd links)
        for link in glob.glob("/proc/[0-9]*/fd/*"):
            try:
                if os.readlink(link) == fifo:
                    return True
            except OSError:  # a process or descriptor gone meanwhile
                pass
        return False

    def feed():  # rank 0 opens the source twice: to count its rows (fed at once), then to tokenize them (a row a second)
        try:
            for delay in itertools.chain([0], itertools.repeat(1)):  # (any further opening is served too, slowly)
                # A FIFO's reader sees end-of-file only at a moment when no writer holds it: reopened at once, the next
                # session could run on into the last one's reader, and count_rows read on at a row a second (CI
                # rehearsal, 2026-12-06: stuck for 13 minutes, where a run of this test takes 40 s). So each session
                # starts once the last reader has closed.
                while opened_anywhere():
                    time.sleep(0.05)
                with open(source, "w") as f:
                    for row in rows:
                        time.sleep(delay)
                        f.write(json.dumps(row) + "\n")
                        f.flush()
        except BrokenPipeError:  # the run died
            pass

    threading.Thread(target=feed, daemon=True).start()
    start = time.time()
    run_script("sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", source, "1.0",
               "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 1, "--max_steps", 2,
               "--dataset_local_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "out", *FAST, nproc=2,
               env=dict(env, SHORT_DEFAULT_PG_TIMEOUT_S=str(timeout_s)))
    assert time.time() - start > 3 * timeout_s  # tokenizing did outlast the timeout
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]


def test_tokenizing_workers_run_whatever_multiprocessing_start_method_is_the_default(tiny_model_dir, tmp_path):
    """--preprocessing_num_workers 2 under each start method a user's Python may default to: fork (Linux up to Python
    3.13), forkserver (Linux from 3.14), spawn (macOS). The workers call the stage script's make_example: before they
    were forked explicitly, a forkserver or spawn worker re-ran sft.py as __mp_main__ and waited forever for the lock
    of the tokenization its parent was doing. Each run must finish and store the same tokens."""
    data = write_jsonl(tmp_path / "sft.jsonl", varied_rows(40))
    stored = {}
    for method in ("fork", "forkserver", "spawn"):
        site = tmp_path / f"site_{method}"
        site.mkdir()  # sitecustomize: the default start method of every Python process the run starts
        (site / "sitecustomize.py").write_text(f"import multiprocessing\nmultiprocessing.set_start_method({method!r}, force=True)\n")
        env = dict(SCRIPT_ENV, PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        run = subprocess.Popen([sys.executable, "sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data,
                                "1.0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                                "--max_steps", "1", "--preprocessing_num_workers", "2", "--dataset_local_cache_dir",
                                str(tmp_path / f"cache_{method}"), "--output_dir", str(tmp_path / method)],
                               cwd=ROOT, env=env, text=True, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = run.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, 9)  # the run and its workers
            stdout, stderr = run.communicate()
            pytest.fail(f"{method}: sft.py did not finish in 180 s:\n{stdout[-2000:]}")
        assert run.returncode == 0, f"{method}:\n{stderr[-4000:]}"
        assert "tokenized in" in stdout
        stored[method] = Dataset.from_file(stored_path(stdout))["input_ids"]
    assert stored["fork"] == stored["forkserver"] == stored["spawn"] and len(stored["fork"]) == 40


@pytest.mark.parametrize("name, content, message", [
    # a byte that is not UTF-8: text mode raised a bare UnicodeDecodeError naming neither file nor line
    ("latin1.jsonl", b'{"messages": []}\n{"messages": "caf\xe9"}\n', "latin1.jsonl:2: not UTF-8 (byte 0xe9 at column 18)"),
    # a key given twice: json keeps the last one, so the first `messages` was silently dropped
    ("twice.jsonl", b'{"messages": [{"role": "user", "content": "a"}], "messages": []}\n', "twice.jsonl:1: duplicate key 'messages'"),
    # lone "\r" line ends: text mode read 2 rows while count_rows counted 1 line, so weight 1.0 kept only the first
    ("mac.jsonl", b'{"a": 1}\r{"a": 2}\r', "mac.jsonl:1: not valid JSON (Extra data at column 10)"),
    # a row cut short (its closing brace lost): the error stood at "column 1", after the line's newline
    ("cut.jsonl", b'{"a": 1}\n{"a": [2]\r\n{"a": 3}\n', "cut.jsonl:2: not valid JSON (Expecting ',' delimiter at column 10)"),
    # .json: json.load's errors named no file, and a non-object element reached make_example (AttributeError there)
    ("bad.json", b'[{"a": 1},\n {"a": 2}', "bad.json: not valid JSON (Expecting ',' delimiter at line 2, column 10)"),
    # a .json of JSON Lines (hub datasets store them so) is read line by line, its errors named by line
    ("lines.json", b'{"a": 1}\n{"a": 2\n', "lines.json:2: not valid JSON (Expecting ',' delimiter at column 8)"),
    ("mixed.json", b'[{"a": 1}, 3]', "mixed.json[1]: expected a JSON object, got int"),
    ("latin1.json", b'[{"a": 1},\n {"a": "caf\xe9"}]', "latin1.json: not UTF-8 (byte 0xe9 at line 2, column 12)"),
    # nested past Python's recursion limit: a bare RecursionError named no file
    ("deep.jsonl", b'{"a": 1}\n{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "deep.jsonl:2: not valid JSON (nested too deeply)"),
])
def test_unreadable_rows_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        common.load_mixture([str(tmp_path / name), "1.0"])
    assert str(error.value) == f"{tmp_path / name}{message[len(name):]}"


def test_readable_variants_read_every_row(tmp_path):
    row = b'{"messages": [{"role": "user", "content": "a"}]}'
    for name, content in [("crlf.jsonl", row + b"\r\n" + row + b"\r\n"), ("bom.jsonl", b"\xef\xbb\xbf" + row + b"\n" + row),
                          ("blank.jsonl", row + b"\n\n  \n" + row + b"\n"), ("bom.json", b"\xef\xbb\xbf[" + row + b"," + row + b"]"),
                          ("lines.json", b"\xef\xbb\xbf" + row + b"\n" + row + b"\n")]:
        (tmp_path / name).write_bytes(content)
        assert common.count_rows(str(tmp_path / name)) == 2
        assert [r for _, r in common.load_mixture([str(tmp_path / name), "1.0"])] == [json.loads(row)] * 2


@pytest.mark.parametrize("weight, expected", [
    ("0", 0), ("0.5", 2), ("1.0", 4), ("1", 4), ("3", 3), ("3.0", 3),
    ("0.9", 3), ("0.2", 0),  # 3.6 and 0.8 rows: rounded down as open-instruct's int(frac * len) (round gave 4 and 1)
    ("-0.5", "must be a fraction in [0, 1] or a row count"),  # was islice's error, naming no source
    ("nan", "must be a fraction in [0, 1] or a row count"), ("inf", "must be a fraction in [0, 1] or a row count"),
    ("1.5", "neither a fraction in [0, 1] nor a whole number of rows"),  # was int(1.5): 1 row, silently
    ("half", "is not a number"), ("5", "asked for 5 rows, it has 4"),
])
def test_mixture_weights(tmp_path, weight, expected, capsys):
    data = write_jsonl(tmp_path / "four.jsonl", [{"i": i} for i in range(4)])
    if isinstance(expected, int):
        assert [row["i"] for _, row in common.load_mixture([data, weight])] == list(range(expected))
        assert (f"{data} (weight {weight}, 4 rows) contributes no row" in capsys.readouterr().err) == (expected == 0)
    else:
        with pytest.raises(ValueError, match=f"{data}: .*{re.escape(expected)}"):
            common.load_mixture([data, weight])


def _keep_row(where, row):
    return (), {"input_ids": [1, 2, 3], "text": where}


def test_a_run_waiting_for_a_build_that_failed_builds_itself(tmp_path, monkeypatch):
    """Two runs share a cache dir; the one building fails (bad rows) and releases its lock without a file. The other,
    waiting for that file, used to wait forever ("waiting for ....lock") for a lock that no longer existed; now it takes
    over, builds, and so reports the error itself (here the build succeeds: the failure was the other run's). And a
    lock file left by a builder that was killed (SIGKILL, or SIGTERM: a preempted job, whose `finally` never ran) made
    every later run wait forever; the lock is flock()'s now, which dies with its holder: nobody waits for it."""
    import fcntl

    import torch.distributed as dist

    data = write_jsonl(tmp_path / "rows.jsonl", [{"i": i} for i in range(3)])
    cache, mixture, key, columns = tmp_path / "cache", [data, "1.0"], ["test"], ["input_ids", "text"]
    digest = hashlib.sha256(json.dumps([common.source_fingerprint(mixture), key, columns]).encode()).hexdigest()[:20]
    cache.mkdir()
    lock_path = cache / f"{digest}.arrow.lock"
    lock_path.write_text("")  # left by a killed builder: no one holds it
    waits = []

    def wait(seconds):
        waits.append(seconds)
        assert len(waits) < 3, "waiting for a lock that no one holds"

    monkeypatch.setattr(common.time, "sleep", wait)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        read, lengths, stats = common.tokenize_once(mixture, _keep_row, columns, key, str(cache), num_workers=1)
        assert waits == [] and stats["how"].startswith("tokenized in") and list(lengths) == [3, 3, 3]
        assert [r["text"] for r in read(range(3))] == [f"{data}:{i}" for i in (1, 2, 3)]

        for name in os.listdir(cache):  # the other run builds (it holds the lock), then fails: no file comes
            if not name.endswith(".lock"):
                os.remove(cache / name)
        other = open(lock_path, "a")
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)

        def sleep(seconds):
            waits.append(seconds)
            assert len(waits) < 3, "still waiting for a lock that is gone"
            other.close()  # the other run's failure released its lock

        monkeypatch.setattr(common.time, "sleep", sleep)
        read, lengths, stats = common.tokenize_once(mixture, _keep_row, columns, key, str(cache), num_workers=1)
    finally:
        dist.destroy_process_group()
    assert len(waits) == 1 and stats["how"].startswith("tokenized in") and list(lengths) == [3, 3, 3]


def test_a_damaged_stored_tokenization_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    """An Arrow file cut at a record batch boundary (a copy interrupted, a crash before the disk had it all) read as
    fewer rows, and the run trained on them without a word; cut elsewhere, it failed with pyarrow's "Expected to be able
    to read ... bytes", naming no file."""
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [m for m in conversation(i) if m]} for i in range(2500)])
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--max_steps", 1,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1,
            "--dataset_local_cache_dir", tmp_path / "cache", *FAST]
    path = stored_path(run_script("sft.py", *args, "--output_dir", tmp_path / "one").stdout)
    import pyarrow as pa

    reader = pa.ipc.open_stream(pa.memory_map(path))  # 3 batches of <= 1000 rows: keep the first two
    batches = [reader.read_next_batch(), reader.read_next_batch()]
    with pa.OSFile(path + ".cut", "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    os.replace(path + ".cut", path)
    result = run_script("sft.py", *args, "--output_dir", tmp_path / "two", check=False)
    assert result.returncode != 0 and f"{path}: the stored tokenization is damaged (2000 of its 2500 examples)" in result.stderr
    with open(path, "r+b") as f:  # cut inside a batch
        f.truncate(os.path.getsize(path) // 2)
    result = run_script("sft.py", *args, "--output_dir", tmp_path / "three", check=False)
    assert result.returncode != 0 and f"{path}: the stored tokenization is damaged (" in result.stderr


# ----------------------------------------------------------------------------- found by a review (2026-12-06)

def test_a_row_the_chat_template_refuses_is_a_bad_row_named_by_its_line():
    """A template's own check (Mistral's, Gemma's, Llama 2's "roles must alternate") raised jinja2's TemplateError
    out of the tokenization, naming no row; now it is one of the bad rows, reported with the others."""
    import jinja2

    def make_example(where, row):
        raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    where, error = common._make_example_star((make_example, "alt.jsonl:4", {"messages": []}))
    assert isinstance(error, ValueError)
    assert str(error) == "alt.jsonl:4: TemplateError: Conversation roles must alternate user/assistant/user/assistant/..."


def test_a_parquet_file_rewritten_with_its_old_mtime_gives_its_new_rows(tmp_path):
    """datasets.load_dataset served a local parquet file from its own cache, which knows the file by its mtime only:
    rewritten with the old mtime kept (cp -p, rsync -a, tar), the old rows came back while the new size made us
    tokenize again. The file is now read by pyarrow itself."""
    import pyarrow
    import pyarrow.parquet

    path = str(tmp_path / "rows.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"i": list(range(10)), "v": ["v1"] * 10}), path)
    assert [row["v"] for _, row in common.load_mixture([path, "1.0"])] == ["v1"] * 10
    mtime = os.stat(path).st_mtime_ns
    pyarrow.parquet.write_table(pyarrow.table({"i": list(range(12)), "v": ["v2"] * 12}), path)
    os.utime(path, ns=(mtime, mtime))
    assert common.count_rows(path) == 12
    assert [(where, row) for where, row in common.load_mixture([path, "0.5"])] == \
        [(f"{path}[row {i}]", {"i": i, "v": "v2"}) for i in range(6)]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        common.count_rows(str(tmp_path / "bad.parquet"))
    # a column twice: refused, as a JSON key twice (before: each row kept the last one's value)
    pyarrow.parquet.write_table(pyarrow.table([["a"], ["b"]], names=["messages", "messages"]), path)
    with pytest.raises(ValueError, match="rows.parquet: column 'messages' appears twice"):
        common.count_rows(path)
    # a row group damaged past an intact footer: named with the file (before: a bare OSError)
    pyarrow.parquet.write_table(pyarrow.table({"v": [f"row {i} " * 20 for i in range(40)]}), path, row_group_size=10,
                                compression="none")
    data = bytearray(open(path, "rb").read())
    offset = pyarrow.parquet.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data[offset:offset + 200] = b"\xff" * 200
    open(path, "wb").write(bytes(data))
    assert common.count_rows(path) == 40
    with pytest.raises(ValueError, match=r"rows.parquet: not a readable parquet file, a row group is damaged \("):
        common.load_mixture([path, "1.0"])


def test_a_file_rewritten_with_its_old_size_and_mtime_is_tokenized_again(tmp_path):
    """The tokenization was keyed by a file's size and mtime: a file rewritten with its old mtime kept (cp -p, rsync -a,
    tar) and the same size (a gold 41 made 14) trained on its old tokens. It is keyed by the file's content now."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"ground_truth": "41"}\n')
    before, stat = common.source_fingerprint([str(path), "1.0"]), os.stat(path)
    time.sleep(0.05)  # (past the clock's tick: a ctime in the same tick would be equal)
    (tmp_path / "new.jsonl").write_text('{"ground_truth": "14"}\n')
    os.utime(tmp_path / "new.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(tmp_path / "new.jsonl", path)  # cp -p: content and mtime, into the same file
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    after = common.source_fingerprint([str(path), "1.0"])
    assert after != before
    # the same content after a chmod, or copied in anew (another inode, new times): the same key, no re-tokenizing
    os.chmod(path, 0o600)
    shutil.copy(tmp_path / "new.jsonl", tmp_path / "copy.jsonl")
    os.replace(tmp_path / "copy.jsonl", path)
    assert common.source_fingerprint([str(path), "1.0"]) == after


def test_a_source_without_a_weight_is_an_error_even_with_a_cache(tmp_path):
    """iter_mixture refused "a.jsonl 1.0 b.jsonl", but the cache key paired sources with weights by zip(), which dropped
    b.jsonl: once a.jsonl alone was tokenized, the same command reused that and trained without b.jsonl."""
    with pytest.raises(ValueError, match="--dataset_mixer_list takes SOURCE WEIGHT pairs"):
        common.source_fingerprint([str(tmp_path / "a.jsonl"), "1.0", str(tmp_path / "b.jsonl")])
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):  # (.json said [Errno 2] only)
        common.count_rows(str(tmp_path / "missing.json"))


def test_a_dataset_directory_is_fingerprinted_by_its_files(tmp_path):
    """A local directory (datasets.load_dataset reads one) was known by the directory's own size and mtime, which do
    not change when a file in it is rewritten: the run reused the old tokenization."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"a": 1}\n')
    before = common.source_fingerprint([str(tmp_path / "data"), "1.0"])
    (tmp_path / "data" / "train.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    assert common.source_fingerprint([str(tmp_path / "data"), "1.0"]) != before
    # "DIR:SPLIT" was known by that name alone (a file rewritten: the old tokenization; relative, another directory's);
    # a split file under a symlinked folder (os.walk does not enter it, datasets does) was left out; a DIR whose name
    # holds ':' was cut at it
    (tmp_path / "shards").mkdir()
    (tmp_path / "data" / "data").symlink_to(tmp_path / "shards")
    (tmp_path / "run:2026-12-07T12:00").mkdir()
    for shards, source in [(tmp_path / "shards", f"{tmp_path / 'data'}:test"),
                           (tmp_path / "run:2026-12-07T12:00", f"{tmp_path / 'run:2026-12-07T12:00'}:test")]:
        (shards / "test-00000-of-00001.jsonl").write_text('{"a": 41}\n')
        before = common.source_fingerprint([source, "1.0"])
        assert before[0][:2] == [source.rpartition(":")[0], "test"], before
        (shards / "test-00000-of-00001.jsonl").write_text('{"a": 14}\n')
        assert common.source_fingerprint([source, "1.0"]) != before, source
        assert [row for _, row in common.load_rows(source)] == [{"a": 14}]


def test_a_dataset_directory_is_read_file_by_file_as_it_is_now(tmp_path):
    """A local dataset directory was read by datasets.load_dataset, whose cache knows a file by its mtime: a file
    rewritten with its mtime kept (cp -p, rsync -a) gave its OLD rows (a gold 41 stayed 41 after the file said 14),
    while the new content's key tokenized them afresh; and a bad row failed as "An error occurred while generating the
    dataset", naming no file. Now the directory's split is resolved as datasets does (file names, README configs) and
    each file read by iter_rows."""
    data = tmp_path / "data"
    (data / "data").mkdir(parents=True)
    shard = data / "data" / "train-00000-of-00001.jsonl"
    shard.write_text('{"gold": 41}\n')
    (data / "data" / "test-00000-of-00001.jsonl").write_text('{"gold": 7}\n{"gold": 8}\n')
    assert [row for _, row in common.load_rows(str(data))] == [{"gold": 41}]
    stamp = os.stat(shard).st_mtime_ns
    shard.write_text('{"gold": 14}\n')
    os.utime(shard, ns=(stamp, stamp))
    assert [row for _, row in common.load_rows(str(data))] == [{"gold": 14}]
    assert common.load_rows(str(data))[0][0] == f"{shard}:1"  # errors name the file and line
    assert common.count_rows(f"{data}:test") == 2 and [row["gold"] for _, row in common.load_rows(f"{data}:test")] == [7, 8]
    with pytest.raises(ValueError, match="has no split 'validation' \\(it has train, test\\)"):
        common.count_rows(f"{data}:validation")
    shard.write_text('{"gold": 14}\n{"gold": \n')
    with pytest.raises(ValueError, match=f"{shard}:2: not valid JSON"):
        common.load_rows(str(data))
    # a README's configs choose the files, as datasets.load_dataset does
    (data / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/test-*\n---\n")
    assert [row["gold"] for _, row in common.load_rows(str(data))] == [7, 8]
    (data / "README.md").unlink()
    # JSON Lines in a .json file (as hub datasets store them; datasets read it): read so too, line by line
    (data / "data" / "train-00000-of-00001.jsonl").rename(data / "data" / "train-00000-of-00001.json")
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.json:2: not valid JSON"):
        common.load_rows(str(data))
    (data / "data" / "train-00000-of-00001.json").write_text('{"gold": 14}\n{"gold": 15}\n')
    assert [row["gold"] for _, row in common.load_rows(str(data))] == [14, 15] and common.count_rows(str(data)) == 2
    # other formats (csv, .jsonl.gz, arrow): datasets reads them, converted again at each read (its cache knows the
    # file by its mtime: rewritten with it kept, the old rows came back), and an error names the directory
    for split in ("train", "test"):
        (data / "data" / f"{split}-00000-of-00001.csv").write_text("gold\n3\n")
        for name in os.listdir(data / "data"):
            if not name.endswith(".csv"):
                os.remove(data / "data" / name)
    assert [row for _, row in common.load_rows(str(data))] == [{"gold": 3}]
    shard = data / "data" / "train-00000-of-00001.csv"
    stamp = os.stat(shard).st_mtime_ns
    shard.write_text("gold\n4\n")
    os.utime(shard, ns=(stamp, stamp))
    assert [row for _, row in common.load_rows(str(data))] == [{"gold": 4}] and common.count_rows(str(data)) == 1
    shard.write_text("gold\n4\n5,6\n")
    with pytest.raises(ValueError, match=f"{data}: datasets could not read it: .*"):
        common.load_rows(str(data))


def test_a_deleted_arrow_file_is_rebuilt(tiny_model_dir, tmp_path):
    """The .arrow file deleted, its .arrow.json left: the next run failed opening it; now it tokenizes again."""
    data = write_jsonl(tmp_path / "rows.jsonl", varied_rows(8))
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 1, "--max_steps", 1, "--dataset_local_cache_dir", tmp_path / "cache", *FAST]
    first = run_script("sft.py", *args, "--output_dir", tmp_path / "one").stdout
    os.remove(stored_path(first))
    second = run_script("sft.py", *args, "--output_dir", tmp_path / "two").stdout
    assert "tokenized in" in second and stored_path(second) == stored_path(first) and os.path.exists(stored_path(first))


def test_a_local_file_of_another_extension_says_which_extensions_are_read(tmp_path):
    """data.JSONL / data.txt were taken for hub names: "Couldn't find any data file", which hid the cause."""
    for name in ("data.JSONL", "data.txt"):
        (tmp_path / name).write_text('{"a": 1}\n')
        with pytest.raises(ValueError, match=f"{name}: a local file must end in .jsonl, .json or .parquet"):
            common.count_rows(str(tmp_path / name))


def test_the_gsm8k_builders_name_an_answer_without_its_gold_line(tmp_path):
    """data/build_sft_gsm8k.py and data/build_rlvr.py read GSM8K train's "#### N" line with split("#### "): an answer
    written "####1,007" failed with a bare unpacking error (SFT) or made its whole solution the gold (RLVR). Both now
    stop naming the file's line and field; the shipped files rebuild byte for byte (checked when this was written)."""
    lines = open(os.path.join(ROOT, "data", "gsm8k_train.jsonl")).readlines()[:1100]
    bad = json.loads(lines[1049])
    bad["answer"] = bad["answer"].replace("#### ", "####")
    lines[1049] = json.dumps(bad) + "\n"
    (tmp_path / "gsm8k_train.jsonl").write_text("".join(lines))
    for script in ("build_sft_gsm8k.py", "build_rlvr.py"):
        shutil.copy(os.path.join(ROOT, "data", script), tmp_path / script)
        proc = subprocess.run([sys.executable, str(tmp_path / script)], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode != 0 and "gsm8k_train.jsonl:1050: field 'answer' does not end in a line '#### N'" in proc.stderr, \
            (script, proc.stderr[-1000:])
