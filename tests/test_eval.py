"""eval.py end to end: scoring given responses, and generating with a tiny random Llama on CPU."""
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
from conftest import SCRIPT_ENV, VLLM_ENV, cycle_model, run_script  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run_eval(*args, launcher=None):
    if launcher is None:  # `python eval.py ...`
        return run_script("eval.py", *args, check=False, timeout=600)
    return subprocess.run(launcher + [str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=SCRIPT_ENV)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ----------------------------------------------------------------------------- --responses

def test_responses_gsm8k_and_math(tmp_path):
    gsm = read_jsonl(ROOT / "data" / "gsm8k_test.jsonl")[:2]
    math = read_jsonl(ROOT / "data" / "math500_test.jsonl")[:2]
    gold0, gold1 = (g["answer"].split("#### ")[-1] for g in gsm)
    write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": gsm[0]["question"], "response": f"So she makes {gold0} dollars."},  # right
        {"question": gsm[1]["question"], "response": "It takes 99 bolts."},  # wrong
        {"question": gsm[0]["question"], "response": "The answer is 7."},  # a repeated prompt, wrong this time
    ])
    write_jsonl(tmp_path / "math.jsonl", [
        {"problem": math[0]["problem"], "response": math[0]["solution"]},  # right
        {"problem": math[1]["problem"], "response": "Final Answer: The final answer is $p+q$. I hope it is correct."},
    ])
    out = tmp_path / "out"
    proc = run_eval("--task", "gsm8k", "--task", "math500", "--responses", tmp_path / "gsm.jsonl",
                    "--responses", tmp_path / "math.jsonl", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["gsm8k"]["accuracy"] == pytest.approx(1 / 3)
    assert results["math500"]["accuracy"] == pytest.approx(1 / 2)
    # standard error of the mean: sample std / sqrt(n); [1, 0, 0] -> 1/3, [1, 0] -> 1/2
    assert results["gsm8k"]["accuracy_stderr"] == pytest.approx(statistics.stdev([1, 0, 0]) / 3 ** 0.5)
    assert results["gsm8k"]["accuracy_stderr"] == pytest.approx(1 / 3)
    assert results["math500"]["accuracy_stderr"] == pytest.approx(1 / 2)
    records = read_jsonl(out / "gsm8k_records.jsonl")
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0]  # file order, the repeat included
    assert [r["extracted"] for r in records] == [gold0, "99", "7"]
    assert records[0]["prompt"] == gsm[0]["question"]
    # given responses: whether they were cut at a cap is not known here, so neither is said
    assert all("truncated" not in r for r in records) and "num_truncated" not in results["gsm8k"]
    math_records = read_jsonl(out / "math500_records.jsonl")
    assert [r["score"] for r in math_records] == [1.0, 0.0]
    assert math_records[1]["extracted"] == ["p+q"]  # the one answer it commits to
    assert "accuracy" in proc.stdout  # the summary table

    # records can be fed back in: their "prompt" field stands for the question
    again = run_eval("--task", "gsm8k", "--responses", out / "gsm8k_records.jsonl", "--output_dir", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == {"gsm8k": results["gsm8k"]}


def test_gsm8k_response_ends_at_the_first_stop_string(tmp_path):
    """Tulu 3's GSM8K stops at "Question:" (OLMES gsm8k::tulu): a model that answers, then invents the next question and
    answers that too, is scored on its own answer, not on the last number of the invented one."""
    gsm = read_jsonl(ROOT / "data" / "gsm8k_test.jsonl")[:2]
    gold0 = gsm[0]["answer"].split("#### ")[-1]
    invented = " So the answer is 7.\n\nQuestion: What is 3 + 4?\nAnswer: 3 + 4 = 7. So the answer is 7."
    write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": gsm[0]["question"], "response": f" So the answer is {gold0}.\n\nQuestion: What is 3 + 4?\nAnswer: 7."},
        {"question": gsm[1]["question"], "response": invented},  # wrong before the stop: still wrong
    ])
    proc = run_eval("--task", "gsm8k", "--responses", tmp_path / "gsm.jsonl", "--output_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "gsm8k_records.jsonl")
    assert [r["score"] for r in records] == [1.0, 0.0]
    assert [r["response"] for r in records] == [f" So the answer is {gold0}.\n\n", " So the answer is 7.\n\n"]
    assert [r["extracted"] for r in records] == [gold0, "7"]


def test_responses_errors_name_file_and_line(tmp_path):
    gsm = read_jsonl(ROOT / "data" / "gsm8k_test.jsonl")[:1]
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"question": gsm[0]["question"], "response": "18"},
                       {"question": "What is the airspeed of an unladen swallow?", "response": "11"}])
    proc = run_eval("--task", "gsm8k", "--responses", path, "--output_dir", tmp_path / "out")
    assert proc.returncode != 0 and f"{path}:2:" in proc.stderr and "not found" in proc.stderr
    write_jsonl(path, [{"question": gsm[0]["question"], "response": "18"}, "{not json"])
    proc = run_eval("--task", "gsm8k", "--responses", path, "--output_dir", tmp_path / "out")
    assert proc.returncode != 0 and f"{path}:2:" in proc.stderr and "not valid JSON" in proc.stderr
    write_jsonl(path, [{"question": gsm[0]["question"], "response": "18"}, {"question": ["a"], "response": "x"}])
    proc = run_eval("--task", "gsm8k", "--responses", path, "--output_dir", tmp_path / "out")  # (was a TypeError traceback)
    assert proc.returncode != 0 and f"{path}:2: expected an object with a string 'question'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("task, row, message", [
    ("gsm8k", {"question": "q2"}, "field 'answer' must be a str, got NoneType"),  # was a KeyError after generation
    ("gsm8k", {"question": "q2", "answer": 18}, "field 'answer' must be a str, got int"),
    ("math500", {"question": "q2", "answer": "1"}, "field 'problem' must be a str"),
    ("ifeval", {"prompt": "q2", "instruction_id_list": ["punctuation:no_comma"]}, "field 'kwargs' must be a list"),
    ("ifeval", {"prompt": "q2", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, "fields 'kwargs' and 'instruction_id_list' must be lists of the same length"),
    # golds and constraints no response can meet: they scored 0 (or failed after generation) without naming the row
    ("gsm8k", {"question": "q2", "answer": "She makes eighteen.\n#### eighteen"}, "field 'answer' has no number for the gsm8k verifier"),
    ("math500", {"problem": "q2", "answer": "#### 18"}, "field 'answer' holds '####'"),
    ("ifeval", {"prompt": "q2", "instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]}, "field 'kwargs' unknown IFEval instruction id"),
    ("ifeval", {"prompt": "q2", "instruction_id_list": ["detectable_format:number_bullet_lists"], "kwargs": [{"num_bullets": "3"}]},
     "field 'kwargs' kwarg 'num_bullets' must be a whole number >= 0, got '3'"),
    ("ifeval", {"prompt": "q2", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [1]}, "field 'kwargs' punctuation:no_comma: kwargs must be an object"),
    # no instruction: every response followed all of them (a point for "no"), over no instruction
    ("ifeval", {"prompt": "q2", "instruction_id_list": [], "kwargs": []}, "field 'instruction_id_list' is empty"),
])
def test_task_rows_missing_a_field_name_file_line_and_field(tmp_path, task, row, message):
    """A task file (--data_dir) with a row that scoring cannot read fails at load, naming file, line and field."""
    good = {"gsm8k": {"question": "q1", "answer": "#### 5"}, "math500": {"problem": "q1", "answer": "5"},
            "ifeval": {"prompt": "q1", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}}[task]
    name = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "ifeval": "ifeval_input_data.jsonl"}[task]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / name, [good, row])
    write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q1", "response": "5"}])
    proc = run_eval("--task", task, "--responses", tmp_path / "r.jsonl", "--data_dir", tmp_path / "data",
                    "--output_dir", tmp_path / "out")
    assert proc.returncode != 0 and f"{tmp_path / 'data' / name}:2: {message}" in proc.stderr, proc.stderr[-2000:]


