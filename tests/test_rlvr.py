"""rlvr.py end to end on CPU: GRPO and PPO numbers recomputed by hand from the dumped rollouts, reward routing,
2 processes vs 1, the generator self-check, bad input."""
import json
import math
import os
import shutil
import statistics

import pytest
import torch
from datasets import Dataset

import common
from conftest import cycle_model, read_metrics, run_script, write_jsonl

# tiny and fast: 4 prompts x 4 samples, 8 new tokens, a large lr so that one update visibly moves the policy
FAST = ["--num_unique_prompts_rollout", 4, "--num_samples_per_prompt", 4, "--response_length", 8,
        "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--eval_batch_size", 8]
WORDS = json.dumps({"func_name": "validate_word_constraint", "N": 6, "quantifier": "less than"})


def rlvr_rows(n=16):
    """Every verifier: gsm8k (prompt = messages[:-1], the reference answer left out), MATH (spelled in capitals), and an IF word limit that the random
    tiny model meets about half the time, so that rewards vary within a group."""
    rows = []
    for i in range(n):
        if i % 4 == 0:
            rows.append({"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}],
                         "ground_truth": str(i + 1), "dataset": "gsm8k"})
        elif i % 4 == 1:
            rows.append({"messages": [{"role": "user", "content": f"Compute {i} * 2."}], "ground_truth": str(2 * i), "dataset": "MATH"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Say something about {i}."}], "ground_truth": WORDS, "dataset": "ifeval"})
    return rows


@pytest.fixture(scope="module")
def rlvr_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rlvr") / "rlvr.jsonl", rlvr_rows())


def read_rollouts(output_dir):
    with open(os.path.join(output_dir, "rollouts.jsonl")) as f:
        return [json.loads(line) for line in f]


def k3(ref, logp):
    return sum(math.exp(r - l) - (r - l) - 1 for r, l in zip(ref, logp))


def test_grpo_numbers_match_a_hand_computation(tiny_model_dir, tokenizer, rlvr_data, tmp_path):
    out = tmp_path / "grpo"
    run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0",
               "--eval_dataset", rlvr_data, "--eval_every", 1, "--max_steps", 2, "--beta", 0.1, "--save_rollouts", "--output_dir", out, *FAST)
    metrics, rollouts = read_metrics(out), read_rollouts(out)
    assert [m["step"] for m in metrics] == [0, 1, 2] and "eval/reward" in metrics[0] and "eval/reward" in metrics[2]
    assert os.path.exists(out / "config.json") and os.path.exists(out / "model.safetensors")  # final HF save
    for step in (1, 2):
        m, samples = metrics[step], [r for r in rollouts if r["step"] == step]
        assert len(samples) == 16
        # reward routing: the score is the verifier of the row's `dataset` (MATH -> math), x --verification_reward
        verifiers = {"gsm8k": common.gsm8k_score, "math": common.math_score, "ifeval": common.ifeval_rlvr_score}
        datasets = {row["ground_truth"]: row["dataset"].lower() for row in rlvr_rows()}  # the ground truths are distinct
        for s in samples:
            text = tokenizer.decode(s["response"][:-1] if s["finished"] else s["response"], skip_special_tokens=True)
            assert s["score"] == verifiers[s["dataset"]](text, s["ground_truth"])
            assert s["reward"] == 10 * s["score"]
            assert s["dataset"] == datasets[s["ground_truth"]]
        assert {s["dataset"] for s in samples} <= {"gsm8k", "math", "ifeval"}
        assert m["reward"] == pytest.approx(sum(s["reward"] for s in samples) / 16)
        # group-normalized advantages, (r - mean) / (std + 1e-8) with the sample std (Tulu 3.1's), one group per prompt
        for k in range(0, 16, 4):
            group = samples[k : k + 4]
            assert len({s["prompt_index"] for s in group}) == 1
            rewards = torch.tensor([s["reward"] for s in group], dtype=torch.float64)
            expected = (rewards - rewards.mean()) / (statistics.stdev(rewards.tolist()) + 1e-8)
            for s, a in zip(group, expected.tolist()):
                assert s["advantages"] == pytest.approx([a] * len(s["response"]), abs=1e-5)
        # one epoch, one mini-batch: the loss is taken at the policy that sampled, so ratio = 1 and the clipped
        # surrogate is -A per token, averaged over all response tokens (token-level normalization)
        tokens = sum(len(s["response"]) for s in samples)
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["clip_frac"] == 0
        assert m["pg_loss"] == pytest.approx(-sum(sum(s["advantages"]) for s in samples) / tokens, abs=1e-5)
        assert m["kl"] == pytest.approx(k3(sum((s["ref_logps"] for s in samples), []),
                                           sum((s["old_logps"] for s in samples), [])) / tokens, abs=1e-6)
        assert m["response_length"] == pytest.approx(tokens / 16)
        assert m["finished"] == pytest.approx(sum(s["finished"] for s in samples) / 16)
        for name in {s["dataset"] for s in samples}:
            scores = [s["score"] for s in samples if s["dataset"] == name]
            assert m[f"accuracy/{name}"] == pytest.approx(sum(x == 1 for x in scores) / len(scores))
    assert metrics[1]["kl"] == 0  # before the first update the policy IS the reference
    assert metrics[2]["kl"] > 0 and any(r["reward"] != rollouts[0]["reward"] for r in rollouts)
    assert all(m["self_check_max_diff"] < 1e-4 for m in metrics[1:])


def test_two_processes_match_one(tiny_model_dir, rlvr_data, tmp_path):
    """Per-prompt seeds make the samples independent of the rank that draws them; token-level normalization with an
    all-reduced count makes the losses and gradients independent of the split. 2 epochs x 2 mini-batches."""
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_every", 0,
            "--max_steps", 2, "--num_epochs", 2, "--num_mini_batches", 2, *FAST]
    run_script("rlvr.py", *args, "--output_dir", tmp_path / "one")
    run_script("rlvr.py", *args, "--output_dir", tmp_path / "two", nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for key in ["reward", "reward_std", "response_length", "kl", "ratio_mean", "clip_frac", "entropy", "pg_loss", "grad_norm"]:
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], rel=1e-4, abs=1e-6), key
    assert one[1]["kl"] > 0


