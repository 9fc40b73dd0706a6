"""data/decontaminate.py: the Tulu 3 8-gram rule by hand, against a brute-force reference, and the script end to end."""
import importlib.util
import json
import os
import random
import re
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl

SCRIPT = os.path.join(ROOT, "data", "decontaminate.py")
spec = importlib.util.spec_from_file_location("decontaminate", SCRIPT)
decontaminate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decontaminate)


def overlaps(train_text, eval_text, n=8, threshold=0.5):
    eval_ngrams, index = decontaminate.ngram_index({"t": eval_text}, n)
    return decontaminate.overlapped(train_text, eval_ngrams, index, n, threshold) == ["t"]


def test_rule_by_hand():
    test = [f"w{i}" for i in range(30)]  # 30 distinct tokens, so shared 8-grams are exactly the ones we build
    test_prompt = " ".join(test)
    assert overlaps("Please solve: " + test_prompt.upper() + ", thanks!", test_prompt)  # verbatim: coverage 30/30
    assert not overlaps("x y " + " ".join(test[:8]) + " z", test_prompt)  # one shared 8-gram: coverage 8/30
    assert not overlaps(" ".join(test[:15]), test_prompt)  # 8 shared windows cover tokens 0-14: 15/30 = 0.5, not > 0.5
    assert overlaps(" ".join(test[:16]), test_prompt)  # tokens 0-15: 16/30 > 0.5
    # two separate shared 8-grams add up (0-7 and 20-27: 16/30), overlapping windows do not double count (0-8: 9/30)
    assert overlaps(" ".join(test[:8]) + " x " + " ".join(test[20:28]), test_prompt)
    assert not overlaps(" ".join(test[:9]) + " x " + " ".join(test[9:15]), test_prompt)
    # a test prompt of fewer than 8 tokens has no 8-gram: never matched, even when copied verbatim
    assert not overlaps("a b c d e f g h i j", "b c d e f g h")
    assert overlaps("a b c d e f g h i j", "b c d e f g h i")
    # a copy in full-width letters, or with a soft hyphen / zero-width space inside its words, is the same text
    disguised = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in test_prompt)  # (ASCII -> full width)
    assert overlaps(disguised, test_prompt) and overlaps(test_prompt.replace("w1", "w\u00ad1").replace("w2", "w2\u200b"), test_prompt)
    # the threshold and n-gram size are parameters
    assert overlaps(" ".join(test[:15]), test_prompt, threshold=0.4)
    assert overlaps(" ".join(test[:3]), " ".join(test[:5]), n=3)


def brute_force(train_prompts, eval_prompts, n, threshold):
    """All pairs, coverage as a set of positions, no index."""
    result = []
    for train_text in train_prompts:
        train_tokens = decontaminate.words(train_text)
        train_ngrams = {tuple(train_tokens[i:i + n]) for i in range(len(train_tokens) - n + 1)}
        hits = []
        for eval_id, eval_text in sorted(eval_prompts.items()):
            tokens = decontaminate.words(eval_text)
            covered = {p for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n]) in train_ngrams
                       for p in range(i, i + n)}
            if len(tokens) >= n and len(covered) / len(tokens) > threshold:
                hits.append(eval_id)
        result.append(hits)
    return result


