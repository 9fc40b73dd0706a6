"""
Benchmark, not a test: DPO training throughput in one process on this machine (CPU or one GPU).

  1. dpo.py with cached reference log-probs vs --no_cache_ref (a frozen reference model's forward every micro-step);
  2. dpo.py (cached) vs TRL's DPOTrainer with the same loss (sigmoid_norm = dpo_norm), reference log-probs precomputed
     (precompute_ref_log_probs=True), model, pairs, batch, learning rate and number of steps. Skipped if trl is missing.

    python tests/bench_dpo.py                       # SmolLM2-135M-Instruct, the first 24 pairs of data/dpo_gsm8k.jsonl
    python tests/bench_dpo.py --steps 8 --threads 2

tokens/s counts real tokens (prompt + response, chosen and rejected sequences; no padding) per second of optimizer
steps, the first step (warm-up) left out. The one-time reference pass is reported on its own.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--data", default=os.path.join(ROOT, "data", "dpo_gsm8k.jsonl"))
parser.add_argument("--pairs", type=int, default=24)
parser.add_argument("--per_device_train_batch_size", type=int, default=2)
parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--threads", type=int, default=os.cpu_count())
args = parser.parse_args()
env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
work = tempfile.mkdtemp(prefix="bench_dpo_")
common_flags = ["--model_name_or_path", args.model, "--dataset_mixer_list", args.data, str(args.pairs),
                "--per_device_train_batch_size", str(args.per_device_train_batch_size),
                "--gradient_accumulation_steps", str(args.gradient_accumulation_steps), "--max_steps", str(args.steps),
                "--learning_rate", "5e-6", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                "--preprocessing_num_workers", "1", "--ref_cache_dir", os.path.join(work, "cache")]


def steady_tokens_per_sec(tokens, seconds):
    return sum(tokens[1:]) / sum(seconds[1:])


def run_dpo(name, *extra):
    output_dir = os.path.join(work, name)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dpo.py"), *common_flags, *extra, "--output_dir", output_dir],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    metrics = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    tokens = [m["tokens"] for m in metrics]
    reference = re.search(r"computed for \d+ pairs in ([\d.]+) s", result.stdout)
    return steady_tokens_per_sec(tokens, [m["tokens"] / m["tokens_per_sec"] for m in metrics]), reference


cached, reference_pass = run_dpo("cached")
live, _ = run_dpo("live", "--no_cache_ref")
print(f"dpo.py cached reference: {cached:.0f} tokens/s (+ one reference pass over {args.pairs} pairs: "
      f"{float(reference_pass.group(1)):.1f} s)")
print(f"dpo.py live reference:   {live:.0f} tokens/s")
print(f"cached / live: {cached / live:.2f}x")

# ----------------------------------------------------------------------------- TRL

try:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
except ImportError as error:
    raise SystemExit(f"TRL comparison skipped: {error}")
torch.set_num_threads(args.threads)
rows = [json.loads(line) for line in open(args.data)][: args.pairs]
# TRL's conversational layout: prompt turns apart from the responses
dataset = Dataset.from_list([{"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
                             for row in rows])
config = trl.DPOConfig(output_dir=os.path.join(work, "trl"), loss_type=["sigmoid_norm"], beta=5.0, learning_rate=5e-6,
                       lr_scheduler_type="constant", max_steps=args.steps, max_length=2048,
                       per_device_train_batch_size=args.per_device_train_batch_size,
                       gradient_accumulation_steps=args.gradient_accumulation_steps, precompute_ref_log_probs=True,
                       save_strategy="no", report_to="none", logging_steps=1, bf16=torch.cuda.is_available(), seed=123,
                       use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                       gradient_checkpointing=False)  # (TRL 1.16's default is True: recomputation dpo.py does not do)
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
batch_tokens, step_seconds = [], []  # real tokens of every micro-batch, in the order the trainer takes them
collate = trainer.data_collator
trainer.data_collator = lambda features: (lambda batch: batch_tokens.append(int(batch["attention_mask"].sum())) or batch)(collate(features))


class StepTimer(TrainerCallback):
    def on_train_begin(self, *_, **__):
        batch_tokens.clear()  # the reference pass went through the same collator

    def on_step_begin(self, *_, **__):
        torch.cuda.is_available() and torch.cuda.synchronize()  # on a GPU, time the step's kernels, not their launch
        self.start = time.time()

    def on_step_end(self, *_, **__):
        torch.cuda.is_available() and torch.cuda.synchronize()
        step_seconds.append(time.time() - self.start)


trainer.add_callback(StepTimer())
start = time.time()
trainer.train()
accumulation = args.gradient_accumulation_steps
step_tokens = [sum(batch_tokens[i * accumulation : (i + 1) * accumulation]) for i in range(len(step_seconds))]
trl_tokens_per_sec = steady_tokens_per_sec(step_tokens, step_seconds)
print(f"TRL {trl.__version__} DPOTrainer, precomputed reference: {trl_tokens_per_sec:.0f} tokens/s "
      f"(padded batches, {sum(step_tokens)} real tokens in {len(step_seconds)} steps)")
print(f"dpo.py cached / TRL precomputed: {cached / trl_tokens_per_sec:.2f}x")