@pytest.mark.parametrize("schedule, epochs, mini_batches", [("constant", 1, 1), ("linear", 2, 2)])
def test_weight_decay_alone_shrinks_every_weight_by_lr_times_decay_per_step(tiny_model_dir, rlvr_data, tmp_path, schedule,
                                                                           epochs, mini_batches):
    """--weight_decay reaches AdamW (Tulu 3's runs kept torch's 0.01): with every reward 0 (--verification_reward 0) the
    advantages are 0 and, with no reference (--beta 0), so is every gradient, hence Adam's step; what is left is the
    decoupled decay, w <- w (1 - lr_s wd), once per optimizer step s. That reads the learning rate of every optimizer
    step: 2 rollouts x epochs x mini-batches of them. "linear" decays at each one, lr_s = lr (1 - s / 8) for s = 0..7 as
    open-instruct's scheduler (grpo_fast.py:376-382@e6c3044aa), not once per rollout (that gave a factor 1 - 6 lr wd)."""
    lr, decay = 1e-3, 0.5
    run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--max_steps", 2,
               "--verification_reward", 0, "--beta", 0, *FAST, "--learning_rate", lr, "--weight_decay", decay,
               "--lr_scheduler_type", schedule, "--num_epochs", epochs, "--num_mini_batches", mini_batches,
               "--output_dir", tmp_path / "out")
    from safetensors.torch import load_file

    n = 2 * epochs * mini_batches
    factor = math.prod(1 - lr * (1 - s / n if schedule == "linear" else 1) * decay for s in range(n))
    initial, trained = (load_file(os.path.join(d, "model.safetensors")) for d in (tiny_model_dir, tmp_path / "out"))
    for name, weight in initial.items():
        torch.testing.assert_close(trained[name], weight * factor, rtol=1e-6, atol=0, msg=name)


def test_gradient_checkpointing_changes_no_number(tiny_model_dir, rlvr_data, tmp_path):
    """--gradient_checkpointing recomputes the policy's and the value model's blocks in backward: PPO's losses, grad
    norms and (step 2: after one update) KL and ratios are those of the run that keeps every activation."""
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_every", 0,
            "--max_steps", 2, "--algo", "ppo", "--beta", 0.05, *FAST]
    run_script("rlvr.py", *args, "--output_dir", tmp_path / "kept")
    run_script("rlvr.py", *args, "--gradient_checkpointing", "--output_dir", tmp_path / "recomputed")
    kept, recomputed = read_metrics(tmp_path / "kept"), read_metrics(tmp_path / "recomputed")
    for key in ["reward", "kl", "ratio_mean", "entropy", "pg_loss", "vf_loss", "grad_norm"]:
        assert [m[key] for m in recomputed] == pytest.approx([m[key] for m in kept], rel=1e-5, abs=1e-7), key
    assert kept[1]["kl"] > 0


