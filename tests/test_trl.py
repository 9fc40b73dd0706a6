"""sft.py, dpo.py and rlvr.py's GRPO update against TRL's trainers, an independent implementation of the same training
step: the same tiny model, the same tokens, the same hyperparameters; the per-step loss and gradient norm and the final
weights must agree (SFT and DPO: three optimizer steps of TRL's own loop; GRPO: see its test).

What this checks that the hand computations of test_sft.py / test_dpo.py do not: the whole optimizer step over several
steps (gradient accumulation, the gradient-norm clip, AdamW, the linear schedule), against code we did not write. What
it does not check: tokenization. Both sides train on the tokens common.tokenize_conversation makes, whose labels
test_template.py checks against open-instruct's (TRL's DPO tokenization runs a response to the end of the rendered text,
so with ChatML it also scores the "\\n" after <|im_end|>, which neither open-instruct nor we do). Each global batch is
the whole data set, so the two trainers' different shuffles and micro-batch groupings change nothing but rounding:
sft.py's --reduce_loss mean and TRL's loss are both the token mean over the global batch, and both DPO losses the mean
over its pairs.

TRL runs in this process on CPU in fp32, padded batches (padding_free=False); ours packs padding-free. Weight decay is
0 on both sides, as in Tulu 3's SFT and DPO, and only 0 compares: transformers exempts biases and norm weights from
decay, we decay every weight (as Tulu 3's RLVR did, torch's AdamW over all parameters). Skipped where trl does not
import (CI installs it: requirements.txt)."""
import pytest
import torch

from conftest import conversation, read_metrics, run_script, write_jsonl

trl = pytest.importorskip("trl")

torch.set_num_threads(1)
STEPS, LR = 3, 1e-3
# the same for both: 8 examples (pairs) = 2 per micro-batch x 4 accumulation steps = one step per epoch
BATCH = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
OURS = ["--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 4, "--max_steps", STEPS,
        "--learning_rate", LR, "--lr_scheduler_type", "linear", "--warmup_ratio", 0, "--clip_grad_norm", 1.0,
        "--weight_decay", 0, "--seed", 0, "--preprocessing_num_workers", 1, "--mixed_precision", "no"]


def trl_config(config_class, output_dir, **extra):
    """TRL's arguments equal to OURS: fp32 on CPU, linear decay from LR with no warmup, clip at 1.0, torch's AdamW
    with its defaults and, like ours on CPU, not fused (transformers picks the fused one by default)."""
    return config_class(output_dir=str(output_dir), max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear",
                        optim="adamw_torch",
                        warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, use_cpu=True, bf16=False, fp16=False,
                        save_strategy="no", report_to="none", logging_steps=1, seed=0, dataloader_num_workers=0,
                        gradient_checkpointing=False, **BATCH, **extra)


def assert_same_training(ours_dir, trainer, initial_dir):
    """Per-step loss and pre-clip gradient norm of metrics.jsonl vs TRL's log; the saved weights vs TRL's model."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    ours = read_metrics(ours_dir)
    assert len(logs) == len(ours) == STEPS
    for step, (theirs, mine) in enumerate(zip(logs, ours)):
        for key in ("loss", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), (step, key, mine[key], theirs[key])
    assert max(m["grad_norm"] for m in ours) > 1.0  # the clip acted on a step both took, so it is compared too
    assert_same_updates(ours_dir, trainer.model, initial_dir)


def assert_same_updates(ours_dir, their_model, initial_dir, trained=True):
    """Every tensor's update (saved in ours_dir, minus the initial weights) within 1e-3 of TRL's model's, as a whole
    per tensor: Adam's g / (sqrt(v) + eps) turns rounding-level differences of a gradient element near 0 into a
    visible one of that element's step (1 of 8192 weights differed by 2% of lr). trained: each moved ~lr a step."""
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(initial_dir, dtype=torch.float32).state_dict()
    for name, weight in their_model.state_dict().items():
        update, their_update = saved[name] - initial[name], weight - initial[name]
        if trained:
            assert their_update.norm() > 0.5 * LR * update.numel() ** 0.5, name
        difference = ((update - their_update).norm() / their_update.norm()).item()
        assert difference < 1e-3, f"{name}: the updates differ by {difference:.2e} of TRL's"


