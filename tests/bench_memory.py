"""Peak resident memory of ONE optimizer step of sft.py / dpo.py / rlvr.py on CPU, at several packed micro-batch sizes.

    python tests/bench_memory.py                                  # this checkout
    python tests/bench_memory.py --repo /path/to/older/checkout   # the same measurement of another version

Each size is a fresh `python STAGE.py --max_steps 1` on synthetic data whose one micro-batch packs about that many
tokens (one document up to 4,096 tokens; 16,000 = four documents of 4,000), embedded SmolLM2-135M-Instruct, fp32:
  sft   conversations of that length, --gradient_checkpointing;
  dpo   pairs whose two sides (half the length each) pack together, --gradient_checkpointing;
  rlvr  GRPO with the HF generator: one prompt of the length less --rlvr_response_length, sampled 4 times, a sample
        per micro-batch (16,000: the 4 samples of 4,000 in one); --gradient_checkpointing where the version has it (an
        rlvr.py without it keeps the layers' activations, ~1.3 MB per token for this model, in its numbers).
Activation checkpointing keeps the layers' activations out of the SFT / DPO picture, so what remains is what grows
differently: the logits and their fp32 copies, and the attention over the packed row.

Prints the child's peak RSS (from wait4: that process and its children alone), its CPU time (user + sys, meaningful on
a shared machine where wall time is not), and what the step logged (loss, grad norm; rlvr: pg_loss, entropy), so two
versions can be checked for the same numbers at lower memory. A run past --timeout seconds, or whose RSS passes
--max_rss_gb, is stopped and reported as a lower bound (its peak so far, VmHWM from /proc, polled every 0.5 s).
A benchmark, not a test: it takes minutes to hours and measures this machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", default=ROOT, help="the checkout whose sft.py / dpo.py / rlvr.py to measure")
parser.add_argument("--sizes", type=int, nargs="+", default=[535, 4035, 16000])
parser.add_argument("--stages", nargs="+", default=["sft", "dpo", "rlvr"])
parser.add_argument("--no_gradient_checkpointing", action="store_true",
                    help="keep every layer's activations (~1.3 MB per token for this model, which then dominate)")
parser.add_argument("--rlvr_response_length", type=int, default=64, help="rlvr: max new tokens (the rest is prompt)")
parser.add_argument("--timeout", type=float, default=3600, help="stop a run after this many seconds (a lower bound)")
parser.add_argument("--max_rss_gb", type=float, default=14.0, help="stop a run whose RSS passes this (a lower bound)")
args = parser.parse_args()
sys.path.insert(0, ROOT)
from transformers import AutoTokenizer  # noqa: E402

import common  # noqa: E402

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def longest(tokens, seed, length):
    """The most words w{...} whose text keeps length(text) <= tokens, by bisection."""
    words = [f"w{(seed * 7919 + i) % 1000}" for i in range(tokens)]
    lo, hi = 1, tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if length(" ".join(words[:mid])) <= tokens else (lo, mid - 1)
    return " ".join(words[:lo])


def conversation(tokens, seed):
    """A user question and an assistant answer that tokenize (chat template included) to exactly `tokens` tokens."""
    messages = lambda text: [{"role": "user", "content": f"Question {seed}?"}, {"role": "assistant", "content": text}]
    return messages(longest(tokens, seed, lambda text: len(common.tokenize_conversation(tokenizer, messages(text))[0])))


def prompt(tokens, seed):
    """An RLVR row whose prompt (chat template and generation prompt included) is exactly `tokens` tokens."""
    messages = lambda text: [{"role": "user", "content": f"Question {seed}: {text}"}]
    length = lambda text: len(tokenizer(common.render(tokenizer, messages(text), add_generation_prompt=True),
                                        add_special_tokens=False).input_ids)
    # "no commas": some samples follow it and some do not, so GRPO's advantages (and the gradient) are not all 0
    return {"messages": messages(longest(tokens, seed, length)), "dataset": "ifeval",
            "ground_truth": json.dumps({"func_name": "validate_no_commas"})}


def vmhwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def measure(command, log_path):
    """Run `command`; -> (peak RSS KiB, CPU seconds, exit code, why it was stopped or None)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=args.repo, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false"))
        start, seen, stopped = time.time(), 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                seen = max(seen, vmhwm_kib(proc.pid))
            except (FileNotFoundError, StopIteration):
                pass
            if stopped is None and time.time() - start > args.timeout:
                stopped = f"stopped after {args.timeout:.0f} s"
            elif stopped is None and seen > args.max_rss_gb * 2 ** 20:
                stopped = f"stopped at the {args.max_rss_gb:g} GB cap"
            if stopped:
                proc.kill()
            time.sleep(0.5)
    return max(usage.ru_maxrss, seen), usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status), stopped