@pytest.mark.parametrize("verification_reward, penalty", [(10, -3), (0, 1e-6)])
def test_ppo_gae_matches_a_hand_computation(tiny_model_dir, rlvr_data, tmp_path, verification_reward, penalty):
    """(0, 1e-6): every reward is 0 or 1e-6, so the advantages before whitening spread by ~1e-6, under the variance floor."""
    out = tmp_path / "ppo"
    run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0",
               "--eval_every", 0, "--max_steps", 2, "--algo", "ppo", "--beta", 0.05, "--gamma", 0.9, "--lam", 0.8,
               "--verification_reward", verification_reward, "--non_stop_penalty", "--penalty_reward_value", penalty,
               "--save_rollouts", "--output_dir", out, *FAST)
    metrics, rollouts = read_metrics(out), read_rollouts(out)
    for step in (1, 2):
        samples = [r for r in rollouts if r["step"] == step]
        all_gae = []
        for s in samples:
            n = len(s["response"])
            assert s["reward"] == (verification_reward * s["score"] if s["finished"] else penalty)  # --non_stop_penalty replaces it
            # per-token reward: -beta (log pi_old - log ref), plus the verifier reward on the last token
            rewards = [-0.05 * (o - r) for o, r in zip(s["old_logps"], s["ref_logps"])]
            rewards[-1] += s["reward"]
            assert s["token_rewards"] == pytest.approx(rewards, abs=1e-5)
            values = s["old_values"]
            if step == 1:
                assert values == [0.0] * n  # the value head starts at zero
            gae = [0.0] * n  # GAE by the textbook recursion, written out independently
            for t in range(n):
                gae[t] = sum((0.9 * 0.8) ** (u - t) * (rewards[u] + 0.9 * (values[u + 1] if u + 1 < n else 0.0) - values[u])
                             for u in range(t, n))
            assert s["gae"] == pytest.approx(gae, abs=1e-4)
            assert s["returns"] == pytest.approx([a + v for a, v in zip(gae, values)], abs=1e-4)
            all_gae += gae
        # whitened as Tulu 3's masked_whiten (open-instruct ppo_vllm_thread_ray_gtrl.py:460-485@9c2d44bec): the unbiased
        # variance, and 1e-8 added to it, so a spread below ~1e-4 stays small; before, (a - mean) / (population std + 1e-8)
        mean = sum(all_gae) / len(all_gae)
        var = sum((a - mean) ** 2 for a in all_gae) / (len(all_gae) - 1)
        whitened = [(a - mean) / math.sqrt(var + 1e-8) for a in all_gae]
        assert sum((s["advantages"] for s in samples), []) == pytest.approx(whitened, abs=1e-4)
        if penalty == 1e-6 and step == 1:  # no KL yet, V = 0: only the 1e-6 rewards, which whitening must not blow up
            assert 0 < max(map(abs, whitened)) < 0.05
        m = metrics[step - 1]
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert m["pg_loss"] == pytest.approx(-sum(whitened) / len(whitened), abs=1e-5)
        # the value model has not moved yet within this rollout: the clipped value loss is 0.5 (V - R)^2 on average
        vf = [0.5 * (v - r) ** 2 for s in samples for v, r in zip(s["old_values"], s["returns"])]
        assert m["vf_loss"] == pytest.approx(sum(vf) / len(vf), rel=1e-4)
    assert metrics[0]["kl"] == 0 and metrics[1]["kl"] > 0