def test_sft_matches_trl_sft_trainer(tiny_model_dir, tokenizer, tmp_path):
    import common
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    rows = [{"messages": [m for m in conversation(i) if m]} for i in range(8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    run_script("sft.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", *OURS,
               "--reduce_loss", "mean", "--dataset_local_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "ours")

    examples = [common.tokenize_conversation(tokenizer, row["messages"]) for row in rows]
    dataset = Dataset.from_list([{"input_ids": ids, "labels": labels} for ids, labels in examples])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = trl.SFTTrainer(model=model, train_dataset=dataset, processing_class=tokenizer,
                             args=trl_config(trl.SFTConfig, tmp_path / "trl", padding_free=False, max_length=None))
    trainer.train()
    assert_same_training(tmp_path / "ours", trainer, tiny_model_dir)


def test_dpo_norm_matches_trl_dpo_trainer(tiny_model_dir, tokenizer, tmp_path):
    """Tulu 3's length-normalized DPO (dpo_norm) is TRL's sigmoid_norm; plain DPO (checked by hand in test_dpo.py)
    matched TRL's sigmoid as well (3 steps, beta 0.1), left out to keep the suite short."""
    import common
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    pairs = []
    for i in range(8):
        chosen = [m for m in conversation(i) if m]
        rejected = chosen[:-1] + [{"role": "assistant", "content": f"Doubled, it is {6 * i + 1}, I think" + "!" * i}]
        pairs.append({"chosen": chosen, "rejected": rejected})
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_script("dpo.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0", *OURS,
               "--loss_type", "dpo_norm", "--beta", 5.0, "--ref_cache_dir", tmp_path / "ref",
               "--dataset_local_cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "ours")

    def split(messages):
        """(prompt ids, response ids): the response is the final turn's trained tokens (content + end-of-turn), as
        dpo.py scores it; what the template puts after them is left out (a causal model's later tokens change
        nothing before them)."""
        ids, labels = common.tokenize_conversation(tokenizer, messages)
        end = max(t for t, label in enumerate(labels) if label != -100) + 1
        start = end
        while labels[start - 1] != -100:
            start -= 1
        return ids[:start], ids[start:end]

    rows = []
    for pair in pairs:
        (prompt, chosen), (prompt_again, rejected) = split(pair["chosen"]), split(pair["rejected"])
        assert prompt == prompt_again
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # TRL tokenizes conversations itself (with the "\n" after <|im_end|>): it gets a placeholder, then our tokens
    placeholder = Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    trainer = trl.DPOTrainer(model=model, train_dataset=placeholder, processing_class=tokenizer,
                             args=trl_config(trl.DPOConfig, tmp_path / "trl", loss_type=["sigmoid_norm"], beta=5.0,
                                             max_length=None, precompute_ref_log_probs=False))
    trainer.train_dataset = Dataset.from_list(rows)
    trainer.train()
    assert_same_training(tmp_path / "ours", trainer, tiny_model_dir)


def test_grpo_updates_match_trl_grpo_loss(tiny_model_dir, tokenizer, tmp_path):
    """rlvr.py's GRPO update (clipped surrogate, k3 KL, the token mean over the whole rollout batch: TRL's "bnpo" with
    one batch) against TRL's GRPOTrainer._compute_loss, on the same rollouts: the samples, advantages, old and
    reference log-probs that rlvr.py saved. Two epochs over one rollout, so the second optimizer step sees ratios away
    from 1, some clipped, and a KL away from 0. The optimizer loop on TRL's side is the test's (TRL's own would generate
    rollouts of its own): torch's AdamW and the norm clip, as rlvr.py's flags say."""
    import json

    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    limit = json.dumps({"func_name": "validate_word_constraint", "N": 6, "quantifier": "less than"})
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}."}], "ground_truth": limit,
             "dataset": "ifeval"} for i in range(8)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "ours"
    result = run_script("rlvr.py", "--model_name_or_path", tiny_model_dir, "--dataset_mixer_list", data, "1.0",
                        "--num_unique_prompts_rollout", 4, "--num_samples_per_prompt", 4, "--response_length", 8,
                        "--per_device_train_batch_size", 4, "--num_epochs", 2, "--num_mini_batches", 1, "--max_steps", 1,
                        "--learning_rate", LR, "--lr_scheduler_type", "constant", "--beta", 0.5, "--cliprange", 0.2,
                        "--max_grad_norm", 1.0, "--weight_decay", 0, "--temperature", 1.0, "--eval_every", 0,
                        "--save_rollouts", "--output_dir", out)
    metrics, = read_metrics(out)
    samples = [json.loads(line) for line in open(out / "rollouts.jsonl")]
    assert len({s["reward"] for s in samples}) > 1 and metrics["clip_frac"] > 0  # advantages differ; the clip acted
    prompt_ids = Dataset.from_file(next(w for w in result.stdout.split() if w.endswith(".arrow")))["prompt_ids"]

    def padded(rows, left=False):
        """(B, T) tensor of ragged rows and its 0/1 mask, padded on the left (prompts) or the right."""
        width = max(map(len, rows))
        pad = lambda row, fill: [fill] * (width - len(row)) + row if left else row + [fill] * (width - len(row))
        return torch.tensor([pad(row, 0) for row in rows]), torch.tensor([pad([1] * len(row), 0) for row in rows])

    prompts, prompt_mask = padded([prompt_ids[s["prompt_index"]] for s in samples], left=True)
    completions, completion_mask = padded([s["response"] for s in samples])
    inputs = {"prompt_ids": prompts, "prompt_mask": prompt_mask, "completion_ids": completions,
              "completion_mask": completion_mask, "advantages": padded([s["advantages"] for s in samples])[0].float(),
              "old_per_token_logps": padded([s["old_logps"] for s in samples])[0].float(),
              "ref_per_token_logps": padded([s["ref_logps"] for s in samples])[0].float()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    # use_bias_correction_kl=False: the k3 KL as GRPO (eq. 4) and Tulu 3.1 take it, not weighted by the ratio (TRL 1.16's default)
    config = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), loss_type="bnpo", beta=0.5, epsilon=0.2, temperature=1.0,
                            use_bias_correction_kl=False, per_device_train_batch_size=16, num_generations=4,
                            max_completion_length=8, gradient_accumulation_steps=1, use_cpu=True, bf16=False,
                            report_to="none", seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=config,
                              train_dataset=Dataset.from_list([{"prompt": "x"}] * 16), processing_class=tokenizer)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=LR, weight_decay=0.0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # (set by Trainer's own loop, which is not run here)
    norms = []
    for epoch in range(2):
        trainer._compute_loss(trainer.model, inputs).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0).item())
        optimizer.step()
        optimizer.zero_grad()
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-4), (metrics["grad_norm"], norms)
    assert_same_updates(out, trainer.model, tiny_model_dir, trained=False)