@pytest.mark.parametrize("n,threshold", [(8, 0.5), (3, 0.5), (2, 0.3), (4, 0.8)])
def test_matches_brute_force(n, threshold):
    rng = random.Random(n)
    vocabulary = ["a", "b", "C", "d,"]  # few words, so shared n-grams and partial coverage are common

    def text():
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 24)))

    eval_prompts = {("set", i): text() for i in range(40)}
    train_prompts = [text() for _ in range(60)] + [eval_prompts[("set", i)] for i in range(5)]
    eval_ngrams, index = decontaminate.ngram_index(eval_prompts, n)
    fast = [decontaminate.overlapped(t, eval_ngrams, index, n, threshold) for t in train_prompts]
    reference = brute_force(train_prompts, eval_prompts, n, threshold)
    assert fast == reference
    assert any(fast) and not all(fast)  # both outcomes exercised


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_script_end_to_end(tmp_path):
    gsm = ["Tom has 3 apples and buys 5 more apples at the store today. How many apples does Tom have now?",
           "A train leaves the station at noon and travels 60 miles per hour for 3 hours. How far does it go?"]
    math = ["Find the value of x such that the sum of x and twice x is equal to twelve exactly."]
    ifeval = ["Write a poem about the sea. Your entire response should be in English, and in all lowercase letters.",
              "Hi there"]  # < 8 tokens: never matched
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    write_jsonl(eval_dir / "gsm8k_test.jsonl", [{"question": q, "answer": "#### 1"} for q in gsm])
    write_jsonl(eval_dir / "math500_test.jsonl", [{"problem": p, "answer": "4"} for p in math])
    write_jsonl(eval_dir / "ifeval_input_data.jsonl", [{"key": i, "prompt": p} for i, p in enumerate(ifeval)])
    heldout = "Tell me why foxes matter to people. Your reply must not contain a single comma anywhere at all."
    write_jsonl(eval_dir / "if_heldout.jsonl", [{"key": 0, "prompt": heldout}])

    def chat(user, assistant="ok"):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]

    sft_rows = [{"messages": chat(gsm[0] + " Think step by step.")},  # gsm[0] verbatim: removed
                {"messages": chat(heldout.replace("foxes", "owls"))},  # 14 of 18 if_heldout tokens in shared 8-grams: removed
                {"messages": chat("Tom has 3 apples and buys 5 more bananas.")},  # 8 of 19 tokens: kept
                {"messages": [{"role": "system", "content": gsm[1]}] + chat("Hi there")},  # system turns are no prompt
                {"messages": chat("Hello", "Write a poem about the sea. Your entire response should be in English, "
                                  "and in all lowercase letters.")}]  # the answer is no prompt: kept
    # hand-written lines (odd spacing, non-ASCII) so that "kept byte for byte" is tested, not re-serialization
    sft_lines = [json.dumps(row, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n" for row in sft_rows]
    sft_lines[2] = sft_lines[2].replace('"ok"', '"ok, café"')
    sft_path = tmp_path / "sft.jsonl"
    sft_path.write_text("".join(sft_lines[:3]) + "\n" + "".join(sft_lines[3:]), encoding="utf-8")  # a blank line too
    dpo_rows = [{"prompt": math[0], "chosen": chat(math[0]), "rejected": chat(math[0], "no")},  # removed (math)
                {"chosen": chat(gsm[1] + " " + ifeval[0]), "rejected": chat("x")},  # removed (gsm8k and ifeval)
                {"prompt": "Find the value of y.", "chosen": chat("Find the value of y."), "rejected": chat("?")}]
    dpo_path = write_jsonl(tmp_path / "dpo.jsonl", dpo_rows)
    rlvr_rows = [{"messages": chat(ifeval[0].replace("sea", "mountains")), "ground_truth": "x"},  # 12 of 18
                 {"messages": [{"role": "user", "content": "Hi there"}], "ground_truth": "y"}]
    rlvr_path = write_jsonl(tmp_path / "rlvr.jsonl", rlvr_rows)

    out_dir = tmp_path / "out"
    result = run("--train", sft_path, dpo_path, rlvr_path, "--out_dir", out_dir, "--eval_dir", eval_dir)
    assert result.returncode == 0, result.stderr
    assert (out_dir / "sft.jsonl").read_text(encoding="utf-8") == "".join(sft_lines[2:])
    with open(dpo_path) as f:
        assert (out_dir / "dpo.jsonl").read_text() == f.readlines()[2]
    with open(rlvr_path) as f:
        assert (out_dir / "rlvr.jsonl").read_text() == f.readlines()[1]
    report = json.loads((out_dir / "decontamination.json").read_text())
    assert report["eval_set_sizes"] == {"gsm8k_test": 2, "math500_test": 1, "ifeval": 2, "if_heldout": 1}
    sft, dpo, rlvr = (report["train"][name] for name in ("sft.jsonl", "dpo.jsonl", "rlvr.jsonl"))
    assert (sft["rows"], sft["removed"], sft["kept"]) == (5, 2, 3)
    assert sft["removed_by_eval_set"] == {"gsm8k_test": 1, "math500_test": 0, "ifeval": 0, "if_heldout": 1}
    assert (dpo["rows"], dpo["removed"], dpo["kept"]) == (3, 2, 1)
    assert dpo["removed_by_eval_set"] == {"gsm8k_test": 1, "math500_test": 1, "ifeval": 1, "if_heldout": 0}
    assert dpo["eval_instances_overlapped"] == {"gsm8k_test": 1, "math500_test": 1, "ifeval": 1, "if_heldout": 0}
    assert dpo["contaminated"] == {"gsm8k_test": True, "math500_test": True, "ifeval": True, "if_heldout": False}  # 1/2, 1/1, 1/2 > 2%
    assert (rlvr["rows"], rlvr["removed"], rlvr["removed_by_eval_set"]["ifeval"]) == (2, 1, 1)
    assert sft["contaminated"]["ifeval"] is False and "CONTAMINATED" in result.stdout

    # idempotent: cleaning the cleaned files removes nothing and writes the same bytes
    again = run("--train", *(out_dir / name for name in ("sft.jsonl", "dpo.jsonl", "rlvr.jsonl")),
                "--out_dir", tmp_path / "again", "--eval_dir", eval_dir)
    assert again.returncode == 0, again.stderr
    for name in ("sft.jsonl", "dpo.jsonl", "rlvr.jsonl"):
        assert (tmp_path / "again" / name).read_bytes() == (out_dir / name).read_bytes()
    counts = json.loads((tmp_path / "again" / "decontamination.json").read_text())["train"]
    assert [c["removed"] for c in counts.values()] == [0, 0, 0]


def test_lines_turns_and_the_two_percent_bar(tmp_path):
    """Lines are the stages' lines (split on b"\\n" only: a lone "\\r" inside a row, legal JSON whitespace, used to
    shift every later line, so that a contaminated row was written and the last clean one lost), kept byte for byte
    (CRLF too); each user turn is a prompt of its own (as open-instruct indexes them), a DPO row's string `prompt` does
    not hide the earlier user turns of `chosen`; overlapped eval instances are counted once, and "more than 2%" is strict."""
    words = [f"w{i}" for i in range(16)]
    eval_prompts = [" ".join(words)] + [f"another prompt number {i} with enough words in it" for i in range(49)]
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    write_jsonl(eval_dir / "gsm8k_test.jsonl", [{"question": q, "answer": "#### 1"} for q in eval_prompts])  # 50
    for name, field in [("math500_test.jsonl", "problem"), ("ifeval_input_data.jsonl", "prompt"), ("if_heldout.jsonl", "prompt")]:
        write_jsonl(eval_dir / name, [{field: "nothing shared here"}])

    def chat(*users):
        return [turn for user in users for turn in ({"role": "user", "content": user}, {"role": "assistant", "content": "ok"})]

    copy = json.dumps({"messages": chat(eval_prompts[0])}).encode()
    lines = [json.dumps({"messages": chat("clean one")}).encode() + b"\r\n",
             b'{\r"messages": ' + json.dumps(chat("clean two")).encode() + b"}\n",  # a lone \r between tokens
             copy + b"\n", copy + b"\r\n", copy + b"\n",  # three copies of one eval prompt: 3 rows, 1 instance
             json.dumps({"messages": chat(" ".join(words[:8]), " ".join(words[8:]))}).encode() + b"\n",  # 8 + 8 tokens: kept
             json.dumps({"messages": chat("clean three")}).encode() + b"\n"]
    sft_path = tmp_path / "sft.jsonl"
    sft_path.write_bytes(b"".join(lines))
    dpo_rows = [{"prompt": "Now say it again.", "chosen": chat(eval_prompts[0], "Now say it again."),
                 "rejected": chat(eval_prompts[0], "Now say it again.")[:-1] + [{"role": "assistant", "content": "no"}]},
                {"prompt": eval_prompts[1], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}]  # the response alone: the prompt is `prompt`
    dpo_path = write_jsonl(tmp_path / "dpo.jsonl", dpo_rows)
    result = run("--train", sft_path, dpo_path, "--out_dir", tmp_path / "out", "--eval_dir", eval_dir)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "sft.jsonl").read_bytes() == lines[0] + lines[1] + lines[5] + lines[6]
    assert (tmp_path / "out" / "dpo.jsonl").read_bytes() == b""
    sft, dpo = (json.loads((tmp_path / "out" / "decontamination.json").read_text())["train"][name] for name in ("sft.jsonl", "dpo.jsonl"))
    assert (sft["rows"], sft["removed"], sft["eval_instances_overlapped"]["gsm8k_test"]) == (7, 3, 1)
    assert sft["contaminated"]["gsm8k_test"] is False  # 1 of 50 is 2%, not more
    assert (dpo["removed"], dpo["eval_instances_overlapped"]["gsm8k_test"], dpo["contaminated"]["gsm8k_test"]) == (2, 2, True)


def test_bad_rows_name_file_and_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"f\.jsonl:7: field 'messages\[1\]\.content' must be a string"):
        decontaminate.prompt_turns({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "f.jsonl:7")
    with pytest.raises(ValueError, match=r"f\.jsonl:2: field 'chosen' has no user turn"):
        decontaminate.prompt_turns({"chosen": [{"role": "assistant", "content": "a"}]}, "f.jsonl:2")
    # an SFT row with no user turn, which sft.py trains (it stopped the whole run): its system turns are its prompt
    system = [{"role": "system", "content": "Solve: 2 + 2"}, {"role": "assistant", "content": "4"}]
    assert decontaminate.prompt_turns({"messages": system}, "f.jsonl:3") == ["Solve: 2 + 2"]
    assert decontaminate.prompt_turns({"messages": system[1:]}, "f.jsonl:4") == []
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "fine"}]},
                                                {"text": "no prompt field here"}])
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--train", path, "--out_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}:2: no prompt found: expected field 'messages'"):
        runpy.run_path(SCRIPT, run_name="__main__")  # the script as `python data/decontaminate.py` runs it, in-process