def run(stage, size, work):
    documents = [size] if size <= 4096 else [size // 4] * 4
    data = os.path.join(work, f"{stage}_{size}.jsonl")
    response = args.rlvr_response_length
    with open(data, "w") as f:
        if stage == "sft":
            f.writelines(json.dumps({"messages": conversation(n, i)}) + "\n" for i, n in enumerate(documents))
        elif stage == "dpo":  # a pair of two responses of about n / 2 tokens each: the micro-batch packs both sides
            for i, n in enumerate(documents):
                chosen, rejected = conversation(n // 2, i), conversation(n // 2, i + 100)
                rejected[0] = chosen[0]
                f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
        else:  # one prompt; each sample is the prompt and up to `response` new tokens
            f.write(json.dumps(prompt(documents[0] - response, 0)) + "\n")
    script = os.path.join(args.repo, f"{stage}.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=args.repo).stdout
    extra = ["--dataset_local_cache_dir", os.path.join(work, "cache")] if "--dataset_local_cache_dir" in help_text else []
    extra += ["--preprocessing_num_workers", "1"] if "--preprocessing_num_workers" in help_text else []
    checkpointing = ["--gradient_checkpointing"] if "--gradient_checkpointing" in help_text and not args.no_gradient_checkpointing else []
    out = os.path.join(work, f"out_{stage}_{size}")
    common_args = [script, "--model_name_or_path", MODEL, "--dataset_mixer_list", data, "1.0", "--max_steps", "1",
                   "--output_dir", out, *extra]
    if stage == "rlvr":
        command = [*common_args, "--generator", "hf", "--num_unique_prompts_rollout", "1", "--num_samples_per_prompt",
                   "4", "--per_device_train_batch_size", str(len(documents)),
                   "--response_length", str(response), "--max_prompt_length", "8192", *checkpointing]
    else:
        command = [*common_args, "--per_device_train_batch_size", str(len(documents)), "--gradient_accumulation_steps",
                   "1", "--max_seq_length", "4096", *(["--ref_cache_dir", os.path.join(work, "ref")] if stage == "dpo" else []),
                   *checkpointing]
    peak_kib, cpu, code, stopped = measure([sys.executable, *command], os.path.join(work, f"log_{stage}_{size}.txt"))
    if code and not stopped:
        raise SystemExit(open(os.path.join(work, f"log_{stage}_{size}.txt")).read()[-3000:])
    peak = f"{peak_kib / 2 ** 20:.2f}" if not stopped else f">= {peak_kib / 2 ** 20:.2f} ({stopped})"
    if stopped:
        return peak, cpu, "-"
    metrics = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    if stage == "rlvr":  # what was packed: the prompt and the sampled responses (which may stop early, at eos)
        tokens = len(documents) * (documents[0] - response) + metrics["response_length"] * len(documents)
        logged = (f"{tokens:,.0f} tokens per micro-batch (mean); pg_loss {metrics['pg_loss']:.6f}, entropy {metrics['entropy']:.6f}, "
                  f"grad_norm {metrics['grad_norm']:.6f}")
    else:
        logged = f"loss {metrics['loss']:.6f}, grad_norm {metrics['grad_norm']:.6f}"
    return peak, cpu, logged


with tempfile.TemporaryDirectory() as work:
    print(f"repo {args.repo}")
    print("| stage | packed tokens | peak RSS (GB) | CPU s (user + sys) | the step's metrics |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        for size in sorted(args.sizes):
            peak, cpu, logged = run(stage, size, work)
            print(f"| {stage} | {size:,} | {peak} | {cpu:.0f} | {logged} |", flush=True)
