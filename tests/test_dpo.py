"""dpo.py end to end on CPU: every loss against an independent unpacked computation (loss, rewards and gradient norm,
at policy == reference and one step later), cached vs live reference, cache reuse, 2 processes vs 1, bad rows.

The trainer runs are shared between tests (module-scoped fixtures): process start-up dominates on a small CPU."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from conftest import conversation, read_metrics, run_script, write_jsonl

# One thread for the in-process computations, like the subprocesses (OMP_NUM_THREADS=1): on a busy 2-core machine two
# threads that wait on each other made the independent computation 10x slower.
torch.set_num_threads(1)
FAST = ["--preprocessing_num_workers", "1", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--learning_rate", "1e-3"]
SEED = 123  # dpo.py's default --seed


def preference_rows(n=9):
    """Multi-turn pairs (the earlier assistant turn is prompt, not response) in the three accepted layouts."""
    rows = []
    for i in range(n):
        messages = [m for m in conversation(i) if m]
        rejected = messages[:-1] + [{"role": "assistant", "content": f"Doubled, it is {6 * i + 1}, I think" + "!" * i}]
        row = {"chosen": messages, "rejected": rejected}
        if i % 3 == 1:  # Tulu: a prompt string naming the user's question
            row["prompt"] = messages[-2]["content"]
        if i % 3 == 2:  # TRL: the prompt turns apart, responses alone
            row = {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": rejected[-1:]}
        rows.append(row)
    return rows


def full_conversations(row):
    prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
    return prompt + row["chosen"], prompt + row["rejected"]


def response_logps(model, tokenizer, messages):
    """log pi(y|x) summed over the final response, and |y|: one unpacked sequence, positions found by tokenizing the
    prompt alone (not with common.tokenize_conversation) and gathered by hand."""
    prompt_ids = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    end = max(t for t, token in enumerate(ids) if token == tokenizer.eos_token_id)  # the response's end-of-turn token
    logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V)
    scored = range(len(prompt_ids), end + 1)  # token t is predicted at position t - 1
    return sum(logprobs[t - 1, ids[t]] for t in scored), len(scored)


def independent_step(policy, reference, tokenizer, rows, loss_type, beta, label_smoothing=0.0, gamma_beta_ratio=0.5):
    """Loss, metrics and gradient norm of one global batch, written from the papers' formulas."""
    policy.zero_grad()
    losses, rewards, logps = [], [], []
    for row in rows:
        (pc, nc), (pr, nr) = [response_logps(policy, tokenizer, side) for side in full_conversations(row)]
        if loss_type == "simpo":
            reward_c, reward_r = beta * pc / nc, beta * pr / nr
            z = reward_c - reward_r - gamma_beta_ratio * beta
        else:
            with torch.no_grad():
                (rc, _), (rr, _) = [response_logps(reference, tokenizer, side) for side in full_conversations(row)]
            norm_c, norm_r = (nc, nr) if loss_type == "dpo_norm" else (1, 1)
            reward_c, reward_r = beta * (pc - rc) / norm_c, beta * (pr - rr) / norm_r
            z = reward_c - reward_r
        losses.append(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z))
        rewards.append((reward_c.item(), reward_r.item()))
        logps.append((pc.item(), pr.item()))
    loss = torch.stack(losses).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in policy.parameters() if p.grad is not None)).item()
    mean = lambda values: sum(values) / len(values)
    return {"loss": loss.item(), "grad_norm": grad_norm, "rewards/chosen": mean([c for c, _ in rewards]),
            "rewards/rejected": mean([r for _, r in rewards]), "rewards/accuracy": mean([c > r for c, r in rewards]),
            "logps/chosen": mean([c for c, _ in logps]), "logps/rejected": mean([r for _, r in logps])}


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    too_long = {"chosen": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one " * 300}],
                "rejected": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "two"}]}
    return write_jsonl(tmp_path_factory.mktemp("dpo_data") / "pairs.jsonl", preference_rows() + [too_long])


