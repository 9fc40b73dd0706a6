"""
Remove training rows whose prompt overlaps an eval prompt, with the Tulu 3 rule (report section 3.2): 8-gram matching.

    python data/decontaminate.py   # -> out/data/{if_sft,dpo_if,if_rlvr}.jsonl, out/data/decontamination.json

A test instance overlaps a training instance when more than 50% of the test prompt's tokens lie in 8-grams that also
occur in the training prompt: each position of the test prompt covered by a shared 8-gram counts, coverage = covered
positions / test tokens, overlap when coverage > --threshold. A training row overlapping any eval instance is removed.
Per (training file, eval set) we also report how many eval instances are overlapped and whether that exceeds 2% of the
eval set, Tulu's bar for calling a whole training set contaminated; that is a report line, not an action.

Tokens are lowercase words, re.findall(r"\\w+", text.lower()). (open-instruct's decontamination/search.py builds its
8-grams from spaCy's en_core_web_lg tokens, punctuation included, and finds training text with Elasticsearch; words make
the rule independent of both and of any model's vocabulary.) A test prompt of fewer than 8 tokens has no 8-gram, so it
can never be matched: it counts as unmatched.

Training prompts: each user turn on its own (as open-instruct indexes one document per user message), from `messages`
(SFT, RLVR; an SFT row without a user turn: its system turns) or `chosen` (DPO), or a DPO row's `prompt` when `chosen`
holds the response alone; a row is removed when any of its prompts overlaps. Cleaned files keep the original lines byte for byte (read and written as bytes, split
on "\n" only, as the stages read them), in order. The run is deterministic and idempotent.
"""
import argparse
import json
import os
import re
import sys
import time
import unicodedata
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import check_messages, load_rows  # noqa: E402

EVAL_SETS = {"gsm8k_test": ("gsm8k_test.jsonl", "question"), "math500_test": ("math500_test.jsonl", "problem"),
             "ifeval": ("ifeval_input_data.jsonl", "prompt"),
             "if_heldout": ("if_heldout.jsonl", "prompt")}  # name -> (file in --eval_dir, prompt field)
CONTAMINATED_FRACTION = 0.02  # Tulu 3 calls a training set contaminated when it overlaps > 2% of an eval set


def words(text):
    """The text's words, lower-cased, after NFKC (full-width letters are letters) and without format characters (a
    soft hyphen or zero-width space inside a word split it, and a test prompt so disguised was not found)."""
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")
    return re.findall(r"\w+", text.lower())


def ngram_index(eval_prompts, n):
    """eval_prompts: {eval id: text}. Returns each eval prompt's n-grams in order, and n-gram -> ids of the eval
    prompts containing it, so a training prompt is only scored against eval prompts sharing one of its n-grams."""
    eval_ngrams, index = {}, defaultdict(set)  # a dict hashes the n-gram tuple and still compares it, so no false hits
    for eval_id, text in eval_prompts.items():
        tokens = words(text)
        eval_ngrams[eval_id] = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]  # empty if < n tokens
        for ngram in eval_ngrams[eval_id]:
            index[ngram].add(eval_id)
    return eval_ngrams, index


def overlapped(train_text, eval_ngrams, index, n, threshold):
    """Ids of the eval prompts that this training prompt overlaps (coverage > threshold), in sorted order."""
    tokens = words(train_text)
    train_ngrams = {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}
    candidates = set().union(*(index.get(ngram, ()) for ngram in train_ngrams))
    hits = []
    for eval_id in sorted(candidates):
        windows = eval_ngrams[eval_id]
        covered = [False] * (len(windows) + n - 1)  # one flag per eval token
        for start, ngram in enumerate(windows):
            if ngram in train_ngrams:
                covered[start:start + n] = [True] * n
        if sum(covered) / len(covered) > threshold:
            hits.append(eval_id)
    return hits


