"""
Benchmark, not a test: eval.py's HF generation against plain `model.generate` on the same prompts and batch.

    python tests/bench_eval.py                                   # embedded model, 16 GSM8K 8-shot prompts, 64 tokens, batch 16
    OMP_NUM_THREADS=1 python tests/bench_eval.py --limit 32

Three runs, one after the other, each timing the same span (model load + generate + decode; the load is well under a
second for the 135M model):
  plain       one left-padded batch of the full prompts, `model.generate(...)` greedy, in this process
  eval.py     `python eval.py --task gsm8k ...`, its own "generation: ... in X s" line (shared few-shot prefix cached)
  no cache    the same with --no_prefix_cache: every prompt prefilled whole, i.e. eval.py's scaffolding alone
Prints seconds, generated tokens/s, the ratios to plain, and how many responses match plain's. On a shared machine
absolute numbers are noise; the ratios are what to read.
"""
import argparse
import ast
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

# The prompts eval.py builds: its 8 exemplars (read from its source, so the two cannot drift apart) as chat turns.
tree = ast.parse(open(os.path.join(ROOT, "eval.py")).read())
shots = next(ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "GSM8K_SHOTS")
questions = [json.loads(line)["question"] for line, _ in zip(open(os.path.join(ROOT, "data", "gsm8k_test.jsonl")), range(args.limit))]


def run_eval(*extra):
    """eval.py on the same prompts; -> (seconds, generated tokens, responses in data order) from its own output."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model_name_or_path", args.model,
                               "--task", "gsm8k", "--limit", str(args.limit), "--max_new_tokens", str(args.max_new_tokens),
                               "--batch_size", str(args.batch_size), "--output_dir", out, *extra],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        tokens, seconds = re.search(r"generation: \d+ prompts, (\d+) tokens in ([\d.]+)s", proc.stdout).groups()
        responses = [json.loads(line)["response"] for line in open(os.path.join(out, "gsm8k_records.jsonl"))]
    return float(seconds), int(tokens), responses


def run_plain():
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    messages = [sum([[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in shots], [])
                + [{"role": "user", "content": question}] for question in questions]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    responses, tokens = [], 0
    for b in range(0, len(texts), args.batch_size):
        batch = tokenizer(texts[b:b + args.batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch.input_ids.shape[1]:].tolist():
            stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
            tokens += len(row) if stop is None else stop + 1  # counted as eval.py counts: the eos is generated
            responses.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
    return time.time() - start, tokens, responses


print(f"{args.model}: {len(questions)} GSM8K 8-shot prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, "
      f"{torch.get_num_threads()} threads")
runs = {"plain": run_plain(), "eval.py": run_eval(), "no cache": run_eval("--no_prefix_cache")}
plain_seconds, _, plain_responses = runs["plain"]
for name, (seconds, tokens, responses) in runs.items():
    same = sum(a == b for a, b in zip(responses, plain_responses))
    print(f"{name:<10}{seconds:8.1f} s {tokens:6d} tokens {tokens / seconds:7.1f} tok/s   "
          f"plain / this = {plain_seconds / seconds:5.2f}x   responses equal to plain: {same}/{len(plain_responses)}")
