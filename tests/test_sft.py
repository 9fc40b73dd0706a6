"""sft.py end to end on CPU: packing vs padding, 2 processes vs 1, resume, save-reload, bad input."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import ROOT, SCRIPT_ENV, aborted_at_exit, conversation, read_metrics, run_script, write_jsonl

FAST = ["--preprocessing_num_workers", "1", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--learning_rate", "1e-3"]


def tiny_examples(tokenizer, n=5):
    return [common.tokenize_conversation(tokenizer, [m for m in conversation(i) if m]) for i in range(1, n + 1)]


def test_packed_forward_equals_padded_forward(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    common.register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    examples = tiny_examples(tokenizer)
    lengths = [len(ids) for ids, _ in examples]
    assert len(set(lengths)) > 1  # padding actually happens
    padded_inputs, padded_targets = common.collate(examples, False, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        padded_logits = model(**padded_inputs).logits  # (B, L, V)
        model.set_attn_implementation("packed")
        packed_inputs, packed_targets = common.collate(examples, True, tokenizer.pad_token_id, "cpu")
        packed_logits = model(**packed_inputs).logits[0]  # (T, V)
        # reference: each document alone, no packing and no padding at all
        model.set_attn_implementation("sdpa")
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in examples])
    unpadded = torch.cat([padded_logits[i, :n] for i, n in enumerate(lengths)])
    assert torch.allclose(packed_logits, alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(unpadded, alone, atol=1e-5, rtol=1e-4)
    loss = lambda logits, targets: F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(loss(packed_logits, packed_targets[0]), loss(padded_logits, padded_targets), rtol=1e-5)
    # targets never cross a document boundary: the label after each document's last token is ignored
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (packed_targets[0, ends] == -100).all()


def test_two_processes_match_one_and_packing_matches_padding(tiny_model_dir, sft_data, tmp_path):
    """Global batch of 8 as 1 process x 4 micro-steps of 2 and as 2 processes x 2 micro-steps of 2, for both loss
    reductions; padded micro-batches against packed ones; activation checkpointing on and off."""
    common_args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "16", "--max_steps", "4", *FAST]
    for reduce_loss in ["sum", "mean"]:
        one, two = tmp_path / f"one_{reduce_loss}", tmp_path / f"two_{reduce_loss}"
        run_script("sft.py", *common_args, "--reduce_loss", reduce_loss, "--per_device_train_batch_size", 2,
                   "--gradient_accumulation_steps", 4, "--output_dir", one)
        run_script("sft.py", *common_args, "--reduce_loss", reduce_loss, "--per_device_train_batch_size", 2,
                   "--gradient_accumulation_steps", 2, "--output_dir", two, nproc=2)
        losses_one = [m["loss"] for m in read_metrics(one)]
        losses_two = [m["loss"] for m in read_metrics(two)]
        assert len(losses_one) == 4 and losses_one[-1] < losses_one[0]  # it trains
        assert losses_two == pytest.approx(losses_one, rel=1e-4), reduce_loss
        assert [m["tokens"] for m in read_metrics(one)] == [m["tokens"] for m in read_metrics(two)]
        # Adam hides a constant gradient scale from the losses; the gradient norm does not
        assert [m["grad_norm"] for m in read_metrics(two)] == pytest.approx([m["grad_norm"] for m in read_metrics(one)], rel=1e-4)
    padded = tmp_path / "padded"
    run_script("sft.py", *common_args, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
               "--output_dir", padded, "--no_padding_free")
    packed = tmp_path / "packed"  # with activation checkpointing, which must not change the numbers either
    run_script("sft.py", *common_args, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
               "--output_dir", packed, "--gradient_checkpointing")
    packed_losses = [m["loss"] for m in read_metrics(packed)]
    assert [m["loss"] for m in read_metrics(padded)] == pytest.approx(packed_losses, rel=1e-4)
    assert [m["loss"] for m in read_metrics(tmp_path / "one_sum")] == pytest.approx(packed_losses, rel=1e-4)  # 2 x 4 split


def launch_two_nodes(tmp_path, node_args, env=SCRIPT_ENV):
    """sft.py on two torchrun "nodes" of one process each, both on this machine, launched the way each node of a cluster
    launches it (node_args: each node's arguments) -> (exit codes, logs). A rank's abort at exit after the model was
    saved (seen once in 2026-12-06's runs) counts as success: its outputs are checked as they are.

    The static rendezvous (--master_addr/--master_port/--node_rank): node 0 hosts the store and holds global rank 0,
    always. The README's c10d rendezvous also works on one machine (same numbers), but there both launchers match
    127.0.0.1, so the store goes to whichever binds the port first, and ranks go by the sorted host_pid names of the
    launchers, --node_rank ignored: a path no cluster takes. sft.py itself only reads the RANK, WORLD_SIZE and
    MASTER_* that torchrun sets, the same for both."""
    for _ in range(3):  # the port is free when chosen, and bound by node 0 a moment later: another process
        codes, logs = launch_nodes_once(tmp_path, node_args, env)  # may take it in between (then again, on another)
        if not any("address already in use" in log.lower() for log in logs):
            break
    return codes, logs


def launch_nodes_once(tmp_path, node_args, env):
    """One try of launch_two_nodes, on a port chosen now."""
    with socket.socket() as s:  # a port the OS says is free now; torchrun binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node_rank in [0, 1]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                   os.path.join(ROOT, "sft.py"), *map(str, node_args[node_rank])]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # a file, not a pipe: a full pipe would stall the node
        # a session of its own, so a hung node's launcher and its worker can be killed together
        nodes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                       start_new_session=True), log))
    deadline = time.time() + 120  # a rendezvous that never completes fails the test instead of hanging it
    try:
        while any(node.poll() is None for node, _ in nodes) and time.time() < deadline:
            if any(node.poll() for node, _ in nodes):  # a node failed: the other's launcher waits for it to the deadline
                deadline = min(deadline, time.time() + 10)
            time.sleep(0.2)
    finally:  # also when the test is interrupted: no launcher is left waiting on a port
        for node, log in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            log.close()
    logs = [(tmp_path / f"node{node_rank}.log").read_text() for node_rank in [0, 1]]
    if "saved the model to" in logs[0] and any(aborted_at_exit(log) for log in logs):
        print("a rank aborted at exit after the run had saved its model; its outputs are checked as they are")
        return [0, 0], logs
    return [node.returncode for node, _ in nodes], logs


def test_two_nodes_match_one_process(tiny_model_dir, sft_data, tmp_path):
    """Two torchrun "nodes" of one process each against one plain process with the same global batch of 4: 2 nodes x
    1 micro-step of 2 examples vs 1 process x 2 micro-steps of 2."""
    common_args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "12", "--max_steps", "3",
                   "--per_device_train_batch_size", "2", *FAST]
    one = tmp_path / "one"
    run_script("sft.py", *common_args, "--gradient_accumulation_steps", 2, "--output_dir", one)
    # one directory, as on a cluster's shared disk
    node_args = [common_args + ["--gradient_accumulation_steps", "1", "--output_dir", tmp_path / "two_nodes"]] * 2
    codes, logs = launch_two_nodes(tmp_path, node_args)
    for node_rank, code in enumerate(codes):
        how = "killed" if code == -signal.SIGKILL else f"exit {code}"
        assert code == 0, f"node {node_rank}: {how}\n{logs[node_rank][-6000:]}"
    assert "world size 2" in logs[0]  # one job across the two nodes, not two jobs of one

    metrics_one, metrics_two = read_metrics(one), read_metrics(tmp_path / "two_nodes")
    assert [m["step"] for m in metrics_two] == [1, 2, 3]
    assert [m["tokens"] for m in metrics_two] == [m["tokens"] for m in metrics_one]  # the same examples each step
    assert [m["loss"] for m in metrics_two] == pytest.approx([m["loss"] for m in metrics_one], rel=1e-5)
    # A float32 norm over the 3.1M embedding gradients is itself only good to ~1e-4, and two shards sum their squares
    # in another order than one tensor does (measured: up to 4e-5 apart); a node count wrong in the gradient scale or
    # the data split is off by far more.
    assert [m["grad_norm"] for m in metrics_two] == pytest.approx([m["grad_norm"] for m in metrics_one], rel=1e-4)


def test_nodes_whose_output_dirs_differ_stop_at_the_first_checkpoint_and_at_a_resume(tiny_model_dir, sft_data, tmp_path):
    """On two nodes each with --output_dir on its own disk (the same path, two directories), every checkpoint was
    written in pieces no node could resume from: DCP's .metadata and `done` on node 0, each node its own shards. Found
    only at the resume, where node 0 resumed and node 1 started afresh, their collectives out of step. Now the first
    checkpoint stops the run (not complete: no `done` left), and a resume whose ranks see different checkpoints stops."""
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "12", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "1", *FAST]
    node_args = [args + ["--output_dir", tmp_path / f"disk{node_rank}"] for node_rank in [0, 1]]
    env = dict(SCRIPT_ENV, CHECKPOINT_VISIBLE_TIMEOUT="2")  # (90 s by default: NFS may show a new name that late)
    codes, logs = launch_two_nodes(tmp_path, node_args, env)
    assert codes[0] != 0 and codes[1] != 0, logs
    for log in logs:
        assert "but not to be seen by rank 1" in log and "must be a filesystem they all share" in log, log[-3000:]
    assert not (tmp_path / "disk0" / "checkpoint-1" / "done").exists()

    (tmp_path / "disk0" / "checkpoint-1" / "done").touch()  # complete on node 0 alone (say, copied there)
    codes, logs = launch_two_nodes(tmp_path, [a + ["--resume", "auto"] for a in node_args], env)
    assert codes[0] != 0 and codes[1] != 0, logs
    for log in logs:
        assert "the ranks see different checkpoints in --output_dir" in log and "checkpoint-1" in log, log[-3000:]
        assert "resumed from" not in log


def test_a_tied_lm_head_built_apart_is_refused(tiny_model_dir, sft_data, tmp_path):
    """transformers 5.0.0 built a tied config's LM head as a second matrix on the meta device: it trained apart from
    the embeddings, and the saved model, reloaded tied, lost it. Simulated by making tie_weights a no-op (the test's
    2-layer Llama ties): the stages (common.materialize) must refuse to train, not train the wrong model."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import transformers\n"
                                           "transformers.PreTrainedModel.tie_weights = lambda self, *args, **kwargs: None\n")
    # an environment of its own: a fresh interpreter, which runs sitecustomize (kept ahead of inherited packages)
    python_path = os.pathsep.join([str(site)] + [p for p in [SCRIPT_ENV.get("PYTHONPATH")] if p])
    result = run_script("sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8",
                        "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--max_steps", 1,
                        "--output_dir", tmp_path / "out", *FAST, check=False,
                        env=dict(SCRIPT_ENV, PYTHONPATH=python_path, UNTIED="1"))
    assert result.returncode != 0 and "built them apart; use transformers >= 5.1" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sum_loss_gradient_and_clipping_are_tulu_3s_deepspeed_ones(tiny_model_dir, tokenizer, tmp_path):
    """Tulu 3's DeepSpeed took the gradient of each micro-batch's summed loss / accumulation steps, averaged over ranks,
    and clipped that at 1.0: --reduce_loss sum must give the same gradient (so AdamW's eps and the clip see Tulu's
    numbers), checked against an independent computation of the first global batch (all 8 rows; 1 rank x 4 micro-steps of 2, and
    2 ranks x 2), and --clip_grad_norm c must clip it at c: read back from Adam's first moment, (1 - beta1) g."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    def first_moment_norm(output_dir):
        dcp_to_torch_save(output_dir / "checkpoint-1", output_dir / "state.pt")
        state = torch.load(output_dir / "state.pt", weights_only=False)["optimizer"]["state"]
        return torch.sqrt(sum((entry["exp_avg"].double() ** 2).sum() for entry in state.values())).item() / (1 - 0.9)

    conversations = [[m for m in conversation(i) if m] for i in range(8)]
    data = write_jsonl(tmp_path / "eight.jsonl", [{"messages": messages} for messages in conversations])
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--max_steps", "2",
            "--checkpointing_steps", "1", "--reduce_loss", "sum", "--per_device_train_batch_size", 2, *FAST]
    unclipped = tmp_path / "unclipped"
    run_script("sft.py", *args, "--gradient_accumulation_steps", 4, "--clip_grad_norm", -1, "--output_dir", unclipped)
    norm = read_metrics(unclipped)[0]["grad_norm"]
    assert first_moment_norm(unclipped) == pytest.approx(norm, rel=1e-4)
    # independent: every token loss of the 8 conversations summed, one at a time, unpacked; / (4 micro-batches)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    for messages in conversations:
        input_ids, labels = common.tokenize_conversation(tokenizer, messages)
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
        F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100, reduction="sum").backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item() / 4
    assert norm == pytest.approx(expected, rel=1e-4)
    # the same global batch as 2 ranks x 2 micro-steps, clipped at half that norm
    clipped = tmp_path / "clipped"
    run_script("sft.py", *args, "--gradient_accumulation_steps", 2, "--clip_grad_norm", norm / 2,
               "--output_dir", clipped, nproc=2)
    assert read_metrics(clipped)[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)  # logged before clipping
    assert first_moment_norm(clipped) == pytest.approx(norm / 2, rel=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_training_flops_are_what_torchs_flop_counter_counts(tied):
    """common.training_flops, MFU's numerator, against torch's FlopCounterMode over one forward + backward of a GQA
    Llama (eager attention, whose matmuls the counter sees). The counter counts matmuls only, so PaLM's convention
    differs from it by two known terms: its N includes the norms' weights (elementwise) and leaves out the LM head."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    length = 48
    input_ids = torch.randint(0, config.vocab_size, (1, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    n_params = sum(p.numel() for p in model.parameters())
    norm_weights = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    lm_head = config.vocab_size * config.hidden_size
    # (transformers <= 5.17 computes the rotary angles with a small matmul, which the counter counts; newer does not)
    rotary = sum(counter.get_flop_counts().get("LlamaForCausalLM.model.rotary_emb", {}).values())
    assert common.training_flops(config, n_params, length, length ** 2) == \
        counter.get_total_flops() - rotary + 6 * (norm_weights - lm_head) * length


def test_resume_logs_the_same_losses(tiny_model_dir, sft_data, tmp_path):
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "1.0", "--num_train_epochs", "2",
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--checkpointing_steps", 3, *FAST]
    full = tmp_path / "full"
    run_script("sft.py", *args, "--output_dir", full)  # 24 rows / 4 = 6 steps per epoch, 12 steps, checkpoints at 3, 6, 9
    # An interrupted run: what was on disk after step 7 (checkpoints 3 and 6, metrics through step 7), killed while it
    # wrote step 8's line (which stopped the resume with a JSONDecodeError naming no file)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted, ignore=shutil.ignore_patterns("checkpoint-9", "*.safetensors"))
    with open(interrupted / "metrics.jsonl") as f:
        lines = f.readlines()
    with open(interrupted / "metrics.jsonl", "w") as f:
        f.writelines(lines[:7] + [lines[7][:40]])
    result = run_script("sft.py", *args, "--output_dir", interrupted, "--resume")
    assert "resumed from" in result.stdout and "checkpoint-6" in result.stdout
    full_metrics, resumed_metrics = read_metrics(full), read_metrics(interrupted)
    assert [m["step"] for m in resumed_metrics] == list(range(1, 13))
    assert [m["loss"] for m in resumed_metrics] == pytest.approx([m["loss"] for m in full_metrics], rel=1e-5)
    assert [m["lr"] for m in resumed_metrics] == [m["lr"] for m in full_metrics]


def test_saved_model_reloads_with_the_trained_weights(tiny_model_dir, sft_data, tokenizer, tmp_path):
    """The saved model's loss on the whole data equals the loss the trainer logged for its next step (global batch =
    the whole data set, so the shuffle order does not matter), computed independently: plain HF, unpacked."""
    from transformers import AutoModelForCausalLM

    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", sft_data, "8", "--reduce_loss", "mean",
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, *FAST]
    run_script("sft.py", *args, "--max_steps", 2, "--output_dir", tmp_path / "two")
    run_script("sft.py", *args, "--max_steps", 3, "--output_dir", tmp_path / "three")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    examples = [common.tokenize_conversation(tokenizer, json.loads(line)["messages"]) for line in open(sft_data).readlines()[:8]]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total += F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum").item()
            count += sum(label != -100 for label in labels[1:])
    assert total / count == pytest.approx(read_metrics(tmp_path / "three")[2]["loss"], rel=1e-4)
    assert os.path.exists(tmp_path / "two" / "chat_template.jinja")  # the tokenizer keeps its chat template


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', ":2: not valid JSON"),
    ('{"conversation": []}', ":2: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', ":2: field 'messages[0].role' must be one of"),
    ('{"messages": [{"role": "user", "content": 5}]}', ":2: field 'messages[0].content' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: field 'messages' has no assistant turn"),
    # valid JSON, half of an emoji's surrogate pair: was a TypeError from the tokenizer, naming no row
    ('{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "yo"}]}',
     ":2: field 'messages[0].content' is not valid Unicode"),
])
def test_bad_input_names_file_line_and_field(tiny_model_dir, tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    result = run_script("sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0",
                        "--output_dir", tmp_path / "out", *FAST, check=False)
    assert result.returncode != 0
    assert f"{path}{message}" in result.stderr


def test_overlong_examples_are_truncated_by_default_or_dropped_and_counted(tiny_model_dir, tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(["one"] * n)}]}
            for n in (5, 5, 5, 5, 200)]
    # and one whose prompt alone is past the cut: dropped with no trained token, and not counted truncated as well
    rows.append({"messages": [{"role": "user", "content": " ".join(["count"] * 200)}, {"role": "assistant", "content": "ok"}]})
    # and one that quotes the end-of-turn token's text: kept and tokenized as the token (as open-instruct), but counted
    rows.append({"messages": [{"role": "user", "content": "End?"}, {"role": "assistant", "content": "<|im_end|>, so."}]})
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", "--max_seq_length", 64,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--max_steps", 1, *FAST]
    dropped = run_script("sft.py", *args, "--output_dir", tmp_path / "drop", "--overlong", "drop")
    assert "7 rows -> 5 examples (2 dropped as longer than 64 tokens, 0 truncated" in dropped.stdout
    assert "0 dropped with no trained token, 1 with a special token's text in a message" in dropped.stdout
    truncated = run_script("sft.py", *args, "--output_dir", tmp_path / "truncate")  # the default, as open-instruct
    assert "7 rows -> 6 examples (0 dropped as longer than 64 tokens, 1 truncated, 1 dropped with no trained token" in truncated.stdout
    missing = run_script("sft.py", *args[:2], "--dataset_mixer_list", tmp_path / "nope.jsonl", "1.0",
                         "--output_dir", tmp_path / "x", check=False)
    assert "nope.jsonl: no such file" in missing.stderr