def test_ppo_on_a_model_type_without_a_value_model_is_refused_before_loading(tokenizer, rlvr_data, tmp_path):
    """PPO builds its value model as AutoModelForTokenClassification, which transformers lacks for some model types
    (Gemma 3's text model): the run stopped with transformers' ValueError after the policy had loaded. Now the
    command is refused first, naming the type and what runs (GRPO: no value model); a Llama's PPO is not."""
    from transformers import AutoConfig

    for model_type, refused in (("gemma3_text", True), ("llama", False)):
        path = tmp_path / model_type  # a config and a tokenizer only: a refusal must come before any weights are read
        AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, head_dim=16,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
        tokenizer.save_pretrained(path)
        result = run_script("rlvr.py", "--model_name_or_path", path, "--dataset_mixer_list", rlvr_data, "1.0",
                            "--algo", "ppo", "--output_dir", tmp_path / f"out_{model_type}", *FAST, check=False)
        message = f"error: --algo ppo: transformers has no token-classification model for gemma3_text ({path})"
        assert result.returncode != 0 and (message in result.stderr) == refused, result.stderr[-2000:]
    assert "no file named model.safetensors" in result.stderr  # the Llama went on, to the weights that are not there


def test_self_check_fires_when_the_generator_is_stale(tiny_model_dir, rlvr_data, tmp_path):
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0",
                        "--eval_every", 0, "--max_steps", 2, "--debug_skip_weight_sync", "--output_dir", tmp_path, *FAST,
                        check=False)
    assert result.returncode != 0
    assert "generator self-check failed: after the weight sync" in result.stderr  # the checksums, right after the sync
    assert read_metrics(tmp_path) == []  # the initial sync had nothing to change; the one after step 1 did
    # the log-prob half, live: fp32 agrees to ~1e-6, not to 1e-12
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0",
                        "--eval_every", 0, "--max_steps", 1, "--self_check_tolerance", 1e-12, "--output_dir", tmp_path / "tight",
                        *FAST, check=False)
    assert result.returncode != 0 and "generator self-check failed: its log-probs differ" in result.stderr


BAD_ROWS = [  # (row, the error it must give), all in one file: rlvr.py reports every bad row at once
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "3", "dataset": "trivia"}, "field 'dataset'"),
    ({"messages": [{"role": "user", "content": "Hi"}], "dataset": "gsm8k"}, "field 'ground_truth'"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": '{"func_name": "nope"}', "dataset": "ifeval"}, "field 'ground_truth'"),
    ({"messages": [{"role": "robot", "content": "Hi"}], "ground_truth": "3", "dataset": "gsm8k"}, "field 'messages[0].role'"),
    # golds no response can match (every sample would score 0): they used to be accepted
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "forty", "dataset": "gsm8k"}, "field 'ground_truth' has no number"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "1/2", "dataset": "gsm8k"}, "field 'ground_truth' holds several numbers"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": ["1", "2"], "dataset": "gsm8k"}, "field 'ground_truth' must be a string or a number"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": True, "dataset": "math"}, "field 'ground_truth' must be a string or a number"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "\\boxed{}", "dataset": "math"}, "field 'ground_truth' is empty once normalized"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "Half of 36.\n#### 18", "dataset": "math"}, "field 'ground_truth' holds '####'"),
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": float("nan"), "dataset": "math"}, "field 'ground_truth' must be a finite number"),
    # valid JSON, half of an emoji's surrogate pair: the tokenized store's writer failed on it, naming no row
    ({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": "\\frac{1}{2} \ud83d", "dataset": "math"}, "field 'ground_truth' is not valid Unicode"),
    # IF constraints whose arguments no response could meet, or any would: a count "3" never equalled 3, a keyword list
    # as one string was checked letter by letter, "English" is no language code, an empty ending ends every text
    *[({"messages": [{"role": "user", "content": "Hi"}], "ground_truth": json.dumps(truth), "dataset": "ifeval"}, f"field 'ground_truth' {message}")
      for truth, message in [({"func_name": "verify_paragraph_count", "N": "3"}, "is not valid for dataset 'ifeval': kwarg 'N' must be a whole number"),
                             ({"func_name": "verify_keywords", "keyword_list": "banana"}, "is not valid for dataset 'ifeval': kwarg 'keyword_list' must be a non-empty list"),
                             ({"func_name": "validate_response_language", "language": "English"}, "is not valid for dataset 'ifeval': kwarg 'language' must be a language code"),
                             ({"func_name": "validate_end", "end_phrase": " "}, "is not valid for dataset 'ifeval': kwarg 'end_phrase' must be non-empty text"),
                             ([{"func_name": "validate_paragraphs", "N": 2, "first_word": "so", "i": 3}], "is not valid for dataset 'ifeval': validate_paragraphs: i=3 is not a paragraph of N=2")]],
    # no question to answer: the prompt would have been the system prompt alone
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "3"}], "ground_truth": "3",
      "dataset": "gsm8k"}, "field 'messages' must end with a user turn"),
]


