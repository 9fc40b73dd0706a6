"""
Build the embedded DPO set: on-policy preference pairs on GSM8K train prompts, judged by the GSM8K verifier.

As in Tulu 3's on-policy data, the policy itself writes the responses: we sample --num_samples completions per prompt
from the model (batched HF generate, CPU is fine), score each with common.gsm8k_score (last number vs the gold after
`#### `), and make one pair per prompt:
    chosen   = a correct completion, or the gold solution (written like data/build_sft_gsm8k.py) when none is correct
    rejected = an incorrect completion (one that ended on its own if there is one, else one cut at --max_new_tokens)
Prompts where every sample is correct give no pair. The prompts are GSM8K train rows from --start on: sft.py's default
trains on the first 512 rows, so by default DPO sees questions SFT did not.

    OMP_NUM_THREADS=1 python data/build_dpo_gsm8k.py   # -> data/dpo_gsm8k.jsonl (128 prompts x 4 samples, ~1 h on 1 busy core)
"""
import argparse
import json
import os
import re
import sys
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
parser.add_argument("--start", type=int, default=512, help="first GSM8K train row to use")
parser.add_argument("--num_prompts", type=int, default=128)
parser.add_argument("--num_samples", type=int, default=4, help="completions sampled per prompt")
parser.add_argument("--temperature", type=float, default=0.9)
parser.add_argument("--max_new_tokens", type=int, default=256)
parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call (each stops when its longest sample does)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default=os.path.join(ROOT, "data", "dpo_gsm8k.jsonl"))
args = parser.parse_args()
torch.manual_seed(args.seed)

with open(os.path.join(ROOT, "data", "gsm8k_train.jsonl")) as f:
    rows = [json.loads(line) for line in f][args.start : args.start + args.num_prompts]
for number, row in enumerate(rows, args.start + 1):  # the solution, then "#### N" on its last line, or named here
    if not re.fullmatch(r".*\n#### -?[\d,]+(?:\.\d+)?\s*", row["answer"], re.DOTALL):
        raise SystemExit(f"gsm8k_train.jsonl:{number}: field 'answer' does not end in a line '#### N'")
tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
tokenizer.padding_side = "left"  # generation continues every row from its last real token
model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()

# ----------------------------------------------------------------------------- Sample

samples = []  # per prompt: [(response text, ended with eos)] * num_samples
progress = tqdm(range(0, len(rows), args.batch_size), desc="sampling", unit="batch")
generated_tokens, start_time = 0, time.time()
for b in progress:
    # The prompt format of data/sft_gsm8k.jsonl (user = the question), rendered by the model's own chat template,
    # which is what dpo.py's default --chat_template renders the pairs with.
    prompts = [common.render(tokenizer, [{"role": "user", "content": row["question"]}], add_generation_prompt=True)
               for row in rows[b : b + args.batch_size]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                                pad_token_id=tokenizer.pad_token_id)  # (batch * num_samples, prompt + new)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    ended = (new_tokens == tokenizer.eos_token_id).any(1).tolist()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    generated_tokens += int((new_tokens != tokenizer.pad_token_id).sum()) + sum(ended)  # pad == eos here
    for p in range(len(prompts)):
        samples.append([(texts[p * args.num_samples + s].strip(), ended[p * args.num_samples + s])
                        for s in range(args.num_samples)])
    progress.set_postfix(tok_s=f"{generated_tokens / (time.time() - start_time):.0f}")

# ----------------------------------------------------------------------------- Judge and pair

counts = dict(prompts=len(rows), pairs=0, chosen_model=0, chosen_gold=0, all_correct=0, rejected_cut=0, correct_samples=0)
with open(args.output, "w") as out:
    for i, (row, row_samples) in enumerate(zip(rows, samples)):
        gold = row["answer"]
        correct = [text for text, _ in row_samples if text and common.gsm8k_score(text, gold) == 1.0]
        incorrect = [(text, done) for text, done in row_samples if text and common.gsm8k_score(text, gold) == 0.0]
        counts["correct_samples"] += len(correct)
        if not incorrect:
            counts["all_correct"] += 1
            continue
        if correct:
            chosen, counts["chosen_model"] = correct[0], counts["chosen_model"] + 1
        else:  # nothing right: fall back to the reference solution, formatted as in data/build_sft_gsm8k.py
            reasoning, answer = re.fullmatch(r"(.*)\n#### (.*)", gold, re.DOTALL).groups()  # (checked above)
            chosen = f"{re.sub(r'<<[^>]*>>', '', reasoning).strip()}\nThe answer is {answer.strip()}."
            counts["chosen_gold"] += 1
        rejected, done = next(((t, d) for t, d in incorrect if d), incorrect[0])
        counts["rejected_cut"] += not done
        user = {"role": "user", "content": row["question"]}
        out.write(json.dumps({
            "id": f"gsm8k_train_{args.start + i}", "prompt": row["question"],
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
            "source": "gsm8k", "chosen_from": "model" if correct else "gold",
        }) + "\n")
        counts["pairs"] += 1
print(f"{counts} -> {args.output} ({generated_tokens} tokens sampled in {time.time() - start_time:.0f} s)")
