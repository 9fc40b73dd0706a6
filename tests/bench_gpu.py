"""
Benchmark, not a test: the stages on one GPU, each against its peer, same model, data, batch and GPU, in one run.

    python tests/bench_gpu.py                 # needs CUDA; TRL for the peer rows (pip install trl==1.16.0)

  1. SFT: sft.py (padding-free, varlen flash attention, FSDP2 bf16) vs TRL's SFTTrainer with padding_free=True (no
     flash-attn package: transformers then builds a block-diagonal mask for SDPA from the packed position_ids), and
     last (after the RLVR row) TRL's SFTTrainer again with sft.py's attention kernel (common.packed_attention, which
     reads the cu_seq_lens_q TRL's padding-free collator passes): the trainers compared on one kernel.
     A ~1B Llama (Llama-3.2-1B's shape, random weights, built from a config: no download), max length 4096,
     synthetic Tulu-like conversations (1-3 turns, lognormal lengths: median ~450 tokens, mean ~750, tail to 4096),
     8 conversations per micro-batch x 2 accumulation steps, no activation checkpointing on either side.
     tokens/s = every input token (no padding) per second of optimizer steps, the first two steps left out; MFU as
     sft.py logs it (6 N per token for the non-embedding weights + attention, against 989 TFLOP/s dense bf16).
  2. DPO: dpo.py vs TRL's DPOTrainer (tests/bench_dpo.py on the same model and synthetic pairs).
  3. RLVR: rlvr.py's generation tokens/s with the HF generator (and vLLM when it imports).
Absolute times depend on the machine; the ratios in the same run are what to read.
"""
import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--batch", type=int, default=8, help="conversations per micro-batch")
parser.add_argument("--accumulation", type=int, default=2)
parser.add_argument("--skip", nargs="*", default=[], choices=["sft", "trl_sft", "dpo", "rlvr", "trl_sft_packed"])
parser.add_argument("--work", default=None, help="where the model and data go (default: a temporary directory)")
args = parser.parse_args()
assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
work = args.work or tempfile.mkdtemp(prefix="bench_gpu_")
os.makedirs(work, exist_ok=True)
env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def run(command):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result.stdout


# ----------------------------------------------------------------------------- A ~1B Llama and Tulu-like data

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

model_dir = os.path.join(work, "llama_1b")
tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer"))
if not os.path.exists(os.path.join(model_dir, "config.json")):
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
rng = random.Random(0)
words = sorted({w for line in open(os.path.join(ROOT, "data", "gsm8k_train.jsonl")) for w in json.loads(line)["question"].split()})


# tokens per word of these words, measured (1.35 was assumed: conversations came out 1.6x longer than planned)
sample = [rng.choice(words) for _ in range(2000)]
tokens_per_word = len(tokenizer(" " + " ".join(sample), add_special_tokens=False).input_ids) / len(sample)


def text(tokens):
    return " ".join(rng.choice(words) for _ in range(max(1, int(tokens / tokens_per_word))))


def lognormal_tokens(median, sigma=1.0, cap=4096):
    return min(cap, int(median * math.exp(rng.gauss(0, sigma))))


sft_path, pairs_path = os.path.join(work, "sft.jsonl"), os.path.join(work, "pairs.jsonl")
n_sft = args.steps * args.batch * args.accumulation
with open(sft_path, "w") as f:
    for _ in range(n_sft):
        messages = None  # drawn again until it fits in 4096 tokens: sft.py would cut it there, TRL (max_length None) not
        while messages is None or len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]) > 4096:
            total, turns = lognormal_tokens(450, cap=3800), rng.choices([1, 2, 3], weights=[0.7, 0.2, 0.1])[0]
            messages = []
            for _ in range(turns):
                messages += [{"role": "user", "content": text(0.25 * total / turns)},
                             {"role": "assistant", "content": text(0.75 * total / turns)}]
        f.write(json.dumps({"messages": messages}) + "\n")
with open(pairs_path, "w") as f:
    for _ in range(64):
        prompt = [{"role": "user", "content": text(lognormal_tokens(150, 0.7, 1000))}]
        chosen, rejected = (text(lognormal_tokens(300, 0.7, 1000)) for _ in range(2))
        f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": chosen}],
                            "rejected": prompt + [{"role": "assistant", "content": rejected}]}) + "\n")
results = {}


def report(name, value):
    results[name] = value
    print(f"{name}: {value}", flush=True)
    # written after every row, so a run cut short (.ci/gpu's time limit) still leaves the rows it finished
    json.dump(results, open(os.path.join(work, "results.json"), "w"), indent=1)


# ----------------------------------------------------------------------------- 1. SFT

if "sft" not in args.skip:
    out = os.path.join(work, "sft")
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 1, "--standalone", "sft.py",
         "--model_name_or_path", model_dir, "--dataset_mixer_list", sft_path, n_sft, "--max_seq_length", 4096,
         "--per_device_train_batch_size", args.batch, "--gradient_accumulation_steps", args.accumulation,
         "--max_steps", args.steps, "--learning_rate", 1e-5, "--output_dir", out])
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][2:]
    report("sft.py tokens/s", statistics.mean(m["tokens_per_sec"] for m in metrics))
    report("sft.py MFU", statistics.mean(m["mfu"] for m in metrics))