def test_bad_rows_name_file_line_and_field(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [rlvr_rows(1)[0]] + [row for row, _ in BAD_ROWS] + [rlvr_rows(1)[0]])
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", path, "1.0",
                        "--eval_every", 0, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode != 0
    stderr = result.stderr.replace("[rank0]: ", "")
    assert f"ValueError: {len(BAD_ROWS)} bad rows:" in stderr
    for line, (_, message) in enumerate(BAD_ROWS, 2):
        assert f"\n{path}:{line}: {message}" in stderr, message


def test_resume_logs_the_same_metrics(tiny_model_dir, rlvr_data, tmp_path):
    """A run resumed from its step-2 checkpoint (policy, value model, both optimizers) logs the same step 3, and its
    rollouts.jsonl holds each step's samples once."""
    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_every", 0,
            "--max_steps", 3, "--algo", "ppo", "--checkpointing_steps", 2, "--save_rollouts", *FAST]
    cache = ["--dataset_local_cache_dir", tmp_path / "cache"]
    built = run_script("rlvr.py", *args, *cache, "--output_dir", tmp_path / "full")
    assert os.path.exists(tmp_path / "full" / "checkpoint-2" / "done")
    assert "prompts (0 dropped as too long); tokenized in" in built.stdout
    resumed = run_script("rlvr.py", *args, *cache, "--output_dir", tmp_path / "full", "--resume")  # redoes step 3
    assert "reused the tokenization in" in resumed.stdout  # the prompts are not tokenized again
    first = read_metrics(tmp_path / "full")
    assert [m["step"] for m in first] == [1, 2, 3]
    run_script("rlvr.py", *args, "--output_dir", tmp_path / "fresh")
    fresh = read_metrics(tmp_path / "fresh")
    for key in ["reward", "pg_loss", "vf_loss", "kl", "grad_norm", "value_grad_norm"]:
        assert first[2][key] == pytest.approx(fresh[2][key], rel=1e-5), key
    rollouts = [[json.loads(line) for line in open(tmp_path / run / "rollouts.jsonl")] for run in ("full", "fresh")]
    assert [r["step"] for r in rollouts[0]] == [r["step"] for r in rollouts[1]]  # step 3 not logged twice
    assert [r["response"] for r in rollouts[0]] == [r["response"] for r in rollouts[1]]