def prompt_turns(row, where):
    """The prompts of a training row, one per user turn: of `messages` (SFT, RLVR; with no user turn, its system
    turns) or `chosen` (DPO); a DPO row whose `chosen` is the response alone takes them from `prompt` (a string, or a
    message list)."""
    for field in ("messages", "chosen", "prompt"):  # SFT / RLVR rows, then DPO rows
        if field not in row:
            continue
        if field == "prompt" and isinstance(row[field], str):
            return [row[field]]
        check_messages(row[field], where, field)
        user_turns = [m["content"] for m in row[field] if m["role"] == "user"]
        if user_turns:
            return user_turns
        if field == "messages":  # an SFT row with no user turn (sft.py trains it): its system turns prompt the reply
            return [m["content"] for m in row[field] if m["role"] == "system"]
        if field != "chosen" or "prompt" not in row:  # (dpo.py refuses a preference with no prompt too)
            raise ValueError(f"{where}: field '{field}' has no user turn to take the prompt from")
    raise ValueError(f"{where}: no prompt found: expected field 'messages', 'prompt' or 'chosen'")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", nargs="+", default=[os.path.join(HERE, f) for f in
                                                       ("if_sft.jsonl", "dpo_if.jsonl", "if_rlvr.jsonl")])
    parser.add_argument("--out_dir", default="out/data")
    parser.add_argument("--eval_dir", default=HERE, help="where the eval files of EVAL_SETS are")
    parser.add_argument("--ngram", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5, help="overlap when coverage is above this")
    args = parser.parse_args()
    names = [os.path.basename(path) for path in args.train]
    if len(set(names)) != len(names) or not all(name.endswith(".jsonl") for name in names):
        raise ValueError(f"--train files must be .jsonl with distinct basenames (outputs keep them): {args.train}")

    t0 = time.time()
    eval_prompts, eval_sizes = {}, {}  # eval id = (eval set, row number in its file)
    for eval_set, (file, field) in EVAL_SETS.items():
        rows = load_rows(os.path.join(args.eval_dir, file))
        for i, (where, row) in enumerate(rows):
            if not isinstance(row.get(field), str):
                raise ValueError(f"{where}: field '{field}' must be a string")
            eval_prompts[(eval_set, i)] = row[field]
        eval_sizes[eval_set] = len(rows)
    eval_ngrams, index = ngram_index(eval_prompts, args.ngram)

    os.makedirs(args.out_dir, exist_ok=True)
    report = {"ngram": args.ngram, "threshold": args.threshold, "contaminated_fraction": CONTAMINATED_FRACTION,
              "eval_set_sizes": eval_sizes, "train": {}}
    for path, name in zip(args.train, names):
        with open(path, "rb") as f:  # split on b"\n" only, as common.iter_rows numbers the lines: text mode would also
            lines = f.readlines()     # split on a lone "\r" (legal JSON whitespace) and shift every later line
        kept_lines, removed_by_eval_set, eval_hits = [], defaultdict(int), defaultdict(set)
        rows = load_rows(path)
        for where, row in rows:
            hits = sorted({hit for turn in prompt_turns(row, where)
                           for hit in overlapped(turn, eval_ngrams, index, args.ngram, args.threshold)})
            for eval_set in sorted({eval_set for eval_set, _ in hits}):
                removed_by_eval_set[eval_set] += 1  # a row overlapping two eval sets counts under both
            for eval_set, i in hits:
                eval_hits[eval_set].add(i)
            if not hits:
                kept_lines.append(lines[int(where.rsplit(":", 1)[1]) - 1])  # where = "file:line"
        with open(os.path.join(args.out_dir, name), "wb") as f:
            f.writelines(kept_lines)
        report["train"][name] = {
            "rows": len(rows), "removed": len(rows) - len(kept_lines), "kept": len(kept_lines),
            "removed_by_eval_set": {eval_set: removed_by_eval_set[eval_set] for eval_set in EVAL_SETS},
            "eval_instances_overlapped": {eval_set: len(eval_hits[eval_set]) for eval_set in EVAL_SETS},
            "contaminated": {eval_set: len(eval_hits[eval_set]) > CONTAMINATED_FRACTION * eval_sizes[eval_set]
                             for eval_set in EVAL_SETS}}
    with open(os.path.join(args.out_dir, "decontamination.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")

    w = max(len("training file"), *map(len, report["train"])) + 2  # column width of the file names
    print(f"{'training file':<{w}}{'eval set':<14}{'rows':>6}{'removed':>9}{'eval overlapped':>18}  verdict (> 2%)")
    for name, counts in report["train"].items():
        for eval_set, size in eval_sizes.items():
            overlapped_count = counts["eval_instances_overlapped"][eval_set]
            print(f"{name:<{w}}{eval_set:<14}{counts['rows']:>6}{counts['removed_by_eval_set'][eval_set]:>9}"
                  f"{f'{overlapped_count}/{size}':>12} {overlapped_count / max(size, 1):>5.1%}  "
                  f"{'CONTAMINATED' if counts['contaminated'][eval_set] else 'clean'}")
        print(f"{name:<{w}}{'(any)':<14}{counts['rows']:>6}{counts['removed']:>9}   -> kept {counts['kept']}")
    print(f"wrote {args.out_dir}/ ({time.time() - t0:.1f}s)")