TRL_SFT = r"""
import json, sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
model_dir, data_path, batch, accumulation, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
attention = sys.argv[7]  # "sdpa", or "packed": sft.py's kernel, given the cu_seq_lens_q / max_length_q TRL's collator passes
if attention == "packed":
    sys.path.insert(0, sys.argv[8])
    import common
    from transformers import AttentionInterface
    def packed_under_autocast(module, query, key, value, *rest, **kwargs):
        # fp32 weights under bf16 autocast leave q and k fp32 after RoPE and v bf16: autocast casts SDPA's inputs to
        # bf16 but knows nothing of varlen_attn, which takes one 16-bit dtype (sft.py computes in bf16 throughout)
        dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else value.dtype
        return common.packed_attention(module, query.to(dtype), key.to(dtype), value.to(dtype), *rest, **kwargs)
    AttentionInterface.register("packed", packed_under_autocast)
rows = [json.loads(line) for line in open(data_path)]
# prompt/completion: TRL trains on the completion only, as sft.py trains on assistant turns only (same compute)
dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
micro_tokens, step_tokens, step_times = [], [], []
class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k):
        torch.cuda.synchronize(); self.start = time.time()
    def on_step_end(self, *a, **k):  # (tokens counted by position below: the loader collates a micro-batch ahead)
        torch.cuda.synchronize(); step_times.append(time.time() - self.start)
config = SFTConfig(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                   max_steps=steps, learning_rate=1e-5, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                   report_to=[], max_length=None, padding_free=True, bf16=True, gradient_checkpointing=False,
                   dataloader_num_workers=0, seed=123)
trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()])
collate = trainer.data_collator
def counting_collate(features):
    batch = collate(features); micro_tokens.append(batch["input_ids"].numel()); return batch
trainer.data_collator = counting_collate
micro_tokens.clear()
trainer.train()
step_tokens = [sum(micro_tokens[i * accumulation:(i + 1) * accumulation]) for i in range(len(step_times))]
print(json.dumps(dict(tokens_per_sec=sum(step_tokens[2:]) / sum(step_times[2:]), peak_gb=torch.cuda.max_memory_allocated() / 2**30)))
"""


def trl_sft_row(attention, label):
    try:
        import trl

        output = run([sys.executable, "-c", TRL_SFT, model_dir, sft_path, args.batch, args.accumulation, args.steps,
                      os.path.join(work, f"trl_sft_{attention}"), attention, ROOT])
        trl_result = json.loads(output.strip().splitlines()[-1])
        report(f"TRL {trl.__version__} SFTTrainer padding_free{label} tokens/s", trl_result["tokens_per_sec"])
        if "sft.py tokens/s" in results:
            report(f"sft.py / TRL SFT{label}", results["sft.py tokens/s"] / trl_result["tokens_per_sec"])
            report(f"TRL SFT{label} MFU (sft.py's MFU x the tokens/s ratio: same data, same FLOPs per token)",
                   results["sft.py MFU"] * trl_result["tokens_per_sec"] / results["sft.py tokens/s"])
    except ImportError:
        print("trl is not installed: TRL SFT row skipped")
    except SystemExit as failure:  # (an OOM in TRL's run: the rows after it still run)
        print(f"TRL SFT{label} row failed: {failure}", flush=True)


if "trl_sft" not in args.skip:
    trl_sft_row("sdpa", "")

# ----------------------------------------------------------------------------- 2. DPO

if "dpo" not in args.skip:
    try:
        output = run([sys.executable, os.path.join(ROOT, "tests", "bench_dpo.py"), "--model", model_dir, "--data", pairs_path,
                      "--pairs", 48, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--steps", 6])
    except SystemExit as failure:
        output = f"failed: {failure}"
    print(output, flush=True)
    report("dpo", output)

# ----------------------------------------------------------------------------- 3. RLVR generation

if "rlvr" not in args.skip:
    generators = ["hf"]
    try:
        import vllm  # noqa: F401

        generators.append("vllm")
    except ImportError:
        print("vllm does not import here: only the HF generator is measured")
    rlvr_path = os.path.join(work, "rlvr.jsonl")
    with open(rlvr_path, "w") as f:
        for line in open(os.path.join(ROOT, "data", "rlvr_train.jsonl")).readlines()[:64]:
            f.write(line)
    for generator in generators:
        out = os.path.join(work, f"rlvr_{generator}")
        run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 1, "--standalone", "rlvr.py",
             "--model_name_or_path", model_dir, "--dataset_mixer_list", rlvr_path, "1.0", "--generator", generator,
             "--num_unique_prompts_rollout", 16, "--num_samples_per_prompt", 4, "--response_length", 256,
             "--per_device_train_batch_size", 8, "--max_steps", 3, "--output_dir", out])
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"time/generate"' in line][1:]
        generated = [m["response_length"] * 64 for m in metrics]
        report(f"rlvr.py {generator} generation tokens/s (64 samples x <= 256 tokens)",
               sum(generated) / sum(m["time/generate"] for m in metrics))

# ----------------------------------------------------------------------------- 4. TRL's SFT on sft.py's kernel

if "trl_sft_packed" not in args.skip:  # (last: where the time limit cuts the run, the rows above came first)
    trl_sft_row("packed", " with sft.py's varlen kernel")

print(json.dumps(results, indent=1, default=str))