def test_every_recipe_command_trains_tulu_3s_effective_batch_of_128():
    """Tulu 3's SFT and DPO batches were 128 (64 GPUs x 1 x 2 for SFT, docs/tulu3.md@30d11b4fb; T11, T18): the
    per-device flags keep their meaning, so each layout needs its own --gradient_accumulation_steps. Every torchrun
    command for sft.py / dpo.py in the README and the two docstrings that sets a batch size must multiply out to 128
    (sft.py's one-node command once copied the 8-node accumulation, 2, and trained on batches of 16)."""
    texts = [open(os.path.join(ROOT, name)).read() for name in ("README.md", "sft.py", "dpo.py")]
    commands = [line for text in texts for line in re.sub(r"\\\n\s*", " ", text).splitlines()
                if "torchrun" in line and re.search(r"\b(sft|dpo)\.py\b", line) and "--per_device_train_batch_size" in line]
    assert len(commands) == 5  # README: SFT 8 nodes, DPO 8B one node, DPO 70B 8 nodes; sft.py and dpo.py: one node each
    flag = lambda command, name, default=None: int(re.search(rf"--{name} (\d+)", command).group(1)) if f"--{name} " in command else default
    for command in commands:
        batch = (flag(command, "nnodes", 1) * flag(command, "nproc_per_node") * flag(command, "per_device_train_batch_size")
                 * flag(command, "gradient_accumulation_steps"))
        assert batch == 128, command


