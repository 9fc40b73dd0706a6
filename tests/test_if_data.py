"""The pipeline's IF data (data/build_if.py, data/build_dpo_if.py) holds what README claims of it: every SFT answer
follows its constraints by both verifiers, every DPO pair is ordered by the verifier, and the held-out prompts are
held out (new topics, new wordings, no training prompt linked to one by the Tulu 8-gram rule)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
import common  # noqa: E402
import decontaminate  # noqa: E402
from conftest import run_script  # noqa: E402


def rows(name):
    return [row for _, row in common.load_rows(os.path.join(ROOT, "data", name))]


def user_turns(row):
    return decontaminate.prompt_turns(row, "test")


def test_sft_answers_follow_their_constraints_by_both_verifiers():
    sft = rows("if_sft.jsonl")
    assert len(sft) >= 128
    for row in sft:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert all(common.ifeval_follow(answer, row["instruction_id_list"], row["kwargs"], prompt)), row
        assert common.ifeval_rlvr_score(answer, row["ground_truth"]) == 1.0, row
    # and the checks are not vacuous: the same answers fail a constraint they were not written for (most of them)
    capital = sum(common.ifeval_follow(r["messages"][1]["content"], ["change_case:english_capital"], [{}], "")[0] for r in sft)
    assert capital == 0


def test_dpo_pairs_are_ordered_by_the_verifier():
    truth = {row["messages"][-1]["content"]: row["ground_truth"] for row in rows("if_rlvr.jsonl")}
    pairs = rows("dpo_if.jsonl")
    assert len(pairs) >= 48
    for pair in pairs:
        gt = truth[pair["prompt"]]  # every pair is on an RLVR training prompt
        chosen, rejected = (common.ifeval_rlvr_score(pair[side][-1]["content"], gt, pair["prompt"])  # (as rlvr.py: with the prompt)
                            for side in ("chosen", "rejected"))
        assert (chosen, rejected) == (pair["chosen_score"], pair["rejected_score"]) and chosen > rejected


def test_heldout_prompts_are_held_out():
    heldout = rows("if_heldout.jsonl")
    assert len(heldout) >= 200
    for row in heldout:  # eval.py scores them with Google's checks: every id and kwarg must be valid
        common.ifeval_follow("x", row["instruction_id_list"], row["kwargs"], row["prompt"])
    import build_if

    train_text = "\n".join(turn for name in ("if_sft.jsonl", "if_rlvr.jsonl", "dpo_if.jsonl")
                           for r in rows(name) for turn in user_turns(r))
    for topic in build_if.HELDOUT_TOPICS:  # no held-out topic in any training prompt
        assert f" {topic}." not in train_text and f" {topic} " not in train_text, topic
    # the Tulu rule (data/decontaminate.py) links no training prompt to a held-out prompt
    eval_ngrams, index = decontaminate.ngram_index({i: r["prompt"] for i, r in enumerate(heldout)}, 8)
    for name in ("if_sft.jsonl", "if_rlvr.jsonl", "dpo_if.jsonl"):
        for row in rows(name):
            for turn in user_turns(row):
                assert not decontaminate.overlapped(turn, eval_ngrams, index, 8, 0.5), (name, turn)
    # ... while the rule does link a held-out prompt to a copy of itself with another topic (it can fail)
    copy = heldout[0]["prompt"].replace(heldout[0]["prompt"].split(" about ")[-1].split(".")[0], "kittens")
    assert decontaminate.overlapped(copy, eval_ngrams, index, 8, 0.5)


@pytest.mark.parametrize("limit", [["3"], ["ifheldout=3"], ["1", "ifheldout=3"]])
def test_eval_scores_ifheldout_responses(tmp_path, limit):
    heldout = rows("if_heldout.jsonl")[:3]
    responses = tmp_path / "responses.jsonl"
    # one fixed response to every prompt: its scores must be Google's loose checks of it, prompt by prompt
    responses.write_text("".join(json.dumps({"prompt": r["prompt"], "response": "OK, FINE."}) + "\n" for r in heldout))
    out = tmp_path / "eval"
    result = run_script("eval.py", "--task", "ifheldout", "--responses", str(responses), "--output_dir", str(out),
                        "--limit", *limit, check=False)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "ifheldout_records.jsonl").read_text().splitlines()]
    assert len(records) == 3
    expected = [float(all(common.ifeval_follow("OK, FINE.", r["instruction_id_list"], r["kwargs"], r["prompt"], loose=True)))
                for r in heldout]
    assert [r["score"] for r in records] == expected
    results = json.loads((out / "results.json").read_text())["ifheldout"]
    assert results["num_examples"] == 3 and results["prompt_level_loose_acc"] == sum(expected) / 3


def test_eval_rejects_a_bad_limit(tmp_path):
    result = run_script("eval.py", "--task", "ifheldout", "--responses", str(tmp_path / "x.jsonl"), "--limit", "ifevl=3", check=False)
    assert result.returncode != 0 and "TASK=N" in result.stderr
