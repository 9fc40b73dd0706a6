"""
Evaluate a chat model the Tulu 3 way on three skills, with greedy decoding:
  gsm8k    GSM8K test, 8-shot chain of thought (Wei et al. exemplars), last number vs gold
  math500  MATH-500, 4-shot Minerva format, the RLVR verifier's matching (boxed / Minerva sentence / last $..$, all right)
  ifeval   IFEval, 0-shot, Google's 25 checks, prompt- and instruction-level, strict and loose
  ifheldout  the pipeline's held-out IF-constraint prompts (data/if_heldout.jsonl, data/build_if.py), scored as ifeval

One process (vLLM when it is installed and a GPU is present, else batched HF generate):
    python eval.py --model_name_or_path out/sft --task gsm8k --task math500 --task ifeval
Data parallel on 8 GPUs (every rank loads the whole model and answers 1/8 of the prompts):
    torchrun --nproc_per_node 8 eval.py --model_name_or_path out/sft --task gsm8k --task math500 --task ifeval
Several models, one after the other, ending with one table (e.g. a checkpoint after each training stage):
    python eval.py --model_name_or_path models/SmolLM2-135M-Instruct out/sft out/dpo out/rlvr --task gsm8k --task ifeval
Score responses produced elsewhere, loading no model (one --responses per --task, same order):
    python eval.py --task ifeval --responses ifeval_responses.jsonl --output_dir out/eval

Writes <output_dir>/results.json as {task: {metric: value}} and <output_dir>/<task>_records.jsonl; with several
models, those go to <output_dir>/<model directory name>/ (numbered, k_<name>, when two names differ at most in case)
and the table to <output_dir>/table.md.
The prompts are those of Tulu 3's evaluation (OLMES's gsm8k::tulu, minerva_math::tulu, ifeval::tulu), token for token:
few-shot exemplars as chat turns (user "Question: ..." / "Problem: ... Solution:", assistant the worked answer), not one
long user message; with their stop strings and per-task token caps. Each record keeps the whole prompt as "input" and
says whether the response was cut at the token cap ("truncated", counted in results.json as "num_truncated").
"""
import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
# Before init_process_group on purpose: its functions default to `group=group.WORLD`, which, imported after init (as
# transformers does with the model), holds the group forever. destroy_process_group then cannot free it, and its gloo
# threads lived on into interpreter exit, where freeing a gather's tensors without the GIL aborted about 1 torchrun in
# 100 on CPU (SIGABRT, "terminate called without an active exception"; core: ~AsyncAllgatherWork in runLoop).
import torch.distributed.nn  # noqa: F401
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

import common
from common import gsm8k_extract, gsm8k_score, ifeval_follow, math_extract, math_normalize, math_score

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model_name_or_path", nargs="+", default=[],
                    help="HF model directories; several: each is scored, then one table compares them")
TASKS = ["gsm8k", "math500", "ifeval", "ifheldout"]
parser.add_argument("--task", action="append", required=True, choices=TASKS)
parser.add_argument("--limit", nargs="+", action="extend", default=[],
                    help="only the first N examples: N (every task) and/or TASK=N (that task), e.g. 16 ifheldout=240")
parser.add_argument("--max_new_tokens", type=int, default=None,
                    help="every task's cap; default Tulu 3's per task: GSM8K 512, MATH 1024, IFEval (and held-out) 2048")
parser.add_argument("--mixed_precision", default=None, choices=["bf16", "no"],
                    help="HF path: bf16 weights (default on CUDA) or no (fp32, default on CPU)")
parser.add_argument("--batch_size", type=int, default=32, help="prompts per HF generate call (vLLM batches itself)")
parser.add_argument("--generator", default="auto", choices=["auto", "vllm", "hf"], help="auto: vLLM if it imports and CUDA is up")
parser.add_argument("--no_prefix_cache", action="store_true", help="HF path: prefill every prompt whole (for comparison)")
parser.add_argument("--output_dir", default="out/eval")
parser.add_argument("--chat_template", default="default", choices=["default", "tulu"],
                    help="default: the tokenizer's own template; tulu: the Tulu 3 template")