# The flags of the two published Tulu 3 SFT commands (open-instruct docs/tulu3.md@30d11b4fb, 8B and 70B; accelerate's
# own flags aside), which the README says port by replacing the launcher.
TULU3_SFT_FLAGS = ["--tokenizer_name", "meta-llama/Llama-3.1-8B", "--use_slow_tokenizer", "--use_flash_attn",
                   "--max_seq_length", 4096, "--preprocessing_num_workers", 128, "--per_device_train_batch_size", 1,
                   "--gradient_accumulation_steps", 2, "--learning_rate", "5e-06", "--lr_scheduler_type", "linear",
                   "--warmup_ratio", 0.03, "--weight_decay", 0.0, "--num_train_epochs", 2, "--output_dir", "output/sft_8b",
                   "--with_tracking", "--report_to", "wandb", "--logging_steps", 1, "--reduce_loss", "sum",
                   "--model_revision", "main", "--checkpointing_steps", "epoch", "--dataset_mix_dir", "output/sft_8b",
                   "--exp_name", "L3.1-8B-v3.9-nc-fixed-2", "--seed", 123,
                   # the 70B command's others
                   "--keep_last_n_checkpoints", 20, "--gradient_checkpointing"]


def test_the_published_tulu_3_sft_command_parses(tmp_path):
    """Every flag is accepted (argparse passes; the run then stops at the missing model directory, before any work)."""
    result = run_script("sft.py", "--model_name_or_path", tmp_path / "no_model", "--dataset_mixer_list",
                        "allenai/tulu-v.3.9-mix-preview-noncommercial", "1.0", *TULU3_SFT_FLAGS, check=False)
    assert "unrecognized arguments" not in result.stderr and "no model directory" in result.stderr, result.stderr[-500:]


