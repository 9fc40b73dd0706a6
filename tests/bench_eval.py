"""
Benchmark, not a test: eval.py's HF generation against plain `model.generate` on the same prompts and batch.

    python tests/bench_eval.py                                   # embedded model, 16 GSM8K 8-shot prompts, 64 tokens, batch 16
    OMP_NUM_THREADS=1 python tests/bench_eval.py --limit 32

Three runs, one after the other, each timing the same span (model load + generate + decode; the load is well under a
second for the 135M model):
  plain       the prompts eval.py built (its records keep them), left-padded batches, `model.generate(...)` greedy, here
  eval.py     `python eval.py --task gsm8k ...`, its own "generation: ... in X s" line (shared few-shot prefix cached)
  no cache    the same with --no_prefix_cache: every prompt prefilled whole, i.e. eval.py's scaffolding alone
Prints seconds, generated tokens/s, the ratios to plain, and how many responses match plain's. On a shared machine
absolute numbers are noise; the ratios are what to read.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--limit", type=int, default=16, help="GSM8K test prompts")
parser.add_argument("--max_new_tokens", type=int, default=64)
parser.add_argument("--batch_size", type=int, default=16)
args = parser.parse_args()



def run_eval(*extra):
    """eval.py on the first --limit GSM8K prompts; -> (seconds, generated tokens, responses in data order, the whole
    prompts it built) from its own output."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model_name_or_path", args.model,
                               "--task", "gsm8k", "--limit", str(args.limit), "--max_new_tokens", str(args.max_new_tokens),
                               "--batch_size", str(args.batch_size), "--output_dir", out, *extra],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        tokens, seconds = re.search(r"generation: \d+ prompts, (\d+) tokens in ([\d.]+)s", proc.stdout).groups()
        records = [json.loads(line) for line in open(os.path.join(out, "gsm8k_records.jsonl"))]
    return float(seconds), int(tokens), [r["response"] for r in records], [r["input"] for r in records]


def run_plain(texts):
    """The same prompt texts (eval.py's records keep them), one left-padded batch at a time through model.generate."""
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    responses, tokens = [], 0
    for b in range(0, len(texts), args.batch_size):
        batch = tokenizer(texts[b:b + args.batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch.input_ids.shape[1]:].tolist():
            stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
            tokens += len(row) if stop is None else stop + 1  # counted as eval.py counts: the eos is generated
            responses.append(tokenizer.decode(row[:stop], skip_special_tokens=True).split("Question:")[0])  # eval.py's stop
    return time.time() - start, tokens, responses


print(f"{args.model}: {args.limit} GSM8K 8-shot prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, "
      f"{torch.get_num_threads()} threads")
runs = {"eval.py": run_eval()}
runs = {"plain": run_plain(runs["eval.py"][3]), **runs, "no cache": run_eval("--no_prefix_cache")}
plain_seconds, _, plain_responses = runs["plain"][:3]
for name, (seconds, tokens, responses, *_) in runs.items():
    same = sum(a == b for a, b in zip(responses, plain_responses))
    print(f"{name:<10}{seconds:8.1f} s {tokens:6d} tokens {tokens / seconds:7.1f} tok/s   "
          f"plain / this = {plain_seconds / seconds:5.2f}x   responses equal to plain: {same}/{len(plain_responses)}")