parser.add_argument("--responses", action="append", help="jsonl of responses to score instead of generating")
parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
parser.add_argument("--from_hub", action="store_true", help="load the test sets with datasets.load_dataset")
args = parser.parse_args()
for flag in ("max_new_tokens", "batch_size"):  # (0 tokens fell back to the task's default; a batch of 0 failed late)
    if getattr(args, flag) is not None and getattr(args, flag) < 1:
        parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
if args.responses and args.model_name_or_path:  # one or the other: the models were silently not evaluated
    parser.error("--responses scores given responses; --model_name_or_path generates them: give one of the two")
if args.generator == "vllm" and not importlib.util.find_spec("vllm"):
    parser.error("--generator vllm: vllm does not import here (on a GPU: pip install vllm==0.32.0; or --generator hf)")
# Everything that needs only the command line is checked first, before a model or a data file is read.
tasks = args.task
if len(set(tasks)) < len(tasks):  # (dropped silently, then "give one --responses file per --task" with two files)
    sys.exit(f"error: --task {next(t for t in tasks if tasks.count(t) > 1)} given twice")
if args.responses and len(args.responses) != len(tasks):
    sys.exit("error: give one --responses file per --task, in the same order")
if not args.responses and not args.model_name_or_path:
    sys.exit("error: --model_name_or_path is required unless --responses is given")
limits = {}  # --limit as {task: N}: the task's TASK=N if given, else a bare N, else None (all examples)
for item in args.limit:
    name, _, n = item.rpartition("=")
    if name and name not in TASKS or not n.isdigit() or int(n) == 0:  # (0 examples: no score to give)
        sys.exit(f"error: --limit takes N or TASK=N with TASK one of {', '.join(TASKS)}; got {item!r}")
    if (name or None) in limits:  # the last one silently won
        sys.exit(f"error: --limit gives {name or 'N'} twice: {' '.join(args.limit)}")
    limits[name or None] = int(n)
if set(limits) - {None, *tasks}:  # (ignored before)
    sys.exit(f"error: --limit {' '.join(args.limit)} names a task this run does not --task")
limits = {task: limits.get(task, limits.get(None)) for task in tasks}
shaping = [flag for flag, given in [("--max_new_tokens", args.max_new_tokens), ("--chat_template", args.chat_template != "default"),
                                     ("--mixed_precision", args.mixed_precision), ("--no_prefix_cache", args.no_prefix_cache)] if given]
if args.responses and shaping:  # (ignored without a word before)
    print(f"warning: {', '.join(shaping)} shape generation, and do nothing here: --responses scores the given responses",
          file=sys.stderr)
tokenizers = {}  # model path -> (its tokenizer, template set; its eos and other stop ids, e.g. Llama 3's <|eot_id|>)
for model_path in args.model_name_or_path:  # every model found before the first is evaluated, not after it
    common.require_model_directory(model_path)
    try:  # (a missing name: the hub, retried for a minute, after the models before it had run)
        with contextlib.suppress(ValueError):  # a model type transformers does not know: vLLM may
            AutoConfig.from_pretrained(model_path)
        # and its template, whose turns must end where the model stops (refused halfway through the models before)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        common.set_chat_template(tokenizer, args.chat_template)
        tokenizers[model_path] = tokenizer, common.stop_token_ids(tokenizer, model_path)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {model_path}: {e}")

# ----------------------------------------------------------------------------- setup
ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun
backend = "nccl" if torch.cuda.is_available() else "gloo"
if ddp:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
engines = []  # the vLLM engines started so far (after each, torchrun's group is rebuilt under a prefix of its own)
print0 = lambda *a, **k: print(*a, **k, flush=True) if rank == 0 else None


# ----------------------------------------------------------------------------- data and prompts
DATA_FILES = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl", "ifeval": "ifeval_input_data.jsonl",
              "ifheldout": "if_heldout.jsonl"}