@pytest.mark.parametrize("script", ["sft.py", "dpo.py", "rlvr.py"])
def test_the_saved_model_keeps_the_source_generation_config(script, tiny_model_dir, tmp_path):
    """Each stage builds its model from config.json and saved the generation_config.json derived from it, which lost
    the ids the source stops at besides config.json's eos (Gemma's <end_of_turn>, Qwen's <|endoftext|>) and its sampling
    defaults: eval and RLVR of the trained model then generated past those stops. The source's is saved now."""
    from transformers import GenerationConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    source = GenerationConfig.from_pretrained(model)
    GenerationConfig(eos_token_id=[source.eos_token_id, 7], bos_token_id=source.bos_token_id, do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(model)
    user = {"role": "user", "content": "What is 2 + 3?"}
    rows = {"sft.py": [{"messages": [user, {"role": "assistant", "content": "5."}]}] * 4,
            "dpo.py": [{"chosen": [user, {"role": "assistant", "content": "5."}],
                        "rejected": [user, {"role": "assistant", "content": "6."}]}] * 4,
            "rlvr.py": [{"messages": [user], "ground_truth": "5", "dataset": "gsm8k"}] * 4}[script]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    stage = {"sft.py": ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1],
             "dpo.py": ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--ref_cache_dir", tmp_path / "ref"],
             "rlvr.py": ["--num_unique_prompts_rollout", 2, "--num_samples_per_prompt", 2, "--response_length", 4,
                         "--eval_every", 0]}[script]
    run_script(script, "--model_name_or_path", model, "--dataset_mixer_list", data, "1.0", "--max_steps", 1,
               "--preprocessing_num_workers", 1, "--dataset_local_cache_dir", tmp_path / "cache", *stage,
               "--output_dir", tmp_path / "out")
    saved = GenerationConfig.from_pretrained(tmp_path / "out")
    assert (saved.eos_token_id, saved.do_sample, saved.temperature, saved.top_p) == ([source.eos_token_id, 7], True, 0.6, 0.9)


