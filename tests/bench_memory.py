"""Peak resident memory of ONE optimizer step of sft.py / dpo.py on CPU, at several packed micro-batch sizes.

    python tests/bench_memory.py                                  # this checkout
    python tests/bench_memory.py --repo /path/to/older/checkout   # the same measurement of another version

Each size is a fresh `python sft.py --max_steps 1 --gradient_checkpointing` (and dpo.py) on synthetic conversations
that pack into one micro-batch of about that many tokens (one document up to 4,035 tokens; 16,000 = four documents of
4,000), embedded SmolLM2-135M-Instruct, fp32. Activation checkpointing keeps the layers' activations out of the picture
(without it they cost ~1.3 MB per token here, linear in tokens, the same before and after), so what remains is what
grows differently: the logits and their fp32 copies, and the attention over the packed row. Prints the child's peak RSS (getrusage) and the step's loss, so two versions can be
checked for the same loss at lower memory. A benchmark, not a test: it takes minutes and measures this machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", default=ROOT, help="the checkout whose sft.py / dpo.py to measure")
parser.add_argument("--sizes", type=int, nargs="+", default=[535, 4035, 16000])
parser.add_argument("--stages", nargs="+", default=["sft", "dpo"])
parser.add_argument("--no_gradient_checkpointing", action="store_true",
                    help="keep every layer's activations (~1.3 MB per token for this model, which then dominate)")
args = parser.parse_args()
sys.path.insert(0, ROOT)
from transformers import AutoTokenizer  # noqa: E402

import common  # noqa: E402

MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
tokenizer = AutoTokenizer.from_pretrained(MODEL)


def conversation(tokens, seed):
    """A user question and an assistant answer that tokenize (chat template included) to exactly `tokens` tokens."""
    words = [f"w{(seed * 7919 + i) % 1000}" for i in range(tokens)]
    lo, hi = 1, tokens
    while lo < hi:  # the most words whose conversation stays within `tokens`
        mid = (lo + hi + 1) // 2
        messages = [{"role": "user", "content": f"Question {seed}?"}, {"role": "assistant", "content": " ".join(words[:mid])}]
        n = len(common.tokenize_conversation(tokenizer, messages)[0])
        lo, hi = (mid, hi) if n <= tokens else (lo, mid - 1)
    return [{"role": "user", "content": f"Question {seed}?"}, {"role": "assistant", "content": " ".join(words[:lo])}]


def run(stage, size, work):
    documents = [size] if size <= 4096 else [size // 4] * 4
    data = os.path.join(work, f"{stage}_{size}.jsonl")
    with open(data, "w") as f:
        for i, n in enumerate(documents):
            if stage == "sft":
                f.write(json.dumps({"messages": conversation(n, i)}) + "\n")
            else:  # a pair of two responses of about n / 2 tokens each: the micro-batch packs both sides
                chosen, rejected = conversation(n // 2, i), conversation(n // 2, i + 100)
                rejected[0] = chosen[0]
                f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    script = os.path.join(args.repo, f"{stage}.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=args.repo).stdout
    extra = ["--dataset_local_cache_dir", os.path.join(work, "cache")] if "--dataset_local_cache_dir" in help_text else []
    if stage == "dpo":
        extra += ["--ref_cache_dir", os.path.join(work, "ref")]
    out = os.path.join(work, f"out_{stage}_{size}")
    command = [sys.executable, script, "--model_name_or_path", MODEL, "--dataset_mixer_list", data, str(len(documents)),
               "--per_device_train_batch_size", str(len(documents)), "--gradient_accumulation_steps", "1",
               "--max_seq_length", "4096", "--max_steps", "1", "--preprocessing_num_workers", "1", "--output_dir", out,
               *extra, *([] if args.no_gradient_checkpointing else ["--gradient_checkpointing"])]
    # a wrapper process per run, so the peak (ru_maxrss of its one child) is this run's alone
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=args.repo,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak_kib = int(proc.stdout.split()[-1])
    loss = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())["loss"]
    return peak_kib / 2 ** 20, loss


with tempfile.TemporaryDirectory() as work:
    print(f"repo {args.repo}")
    print("| stage | packed tokens | peak RSS (GB) | loss of the step |")
    print("|---|---|---|---|")
    for stage in args.stages:
        for size in sorted(args.sizes):
            peak, loss = run(stage, size, work)
            print(f"| {stage} | {size:,} | {peak:.2f} | {loss:.6f} |", flush=True)