HUB_DATASETS = {"gsm8k": ("openai/gsm8k", "main", "test"), "math500": ("HuggingFaceH4/MATH-500", None, "test"),
                "ifeval": ("google/IFEval", None, "train")}
QUESTION_FIELD = {"gsm8k": "question", "math500": "problem", "ifeval": "prompt", "ifheldout": "prompt"}
IFEVAL_FORMAT = ("ifeval", "ifheldout")  # rows with instruction_id_list and kwargs, scored by Google's checks

# Wei et al. (2022), the 8 chain-of-thought exemplars used for GSM8K.
GSM8K_SHOTS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. So the answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers were added. 9 + 20 is 29. So the answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he had 35 - 2 = 33 golf balls. So the answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars left. 23 - 15 is 8. So the answer is 8."),
]
# Lewkowycz et al. (2022, Minerva), the 4 MATH exemplars; every answer ends with the Minerva sentence. The text is
# exactly what Tulu 3's evaluation (OLMES, fewshot source "Minerva:MATH") showed the model, its slips included (a stray
# "}" after the first problem, double spaces, "\\" line breaks written as a single backslash), so the prompts match
# token for token.
MINERVA_SHOTS = [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
     "Final Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\n"
     "Final Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
     "Final Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n"
     "$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
     "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]
# Tulu 3's evaluation regime per task (OLMES gsm8k::tulu, minerva_math::tulu, ifeval::tulu), as chat turns:
# the user turn wraps the question; GSM8K's assistant turns open with "Answer:", which also follows the generation prompt
# (the model continues after it); a response ends at eos or at the first stop string (generation stops there, and the
# response is cut before it); at most this many new tokens.
QUESTION_FORMAT = {"gsm8k": "Question: {}", "math500": "Problem:\n{}\n\nSolution:", "ifeval": "{}", "ifheldout": "{}"}
ANSWER_PREFIX = {"gsm8k": "Answer:"}
STOP_STRINGS = {"gsm8k": ["Question:", "</s>", "<|im_end|>"]}  # a model that goes on to invent the next question
MAX_NEW_TOKENS = {"gsm8k": 512, "math500": 1024, "ifeval": 2048, "ifheldout": 2048}


def load_task(task):
    if args.from_hub and task in HUB_DATASETS:  # ifheldout is ours: always the local file
        import datasets

        name, config, split = HUB_DATASETS[task]
        rows = [(f"{name}[row {i}]", row) for i, row in enumerate(datasets.load_dataset(name, config, split=split))]
    else:
        rows = common.load_rows(os.path.join(args.data_dir, DATA_FILES[task]))
    # Every field scoring reads, checked now: a missing 'answer' used to surface as a bare KeyError after generation.
    fields = {QUESTION_FIELD[task]: str, **({"instruction_id_list": list, "kwargs": list} if task in IFEVAL_FORMAT else
                                            {"answer": str})}
    for where, row in rows:
        for field, kind in fields.items():
            if not isinstance(row.get(field), kind):
                raise ValueError(f"{where}: field '{field}' must be a {kind.__name__}, got {type(row.get(field)).__name__}")
        if task in IFEVAL_FORMAT and len(row["kwargs"]) != len(row["instruction_id_list"]):
            raise ValueError(f"{where}: fields 'kwargs' and 'instruction_id_list' must be lists of the same length")
        if task in IFEVAL_FORMAT and not row["instruction_id_list"]:  # (all([]): a free point for any response)
            raise ValueError(f"{where}: field 'instruction_id_list' is empty")
        try:  # a gold or a constraint no response can meet, checked now, not after generation (or never: it scored 0)
            if task in IFEVAL_FORMAT:
                common.ifeval_follow("x", row["instruction_id_list"], row["kwargs"], row[QUESTION_FIELD[task]])
            else:
                common.ground_truth_text({"gsm8k": "gsm8k", "math500": "math"}[task], row["answer"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: field '{'kwargs' if task in IFEVAL_FORMAT else 'answer'}' {e}") from None
        if task in IFEVAL_FORMAT:  # the hub copy pads every kwargs dict with all keys set to None
            row["kwargs"] = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"]]
    if not rows:
        raise ValueError(f"{os.path.join(args.data_dir, DATA_FILES[task])}: no {task} example")
    return [row for _, row in rows]  # all of them: --limit is applied to the prompts or to the given responses


def prompt_text(tokenizer, task, example):
    """The whole prompt as the model sees it: the few-shot exemplars as chat turns, the question, the generation
    prompt, then the task's answer prefix (GSM8K: "Answer:")."""
    shots = {"gsm8k": GSM8K_SHOTS, "math500": MINERVA_SHOTS}.get(task, [])
    prefix = ANSWER_PREFIX.get(task, "")
    messages = [turn for q, a in shots for turn in ({"role": "user", "content": QUESTION_FORMAT[task].format(q)},
                                                      {"role": "assistant", "content": f"{prefix} {a}".strip()})]
    messages.append({"role": "user", "content": QUESTION_FORMAT[task].format(example[QUESTION_FIELD[task]])})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix


def read_responses(path, task, examples):
    """[(example, response, {})] in file order; each row is matched to the task's data by its question text."""
    by_question = {example[QUESTION_FIELD[task]]: example for example in reversed(examples)}  # (a repeat: the first)
    pairs = []
    for where, row in common.load_rows(path):  # errors name file and line
        # our own <task>_records.jsonl call the question "prompt": accept it so they can be re-scored
        question = row.get(QUESTION_FIELD[task], row.get("prompt"))
        if not isinstance(row.get("response"), str) or not isinstance(question, str):
            raise ValueError(f"{where}: expected an object with a string '{QUESTION_FIELD[task]}' and a string 'response'")
        if question not in by_question:
            raise ValueError(f"{where}: {QUESTION_FIELD[task]} not found in the {task} data: {str(question)[:80]!r}")
        # (a question may be answered several times: several samples of one prompt are each scored)
        pairs.append((by_question[question], row["response"], {}))  # (no prompt text, no "truncated": not generated here)
    pairs = pairs[:limits[task]]
    if not pairs:  # (no score to give: an accuracy of 0 over 0 examples was reported)
        raise ValueError(f"{path}: no response")
    answered = len({id(example) for example, _, _ in pairs})
    if answered < len(by_question) and limits[task] is None:
        print0(f"warning: {path} answers {answered} of the {len(by_question)} {task} questions; scored on those")
    return pairs


try:  # a bad row: its file, line and field, not a traceback
    examples = {task: load_task(task) for task in tasks}
    # responses generated elsewhere, scored in place of a model's: no tokenizer, no model
    given_pairs = {task: read_responses(path, task, examples[task]) for task, path in zip(tasks, args.responses or [])}
except (ValueError, OSError) as e:  # (OSError: a missing or unreadable file, a traceback before)
    sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- generation
def generate(model_path):
    """Greedy responses of one model to every example -> ({task: [(example, response, {"truncated": cut at the token
    cap, "input": prompt text})]}, seconds, generated tokens).
    Every rank answers a strided share of the prompts; every rank returns all of them."""
    tokenizer, eos_ids = tokenizers[model_path]
    # All tasks go through one generation pass (better batches); jobs[i] = (task, example).
    jobs = [(task, example) for task in tasks for example in examples[task][:limits[task]]]
    # The template decides BOS and the rest, so the tokenizer must not add special tokens again.
    prompts = [prompt_text(tokenizer, task, example) for task, example in jobs]
    prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in prompts]
    max_new = [args.max_new_tokens or MAX_NEW_TOKENS[task] for task, _ in jobs]
    mine = list(range(rank, len(jobs), world_size))  # strided, so every rank gets a mix of lengths
    done = {}  # job index -> (response text, number of generated tokens, whether it ran to the cap)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process (as external_launcher wants)
    try:
        import vllm
    except ImportError:
        vllm = None
    start = time.time()
    if args.generator == "vllm" or (args.generator == "auto" and vllm is not None and torch.cuda.is_available()):
        # Each rank is its own engine (tensor_parallel_size=1) on its own GPU, in this process (external_launcher, tested
        # against tests/fake_vllm only). The executor reads the torchrun variables even in one process
        # (vllm/v1/executor/uniproc_executor.py:186-197) and joins torch's default process group: one process makes a
        # group of one first, as rlvr.py does, so vLLM never rendezvous on MASTER_PORT.
        for key, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500).items():
            os.environ.setdefault(key, str(value))
        if not ddp:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        llm = vllm.LLM(model=model_path, seed=0, distributed_executor_backend="external_launcher")
        engines.append(model_path)
        params = [vllm.SamplingParams(temperature=0, max_tokens=max_new[i], stop_token_ids=eos_ids,
                                      stop=STOP_STRINGS.get(jobs[i][0])) for i in mine]
        outputs = llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in mine], params, use_tqdm=rank == 0)
        for i, out in zip(mine, outputs):  # "length": it reached max_tokens, not an eos id or a stop string
            done[i] = out.outputs[0].text, len(out.outputs[0].token_ids), out.outputs[0].finish_reason == "length"
        # Shut the engine down before the next model: `del llm` is not enough, since EngineCore.__init__ freezes the gc
        # heap (vllm/v1/engine/core.py:253), so its weights, KV cache and parallel groups can outlive it. The shutdown
        # (vllm/v1/engine/core_client.py:401 -> core.py:824-839) unfreezes the heap and runs cleanup_dist_env_and_memory:
        # destroy_model_parallel(), destroy_distributed_environment() -- which destroys torch's default process group
        # too (vllm/distributed/parallel_state.py:2506-2513) -- gc and the device cache.
        llm.llm_engine.engine_core.shutdown()
        del llm, outputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if ddp:  # the gather below and the next engine need torchrun's group back, under a prefix of its own: from the
            # old keys, a rank that gets here first would read the other ranks' last addresses (it hung so on CPU)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"after_engine{len(engines)}", store), rank=rank, world_size=world_size)
    else:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if (args.mixed_precision or ("no" if device == "cpu" else "bf16")) == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        # the KV cache's keyword: `cache` in newer transformers (5.24 warns at `past_key_values`), `past_key_values` before
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        # Batches of one task each, longest prompts first: a batch shares one few-shot prefix and little padding (a
        # batch that mixed IFEval's tail with GSM8K's head had no common prefix: its IFEval rows were padded to
        # GSM8K's ~1,000 tokens and GSM8K's exemplars prefilled row by row), and OOM shows up at once.
        orders = [sorted((i for i in mine if jobs[i][0] == task), key=lambda i: -len(prompt_ids[i])) for task in tasks]
        batches = [order[b:b + args.batch_size] for order in orders for b in range(0, len(order), args.batch_size)]
        for batch in tqdm(batches, desc=f"generate {model_path}", disable=rank != 0):
            # The few-shot exemplars (~1,000 tokens for GSM8K) are the same in every prompt of a task: run that shared
            # prefix once, copy its KV cache to every row, and feed only the rest: [prefix | padding | question].
            # The padding sits mid-row, masked out; positions come from the mask, so the questions continue at the
            # prefix's end. Same greedy tokens as without the cache (tested), a fraction of the prefill compute.
            width, shared = max(len(prompt_ids[i]) for i in batch), 0
            # Not where padding mid-row (below) would change an answer: a sliding window counts its slots (a question
            # would see fewer real tokens than alone), and a Mamba / linear-attention layer runs its state through it
            prefix_cache = not args.no_prefix_cache and not common.packing_problem(model, width + max_new[batch[0]])
            while prefix_cache and all(len(prompt_ids[i]) > shared + 1 and
                                       prompt_ids[i][shared] == prompt_ids[batch[0]][shared] for i in batch):
                shared += 1
            # the rest of each prompt, left-padded, so that every prompt ends where generation starts
            rests = [(prompt_ids[i][shared:], width - len(prompt_ids[i])) for i in batch]
            step_ids = torch.tensor([[pad_id] * pad + rest for rest, pad in rests], device=device)  # (B, width - shared)
            mask = torch.tensor([[1] * shared + [0] * pad + [1] * len(rest) for rest, pad in rests], device=device)  # (B, width)
            with torch.no_grad():
                cache = DynamicCache(config=model.config)
                if shared:
                    model(input_ids=torch.tensor([prompt_ids[batch[0]][:shared]], device=device), **{cache_name: cache},
                          use_cache=True, logits_to_keep=1)  # only the cache is kept: no (shared, V) logits
                    cache.batch_repeat_interleave(len(batch))
                # Greedy decoding written out, so that a finished row leaves the batch: model.generate computes every
                # row until the longest ends, and most answers are short (held-out IF: ~40 of 96 tokens), so on CPU
                # most of its work went to rows already done. The same forward calls, positions (from the mask, as
                # transformers' _prepare_position_ids_for_generation) and argmax as its greedy search: the same tokens (tested).
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, shared:]  # (B, width - shared)
                live, new = list(range(len(batch))), [[] for _ in batch]
                ended = set()  # the rows that stopped at an eos id or a stop string; the others ran to the cap
                cap, stops = max_new[batch[0]], STOP_STRINGS.get(jobs[batch[0]][0], [])  # a batch is one task
                for _ in range(cap):
                    next_ids = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **{cache_name: cache},
                                     use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)  # (live rows,)
                    keep = []
                    for k, (row, token) in enumerate(zip(live, next_ids.tolist())):
                        new[row].append(token)
                        # a stop string this token completed lies within the last 16 tokens: the longest is 10
                        # characters, and a token is at least one (the full text is cut at scoring, as ever)
                        tail = tokenizer.decode(new[row][-16:], skip_special_tokens=True) if stops else ""
                        if token in eos_ids or any(stop in tail for stop in stops):
                            ended.add(row)
                        elif len(new[row]) < cap:
                            keep.append(k)
                    if not keep:
                        break
                    if len(keep) < len(live):  # drop the finished rows from the cache, the mask and the batch
                        index = torch.tensor(keep, device=device)
                        cache.batch_select_indices(index)
                        mask, next_ids, positions, live = mask[index], next_ids[index], positions[index], [live[k] for k in keep]
                    mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # one column more per step
                    step_ids, positions = next_ids[:, None], positions[:, -1:] + 1  # (live, 1) each
            for row, i in enumerate(batch):  # a row's eos, if it has one, is its last token (and counts as generated)
                text = tokenizer.decode(new[row][:-1] if new[row][-1] in eos_ids else new[row], skip_special_tokens=True)
                done[i] = text, len(new[row]), row not in ended
    if ddp:  # everyone's answers to every rank (only rank 0 uses them)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, done)
        done = {i: answer for part in gathered for i, answer in part.items()}
    pairs = {task: [] for task in tasks}
    for i, (task, example) in enumerate(jobs):
        text, _, truncated = done[i]
        pairs[task].append((example, text, {"truncated": truncated, "input": prompts[i]}))
    return pairs, time.time() - start, sum(count for _, count, _ in done.values())