def test_flags_that_cannot_score_are_refused(tmp_path):
    """Each ran: --limit 0 and an empty responses file reported an accuracy of 0 over 0 examples (and several models
    then died in the table), --max_new_tokens 0 fell back to the task's 2048, and models given with --responses were
    silently not evaluated."""
    gsm = read_jsonl(ROOT / "data" / "gsm8k_test.jsonl")[:1]
    write_jsonl(tmp_path / "r.jsonl", [{"question": gsm[0]["question"], "response": "18"}])
    (tmp_path / "empty.jsonl").write_text("")
    for args, message in [(["--responses", tmp_path / "r.jsonl", "--limit", "0"], "--limit takes N or TASK=N"),
                          (["--responses", tmp_path / "r.jsonl", "--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
                          (["--responses", tmp_path / "r.jsonl", "--model_name_or_path", tmp_path], "give one of the two"),
                          (["--responses", tmp_path / "empty.jsonl"], f"{tmp_path / 'empty.jsonl'}: no response"),
                          # a task given twice was dropped silently, then: "give one --responses file per --task"
                          (["--task", "gsm8k", "--responses", tmp_path / "r.jsonl", "--responses", tmp_path / "r.jsonl"],
                           "--task gsm8k given twice"),
                          # a limit for a task not run was ignored
                          (["--responses", tmp_path / "r.jsonl", "--limit", "math500=2"], "names a task this run does not"),
                          # a response that is not a string: the right message, but in a traceback
                          (["--responses", tmp_path / "null.jsonl"], "error: " + f"{tmp_path / 'null.jsonl'}:1: expected"),
                          # a missing file
                          (["--responses", tmp_path / "missing.jsonl"], f"error: {tmp_path / 'missing.jsonl'}: no such file"),
                          # the command line is checked before any model is looked for: a bad --limit was reported
                          # only after every model's config and tokenizer had loaded (a missing one reported first)
                          (["--model_name_or_path", tmp_path / "no_model", "--limit", "0"], "--limit takes N or TASK=N")]:
        write_jsonl(tmp_path / "null.jsonl", [{"question": gsm[0]["question"], "response": None}])
        proc = run_eval("--task", "gsm8k", *args, "--output_dir", tmp_path / "out")
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
    assert not (tmp_path / "out").exists()
    # flags that shape generation do nothing to given responses: said (they were ignored without a word)
    proc = run_eval("--task", "gsm8k", "--responses", tmp_path / "r.jsonl", "--max_new_tokens", 5, "--output_dir", tmp_path / "ok")
    assert proc.returncode == 0 and "warning: --max_new_tokens shape generation, and do nothing here" in proc.stderr


def test_responses_ifeval_reproduces_google_scores(tmp_path):
    fixtures = ROOT / "tests" / "fixtures"
    proc = run_eval("--task", "ifeval", "--responses", fixtures / "ifeval_gpt4_responses.jsonl",
                    "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours = read_jsonl(tmp_path / "ifeval_records.jsonl")
    for level in ("strict", "loose"):
        google = read_jsonl(fixtures / f"ifeval_gpt4_eval_{level}.jsonl")
        expected = [g["follow_instruction_list"] for g in google]
        if level == "loose":
            # The one entry nobody can reproduce: keywords:letter_frequency with letter "#", for which Google's code
            # counts a random letter instead. We count "#" literally, and the response has 4 of them (>= 4 holds).
            row = next(i for i, g in enumerate(google) if "#" in g["prompt"] and "keywords:letter_frequency" in g["instruction_id_list"])
            position = google[row]["instruction_id_list"].index("keywords:letter_frequency")
            expected[row][position] = True
        assert [r[f"follow_instruction_list_{level}"] for r in ours] == expected
    metrics = json.loads((tmp_path / "results.json").read_text())["ifeval"]
    assert set(metrics) >= {"prompt_level_strict_acc", "inst_level_strict_acc",
                            "prompt_level_loose_acc", "inst_level_loose_acc"}
    for level in ("strict", "loose"):  # every accuracy with its standard error, prompt- and instruction-level
        follows = [r[f"follow_instruction_list_{level}"] for r in ours]
        for metric, values in [(f"prompt_level_{level}_acc", [all(f) for f in follows]),
                               (f"inst_level_{level}_acc", [x for f in follows for x in f])]:
            assert metrics[metric] == pytest.approx(statistics.mean(values))
            assert metrics[f"{metric}_stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


# ----------------------------------------------------------------------------- generation with a tiny model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained here, offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    corpus = [json.loads(line)["question"] for line in open(ROOT / "data" / "gsm8k_train.jsonl")][:500]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_generate_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "out"
    wall = time.time()
    proc = run_eval("--model_name_or_path", tiny_model, "--task", "gsm8k", "--task", "math500",
                    "--limit", 5, "--max_new_tokens", 8, "--batch_size", 3, "--output_dir", out)
    wall = time.time() - wall
    assert proc.returncode == 0, proc.stderr
    # the throughput line: 10 prompts in a time shorter than the whole process took, and prompts/s consistent with it
    seconds, prompts_per_sec = map(float, re.search(r"10 prompts, \d+ tokens in ([\d.]+)s \(([\d.]+) prompts/s",
                                                    proc.stdout).groups())
    # (seconds printed to 0.1 s and prompts/s to 0.01: equal up to that rounding, whether the run took 0.3 s or 30)
    assert 0 < seconds < wall and 10 / prompts_per_sec == pytest.approx(seconds, rel=0.01, abs=0.051)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"gsm8k", "math500"}
    assert all(0.0 <= results[t]["accuracy"] <= 1.0 for t in results)
    for task, field, data in [("gsm8k", "question", "gsm8k_test.jsonl"), ("math500", "problem", "math500_test.jsonl")]:
        records = read_jsonl(out / f"{task}_records.jsonl")
        expected = [r[field] for r in read_jsonl(ROOT / "data" / data)[:5]]
        assert [r["prompt"] for r in records] == expected  # input order restored after length sorting
        assert all(isinstance(r["response"], str) and r["score"] in (0.0, 1.0) and "extracted" in r for r in records)
        assert all(isinstance(r["truncated"], bool) for r in records)
        assert results[task]["num_truncated"] == sum(r["truncated"] for r in records)
    assert "prompts/s" in proc.stdout and "generated tokens/s" in proc.stdout

    # the batched (left-padded) run answers like one prompt at a time
    single = run_eval("--model_name_or_path", tiny_model, "--task", "gsm8k", "--task", "math500",
                      "--limit", 5, "--max_new_tokens", 8, "--batch_size", 1, "--output_dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    for task in ("gsm8k", "math500"):
        batched = [r["response"] for r in read_jsonl(out / f"{task}_records.jsonl")]
        one_by_one = [r["response"] for r in read_jsonl(tmp_path / "single" / f"{task}_records.jsonl")]
        assert batched == one_by_one


def run_eval_with(generator, *args):
    """eval.py with --generator hf, or vllm against tests/fake_vllm."""
    args = [*args, "--generator", generator]
    return run_eval(*args) if generator == "hf" else run_script("eval.py", *args, env=VLLM_ENV, check=False)


@pytest.mark.parametrize("generator", ["hf", "vllm"])
def test_gsm8k_generation_stops_at_question_hf_and_vllm(tiny_model, tmp_path, generator):
    """A model that answers, then starts the next "Question:" and would go on forever (a cycle of tokens built into its
    weights) stops there on GSM8K: the response ends before the stop string and no token is generated after it, with
    the HF loop and with vLLM's `stop` (tests/fake_vllm); IFEval, which has no stop strings, runs to the cap, and its
    record says so ("truncated"), where GSM8K's, stopped by the stop string, do not."""
    path = tmp_path / "cycle_model"
    cycle = cycle_model(tiny_model, path)
    args = ["--model_name_or_path", path, "--task", "gsm8k", "--task", "ifeval", "--limit", "gsm8k=3", "ifeval=1",
            "--max_new_tokens", 40, "--output_dir", tmp_path / "out"]
    result = run_eval_with(generator, *args)
    assert result.returncode == 0, result.stderr
    gsm8k = read_jsonl(tmp_path / "out" / "gsm8k_records.jsonl")
    assert [r["response"] for r in gsm8k] == [" The answer is 7.\n"] * 3 and [r["extracted"] for r in gsm8k] == ["7"] * 3
    ifeval = read_jsonl(tmp_path / "out" / "ifeval_records.jsonl")
    assert "Question: The answer is 7.\nQuestion:" in ifeval[0]["response"]  # (its prompt ends inside the cycle)
    # 3 x the cycle (its last token completes "Question:", and counts) + IFEval's 40: not 4 x 40
    assert f"4 prompts, {3 * len(cycle) + 40} tokens in" in result.stdout
    assert [r["truncated"] for r in gsm8k] == [False] * 3 and ifeval[0]["truncated"] is True
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["gsm8k"]["num_truncated"] == 0 and results["ifeval"]["num_truncated"] == 1
    assert re.search(r"^gsm8k +num_truncated +0$", result.stdout, re.M) and re.search(r"^ifeval +num_truncated +1$", result.stdout, re.M)


@pytest.mark.parametrize("generator", ["hf", "vllm"])
def test_truncated_only_where_the_cap_cut_the_response_hf_and_vllm(tiny_model, tmp_path, generator):
    """A response that ends at an eos id is finished, even when the eos is the last token the cap allows; one token
    less and the same answer was cut: "truncated" (the old records could not tell the two apart)."""
    path = tmp_path / "cycle_model"
    cycle = cycle_model(tiny_model, path)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], cycle[2]]  # the cycle's third token ends every GSM8K answer
    (path / "generation_config.json").write_text(json.dumps(config))
    records = {}
    for cap in (40, 3, 2):  # the eos comes well before the cap, as the cap's last token, and one token too late
        result = run_eval_with(generator, "--model_name_or_path", path, "--task", "gsm8k", "--limit", 2,
                               "--max_new_tokens", cap, "--output_dir", tmp_path / f"cap{cap}")
        assert result.returncode == 0, result.stderr
        records[cap] = read_jsonl(tmp_path / f"cap{cap}" / "gsm8k_records.jsonl")
        assert json.loads((tmp_path / f"cap{cap}" / "results.json").read_text())["gsm8k"]["num_truncated"] == (2 if cap == 2 else 0)
    assert [r["truncated"] for cap in (40, 3, 2) for r in records[cap]] == [False] * 4 + [True] * 2
    assert records[40] == records[3]  # the same finished answers
    # which hold the two tokens before the stop id and not its text, which is no special token: vLLM leaves a stop
    # token out of the text all the same (vllm/v1/engine/detokenizer.py:107-113), as the HF loop does
    from transformers import AutoTokenizer
    assert [r["response"] for r in records[3]] == [AutoTokenizer.from_pretrained(path).decode(cycle[:2])] * 2
    assert all(finished["response"].startswith(cut["response"]) for finished, cut in zip(records[3], records[2]))


def test_shared_prefix_cache_changes_no_token(tiny_model, tmp_path):
    """The few-shot prefix computed once and copied to every row == every prompt prefilled whole."""
    args = ["--model_name_or_path", tiny_model, "--task", "gsm8k", "--task", "ifeval", "--limit", 5,
            "--max_new_tokens", 12, "--batch_size", 4]
    cached = run_eval(*args, "--output_dir", tmp_path / "cached")
    whole = run_eval(*args, "--no_prefix_cache", "--output_dir", tmp_path / "whole")
    assert cached.returncode == 0 and whole.returncode == 0, cached.stderr + whole.stderr
    # batches of one task each (5 + 5 prompts in batches of 4: 2 + 2, where a batch mixing the two made 3)
    assert "| 4/4 [" in cached.stderr and "/3 [" not in cached.stderr
    for task in ("gsm8k", "ifeval"):
        responses = [[r["response"] for r in read_jsonl(tmp_path / run / f"{task}_records.jsonl")] for run in ("cached", "whole")]
        assert responses[0] == responses[1] and any(responses[0])


@pytest.mark.parametrize("architecture", ["mistral", "qwen3_5_text"])
def test_shared_prefix_cache_is_left_out_where_padding_mid_row_would_change_an_answer(tmp_path, architecture):
    """A sliding window counts cache slots, padding included. The shared-prefix batch puts its padding mid-row, so
    once a row outgrew the window a question saw fewer real tokens than alone: a Mistral with a 64-token window
    answered GSM8K (~900-token prompts) otherwise batched than one prompt at a time. A linear-attention layer (Qwen 3.5)
    runs its state through the padding, and its cache cannot be copied to every row: the batch stopped with an
    AttributeError. Such batches now go without the prefix cache (left padding only, which neither sees)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from conftest import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    hybrid = {"layer_types": ["linear_attention", "full_attention"]} if architecture == "qwen3_5_text" else {}
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=64, **hybrid,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper than its random init: greedy tokens that depend on what the window holds
        for parameter in model.parameters():
            parameter.mul_(3)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    responses = {}
    for name, flags in [("batched", ["--batch_size", 6]), ("alone", ["--batch_size", 1, "--no_prefix_cache"])]:
        result = run_eval("--model_name_or_path", tmp_path / "model", "--task", "gsm8k", "--limit", 6,
                          "--max_new_tokens", 12, *flags, "--output_dir", tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        responses[name] = [r["response"] for r in read_jsonl(tmp_path / name / "gsm8k_records.jsonl")]
    assert responses["batched"] == responses["alone"] and len(set(responses["alone"])) > 1


def test_finished_rows_leave_the_batch_without_changing_a_token(tiny_model, tmp_path):
    """eval.py drops a row from the batch (cache, mask, positions) once it emits an eos. A second eos id, a token the
    random model emits now and then, makes rows stop at different steps; a batch of 8 must give every row the tokens a
    batch of 1 gives it (no row ever dropped there), and each response must be the no-eos run's, cut at that token."""
    import shutil
    from transformers import AutoTokenizer

    args = ["--task", "ifeval", "--limit", 8, "--max_new_tokens", 16]
    full = run_eval("--model_name_or_path", tiny_model, *args, "--batch_size", 8, "--output_dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    responses = [r["response"] for r in read_jsonl(tmp_path / "full" / "ifeval_records.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tokenizer(r, add_special_tokens=False).input_ids for r in responses]
    # the word piece that appears, after the first position, in the most responses: it ends them at different steps
    # (a plain word, so that re-tokenizing the decoded text gives back the id the model generated)
    candidates = {t for row in ids for t in row[1:] if re.fullmatch(r" ?[a-z]{2,}", tokenizer.decode([t]))}
    stop = max(sorted(candidates), key=lambda t: sum(t in row[1:] for row in ids))
    stopping = tmp_path / "stopping_model"
    shutil.copytree(tiny_model, stopping)
    config = json.loads((stopping / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, stop]
    (stopping / "generation_config.json").write_text(json.dumps(config))
    for batch_size in (8, 1):
        result = run_eval("--model_name_or_path", stopping, *args, "--batch_size", batch_size, "--output_dir", tmp_path / f"b{batch_size}")
        assert result.returncode == 0, result.stderr
    batched, alone = ([r["response"] for r in read_jsonl(tmp_path / f"b{b}" / "ifeval_records.jsonl")] for b in (8, 1))
    assert batched == alone
    assert all(full_response.startswith(cut) for full_response, cut in zip(responses, batched))
    assert sum(cut != full_response for full_response, cut in zip(responses, batched)) >= 2  # rows did stop early
    assert any(cut == full_response for full_response, cut in zip(responses, batched))  # and others ran on after them


def test_generate_under_torchrun_matches_single_process(tiny_model, tmp_path):
    common_args = ["--model_name_or_path", tiny_model, "--task", "gsm8k", "--limit", 5, "--max_new_tokens", 6,
                   "--batch_size", 2]
    single = run_eval(*common_args, "--output_dir", tmp_path / "single")
    assert single.returncode == 0, single.stderr
    # Each rank runs eval.py and then says whether gloo's threads outlived destroy_process_group: they did when
    # torch.distributed.nn was first imported after init (its group=group.WORLD defaults hold the group), and at
    # interpreter exit such a thread aborted about 1 run in 100 (SIGABRT).
    wrapper = tmp_path / "run_then_list_threads.py"
    wrapper.write_text("import os, runpy, sys\nsys.argv = sys.argv[1:]\nsys.path[0] = os.path.dirname(sys.argv[0])\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n"
                       "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
                       "sys.stdout.flush()\nos.write(1, f'\\ngloo threads left: {sorted(n for n in names if \"gloo\" in n)}\\n'.encode())\n")
    has_proc = os.path.isdir("/proc/self/task")  # Linux: the threads can be listed
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    multi = run_eval(*common_args, "--output_dir", tmp_path / "multi", launcher=torchrun + [str(wrapper)] * has_proc)
    assert multi.returncode == 0, multi.stderr
    if has_proc:
        assert multi.stdout.count("gloo threads left: []") == 2, multi.stdout
    one = read_jsonl(tmp_path / "single" / "gsm8k_records.jsonl")
    two = read_jsonl(tmp_path / "multi" / "gsm8k_records.jsonl")
    assert [r["prompt"] for r in two] == [r["prompt"] for r in one]
    assert [(r["response"], r["truncated"]) for r in two] == [(r["response"], r["truncated"]) for r in one]


def test_missing_chat_template_is_an_error(tiny_model, tmp_path):
    if getattr(common, "TULU_CHAT_TEMPLATE", None) is not None:
        proc = run_eval("--model_name_or_path", tiny_model, "--task", "gsm8k", "--limit", 2,
                        "--max_new_tokens", 4, "--chat_template", "tulu", "--output_dir", tmp_path)
        assert proc.returncode == 0, proc.stderr
    else:
        proc = run_eval("--model_name_or_path", tiny_model, "--task", "gsm8k", "--limit", 2,
                        "--chat_template", "tulu", "--output_dir", tmp_path)
        assert proc.returncode != 0 and "TULU_CHAT_TEMPLATE" in proc.stderr


def test_prompts_are_tulu_3s_evaluation_prompts(tiny_model, tmp_path):
    """Each record's "input" is the prompt as OLMES's Tulu regime builds it (gsm8k::tulu, minerva_math::tulu, ifeval::tulu),
    checked here turn by turn in the Tulu template: GSM8K's 8 exemplars as "Question: ..." / "Answer: ... So the answer
    is N." turns and "Answer:" after the generation prompt; MATH's 4 as "Problem:\n...\n\nSolution:" / a solution ending
    in the Minerva sentence (the first problem with OLMES's stray "}"); IFEval's prompt alone."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token
    proc = run_eval("--model_name_or_path", tiny_model, "--task", "gsm8k", "--task", "math500", "--task", "ifeval",
                    "--limit", 2, "--max_new_tokens", 2, "--chat_template", "tulu", "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr

    def turns(text):  # Tulu template -> [(role, content)] and what follows the last generation prompt
        parts = re.split(r"<\|(user|assistant)\|>\n", text)
        assert parts[0] == ""
        pairs = list(zip(parts[1::2], parts[2::2]))
        return pairs[:-1], pairs[-1]

    for record in read_jsonl(tmp_path / "gsm8k_records.jsonl"):
        shots, last = turns(record["input"])
        assert last == ("assistant", "Answer:")
        assert [role for role, _ in shots] == ["user", "assistant"] * 8 + ["user"]
        assert all(c.startswith("Question: ") and c.endswith("\n") for _, c in shots[0::2])
        assert all(re.fullmatch(rf"Answer: \S.* So the answer is \d+\.{re.escape(eos)}\n", c, re.S) for _, c in shots[1::2])
        assert shots[-1][1] == f"Question: {record['prompt']}\n"
    for record in read_jsonl(tmp_path / "math500_records.jsonl"):
        shots, last = turns(record["input"])
        assert last == ("assistant", "")
        assert [role for role, _ in shots] == ["user", "assistant"] * 4 + ["user"]
        assert all(c.startswith("Problem:\n") and c.endswith("\n\nSolution:\n") for _, c in shots[0::2])
        assert all(re.search(rf"\nFinal Answer: The final answer is \$.+\$\. I hope it is correct\.{re.escape(eos)}\n$", c)
                   for _, c in shots[1::2])
        assert shots[0][1].endswith("{\\sqrt{5-x}}$.}\n\nSolution:\n")  # OLMES's text, slip included
        assert shots[-1][1] == f"Problem:\n{record['prompt']}\n\nSolution:\n"
    for record in read_jsonl(tmp_path / "ifeval_records.jsonl"):
        assert record["input"] == f"<|user|>\n{record['prompt']}\n<|assistant|>\n"


def test_several_models_end_with_one_table(tiny_model, tmp_path):
    """Two models in one call == each model alone, and table.md carries each model's headline numbers."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    model = LlamaForCausalLM.from_pretrained(other)
    torch.manual_seed(1)
    for param in model.parameters():
        param.data.normal_(0, 0.5)
    model.save_pretrained(other)
    task_args = ["--task", "gsm8k", "--task", "ifeval", "--limit", 6, "--max_new_tokens", 8, "--batch_size", 4]
    proc = run_eval("--model_name_or_path", tiny_model, other, *task_args, "--output_dir", tmp_path / "both")
    assert proc.returncode == 0, proc.stderr
    names = [os.path.basename(os.path.normpath(tiny_model)), "other"]
    rows = (tmp_path / "both" / "table.md").read_text().splitlines()
    assert rows[0] == "| model | GSM8K (6) | IFEval (6) |"
    responses, scores = [], {}
    for name, path in zip(names, [tiny_model, other]):
        alone = run_eval("--model_name_or_path", path, *task_args, "--output_dir", tmp_path / name)
        assert alone.returncode == 0, alone.stderr
        for task in ("gsm8k", "ifeval"):
            together = read_jsonl(tmp_path / "both" / name / f"{task}_records.jsonl")
            assert together == read_jsonl(tmp_path / name / f"{task}_records.jsonl")
            responses.append([r["response"] for r in together])
            scores[name, task] = [r["score"] for r in together]
    assert responses[0] != responses[2]  # the second model really was loaded
    # each cell: score ± stderr, and below the first row (gain over the row above ± paired stderr), in points
    points = lambda x: f"{100 * x:.1f}"
    first, second = [], []
    for task, metric in [("gsm8k", "accuracy"), ("ifeval", "prompt_level_loose_acc")]:
        a, b = scores[names[0], task], scores["other", task]
        assert json.loads((tmp_path / "other" / "results.json").read_text())[task][metric] == pytest.approx(statistics.mean(b))
        first.append(f"{points(statistics.mean(a))} ± {points(statistics.stdev(a) / math.sqrt(6))}")
        diffs = [y - x for x, y in zip(a, b)]
        second.append(f"{points(statistics.mean(b))} ± {points(statistics.stdev(b) / math.sqrt(6))} "
                      f"({100 * statistics.mean(diffs):+.1f} ± {points(statistics.stdev(diffs) / math.sqrt(6))})")
    assert rows[2] == f"| {names[0]} | {first[0]} | {first[1]} |"
    assert rows[3] == f"| other | {second[0]} | {second[1]} |"
    assert rows[-1] == f"Models: {names[0]} = {tiny_model}; other = {other}."  # (a row named 0_sft said not which sft)
    # a one-model run of one task into that directory: the earlier run's outputs would stand beside its results as if
    # they were this run's (the table; the models' directories; a task it did not run): refused, and nothing deleted
    # (they were deleted, and so were generations another run had made: re-scoring one task in place lost the other's)
    before = sorted(p for p in (tmp_path / "both").rglob("*") if p.is_file())
    alone = run_eval("--model_name_or_path", other, *task_args[2:], "--output_dir", tmp_path / "both")
    assert alone.returncode != 0 and f"--output_dir {tmp_path / 'both'} holds an earlier run's outputs that this run would not " \
        f"rewrite ({tmp_path / 'both' / 'table.md'}, " in alone.stderr
    assert sorted(p for p in (tmp_path / "both").rglob("*") if p.is_file()) == before
    # the same run again rewrites its own outputs; re-scoring its records into the directory that holds them is refused
    again = run_eval("--model_name_or_path", tiny_model, other, *task_args, "--output_dir", tmp_path / "both")
    assert again.returncode == 0, again.stderr[-2000:]
    rescore = run_eval("--task", "gsm8k", "--responses", tmp_path / "other" / "gsm8k_records.jsonl", "--output_dir", tmp_path / "other")
    assert rescore.returncode != 0 and "holds an earlier run's outputs" in rescore.stderr  # (its ifeval records)
    (tmp_path / "other" / "ifeval_records.jsonl").unlink()
    rescore = run_eval("--task", "gsm8k", "--responses", tmp_path / "other" / "gsm8k_records.jsonl", "--output_dir", tmp_path / "other")
    assert rescore.returncode != 0 and "gsm8k_records.jsonl is where this run writes its records" in rescore.stderr


def test_models_whose_names_collide_each_get_a_directory(tiny_model, tmp_path):
    """x/sft, y/sft and z/1_sft were named 0_sft, 1_sft and 1_sft: the third overwrote the second's records and the
    table showed it twice. And a task's --limit given twice: the last silently won."""
    paths = [tmp_path / "x" / "sft", tmp_path / "y" / "sft", tmp_path / "z" / "1_sft"]
    for path in paths:
        path.parent.mkdir()
        path.symlink_to(tiny_model)
    proc = run_eval("--model_name_or_path", *paths, "--task", "gsm8k", "--limit", 1, "--max_new_tokens", 1,
                    "--output_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / "out" / "table.md").read_text().splitlines()[2:5]
    assert [row.split(" | ")[0] for row in rows] == ["| 0_sft", "| 1_sft", "| 2_1_sft"]
    assert all((tmp_path / "out" / name / "gsm8k_records.jsonl").exists() for name in ("0_sft", "1_sft", "2_1_sft"))
    # names that differ only in case are one directory on macOS and Windows
    (tmp_path / "w").mkdir()  # (not y/SFT: on the case-insensitive disks this is about, that is y/sft, which exists)
    (tmp_path / "w" / "SFT").symlink_to(tiny_model)
    proc = run_eval("--model_name_or_path", paths[0], tmp_path / "w" / "SFT", "--task", "gsm8k", "--limit", 1,
                    "--max_new_tokens", 1, "--output_dir", tmp_path / "cased")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "cased")) == ["0_sft", "1_SFT", "table.md"]
    for limits in (["--limit", "gsm8k=1", "gsm8k=3"], ["--limit", "gsm8k=1", "--limit", "gsm8k=3"]):
        proc = run_eval("--task", "gsm8k", "--responses", tmp_path / "r.jsonl", *limits)
        assert proc.returncode != 0 and "--limit gives gsm8k twice" in proc.stderr