def test_packed_attention_refuses_what_it_does_not_compute(tokenizer, sft_data, tmp_path):
    """The packed kernel is plain causal attention within each document. A Mistral sliding window that a document
    outgrows (and Gemma 2's soft-capping, gpt-oss's sinks, attention dropout) was silently computed as that: the model
    trained on other attention than it runs with. Refused at the first forward; transformers' own attention
    (--no_padding_free) computes it, and a window that no document outgrows changes nothing."""
    from transformers import AutoModelForCausalLM, MistralConfig

    args = ["--dataset_mixer_list", sft_data, "8", "--max_steps", 1, "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 1, "--dataset_local_cache_dir", tmp_path / "cache", *FAST]
    for window in (16, 4096):  # the conversations are 30 to 80 tokens long
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
        path = tmp_path / f"mistral_{window}"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        packed = run_script("sft.py", "--model_name_or_path", path, *args, "--output_dir", tmp_path / f"packed_{window}",
                            check=False)
        if window == 16:
            assert packed.returncode != 0 and "a sliding window of 16 tokens, which a" in packed.stderr, packed.stderr[-2000:]
            run_script("sft.py", "--model_name_or_path", path, *args, "--no_padding_free", "--output_dir", tmp_path / "padded")
        else:
            assert packed.returncode == 0, packed.stderr[-2000:]
    # the kernel itself, on what a model passes it
    query, key_value = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    documents = dict(cu_seq_lens_q=torch.tensor([0, 4, 10]), max_length_q=6)
    for asked, message in [(dict(softcap=50.0), "soft-capping"), (dict(s_aux=torch.zeros(4)), "attention sinks"),
                           (dict(dropout=0.1), "attention dropout 0.1"), (dict(sliding_window=5), "a sliding window of 5")]:
        with pytest.raises(NotImplementedError, match=message):
            common.packed_attention(None, query, key_value, key_value, None, **asked, **documents)
    allowed = common.packed_attention(None, query, key_value, key_value, None, sliding_window=6, softcap=None, **documents)[0]
    assert torch.equal(allowed, common.packed_attention(None, query, key_value, key_value, None, **documents)[0])


@pytest.mark.parametrize("architecture", ["gemma", "gemma3_text", "phi"])
def test_first_loss_equals_an_unpacked_hf_forward_beyond_llama(architecture, tokenizer, tmp_path):
    """What a Llama does not have, the stages did not compute: Gemma's embedding scale and Gemma 3's per-layer-type
    rotary frequencies (non-persistent buffers, in no checkpoint, left as to_empty's uninitialized memory) and Phi-2's
    LM-head bias (left out of the chunked head). Each trained silently with other numbers than the model's: the first
    loss was 10.803 for Gemma's 10.812. Now sft.py's first loss is the model's own, from an unpacked HF forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if architecture == "phi":
        torch.nn.init.normal_(model.lm_head.bias)  # initialized to 0, where a trained head's is not
    path = tmp_path / architecture
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    conversations = [[m for m in conversation(i) if m] for i in range(8)]
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids, labels = common.tokenize_conversation(tokenizer, messages)
            targets = torch.tensor(labels[1:])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]  # position t predicts token t + 1
            loss_sum += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            tokens += int((targets != -100).sum())
    data = write_jsonl(tmp_path / "eight.jsonl", [{"messages": messages} for messages in conversations])
    run_script("sft.py", "--model_name_or_path", path, "--dataset_mixer_list", data, "1.0", "--max_steps", 1,
               "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1, "--reduce_loss", "mean",
               "--output_dir", tmp_path / "out", *FAST)
    assert read_metrics(tmp_path / "out")[0]["loss"] == pytest.approx(loss_sum / tokens, rel=1e-6)


def test_blocks_that_share_weights_are_sharded_as_one_fsdp_group(tokenizer, tmp_path):
    """Zamba2 runs one attention block at several depths (model.layers.1 and .3 share its weights).
    Sharded one block per FSDP group, that block's weights sat in two groups, and FSDP stopped at the first forward
    ("shared with a parameter already managed by another FSDP group"). Blocks that share weights are one group now:
    sft.py --no_padding_free (its Mamba layers cannot be packed) on 2 ranks gives every weight, the shared ones
    included, the gradient of an unpacked, unsharded HF backward (read back from Adam's first moment, (1 - beta1) g)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("zamba2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, layer_types=["linear_attention", "hybrid"] * 2,
                                  hybrid_layer_ids=[1, 3], num_mem_blocks=1, num_attention_heads=4, num_key_value_heads=4,
                                  mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, use_shared_attention_adapter=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    shared = [layer.shared_transformer.self_attn.q_proj.weight for layer in model.model.layers[1::2]]
    assert shared[0] is shared[1]  # (one Parameter: transformers ties the copies)
    model.save_pretrained(tmp_path / "zamba2")
    tokenizer.save_pretrained(tmp_path / "zamba2")
    conversations = [[m for m in conversation(i) if m] for i in range(8)]
    data = write_jsonl(tmp_path / "eight.jsonl", [{"messages": messages} for messages in conversations])
    run_script("sft.py", "--model_name_or_path", tmp_path / "zamba2", "--dataset_mixer_list", data, "1.0",
               "--no_padding_free", "--max_steps", 2, "--checkpointing_steps", 1, "--reduce_loss", "sum",
               "--clip_grad_norm", -1, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2,
               "--output_dir", tmp_path / "out", *FAST, nproc=2)
    dcp_to_torch_save(tmp_path / "out" / "checkpoint-1", tmp_path / "state.pt")
    moments = {name: entry["exp_avg"] / (1 - 0.9)
               for name, entry in torch.load(tmp_path / "state.pt", weights_only=False)["optimizer"]["state"].items()}
    # independent: every token loss of the 8 conversations summed, one at a time, unpacked; / (2 ranks x 2 micro-steps)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "zamba2", dtype=torch.float32)
    for messages in conversations:
        input_ids, labels = common.tokenize_conversation(tokenizer, messages)
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
        F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=-100, reduction="sum").backward()
    expected = {name: p.grad / 4 for name, p in model.named_parameters()}  # (a shared weight: under its first name)
    assert sorted(moments) == sorted(expected) and any("shared_transformer" in name for name in expected)
    for name, grad in expected.items():
        assert torch.allclose(moments[name], grad, rtol=1e-3, atol=1e-7), name


def test_an_architecture_without_model_layers_is_refused_by_name(tokenizer, sft_data, tmp_path):
    """GPT-NeoX (Pythia) keeps its blocks at gpt_neox.layers: the stages, which shard model.model.layers, stopped with
    "AttributeError: 'GPTNeoXForCausalLM' object has no attribute 'model'"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    result = run_script("sft.py", "--model_name_or_path", tmp_path / "neox", "--dataset_mixer_list", sft_data, "8",
                        "--max_steps", 1, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1,
                        "--output_dir", tmp_path / "out", *FAST, check=False)
    assert result.returncode != 0 and "error: GPTNeoXForCausalLM keeps no decoder blocks at .model.layers" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_materialize_computes_every_non_persistent_buffer_or_refuses(tiny_model_dir):
    """materialize asks transformers' _init_weights for every module's non-persistent buffers (a parent may fill its
    children's: Falcon-H1's model sets each Mamba mixer's mup_vector). One that nothing writes would keep to_empty's
    uninitialized memory: refused by name (the same tensor, its version counter unchanged)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    common.materialize(model, "cpu")
    expected = AutoModelForCausalLM.from_config(config).model.rotary_emb.inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.model.layers[1].mlp.register_buffer("unknown_scale", torch.empty(3), persistent=False)
    with pytest.raises(SystemExit, match="non-persistent buffer.s. unknown_scale, which no checkpoint holds"):
        common.materialize(model, "cpu")


def test_a_model_with_layers_that_are_not_attention_is_not_packed(tokenizer, sft_data, tmp_path):
    """Linear attention (Qwen 3.5) and Mamba layers run a state and a convolution along the row: packed, a document
    continued the one before it. Refused before training; --no_padding_free trains it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3_5_text", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  layer_types=["linear_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hybrid")
    tokenizer.save_pretrained(tmp_path / "hybrid")
    args = ["--model_name_or_path", tmp_path / "hybrid", "--dataset_mixer_list", sft_data, "8", "--max_steps", 1,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, *FAST]
    packed = run_script("sft.py", *args, "--output_dir", tmp_path / "packed", check=False)
    assert packed.returncode != 0 and "layers that are not attention (linear_attention, Conv1d)" in packed.stderr, packed.stderr[-2000:]
    assert "Traceback" not in packed.stderr
    run_script("sft.py", *args, "--no_padding_free", "--output_dir", tmp_path / "padded")