# ----------------------------------------------------------------------------- scoring
def stderr(values):
    """Standard error of the mean of per-item scores: the SAMPLE standard deviation (n - 1 in the denominator, as
    lm-evaluation-harness computes it) / sqrt(n). None below 2 items, where it is undefined."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def score(pairs, output_dir):
    """Score every (example, response, generation's record fields) with common.verify's rules (IFEval: Google's), the
    response cut at the task's first stop string; write <task>_records.jsonl and results.json to output_dir; return
    ({task: {metric: value}}, {task: [per-prompt score of the headline metric]})."""
    os.makedirs(output_dir, exist_ok=True)
    results, scores = {}, {}  # scores: the headline metric prompt by prompt (ifeval: prompt-level loose, = "score")
    for task in tasks:
        records = []
        for example, response, generated in tqdm(pairs[task], desc=f"score {task}", leave=False):
            for stop in STOP_STRINGS.get(task, []):  # cut at the first stop string, as generation stops there (a
                response = response.split(stop)[0]   # response given with --responses is scored as if it had)
            record = {"prompt": example[QUESTION_FIELD[task]], "response": response, **generated}
            if task == "gsm8k":
                record.update(gold=example["answer"].split("####")[-1].strip(), extracted=gsm8k_extract(response),
                              score=gsm8k_score(response, example["answer"]))
            elif task == "math500":
                record.update(gold=example["answer"], extracted=[math_normalize(c) for c in math_extract(response)],
                              score=math_score(response, example["answer"], example["problem"]))
            else:
                call = (response, example["instruction_id_list"], example["kwargs"], example["prompt"])
                strict, loose = ifeval_follow(*call, loose=False), ifeval_follow(*call, loose=True)
                # score = prompt-level loose, the IFEval number Tulu 3 reports
                record.update(follow_instruction_list_strict=strict, follow_instruction_list_loose=loose,
                              score=float(all(loose)))
            records.append(record)
        with open(os.path.join(output_dir, f"{task}_records.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        scores[task] = [r["score"] for r in records]
        # every accuracy is a mean of 0/1 scores, reported with its standard error as <metric>_stderr
        per_item = {"accuracy": scores[task]}
        if task in IFEVAL_FORMAT:
            per_item = {}
            for level in ("strict", "loose"):
                follows = [r[f"follow_instruction_list_{level}"] for r in records]
                per_item[f"prompt_level_{level}_acc"] = [float(all(f)) for f in follows]
                # instruction level: a mean over instructions, whose stderr treats them as independent (those of one
                # prompt are not quite, so it is a little optimistic)
                per_item[f"inst_level_{level}_acc"] = [float(x) for f in follows for x in f]
        results[task] = {"num_examples": len(records)}
        if not args.responses:  # the responses cut at the token cap: unfinished, not (or not only) wrong
            results[task]["num_truncated"] = sum(r["truncated"] for r in records)
        for metric, values in per_item.items():
            results[task][metric] = sum(values) / max(len(values), 1)
            results[task][f"{metric}_stderr"] = stderr(values)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results, scores


# ----------------------------------------------------------------------------- one model after the other
# One model writes to --output_dir; several write to --output_dir/<name>/ and end with a table comparing them.
paths = args.model_name_or_path or [None]  # None: the given responses
bases = [os.path.basename(os.path.normpath(path)) if path else "responses" for path in paths]
folded = [base.casefold() for base in bases]  # (on macOS and Windows "SFT/" and "sft/" are one directory)
names = [base if folded.count(folded[k]) == 1 else f"{k}_{base}" for k, base in enumerate(bases)]
if len({name.casefold() for name in names}) < len(names):  # a model named "1_sft" beside two "sft": it and the second
    names = [f"{k}_{base}" for k, base in enumerate(bases)]  # wrote to one directory
table, per_prompt, table_path = {}, {}, os.path.join(args.output_dir, "table.md")
# What this run writes. An earlier run's outputs that it would not rewrite (a task or a model it does not run: results
# and records here and in its models' directories, the table) would stand beside its own as if they were this run's,
# and deleting them lost generations (re-scoring one task in place deleted another's records): refused, as is writing
# over the --responses file it scores. Nothing is deleted. (Rank 0's view, which writes them, stops every rank.)
run_dirs = [args.output_dir] if len(paths) == 1 else [os.path.join(args.output_dir, name) for name in names]
writes = {os.path.realpath(os.path.join(d, f)) for d in run_dirs for f in ["results.json"] + [f"{t}_records.jsonl" for t in tasks]}
writes |= {os.path.realpath(table_path)} if len(paths) > 1 else set()
earlier = [table_path] if os.path.isfile(table_path) else []
for directory in [args.output_dir] + ([e.path for e in os.scandir(args.output_dir) if e.is_dir()] if os.path.isdir(args.output_dir) else []):
    records = [path for task in TASKS if os.path.isfile(path := os.path.join(directory, f"{task}_records.jsonl"))]
    earlier += records + [path for path in [os.path.join(directory, "results.json")] * bool(records) if os.path.isfile(path)]
stale = [path for path in earlier if os.path.realpath(path) not in writes]
overwritten = [path for path in args.responses or [] if os.path.realpath(path) in writes]
refusal = [None]
if rank == 0 and stale:
    refusal = [f"--output_dir {args.output_dir} holds an earlier run's outputs that this run would not rewrite "
               f"({', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}), which would stand beside its own: choose "
               "another --output_dir, or move them"]
elif rank == 0 and overwritten:
    refusal = [f"--responses {overwritten[0]} is where this run writes its records: choose another --output_dir"]
if ddp:
    dist.broadcast_object_list(refusal, 0)
if refusal[0]:
    raise SystemExit(f"error: {refusal[0]}")
for name, model_path, output_dir in zip(names, paths, run_dirs):  # (where the refusal above looked)
    pairs, elapsed, generated_tokens = (given_pairs, None, None) if model_path is None else generate(model_path)
    if rank != 0:
        continue
    table[name], per_prompt[name] = score(pairs, output_dir)
    print0(f"{model_path or 'responses'}\n{'task':<10}{'metric':<26}{'value':>8}  stderr")
    for task, metrics in table[name].items():
        for metric in [m for m in metrics if not m.endswith("_stderr")]:  # each with its stderr beside it
            value, se = metrics[metric], metrics.get(f"{metric}_stderr")
            print0(f"{task:<10}{metric:<26}" + (f"{value:>8.4f}" if isinstance(value, float) else f"{value:>8}") +
                   ("" if metric.startswith("num_") else f"  {se:.4f}" if se is not None else "  n/a"))
    if elapsed is not None:
        n_prompts = sum(len(p) for p in pairs.values())
        print0(f"generation: {n_prompts} prompts, {generated_tokens} tokens in {elapsed:.1f}s "
               f"({n_prompts / elapsed:.2f} prompts/s, {generated_tokens / elapsed:.1f} generated tokens/s)")
    print0(f"wrote {os.path.join(output_dir, 'results.json')}")

if rank == 0 and len(paths) > 1:  # the headline number of each task, as Tulu 3 reports it: accuracy / prompt-level loose
    headline = {"gsm8k": ("GSM8K", "accuracy"), "math500": ("MATH-500", "accuracy"), "ifeval": ("IFEval", "prompt_level_loose_acc"),
                "ifheldout": ("IF held-out", "prompt_level_loose_acc")}
    n = {task: table[names[0]][task]["num_examples"] for task in tasks}
    lines = ["| model | " + " | ".join(f"{headline[t][0]} ({n[t]})" for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    points = lambda x: "n/a" if x is None else f"{100 * x:.1f}"

    def cell(k, task):
        """Score ± stderr; below the first row also (gain over the row above ± PAIRED stderr). Pairing: both models
        answered the same prompts, so the stderr of the gain is that of the per-prompt differences, std(diff) / sqrt(n),
        usually well below the two stderrs combined (a prompt easy for one model tends to be easy for the next)."""
        metric = headline[task][1]
        text = f"{points(table[names[k]][task][metric])} ± {points(table[names[k]][task][metric + '_stderr'])}"
        if k == 0:
            return text
        diffs = [b - a for a, b in zip(per_prompt[names[k - 1]][task], per_prompt[names[k]][task])]
        return text + f" ({100 * sum(diffs) / len(diffs):+.1f} ± {points(stderr(diffs))})"

    lines += [f"| {name} | " + " | ".join(cell(k, t) for t in tasks) + " |" for k, name in enumerate(names)]
    lines += ["", "Points: score ± standard error (sample std / sqrt(n)); in parentheses the gain over the row above ± "
              "its paired standard error (std of the per-prompt differences / sqrt(n)).", "",
              "Models: " + "; ".join(f"{name} = {path}" for name, path in zip(names, paths)) + "."]
    with open(table_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print0("\n" + "\n".join(lines) + f"\nwrote {table_path}")
if ddp:  # rank 0 scores while the others wait, as at the end of sft.py
    dist.barrier()
    dist.destroy_process_group()
