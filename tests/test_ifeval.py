"""IFEval verifier: must reproduce Google's own strict/loose scoring of GPT-4's 540 responses, map every Tulu RLVR
func_name onto a check that can both pass and fail, and stay fast on a hostile 1 MB response."""
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # common.py lives at the repository root
from common import ifeval_follow, ifeval_rlvr_score  # noqa: E402


def _jsonl(path):
    with open(ROOT / path) as f:
        return [json.loads(line) for line in f]


INPUTS = {row["prompt"]: row for row in _jsonl("data/ifeval_input_data.jsonl")}
RESPONSES = {row["prompt"]: row["response"] for row in _jsonl("tests/fixtures/ifeval_gpt4_responses.jsonl")}


def test_the_data_is_googles_541_prompts():
    """The copy this project started from had 540 (key 2785 missing); eval.py's IFEval is Google's 541."""
    rows = _jsonl("data/ifeval_input_data.jsonl")
    assert len(rows) == len({row["key"] for row in rows}) == len(INPUTS) == 541
    shinto = next(row for row in rows if row["key"] == 2785)
    response = "*Torii* and *the main hall* and *offerings* at [name], [address] and [date]."
    assert ifeval_follow(response, shinto["instruction_id_list"], shinto["kwargs"], shinto["prompt"]) == [True, True]


@pytest.mark.parametrize("mode", ["strict", "loose"])
def test_reproduces_google_scoring_of_gpt4(mode):
    google = _jsonl(f"tests/fixtures/ifeval_gpt4_eval_{mode}.jsonl")
    assert len(google) == 540
    checked = 0
    for row in google:
        inp, response = INPUTS[row["prompt"]], RESPONSES[row["prompt"]]
        ours = ifeval_follow(response, inp["instruction_id_list"], inp["kwargs"], inp["prompt"], loose=mode == "loose")
        assert len(ours) == len(row["follow_instruction_list"])
        for instruction_id, kwargs, got, want in zip(inp["instruction_id_list"], inp["kwargs"], ours,
                                                     row["follow_instruction_list"]):
            if mode == "loose" and inp["key"] == 1122 and instruction_id == "keywords:letter_frequency":
                # The one entry nobody can reproduce: Google swaps a "letter" outside a-z (here "#") for a random
                # one, so its verdict is a coin flip -- True in strict, False in loose, for the same response. We
                # count "#" literally; the response has the 4 required, so it follows in both modes.
                assert kwargs["letter"] == "#" and response.count("#") == 4 and got is True and want is False
                continue
            assert got == want, (inp["key"], instruction_id, kwargs, mode)
            checked += 1
    assert checked == (832 if mode == "strict" else 831)


def test_loose_forgives_first_and_last_line_and_asterisks():
    response = 'Sure, here it is:\n"**Quoted** answer."'
    assert ifeval_follow(response, ["startend:quotation"], [{}], "p") == [False]
    assert ifeval_follow(response, ["startend:quotation"], [{}], "p", loose=True) == [True]
    end = [{"end_phrase": "Any questions?"}]
    assert ifeval_follow("Done. **Any questions?**", ["startend:end_checker"], end, "p") == [False]
    assert ifeval_follow("Done. **Any questions?**", ["startend:end_checker"], end, "p", loose=True) == [True]
    # an empty response (or one that is only whitespace) never follows anything, not even "no commas"
    assert ifeval_follow(" \n", ["punctuation:no_comma"], [{}], "p", loose=True) == [False]


def test_none_kwargs_are_ignored_and_prompt_fills_repeat():
    kwargs = {"relation": "at least", "num_words": 3, "keyword": None, "num_sentences": None}
    assert ifeval_follow("one two three", ["length_constraints:number_words"], [kwargs], "p") == [True]
    assert ifeval_follow("one two", ["length_constraints:number_words"], [kwargs], "p") == [False]
    prompt = "Repeat this request. Then answer."
    repeat_with_null = [{"prompt_to_repeat": None}]
    assert ifeval_follow(prompt + " Done.", ["combination:repeat_prompt"], repeat_with_null, prompt) == [True]
    assert ifeval_follow("Done.", ["combination:repeat_prompt"], [{}], prompt) == [False]


