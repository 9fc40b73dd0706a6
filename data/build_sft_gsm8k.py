"""
Build the embedded SFT set: GSM8K train as Tulu-format conversations (`id`, `messages`, `source`).

The reference solutions carry calculator annotations (`<<48/2=24>>`) and end in `#### 72`; we drop the annotations and
end with "The answer is 72." -- the close of the 8-shot GSM8K exemplars ("So the answer is 72."), and its last number is
what the verifier reads.

    python data/build_sft_gsm8k.py   # -> data/sft_gsm8k.jsonl
"""
import json
import os
import re

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "gsm8k_train.jsonl")) as f, open(os.path.join(here, "sft_gsm8k.jsonl"), "w") as out:
    for i, line in enumerate(f):
        row = json.loads(line)
        # the solution, then "#### N" on its last line; anything else is named, not a traceback or a wrong gold
        if not (match := re.fullmatch(r"(.*)\n#### (-?[\d,]+(?:\.\d+)?)\s*", row["answer"], re.DOTALL)):
            raise SystemExit(f"gsm8k_train.jsonl:{i + 1}: field 'answer' does not end in a line '#### N'")
        reasoning, answer = match.groups()
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
        messages = [{"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": f"{reasoning}\nThe answer is {answer.strip()}."}]
        out.write(json.dumps({"id": f"gsm8k_train_{i}", "messages": messages, "source": "gsm8k"}) + "\n")
