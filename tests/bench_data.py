"""The SFT data path at Tulu scale: tokenizing, start-up, memory and batch balance, on a synthetic Tulu-like mixture.

    python tests/bench_data.py --rows 5000 10000 20000                                # this checkout
    python tests/bench_data.py --rows 5000 10000 20000 --repo /path/to/older/checkout # the same for another version

For each size, writes a mixture of that many conversations shaped like Tulu 3's SFT mixture (1-3 turns, 10% with a
system prompt, lognormal lengths: median ~470 tokens, mean ~720, a long tail of which ~0.5% pass 4,096 and are
dropped), then runs sft.py on it with a tiny random-init model (the SmolLM2 tokenizer; training itself is negligible,
the data path is what is measured), --steps optimizer steps of 32 examples:
  1 rank, first run (nothing stored yet), then a second run; 2 ranks (torchrun) likewise, the store emptied first;
  then (if the version has it) 2 ranks with --max_tokens_per_micro_batch 8192.
Per run: time to the first optimizer step (the first line of metrics.jsonl appearing), as wall seconds and as CPU
seconds of the whole process tree at that moment; total CPU seconds (user + sys, every process); peak RSS (VmHWM) and
peak anonymous RSS (RssAnon: private memory; file pages of a memory map are shared by the ranks of a machine) of each
rank's own process, polled every 0.5 s (in a version that computes the full (T, V) logits these are the loss's, not
the data's: so also rank 0's RSS when it reports the data loaded, its " rows -> " line, before the model is built);
micro-steps per optimizer step and the token imbalance across ranks (max rank /
mean rank, as sft.py logs it; a version that does not log it uses the fixed split, the same code as the fixed split
here); the first step's loss and token count (the same data and batches in two versions give the same numbers).
On a shared machine wall time is noise; CPU time is what the work costs.

Then extrapolates to Tulu's 939,343 conversations: linearly, from the slope between the two largest sizes; the slope
between each pair of consecutive sizes is printed, so whether the cost is linear in the rows can be read off. A
quantity that changes less than run-to-run noise (15 s, 0.1 GB) from the smallest to the largest size is reported as
not growing rather than extrapolated from noise. --json keeps every measurement.
A benchmark, not a test: minutes to an hour.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repo", default=ROOT, help="the checkout whose sft.py to measure")
parser.add_argument("--rows", type=int, nargs="+", default=[5000, 10000, 20000])
parser.add_argument("--workers", type=int, default=2, help="--preprocessing_num_workers")
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
parser.add_argument("--json", default=None, help="also write every measurement to this file")
args = parser.parse_args()
TULU_ROWS = 939_343
TICK = os.sysconf("SC_CLK_TCK")


def tulu_like_mixture(path, rows, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fi", "go", "hu", "ja", "pe", "zu"]
    vocabulary = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    words = lambda n: " ".join(rng.choice(vocabulary) for _ in range(max(1, n)))
    with open(path, "w") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": words(int(rng.lognormvariate(3, 0.5)))}] if rng.random() < 0.1 else []
            for _ in range(rng.choices([1, 2, 3], [0.7, 0.2, 0.1])[0]):
                messages.append({"role": "user", "content": words(int(rng.lognormvariate(3.4, 1.2)))})
                messages.append({"role": "assistant", "content": words(min(1500, int(rng.lognormvariate(4.2, 1.3))))})
            f.write(json.dumps({"messages": messages}) + "\n")


def tiny_model(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)  # the same weights in every invocation: two versions' losses can be compared
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def processes():
    """{pid: (ppid, argv, CPU seconds incl. reaped children, VmHWM KiB, RssAnon KiB, VmRSS KiB)} of every readable process."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        kib = lambda key: int(status[key].split()[0]) if key in status else 0
        table[int(pid)] = (int(fields[1]), argv, sum(int(x) for x in fields[11:15]) / TICK, kib("VmHWM"), kib("RssAnon"),
                           kib("VmRSS"))
    return table


