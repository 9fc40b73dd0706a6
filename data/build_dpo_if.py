"""
Build the pipeline's DPO set: on-policy preference pairs on IF-constraint prompts, sampled from the SFT model and
judged by the verifier, as Tulu 3's on-policy preference data is (there a judge model; here the IFEval checks).

    python sft.py ...                      # README's pipeline SFT command: -> out/sft
    python data/build_dpo_if.py            # -> data/dpo_if.jsonl (~4 min on 2 cores)

Prompts: the first --num_prompts rows of data/if_rlvr.jsonl (data/build_if.py; RLVR trains on the same prompts, as
Tulu 3's DPO and RLVR prompt sets overlap). Per prompt, --num_samples completions at --temperature, each scored with
the RLVR reward's verifier (common.ifeval_rlvr_score: the fraction of the prompt's constraints followed). One pair
per prompt: chosen = a best-scoring sample, rejected = a worst-scoring one, only when the two scores differ (a
prompt whose samples all score the same says nothing about the constraints). Among equal scores both sides prefer
a sample that ended on its own, so that the pair differs in the constraints rather than in being cut off.
The shipped data/dpo_if.jsonl: 77 pairs from 128 prompts, sampled from README's pipeline SFT model on 2026-12-07, then
re-judged (--rejudge) when the verifier stopped paying a postscript with nothing before it: 75 pairs.

    python data/build_dpo_if.py --rejudge  # the pairs of --output scored again, no sampling; a pair no longer ordered goes
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_name_or_path", default=os.path.join(ROOT, "out", "sft"))
parser.add_argument("--prompts", default=os.path.join(ROOT, "data", "if_rlvr.jsonl"))
parser.add_argument("--num_prompts", type=int, default=128)
parser.add_argument("--num_samples", type=int, default=4, help="completions sampled per prompt")
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--max_new_tokens", type=int, default=96)
parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default=os.path.join(ROOT, "data", "dpo_if.jsonl"))
parser.add_argument("--rejudge", action="store_true", help="score --output's pairs again under the current verifier")
args = parser.parse_args()

if args.rejudge:  # (the verifier changed: what it now pays decides the pairs, as when they were built)
    truth = {row["messages"][-1]["content"]: row["ground_truth"] for _, row in common.load_rows(args.prompts)}
    pairs = []
    for _, pair in common.load_rows(args.output):
        scores = [common.ifeval_rlvr_score(pair[side][-1]["content"], truth[pair["prompt"]], pair["prompt"])
                  for side in ("chosen", "rejected")]
        pairs += [pair | {"chosen_score": scores[0], "rejected_score": scores[1]}] if scores[0] > scores[1] else []
    with open(args.output, "w") as out:
        out.writelines(json.dumps(pair) + "\n" for pair in pairs)
    sys.exit(print(f"{len(pairs)} pairs -> {args.output}"))
common.require_model_directory(args.model_name_or_path)
torch.manual_seed(args.seed)

rows = [row for _, row in common.load_rows(args.prompts)][: args.num_prompts]
tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
tokenizer.padding_side = "left"  # generation continues every row from its last real token
model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()

# ----------------------------------------------------------------------------- Sample
samples = []  # per prompt: [(response text, ended with eos)] * num_samples
start_time = time.time()
for b in tqdm(range(0, len(rows), args.batch_size), desc="sampling", unit="batch"):
    # rendered by the model's own chat template, which is what dpo.py's default --chat_template renders pairs with
    prompts = [common.render(tokenizer, row["messages"], add_generation_prompt=True) for row in rows[b : b + args.batch_size]]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                                pad_token_id=tokenizer.pad_token_id)  # (batch * num_samples, prompt + new)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    ended = (new_tokens == tokenizer.eos_token_id).any(1).tolist()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    for p in range(len(prompts)):
        samples.append([(texts[p * args.num_samples + s].strip(), ended[p * args.num_samples + s])
                        for s in range(args.num_samples)])

# ----------------------------------------------------------------------------- Judge and pair
counts = dict(prompts=len(rows), pairs=0, all_equal=0, chosen_follows_all=0)
with open(args.output, "w") as out:
    for row, row_samples in zip(rows, samples):
        scored = [(common.ifeval_rlvr_score(text, row["ground_truth"], row["messages"][-1]["content"]), done, text)
                  for text, done in row_samples]  # (with the prompt, as rlvr.py scores: a copy of it is no answer)
        best, worst = max(s for s, _, _ in scored), min(s for s, _, _ in scored)
        if best == worst:
            counts["all_equal"] += 1
            continue
        # among equal scores prefer a sample that ended on its own: the pair should differ in the constraints only
        chosen = max((s for s in scored if s[0] == best), key=lambda s: s[1])[2]
        rejected = max((s for s in scored if s[0] == worst), key=lambda s: s[1])[2]
        user = row["messages"]
        out.write(json.dumps({"prompt": user[-1]["content"], "chosen": user + [{"role": "assistant", "content": chosen}],
                              "rejected": user + [{"role": "assistant", "content": rejected}],
                              "chosen_score": best, "rejected_score": worst}) + "\n")
        counts["pairs"] += 1
        counts["chosen_follows_all"] += best == 1.0
print(f"{counts} -> {args.output} ({time.time() - start_time:.0f} s)")