# Every run: 9 pairs (a 10th is dropped as too long), global batch 8 (so each epoch's shuffle leaves one out), 2 steps
# of 1 epoch each, a checkpoint after step 1 (the policy of step 2, for the independent computation).
LOSS_CONFIGS = {"dpo_norm": [], "dpo": ["--label_smoothing", "0.1"], "simpo": []}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs_data, tmp_path_factory):
    """name -> (output_dir, stdout), all runs sharing one reference cache. Four runs only (start-up dominates):
    dpo_norm on 2 processes computes the reference log-probs (each rank a slice: 5 pairs, and 4 + 1 padding); dpo and
    simpo on 1 process (dpo finds the cache); "live": the dpo_norm run interrupted after step 1 and resumed on 1 process
    with a live reference model."""
    root = tmp_path_factory.mktemp("dpo_runs")
    base = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", pairs_data, "1.0", "--max_seq_length", 256,
            "--max_steps", 2, "--checkpointing_steps", 1, "--ref_cache_dir", root / "cache", "--overlong", "drop", *FAST]
    one = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 4]
    plan = {"dpo_norm": (["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2], 2),
            "dpo": (["--loss_type", "dpo", *LOSS_CONFIGS["dpo"], *one], 1),
            "simpo": (["--loss_type", "simpo", *one], 1)}
    results = {}
    for name, (args, nproc) in plan.items():
        results[name] = (root / name, run_script("dpo.py", *base, *args, "--output_dir", root / name, nproc=nproc).stdout)
    live = root / "live"  # what was on disk after step 1: checkpoint-1 and one line of metrics
    shutil.copytree(root / "dpo_norm", live, ignore=shutil.ignore_patterns("*.safetensors"))
    (live / "metrics.jsonl").write_text((live / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    results["live"] = (live, run_script("dpo.py", *base, "--no_cache_ref", *one, "--resume", "--output_dir", live).stdout)
    return results


def load_checkpoint(model_dir, checkpoint_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint_dir))  # the saved optimizer state is simply not asked for
    model.load_state_dict(state["model"])
    return model


@pytest.mark.parametrize("loss_type", list(LOSS_CONFIGS))
def test_loss_and_gradients_match_an_independent_computation(runs, loss_type, tiny_model_dir, tokenizer, pairs_data):
    from transformers import AutoModelForCausalLM

    output_dir, _ = runs[loss_type]
    metrics = read_metrics(output_dir)
    label_smoothing = 0.1 if loss_type == "dpo" else 0.0
    beta = {"dpo_norm": 5.0, "dpo": 0.1, "simpo": 2.0}[loss_type]
    rows = [json.loads(line) for line in open(pairs_data)][:9]  # without the one dropped as too long
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    after_step_1 = load_checkpoint(tiny_model_dir, output_dir / "checkpoint-1")
    for step, policy in [(0, initial), (1, after_step_1)]:
        # the step's pairs: dpo.py's documented shuffle (seed + epoch, one epoch per step here), first global batch
        batch = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED + step))[:8].tolist()
        expected = independent_step(policy, AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer,
                                    [rows[i] for i in batch], loss_type, beta, label_smoothing)
        for key, value in expected.items():
            if key == "rewards/accuracy" and step == 0:
                continue  # rewards are 0 up to rounding at policy == reference: "chosen > rejected" is a coin flip
            assert metrics[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    # policy == reference: the margin is 0, so the loss is ln 2 whatever beta and the label smoothing
    if loss_type != "simpo":
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert metrics[0]["rewards/margin"] == pytest.approx(0, abs=1e-6)
    assert metrics[1]["loss"] < metrics[0]["loss"]  # and it learns


def test_cache_is_computed_once_and_reused(runs):
    assert "reference log-probs: computed for 9 pairs" in runs["dpo_norm"][1]
    # same model, data, template and length: the key depends neither on the world size nor on the loss
    assert "reference log-probs: cache hit" in runs["dpo"][1] and "computed for" not in runs["dpo"][1]
    assert "reference: none" in runs["simpo"][1] and "reference log-probs" not in runs["simpo"][1]
    [cache_file] = os.listdir(runs["dpo"][0].parent / "cache")
    assert torch.load(runs["dpo"][0].parent / "cache" / cache_file)["ref_logps"].shape == (9, 2)
    assert "10 rows -> 9 pairs (1 dropped with a side longer than 256 tokens, 0 truncated" in runs["dpo"][1]


def test_resumed_on_one_process_with_live_reference_matches_two_processes_with_cache(runs):
    """Step 2 of the global batch of 8 pairs, as 2 processes x 2 micro-steps of 2 with cached reference log-probs, and
    resumed from the step-1 checkpoint as 1 process x 4 micro-steps of 2 with a frozen reference model, which must be
    the initial model, not the checkpoint. (The dpo run checks the 1-process cached path against the formula.)"""
    two, live = read_metrics(runs["dpo_norm"][0]), read_metrics(runs["live"][0])
    assert "resumed from" in runs["live"][1] and "checkpoint-1" in runs["live"][1]
    assert [m["step"] for m in live] == [1, 2] and live[0] == two[0]
    for key in ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "tokens"]:
        assert live[1][key] == pytest.approx(two[1][key], rel=1e-4), key


def test_a_resume_refuses_initial_weights_rewritten_since(tiny_model_dir, pairs_data, tmp_path):
    """The reference is the initial model, read again from --model_name_or_path at a resume. Rewritten since (an SFT
    run repeated into that directory), it gave the resumed run another reference without a word; now the resume is
    refused. The same weights written again (a fresh copy) resume; a damaged reference cache is computed again."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, model)
    args = ["--model_name_or_path", model, "--dataset_mixer_list", pairs_data, "1.0", "--max_seq_length", 256, "--overlong",
            "drop", "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 4, "--checkpointing_steps", 1,
            "--ref_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "out", *FAST]
    run_script("dpo.py", *args, "--max_steps", 2)  # checkpoint-1, then the model
    weights = load_file(model / "model.safetensors")
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    result = run_script("dpo.py", *args, "--max_steps", 2, "--resume", check=False)
    assert result.returncode != 0 and "the initial model (the reference) now holds other weights (or config)" in result.stderr, result.stderr[-2000:]
    assert "resumed from" not in result.stdout
    shutil.copytree(tiny_model_dir, model, dirs_exist_ok=True)
    # and the reference cache damaged since it was written (a bare EOFError stopped the run): computed again
    [cache_file] = os.listdir(tmp_path / "cache")
    (tmp_path / "cache" / cache_file).write_bytes(b"")
    resumed = run_script("dpo.py", *args, "--max_steps", 2, "--resume").stdout
    assert "resumed from" in resumed and "is unreadable (EOFError" in resumed and "computed for 9 pairs" in resumed


GOOD = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
BAD_ROWS = [  # (row, the error it must give), all in one file: dpo.py reports every bad row at once
    ({"rejected": GOOD["rejected"]}, "field 'chosen' must be a non-empty list of messages"),
    ({**GOOD, "rejected": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "field 'rejected[1].role' must be one of"),
    ({**GOOD, "chosen": [{"role": "user", "content": "hi"}]}, "field 'chosen' must end with an assistant response"),
    ({**GOOD, "rejected": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "no"}]},
     "fields 'chosen' and 'rejected' have different prompts (they differ at turn 0)"),
    ({**GOOD, "prompt": "hello there"}, "field 'prompt' matches no user turn of 'chosen'"),
    ({**GOOD, "prompt": [{"role": "user", "content": "hey"}]}, "field 'prompt' is not the turns before the response"),
    ({**GOOD, "prompt": 3}, "field 'prompt' must be a string or a list of messages"),
    # responses alone with no prompt (say a null 'prompt' column): was trained as a preference of no prompt at all
    ({"prompt": None, "chosen": GOOD["chosen"][1:], "rejected": GOOD["rejected"][1:]},
     "field 'chosen' has no user turn before its response"),
]


def test_bad_rows_name_file_line_and_field(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD] + [row for row, _ in BAD_ROWS] + [GOOD])
    result = run_script("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0",
                        "--output_dir", tmp_path / "out", *FAST, check=False)
    assert result.returncode != 0
    assert f"ValueError: {len(BAD_ROWS)} bad rows:" in result.stderr
    for line, (_, message) in enumerate(BAD_ROWS, 2):
        assert f"{path}:{line}: {message}" in result.stderr, message


def test_overlong_pairs_are_truncated_by_default_and_counted(tiny_model_dir, tmp_path):
    def pair(prompt_words, rejected_words):
        user = [{"role": "user", "content": " ".join(["count"] * prompt_words)}]
        return {"chosen": user + [{"role": "assistant", "content": "one two"}],
                "rejected": user + [{"role": "assistant", "content": " ".join(["one"] * rejected_words)}]}

    # 4 short pairs; one whose rejected side runs past 64 tokens (cut, kept); one whose prompt alone does (dropped);
    # no preference, so dropped (an error before, which stopped a whole run): one pair whose responses are the same,
    # one whose responses differ only past the cut. Kept (an error before): an empty rejected response, which trains
    # its end-of-turn token as open-instruct does (a generation that failed is a real, dispreferred response)
    same, long = pair(2, 3), pair(2, 200)
    same = {**same, "rejected": same["chosen"]}
    after_cut = {"chosen": long["rejected"][:1] + [{"role": "assistant", "content": " ".join(["one"] * 200) + " a"}],
                 "rejected": long["rejected"][:1] + [{"role": "assistant", "content": " ".join(["one"] * 200) + " b"}]}
    empty = {**same, "rejected": same["chosen"][:1] + [{"role": "assistant", "content": ""}]}
    # and one whose rejected response quotes the end-of-turn token's text: kept as open-instruct keeps it, but counted
    quoting = {**same, "rejected": same["chosen"][:1] + [{"role": "assistant", "content": "<|im_end|>"}]}
    path = write_jsonl(tmp_path / "long.jsonl", [pair(2, 3)] * 4 + [pair(2, 200), pair(200, 3), same, after_cut, empty,
                                                 quoting])
    result = run_script("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0",
                        "--max_seq_length", 64, "--per_device_train_batch_size", 1,
                        "--gradient_accumulation_steps", 1, "--max_steps", 1, "--output_dir", tmp_path / "out",
                        "--ref_cache_dir", tmp_path / "cache", *FAST)
    # (truncated: the pairs kept so; the two dropped after the cut were counted there too, as if trained truncated)
    assert ("10 rows -> 7 pairs (0 dropped with a side longer than 64 tokens, 1 truncated, "
            "1 dropped with a response truncated away, 2 with identical responses, 1 with a special token's text in a "
            "message") in result.stdout


# The flags of the two published Tulu 3 DPO commands (open-instruct docs/tulu3.md@30d11b4fb, 8B and 70B; the
# launcher's own flags and the dataset list aside), which the README says port by replacing the launcher.
TULU3_DPO_FLAGS = ["--use_flash_attn", "--tokenizer_name", "allenai/Llama-3.1-Tulu-3-8B-SFT", "--max_seq_length", 2048,
                   "--preprocessing_num_workers", 16, "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 16,
                   "--learning_rate", "5e-07", "--lr_scheduler_type", "linear", "--warmup_ratio", 0.1, "--weight_decay", 0.0,
                   "--num_train_epochs", 1, "--output_dir", "output/dpo_8b", "--with_tracking", "--report_to", "wandb",
                   "--logging_steps", 1, "--model_revision", "main", "--gradient_checkpointing", "--use_slow_tokenizer",
                   "--use_lora", "False", "--dpo_loss_type", "dpo_norm", "--dpo_beta", 5, "--checkpointing_steps", 1000,
                   "--exp_name", "valpy_dpo_7b_v3.9_best_ifpersonafae"]


def test_the_published_tulu_3_dpo_command_parses(tmp_path):
    """Every flag is accepted (argparse passes; the run then stops at the missing model directory, before any work).
    `--use_lora False` (both published commands) is full fine-tuning, the only kind here; True is refused, not ignored."""
    missing = ["--model_name_or_path", tmp_path / "no_model", "--dataset_mixer_list", "a", "1.0", "b", "1.0"]
    result = run_script("dpo.py", *missing, *TULU3_DPO_FLAGS, check=False)
    assert "unrecognized arguments" not in result.stderr and "no model directory" in result.stderr, result.stderr[-500:]
    lora = run_script("dpo.py", *missing, "--use_lora", "True", check=False)
    assert lora.returncode != 0 and "--use_lora: invalid choice: 'True'" in lora.stderr, lora.stderr[-500:]


def test_reference_weights_rewritten_with_their_size_and_mtime_miss_the_cache(tiny_model_dir, pairs_data, tmp_path):
    """The reference cache knew the weights by each file's size and mtime: other weights of the same shape copied in
    with their mtime kept (`cp -p`, `rsync -a`) got the old model's reference log-probs. ctime and inode are now in the key."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["--model_name_or_path", model, "--dataset_mixer_list", pairs_data, "4", "--max_seq_length", 256, "--max_steps", 1,
            "--ref_cache_dir", tmp_path / "cache", "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, *FAST]
    first = run_script("dpo.py", *args, "--output_dir", tmp_path / "one").stdout
    assert "reference log-probs: computed for 4 pairs" in first
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    other.save_pretrained(tmp_path / "other")
    [weights] = [name for name in os.listdir(model) if name.endswith(".safetensors")]
    stat = os.stat(model / weights)
    os.utime(tmp_path / "other" / weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(tmp_path / "other" / weights).st_size == stat.st_size
    shutil.copy2(tmp_path / "other" / weights, model / weights)  # cp -p into the model directory
    second = run_script("dpo.py", *args, "--output_dir", tmp_path / "two").stdout
    assert "reference log-probs: computed for 4 pairs" in second and "cache hit" not in second


def test_a_reference_cache_that_cannot_be_written_is_a_warning(tiny_model_dir, pairs_data, tmp_path):
    """The cache only saves the next run a pass: one that cannot be written (a full disk, a quota; here a path under a
    file) stopped the run on rank 0 alone, its other ranks left waiting in the first training collective."""
    (tmp_path / "file").write_text("")
    result = run_script("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", pairs_data, "4",
                        "--max_seq_length", 256, "--max_steps", 1, "--ref_cache_dir", tmp_path / "file" / "cache",
                        "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 1, "--output_dir",
                        tmp_path / "out", *FAST, nproc=2)
    assert f"warning: reference log-probs not cached in {tmp_path / 'file' / 'cache'} (NotADirectoryError" in result.stdout
    assert "saved the model to" in result.stdout and (tmp_path / "out" / "model.safetensors").exists()


def test_dropout_is_off_so_the_first_loss_is_ln_2(tokenizer, pairs_data, tmp_path):
    """A config with dropout (Phi-2: resid_pdrop, embd_pdrop; attention dropout) trained with it on: the policy's
    log-probs were noisy against the reference's, so at policy == reference the first loss was not ln 2, and the
    attention's rate was refused by the packed kernel. Off everywhere, as TRL's DPO does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("phi", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, resid_pdrop=0.5, embd_pdrop=0.5,
                                  attention_dropout=0.3, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    run_script("dpo.py", "--model_name_or_path", tmp_path / "phi", "--dataset_mixer_list", pairs_data, "1.0",
               "--max_seq_length", 256, "--overlong", "drop", "--max_steps", 1, "--per_device_train_batch_size", 2,
               "--gradient_accumulation_steps", 4, "--ref_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "out", *FAST)
    assert read_metrics(tmp_path / "out")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