def local_rank(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except FileNotFoundError:
        return None
    return int(env.get(b"LOCAL_RANK", b"0"))


def run(work, name, nproc, extra=()):
    """One sft.py run, watched: see the module docstring for what is measured."""
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
    is_script = lambda argv: any(a.endswith("sft.py") for a in argv) and "torch.distributed.run" not in argv
    metrics_path = os.path.join(out, "metrics.jsonl")
    ranks, first_step = {}, None  # rank pid -> [local rank, peak VmHWM, peak RssAnon]; (wall, CPU) at the first step
    loaded = None  # (VmRSS, RssAnon) of rank 0 when it reports the data loaded (its " rows -> " line)
    log_path = os.path.join(work, f"{name}.log")
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=args.repo, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            table = processes()
            tree, frontier = set(), {proc.pid}
            while frontier:  # the launcher and every descendant
                tree |= frontier
                frontier = {p for p, row in table.items() if row[0] in frontier} - tree
            for p in tree & table.keys():
                parent = table.get(table[p][0])
                if is_script(table[p][1]) and not (parent and is_script(parent[1])):  # a rank, not a tokenizer worker
                    peak = ranks.setdefault(p, [local_rank(p), 0, 0])
                    peak[1], peak[2] = max(peak[1], table[p][3]), max(peak[2], table[p][4])
            if loaded is None and " rows -> " in open(log_path).read():
                rank0 = next((p for p, (r, _, _) in ranks.items() if r == 0 and p in table), None)
                loaded = rank0 and (table[rank0][5] / 2 ** 20, table[rank0][4] / 2 ** 20)
            if first_step is None and os.path.exists(metrics_path) and open(metrics_path).read().endswith("\n"):
                first_step = time.time() - start, sum(table[p][2] for p in tree & table.keys())
            if time.time() - start > args.timeout:
                proc.kill()
            time.sleep(0.5)
    wall = time.time() - start
    if os.waitstatus_to_exitcode(status):
        text = open(os.path.join(work, f"{name}.log")).read()
        raise SystemExit(f"{name} failed: {command}\n{text[:6000]}\n...\n{text[-3000:]}")
    metrics = [json.loads(line) for line in open(metrics_path)]
    said = next((line for line in open(os.path.join(work, f"{name}.log")) if " rows -> " in line), "")  # rank 0's summary
    tokenized = "reused" if "reused the tokenization" in said else \
        next((part.strip().split(" into")[0] for part in said.split(";") if "tokenized in" in part), "")
    return dict(first_step_wall=first_step[0], first_step_cpu=first_step[1], wall=wall,
                cpu=usage.ru_utime + usage.ru_stime, rss=[peak / 2 ** 20 for _, peak, _ in sorted(ranks.values())],
                anon=[anon / 2 ** 20 for _, _, anon in sorted(ranks.values())], loaded=loaded,
                micro=sum(m.get("micro_steps", 8 // nproc) for m in metrics) / len(metrics),  # old code: the fixed split
                imbalance=[m["rank_token_imbalance"] for m in metrics if "rank_token_imbalance" in m],
                loss=metrics[0]["loss"], tokens=metrics[0]["tokens"], tokenized=tokenized)


HELP = subprocess.run([sys.executable, os.path.join(args.repo, "sft.py"), "--help"], capture_output=True, text=True,
                      cwd=args.repo).stdout
RUNS = [("1 rank, first run", 1, ()), ("1 rank, second run", 1, ()), ("2 ranks, first run", 2, ()),
        ("2 ranks, second run", 2, ())]
if "--max_tokens_per_micro_batch" in HELP:
    RUNS.append(("2 ranks, --max_tokens_per_micro_batch 8192", 2, ("--max_tokens_per_micro_batch", "8192")))
results = {}  # (rows, run name) -> measurements
print(f"repo {args.repo}: {args.workers} tokenizer workers, {args.steps} optimizer steps of 32 examples per run")
for rows in sorted(args.rows):
    with tempfile.TemporaryDirectory() as work:
        tulu_like_mixture(os.path.join(work, "mixture.jsonl"), rows)
        tiny_model(os.path.join(work, "model"))
        size_mb = os.path.getsize(os.path.join(work, "mixture.jsonl")) / 1e6
        print(f"\n{rows:,} synthetic conversations ({size_mb:.1f} MB of JSONL)\n")
        print("| run | to the first optimizer step: wall s / CPU s | total CPU s | peak RSS per rank, GB | peak anon RSS "
              "per rank, GB | rank 0 with the data loaded: RSS / anon, GB | micro-steps / step | rank token imbalance | "
              "first step: loss, tokens | tokenizing |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for i, (name, nproc, extra) in enumerate(RUNS):
            if name.startswith("2 ranks, first"):
                shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
            try:
                r = results[rows, name] = run(work, f"out{i}", nproc, extra)
            except SystemExit as failure:  # reported, then run once more: one failure should not lose an hour of runs
                print(f"(FAILED, run again: {str(failure)[-2000:]})", flush=True)
                r = results[rows, name] = run(work, f"out{i}b", nproc, extra)
            imbalance = f"{sum(r['imbalance']) / len(r['imbalance']):.3f}" if r["imbalance"] else "(not logged)"
            print(f"| {name} | {r['first_step_wall']:.0f} / {r['first_step_cpu']:.0f} | {r['cpu']:.0f} | "
                  f"{' / '.join(f'{x:.2f}' for x in r['rss'])} | {' / '.join(f'{x:.2f}' for x in r['anon'])} | "
                  f"{r['loaded'][0]:.2f} / {r['loaded'][1]:.2f} | "
                  f"{r['micro']:.1f} | {imbalance} | {r['loss']:.6f}, {r['tokens']:,} | {r['tokenized'] or '-'} |", flush=True)

sizes = sorted(args.rows)
if len(sizes) >= 2:
    seconds = lambda text: float(text.split()[2]) if text.startswith("tokenized in") else float("nan")
    quantities = [("first run, tokenizing wall s as sft.py reports it (shared machine)", "1 rank, first run",
                   lambda r: seconds(r["tokenized"])),
                  ("first run, wall s to the first optimizer step (shared machine)", "1 rank, first run",
                   lambda r: r["first_step_wall"]),
                  ("first run, CPU s to the first optimizer step", "1 rank, first run", lambda r: r["first_step_cpu"]),
                  ("first run, CPU s to the first optimizer step", "2 ranks, first run", lambda r: r["first_step_cpu"]),
                  ("second run, CPU s to the first optimizer step", "1 rank, second run", lambda r: r["first_step_cpu"]),
                  ("second run, CPU s to the first optimizer step", "2 ranks, second run", lambda r: r["first_step_cpu"]),
                  ("first run, total CPU s", "2 ranks, first run", lambda r: r["cpu"]),
                  ("second run, total CPU s", "2 ranks, second run", lambda r: r["cpu"]),
                  ("rank 0 with the data loaded, RSS GB", "2 ranks, first run", lambda r: r["loaded"][0]),
                  ("rank 0 with the data loaded, RSS GB", "2 ranks, second run", lambda r: r["loaded"][0]),
                  ("rank 0 with the data loaded, anon RSS GB", "2 ranks, second run", lambda r: r["loaded"][1])]
    print(f"\nEXTRAPOLATED linearly to {TULU_ROWS:,} conversations from the slope between {sizes[-2]:,} and "
          f"{sizes[-1]:,} rows (the slopes between consecutive sizes, per 1,000 rows, show whether it is linear):\n")
    print("| quantity | run | " + " | ".join(f"at {n:,}" for n in sizes) + " | slope per 1,000 rows | extrapolated to 939,343 |")
    print("|---|---|" + "---|" * len(sizes) + "---|---|")
    for label, name, get in quantities:
        values = [get(results[n, name]) for n in sizes]
        if any(v != v for v in values):  # NaN: this version does not report it
            continue
        slopes = [(b - a) / (m - n) * 1000 for a, b, n, m in zip(values, values[1:], sizes, sizes[1:])]
        extrapolated = values[-1] + slopes[-1] / 1000 * (TULU_ROWS - sizes[-1])
        noise = 0.1 if "GB" in label else 15.0  # what two runs of the same size can differ by on a shared machine
        if abs(values[-1] - values[0]) < noise:  # a slope of noise would extrapolate to nonsense
            extrapolated = f"no growth measured (within {noise:g} from {sizes[0]:,} to {sizes[-1]:,} rows)"
        else:
            extrapolated = f"{extrapolated:,.1f}" + (f" ({extrapolated / 3600:.1f} h)" if "GB" not in label and extrapolated > 3600 else "")
        print(f"| {label} | {name} | " + " | ".join(f"{v:.2f}" for v in values) + " | " +
              ", ".join(f"{s:.3f}" for s in slopes) + f" | {extrapolated} |")

if args.json:
    with open(args.json, "w") as f:
        json.dump({"repo": args.repo, "runs": [dict(rows=n, run=name, **r) for (n, name), r in results.items()]}, f, indent=1)
