"""
Build the embedded RLVR data in the Tulu RLVR format (`messages`, `ground_truth`, `dataset`):
    python data/build_rlvr.py   ->  data/rlvr_train.jsonl, data/rlvr_heldout.jsonl

Two parts, as in allenai/RLVR-GSM-MATH-IF-Mixed-Constraints:
- GSM8K: questions from the END of data/gsm8k_train.jsonl (SFT and DPO use its start), messages = [user: question,
  assistant: gold solution] so that messages[:-1] is the prompt; ground_truth = the number after "#### ".
- IF constraints: our own small base instructions x a verbalized constraint; ground_truth is the Tulu JSON
  {"func_name": ..., **kwargs} that common.ifeval_rlvr_score checks. No IFEval test prompt is used, but the
  constraint sentences follow IFEval's wording, so one end phrase ("Is there anything else I can help with?") makes 27
  rows overlap an IFEval test prompt by the Tulu 8-gram rule: data/decontaminate.py removes them before training.
Held-out rows use base instructions and GSM8K questions that no training row uses.
Also the README's CPU evidence run: data/rlvr_evidence_{train,heldout}.jsonl, the training / held-out bases x (all
lowercase | no commas) + "at least 25 words", so that an empty or shrinking response cannot earn the full reward.
"""
import json
import os
import random
import re

HERE = os.path.dirname(os.path.abspath(__file__))

BASES = [  # short open-ended instructions a 135M model can answer in a few sentences
    "Describe a sunset.", "Give advice to a new student.", "Explain why people like music.", "Describe your ideal weekend.",
    "Write a short note to a neighbor.", "Explain how to make a cup of tea.", "Describe a busy market.",
    "Tell me about the ocean.", "Give tips for staying healthy.", "Describe a rainy day in a city.",
    "Explain why sleep matters.", "Write a short thank-you message to a teacher.", "Describe a walk in the forest.",
    "Explain what a library is for.", "Give advice for a job interview.", "Describe the moon at night.",
    "Tell me about your favorite animal.", "Explain how plants grow.", "Describe a birthday party.",
    "Give tips for saving money.", "Describe a snowy morning.", "Explain why friends are important.",
    "Write a short welcome message for a club.", "Describe a train journey.", "Explain how to plant a tree.",
    "Tell me about the history of bread.", "Describe a quiet evening at home.", "Give advice to someone learning to cook.",
    "Explain why exercise is good for you.", "Describe a mountain view.", "Write a short invitation to a picnic.",
    "Explain how a bicycle works.", "Describe a summer festival.", "Give tips for reading more books.",
    "Describe the smell of fresh bread.", "Explain what makes a good team.", "Describe a garden in spring.",
    "Tell me about a famous city.", "Give advice for a first day at work.", "Describe a thunderstorm.",
    "Explain why recycling helps.", "Write a short message to a friend who moved away.", "Describe a cozy cafe.",
    "Explain how to learn a new language.", "Describe an autumn afternoon.", "Give tips for a long flight.",
    "Tell me about stars in the sky.", "Explain why water is important.", "Describe a child's first day at school.",
    "Give advice for keeping a plant alive.", "Describe a beach in the morning.", "Explain how to write a letter.",
    "Describe a river.", "Give tips for a good night's sleep.", "Explain why people travel.", "Describe a farm.",
    "Write a short apology for being late.", "Explain what a good friend does.", "Describe a lighthouse.",
    "Give advice for studying for an exam.", "Describe a city park.", "Explain how to stay calm.",
    "Tell me about the desert.", "Describe a kitchen in the morning.", "Give tips for cooking rice.",
    "Explain why art matters.", "Describe a winter night.", "Write a short speech for a graduation.",
    "Describe a bakery.", "Explain how rain forms.", "Give advice for making new friends.", "Describe a zoo.",
    "Explain why people keep pets.", "Describe a small village.", "Give tips for a road trip.",
    "Tell me about the sun.", "Describe a school library.", "Explain how to be a good listener.",
    "Describe a football match.", "Give advice for learning to swim.",
]
END_PHRASES = ["Is there anything else I can help with?", "Thank you for reading.", "Have a nice day.", "That is all."]
CONSTRAINTS = [  # (verbalization, ground truth), a few kinds a small model can plausibly learn
    lambda r: ("Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
               {"func_name": "validate_lowercase"}),
    lambda r: ("Your entire response should be in English, and in all capital letters.", {"func_name": "validate_uppercase"}),
    lambda r: ("In your entire response, refrain from the use of any commas.", {"func_name": "validate_no_commas"}),
    lambda r: (lambda p: (f'Finish your response with this exact phrase "{p}". No other words should follow this phrase.',
                          {"func_name": "validate_end", "end_phrase": p}))(r.choice(END_PHRASES)),
    lambda r: ("Wrap your entire response with double quotation marks.", {"func_name": "validate_quotation"}),
    lambda r: ("Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
               {"func_name": "validate_title"}),
    lambda r: (lambda m: (f"At the end of your response, please explicitly add a postscript starting with {m}",
                          {"func_name": "verify_postscript", "postscript_marker": m}))(r.choice(["P.S.", "P.P.S"])),
    lambda r: (lambda n: (f"Answer with less than {n} words.", {"func_name": "validate_word_constraint", "N": n,
                                                                "quantifier": "less than"}))(r.choice([20, 30, 40])),
]


