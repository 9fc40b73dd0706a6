"""The SFT data path at Tulu scale: tokenizing, memory and batch balance, measured on a synthetic Tulu-like mixture.

    python tests/bench_data.py --rows 5000                                # this checkout
    python tests/bench_data.py --rows 5000 --repo /path/to/older/checkout # the same for another version

Writes a mixture of `--rows` conversations shaped like Tulu 3's SFT mixture (1-3 turns, 10% with a system prompt,
lognormal lengths: median ~450 tokens, mean ~750, cut at 4,096), then runs sft.py on it with a tiny random-init model
(the SmolLM2 tokenizer; training itself is negligible, the data path is what is measured):
  1 rank, first run (nothing stored yet), then a second run: wall time, total CPU time, peak RSS of the largest process;
  2 ranks (torchrun) likewise; then 2 ranks with --max_tokens_per_micro_batch: micro-steps per optimizer step and the
  token imbalance across ranks (max rank / mean rank) against the fixed split of --per_device_train_batch_size.
Each number is of this machine and this run; the last lines extrapolate linearly to Tulu's 939,343 conversations.
A benchmark, not a test: minutes.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", default=ROOT, help="the checkout whose sft.py to measure")
parser.add_argument("--rows", type=int, default=5000)
parser.add_argument("--workers", type=int, default=2, help="--preprocessing_num_workers")
parser.add_argument("--steps", type=int, default=4)
args = parser.parse_args()
TULU_ROWS = 939_343


def tulu_like_mixture(path, rows, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fi", "go", "hu", "ja", "pe", "zu"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    words = lambda n: " ".join(rng.choice(vocabulary) for _ in range(max(1, n)))
    with open(path, "w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": words(int(rng.lognormvariate(3, 0.5)))}] if rng.random() < 0.1 else []
            for _ in range(rng.choices([1, 2, 3], [0.7, 0.2, 0.1])[0]):
                messages.append({"role": "user", "content": words(int(rng.lognormvariate(3.6, 0.9)))})
                messages.append({"role": "assistant", "content": words(min(2000, int(rng.lognormvariate(4.8, 0.9))))})
            f.write(json.dumps({"messages": messages}) + "\n")


def tiny_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def run(work, name, nproc, extra=()):
    """Wall seconds, CPU seconds of every process, peak RSS (GB) of the largest, and the metrics of one sft.py run."""
    script = os.path.join(args.repo, "sft.py")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    out = os.path.join(work, name)
    command = [*launcher, script, "--model_name_or_path", os.path.join(work, "model"), "--dataset_mixer_list",
               os.path.join(work, "mixture.jsonl"), "1.0", "--per_device_train_batch_size", "4",
               "--gradient_accumulation_steps", str(8 // nproc), "--max_steps", str(args.steps),
               "--preprocessing_num_workers", str(args.workers), "--output_dir", out, *extra]
    if "--dataset_local_cache_dir" in HELP:
        command += ["--dataset_local_cache_dir", os.path.join(work, "cache")]
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_utime + r.ru_stime, r.ru_maxrss); sys.exit(code)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=args.repo,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    cpu, peak_kib = proc.stdout.split()[-2:]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return wall, float(cpu), int(peak_kib) / 2 ** 20, metrics


with tempfile.TemporaryDirectory() as work:
    HELP = subprocess.run([sys.executable, os.path.join(args.repo, "sft.py"), "--help"], capture_output=True,
                          text=True, cwd=args.repo).stdout
    tulu_like_mixture(os.path.join(work, "mixture.jsonl"), args.rows)
    tiny_model(os.path.join(work, "model"))
    size_mb = os.path.getsize(os.path.join(work, "mixture.jsonl")) / 1e6
    print(f"repo {args.repo}: {args.rows:,} synthetic conversations ({size_mb:.1f} MB), {args.workers} tokenizer workers, "
          f"{args.steps} optimizer steps of 32 examples")
    print("| run | wall s | CPU s (all processes) | peak RSS GB (largest process) | micro-steps / step | rank token imbalance |")
    print("|---|---|---|---|---|---|")
    rows = {}
    runs = [("1 rank, first run", 1, ()), ("1 rank, second run", 1, ()), ("2 ranks, first run", 2, ()),
            ("2 ranks, second run", 2, ())]
    if "--max_tokens_per_micro_batch" in HELP:
        runs.append(("2 ranks, --max_tokens_per_micro_batch 8192", 2, ("--max_tokens_per_micro_batch", "8192")))
    for i, (name, nproc, extra) in enumerate(runs):
        if name.startswith("2 ranks, first") and "--dataset_local_cache_dir" in HELP:
            subprocess.run(["rm", "-rf", os.path.join(work, "cache")])
        wall, cpu, peak, metrics = run(work, f"out{i}", nproc, extra)
        micro = sum(m.get("micro_steps", 8 // nproc) for m in metrics) / len(metrics)  # old code: the fixed split
        imbalance = [m["rank_token_imbalance"] for m in metrics if "rank_token_imbalance" in m]
        imbalance = f"{sum(imbalance) / len(imbalance):.3f}" if imbalance else "(not logged)"
        rows[name] = (wall, cpu, peak)
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {peak:.2f} | {micro:.1f} | {imbalance} |", flush=True)
    # the same second run on 200 rows: what a run costs without the data, to separate the part that grows with rows
    tulu_like_mixture(os.path.join(work, "mixture.jsonl"), 200, seed=1)
    run(work, "small_first", 1)
    small_wall, _, small_peak, _ = run(work, "small_second", 1)
    scale = TULU_ROWS / args.rows
    first, second = rows["1 rank, first run"], rows["1 rank, second run"]
    print(f"\nExtrapolated linearly to {TULU_ROWS:,} conversations (x{scale:.0f}), from the part that grows with the rows "
          f"(a 200-row run: {small_wall:.0f} s, {small_peak:.2f} GB):")
    print(f"  first run, data preparation on this machine ({args.workers} workers): "
          f"~{(first[0] - small_wall) * scale / 3600:.1f} h")
    print(f"  second run, data preparation: ~{max(0.0, second[0] - small_wall) * scale / 60:.0f} min")
    print(f"  resident memory for data, per rank: ~{max(0.0, second[2] - small_peak) * scale:.1f} GB")