def test_unknown_ids_raise():
    with pytest.raises(ValueError, match="keywords:nonexistent"):
        ifeval_follow("text", ["keywords:nonexistent"], [{}], "p")
    with pytest.raises(ValueError, match="verify_nothing"):
        ifeval_rlvr_score("text", {"func_name": "verify_nothing"})
    with pytest.raises(ValueError, match="None"):
        ifeval_rlvr_score("text", {"N": 3})  # no func_name at all
    with pytest.raises(ValueError, match="num_words"):
        ifeval_follow("text", ["length_constraints:number_words"], [{"relation": "at least"}], "p")


# (ground truth, a response that follows it, a response that does not), one or more per Tulu RLVR func_name
RLVR_CASES = [
    ({"func_name": "verify_keywords", "keyword_list": ["apple", "pie"]}, "An Apple pie.", "An apple tart."),
    ({"func_name": "verify_keyword_frequency", "word": "cat", "N": 2}, "A cat saw a cat.", "A cat saw a dog."),
    ({"func_name": "validate_forbidden_words", "forbidden_words": ["bad"]}, "A fine day.", "That was Bad."),
    ({"func_name": "validate_forbidden_words", "forbidden_words": ["bad"]}, "A fine day.", "A badge."),  # substring, as the release
    ({"func_name": "verify_letter_frequency", "letter": "z", "N": 3}, "zazz is fun.", "Zazz is fun."),  # case-sensitive
    ({"func_name": "validate_response_language", "language": "de"},
     "Das ist ein kurzer Satz, der ganz sicher auf Deutsch geschrieben wurde.",
     "This is a short sentence that was certainly written in English."),
    ({"func_name": "verify_paragraph_count", "N": 2}, "First part.\n* * *\nSecond part.", "First.\n***\nSecond."),
    ({"func_name": "validate_word_constraint", "N": 5, "quantifier": "at most"}, "one two three four five",
     "one two three four five six"),
    ({"func_name": "validate_word_constraint", "N": 10, "quantifier": "around"}, "one two three four five six seven eight nine ten eleven",
     "one two three four five six seven eight nine ten eleven twelve"),  # ("w " * 11: a loop, one word repeated)
    ({"func_name": "validate_word_constraint", "N": 3, "quantifier": "at least"}, "one two three", "one two"),
    ({"func_name": "verify_sentence_constraint", "N": 2, "quantifier": "at least"}, "It rains. It pours.",
     "It rains."),
    ({"func_name": "validate_paragraphs", "N": 2, "i": 2, "first_word": "Second"}, "First one.\n\nSecond one.",
     "First one.\n\nThird one."),
    ({"func_name": "validate_paragraphs", "N": 2, "i": 2, "first_word": "The"}, "A.\n\nThe end.", "A.\n\nTherefore."),
    ({"func_name": "verify_postscript", "postscript_marker": "P.S."}, "Hi.\n\nP.S. Bye.", "Hi. PS Bye."),
    ({"func_name": "validate_placeholders", "N": 2}, "Dear [name], at [address].", "Dear [name]."),
    ({"func_name": "verify_bullet_points", "N": 2}, "Intro\n* one\n- two", "* one\n* two\n* three"),
    ({"func_name": "validate_title"}, "<<An Ode>>\nRoses are red.", "An Ode\nRoses are red."),
    ({"func_name": "validate_choice", "options": ["My answer is yes.", "My answer is no."]}, "My answer is no.",
     "My answer is maybe."),
    ({"func_name": "validate_choice", "options": "('My answer is yes.', 'My answer is no.')"}, "My answer is yes.",
     "Yes."),
    ({"func_name": "validate_highlighted_sections", "N": 2}, "*one* and *two*", "*one* and * *"),
    ({"func_name": "validate_sections", "N": 2, "section_splitter": "Section"}, "Section 1\nA\nSection 2\nB",
     "Section 1\nA\nsection two\nB"),
    ({"func_name": "validate_json_format"}, '```json\n{"a": [1, 2]}\n```', 'Here: {"a": [1, 2]}'),  # fences, as Google
    ({"func_name": "validate_repeat_prompt", "original_prompt": "Say hi."}, "Say hi. Hi!", "say hi. Hi!"),
    ({"func_name": "validate_two_responses"}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ({"func_name": "validate_uppercase"}, "THIS IS AN ENGLISH SENTENCE WRITTEN ENTIRELY IN CAPITAL LETTERS.",
     "This is an English sentence that is not in capital letters."),
    ({"func_name": "validate_lowercase"}, "this is an english sentence written entirely in lowercase letters.",
     "This is an English sentence that is not in lowercase letters."),
    ({"func_name": "validate_frequency_capital_words", "N": 2, "quantifier": "at least"}, "NASA and ESA flew.",
     "Nasa flew."),
    ({"func_name": "validate_end", "end_phrase": "Any questions?"}, "Done. Any questions?", "Any questions? Done."),
    ({"func_name": "validate_quotation"}, '"Quoted."', "Quoted."),
    ({"func_name": "validate_no_commas"}, "No commas here.", "Commas, here."),
]
RLVR_FUNC_NAMES = {
    "verify_keywords", "verify_keyword_frequency", "validate_forbidden_words", "verify_letter_frequency",
    "validate_response_language", "verify_paragraph_count", "validate_word_constraint", "verify_sentence_constraint",
    "validate_paragraphs", "verify_postscript", "validate_placeholders", "verify_bullet_points", "validate_title",
    "validate_choice", "validate_highlighted_sections", "validate_sections", "validate_json_format",
    "validate_repeat_prompt", "validate_two_responses", "validate_uppercase", "validate_lowercase",
    "validate_frequency_capital_words", "validate_end", "validate_quotation", "validate_no_commas",
}


def test_rlvr_cases_cover_every_func_name():
    assert len(RLVR_FUNC_NAMES) == 25 and {gt["func_name"] for gt, _, _ in RLVR_CASES} == RLVR_FUNC_NAMES


@pytest.mark.parametrize("ground_truth,follows,breaks", RLVR_CASES, ids=[gt["func_name"] for gt, _, _ in RLVR_CASES])
def test_rlvr_func_name(ground_truth, follows, breaks):
    assert ifeval_rlvr_score(follows, ground_truth) == 1.0
    assert ifeval_rlvr_score(breaks, ground_truth) == 0.0
    assert ifeval_rlvr_score(follows, json.dumps(ground_truth)) == 1.0  # the JSON string form of the dataset


def test_rlvr_ground_truth_forms():
    # Tulu's dataset spells out every kwarg of every function, unused ones as null
    unused = dict.fromkeys(["N", "quantifier", "end_phrase", "word", "forbidden_words", "letter", "i", "first_word",
                            "postscript_marker", "options", "section_splitter", "original_prompt", "language"])
    ground_truth = json.dumps(unused | {"func_name": "verify_keywords", "keyword_list": ["apple"]})
    assert ifeval_rlvr_score("An apple.", ground_truth) == 1.0
    # several constraints score the fraction followed
    both = [{"func_name": "verify_keywords", "keyword_list": ["apple"]}, {"func_name": "validate_no_commas"}]
    assert ifeval_rlvr_score("An apple, a pear.", both) == 0.5
    assert ifeval_rlvr_score("An apple, a pear.", json.dumps(both)) == 0.5
    assert ifeval_rlvr_score("An apple.", json.dumps([json.dumps(c) for c in both])) == 1.0
    assert ifeval_rlvr_score("", both) == 0.0


def _adversarial_responses(size=1_000_000):
    # shapes that are quadratic (or worse) for naive regexes, or costly per sentence for the tokenizers
    pieces = ["\n", " \n", "[", "<<", "<", "*", "*a", "a@", "A. ", "p. ", '"', "'", "-", "{[", "Section 1", "```"]
    mixed = "".join(p * (size // len(pieces) // len(p)) for p in pieces)
    tiny_sentences = "".join(f"A{i}? " for i in range(size // 8))  # distinct, each costing both tokenizers
    return {"mixed": mixed, "tiny_sentences": tiny_sentences, "one_line_of_brackets": "[<" * (size // 2)}


def test_huge_adversarial_response_is_scored_quickly():
    one_of_each = {}
    for inp in INPUTS.values():
        for instruction_id, kwargs in zip(inp["instruction_id_list"], inp["kwargs"]):
            one_of_each.setdefault(instruction_id, kwargs)
    assert len(one_of_each) == 25
    for name, response in _adversarial_responses().items():
        for run in ("strict", "loose", "rlvr"):  # each well under a second on a laptop; CPU time, so a busy machine does not fail it
            start = time.process_time()
            if run == "rlvr":
                for ground_truth, _, _ in RLVR_CASES:
                    ifeval_rlvr_score(response, ground_truth)
            else:
                ifeval_follow(response, list(one_of_each), list(one_of_each.values()), "p", loose=run == "loose")
            assert time.process_time() - start < 5, (name, run)