def if_rows(bases, count, rng):
    rows = []
    for i in range(count):
        base = bases[i % len(bases)]
        text, truth = rng.choice(CONSTRAINTS)(rng)
        rows.append({"messages": [{"role": "user", "content": f"{base} {text}"}], "ground_truth": json.dumps(truth),
                     "dataset": "ifeval", "constraint_type": truth["func_name"], "constraint": text})
    return rows


def gsm8k_rows(lines):
    rows = []
    for number, line in lines:
        example = json.loads(line)
        # the number after "#### " on the last line: anything else is named (split("#### ") took a whole solution
        # written "####1,007" as its gold)
        if not (match := re.fullmatch(r".*\n#### (-?[\d,]+(?:\.\d+)?)\s*", example["answer"], re.DOTALL)):
            raise SystemExit(f"gsm8k_train.jsonl:{number}: field 'answer' does not end in a line '#### N'")
        gold = match[1].replace(",", "")
        rows.append({"messages": [{"role": "user", "content": example["question"]},
                                  {"role": "assistant", "content": example["answer"]}],
                     "ground_truth": gold, "dataset": "gsm8k"})
    return rows


rng = random.Random(0)
with open(os.path.join(HERE, "gsm8k_train.jsonl")) as f:
    gsm8k = [(n, line) for n, line in enumerate(f, 1) if line.strip()][-1000:]  # the last 1000: SFT/DPO's come from the start
heldout_bases, train_bases = BASES[:16], BASES[16:]
train = gsm8k_rows(gsm8k[:-32]) + if_rows(train_bases, 1000, rng)
heldout = gsm8k_rows(gsm8k[-32:]) + if_rows(heldout_bases, 32, rng)
rng.shuffle(train)
rng.shuffle(heldout)
for name, rows in [("rlvr_train.jsonl", train), ("rlvr_heldout.jsonl", heldout)]:
    with open(os.path.join(HERE, name), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{name}: {len(rows)} rows ({sum(r['dataset'] == 'ifeval' for r in rows)} ifeval)")

# The evidence run's sets. No rng here: the files above stay byte-identical whether or not this part runs.
# Each prompt carries two constraints, a format (all lowercase / no commas) and "at least 25 words": the reward is the
# fraction followed, so an empty or shrinking response keeps at most half of it. A reward that rises here is not a
# response that learned to say less (a single no-commas constraint can be satisfied by saying nothing).
FORMATS = [("Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
            {"func_name": "validate_lowercase"}),
           ("In your entire response, refrain from the use of any commas.", {"func_name": "validate_no_commas"})]
AT_LEAST = ("Answer with at least 25 words.", {"func_name": "validate_word_constraint", "N": 25, "quantifier": "at least"})


def evidence_rows(bases):
    return [{"messages": [{"role": "user", "content": f"{base} {text} {AT_LEAST[0]}"}],
             "ground_truth": json.dumps([truth, AT_LEAST[1]]), "dataset": "ifeval",
             "constraint_type": f"{truth['func_name']}+validate_word_constraint", "constraint": f"{text} {AT_LEAST[0]}"}
            for base in bases for text, truth in FORMATS]


for name, rows in [("rlvr_evidence_train.jsonl", evidence_rows(train_bases)),
                   ("rlvr_evidence_heldout.jsonl", evidence_rows(heldout_bases))]:
    with open(os.path.join(HERE, name), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{name}: {len(rows)} rows")