def test_a_resume_refuses_a_reference_rewritten_since(tiny_model_dir, rlvr_data, tmp_path):
    """The KL's reference is the initial model, read again from --model_name_or_path at a resume: rewritten since (an SFT
    run repeated into it), it anchored the resumed run to other weights without a word. Now refused; the same weights
    written again (a fresh copy) resume."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, model)
    args = ["--model_name_or_path", model, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_every", 0, "--max_steps", 2,
            "--checkpointing_steps", 1, "--output_dir", tmp_path / "out", "--dataset_local_cache_dir", tmp_path / "cache", *FAST]
    run_script("rlvr.py", *args)
    weights = load_file(model / "model.safetensors")
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    result = run_script("rlvr.py", *args, "--resume", check=False)
    assert result.returncode != 0 and "the initial model (the reference) now holds other weights (or config)" in result.stderr, result.stderr[-2000:]
    shutil.copytree(tiny_model_dir, model, dirs_exist_ok=True)
    assert "resumed from" in run_script("rlvr.py", *args, "--resume").stdout


def test_prompt_is_every_turn_up_to_the_last_user_turn(tiny_model_dir, tokenizer, tmp_path):
    """Only a final assistant turn (a reference answer) leaves the prompt. Before, the last turn was dropped whatever its
    role: a [system, user] row was prompted with the system prompt alone, [user, assistant, user] without its question."""
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}
    earlier = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
    prompts = [[system, user], earlier + [user], [user], earlier + [user]]
    rows = [{"messages": prompt + ([{"role": "assistant", "content": "4"}] if i >= 2 else []), "ground_truth": "4",
             "dataset": "gsm8k"} for i, prompt in enumerate(prompts)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0",
                        "--eval_every", 0, "--max_steps", 1, "--output_dir", tmp_path / "out", *FAST)
    path = next(word for word in result.stdout.split() if word.endswith(".arrow"))
    stored = Dataset.from_file(path)["prompt_ids"]
    assert stored == [tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False).input_ids for p in prompts]


def test_the_verifier_reads_a_response_without_its_stop_token(tiny_model_dir, tokenizer, tmp_path):
    """A model may stop at an id that is no special token (an extra eos id in generation_config.json). Its text was
    scored as part of the response: a model stopping at " answer" failed "do not say answer" every time. vLLM leaves a
    stop token out of the text (vllm/v1/engine/detokenizer.py:107-113), and so do eval.py and now rlvr.py, in training
    rollouts and in the greedy held-out evaluation alike."""
    stopping = tmp_path / "cycle_model"
    cycle = cycle_model(tiny_model_dir, stopping)  # it says "... The answer is 7.\nQuestion: ..." to any prompt
    config = json.loads((stopping / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, cycle[1]]  # and stops at " answer"
    (stopping / "generation_config.json").write_text(json.dumps(config))
    truth = json.dumps({"func_name": "validate_forbidden_words", "forbidden_words": ["answer"]})
    messages = [{"role": "user", "content": "Say something, but not the word answer."}]
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": messages, "ground_truth": truth, "dataset": "ifeval"}] * 4)
    out = tmp_path / "out"
    run_script("rlvr.py", "--model_name_or_path", stopping, "--dataset_mixer_list", data, "1.0", "--eval_dataset", data,
               "--eval_every", 1, "--max_steps", 1, "--save_rollouts", "--output_dir", out, *FAST)
    assert read_metrics(out)[0]["eval/reward"] == 10  # the greedy answers: all 4 paid
    samples = read_rollouts(out)
    # ("\n" ends the generation prompt and is in the cycle: "Question: The answer", stopped at " answer")
    assert len(samples) == 16 and all(s["response"][-1] == cycle[1] and s["finished"] and s["score"] == 1 for s in samples)


def test_max_grad_norm_zero_turns_clipping_off(tiny_model_dir, rlvr_data, tmp_path):
    """As --clip_grad_norm in sft.py and dpo.py: <= 0 is off. It clipped to 0 (no update at all) and a negative value
    reversed the gradient (gradient ascent)."""
    from safetensors.torch import load_file

    args = ["--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", rlvr_data, "1.0", "--eval_every", 0,
            "--max_steps", 1, *FAST]
    weights = {}
    for norm in ("0", "-1", "1e9"):
        run_script("rlvr.py", *args, f"--max_grad_norm={norm}", "--output_dir", tmp_path / norm)
        weights[norm] = load_file(tmp_path / norm / "model.safetensors")
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(weights["0"][k], initial[k]) for k in initial)  # it trained
    for k in initial:
        assert torch.equal(weights["0"][k], weights["1e9"][k]) and torch.equal(weights["-1"][k], weights["1e9"][k]), k


def test_the_hf_generator_samples_from_the_policy_alone_not_its_generation_config(tiny_model_dir, tokenizer, tmp_path):
    """generate() fills in what its config leaves unset from the model's generation_config.json: a repetition_penalty
    there (Qwen2.5-Instruct ships 1.05) bent every rollout away from softmax(logits / T), the distribution the policy's
    log-probs (the ratio, the KL) are taken under. With 50 on the cycle model, whose responses repeat their tokens,
    the samples differed from the plain copy's; now they are the same."""
    plain = tmp_path / "plain"
    cycle_model(tiny_model_dir, plain)
    penalized = tmp_path / "penalized"
    shutil.copytree(plain, penalized)
    config = json.loads((penalized / "generation_config.json").read_text())
    (penalized / "generation_config.json").write_text(json.dumps(config | {"repetition_penalty": 50.0, "no_repeat_ngram_size": 2}))
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "Count."}], "ground_truth": "7",
                                                  "dataset": "gsm8k"}] * 4)
    responses = {}
    for model in (plain, penalized):
        run_script("rlvr.py", "--model_name_or_path", model, "--dataset_mixer_list", data, "1.0", "--eval_every", 0,
                   "--max_steps", 1, "--save_rollouts", "--output_dir", tmp_path / f"out_{model.name}", *FAST,
                   "--response_length", 24)
        responses[model.name] = [s["response"] for s in read_rollouts(tmp_path / f"out_{model.name}")]
    assert any(len(r) > len(set(r)) for r in responses["plain"])  # (a token repeated: the penalty had work to do)
    assert responses["penalized"] == responses["plain"]
