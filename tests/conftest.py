"""Shared fixtures: a tiny random-init Llama with the real SmolLM2 tokenizer, and a helper to run the stage scripts."""
import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer")  # SmolLM2-135M-Instruct's, Apache-2.0


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Llama (hidden 64, grouped-query attention, tied embeddings) saved as an ordinary HF directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def conversation(i):
    """A small multi-turn conversation, different for every i (so packing and shuffling are exercised)."""
    return [{"role": "system", "content": "You add numbers."} if i % 3 == 0 else None,
            {"role": "user", "content": f"What is {i} + {2 * i}?"},
            {"role": "assistant", "content": f"{i} + {2 * i} = {3 * i}." + " Indeed." * (i % 4)},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"Doubled, it is {6 * i}."}]


def cycle_model(tiny_model, path):
    """The tiny model's copy at `path` whose weights cycle through " The answer is 7.\nQuestion:" forever (from any
    token outside the cycle, e.g. GSM8K's "Answer:", into its first); -> the cycle's token ids."""
    import shutil
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cycle = tokenizer(" The answer is 7.\nQuestion:", add_special_tokens=False).input_ids
    assert len(set(cycle)) == len(cycle) < 63  # one hidden dimension per token of the cycle, one for the way in
    config = LlamaConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # the next token depends on the last one only: attention and MLP add nothing to the residual
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight  # (V, 64) each
        embed.zero_(), head.zero_()
        embed[:, 63], head[cycle[0], 63] = 1, 5  # from any token outside the cycle into it
        for i, token in enumerate(cycle):  # and round it: token i -> token i + 1 -> ... -> token 0
            embed[token, i], head[cycle[(i + 1) % len(cycle)], i] = 4, 20
    shutil.copytree(tiny_model, path)
    model.save_pretrained(path)
    return cycle


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    rows = [{"messages": [m for m in conversation(i) if m]} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


# One thread per process: the test machine is small and shared, and several processes train at once.
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                  PYTHONFAULTHANDLER="1")  # a crash prints every thread's Python stack
# The same, with tests/fake_vllm (a CPU stand-in of vLLM 0.32's offline API) importable as `vllm`
FAKE_VLLM = os.path.join(ROOT, "tests", "fake_vllm")
VLLM_ENV = dict(SCRIPT_ENV, PYTHONPATH=os.pathsep.join([FAKE_VLLM] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


# Script runs fork from tests/prefork.py, which has imported torch and transformers once (~3 s a one-process run less,
# ~7 s a two-rank one; read its docstring); PREFORK=0 starts each as a fresh `python script.py` or torchrun. Linux only
# (it forks, and counts its threads).
PREFORK = os.environ.get("PREFORK", "1") != "0" and sys.platform == "linux"
prefork = None  # the forking process, started at the first run


def run_forked(command, env, timeout=None, nproc=1):
    """`subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)`, with
    command = [python, script, *args], run by children of tests/prefork.py: one, or nproc ranks with the environment
    torchrun --standalone gives its workers (returning the first failed rank's status, where torchrun exits 1)."""
    global prefork
    if prefork is None:
        prefork = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "prefork.py")], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=SCRIPT_ENV, cwd=ROOT)
        atexit.register(prefork.kill)
    # what env's PYTHONPATH adds to prefork.py's (tests/fake_vllm), after the script's directory as in `python script.py`
    inherited = SCRIPT_ENV.get("PYTHONPATH", "").split(os.pathsep)
    path = [os.path.dirname(command[1])] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in inherited]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        prefork.stdin.write(json.dumps(dict(argv=command[1:], cwd=ROOT, env=env, stdout=out, stderr=err, path=path,
                                            nproc=nproc)) + "\n")
        prefork.stdin.flush()
        pids = reply()
        status = reply(timeout)
        if status is None:  # still running after `timeout` seconds
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # a rank that had exited: prefork reaped it
                    (os.killpg if nproc > 1 else os.kill)(pid, signal.SIGKILL)  # a rank with its own workers
            reply()  # its status, -9
            with open(out, "rb") as stdout, open(err, "rb") as stderr:  # bytes, as subprocess.run gives them here
                raise subprocess.TimeoutExpired(command, timeout, stdout.read(), stderr.read())
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(command, status[0], stdout.read(), stderr.read())


def reply(timeout=None):
    """prefork.py's next line as a list of ints, or None after `timeout` seconds. Read a byte at a time from the pipe
    itself, so that no line waits in a buffer that select() cannot see."""
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([prefork.stdout], [], [], timeout)[0]:
            return None
        byte = os.read(prefork.stdout.fileno(), 1)
        if not byte:
            raise RuntimeError(f"tests/prefork.py exited ({prefork.wait()}); PREFORK=0 runs the suite without it")
        line += byte
    return [int(word) for word in line.split()]


def run_script(script, *args, nproc=1, check=True, env=None, timeout=None):
    """Run a stage script as a user would: `python script.py` for one process, torchrun for more (one node; the
    several-node launch is spelled out in test_sft.py's test_two_nodes_match_one_process), or as tests/prefork.py
    stands in for them."""
    env = env or SCRIPT_ENV
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    # forked only in the environment prefork.py started with (tests/fake_vllm on the path aside: a path, not an import;
    # a sitecustomize.py there would have to run at the interpreter's start)
    added = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if PREFORK and {**env, "PYTHONPATH": ""} == {**SCRIPT_ENV, "PYTHONPATH": ""} and \
            not any(os.path.exists(os.path.join(p, "sitecustomize.py")) for p in added):
        result = run_forked(command, env, timeout, nproc)
    else:
        if nproc > 1:
            command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    saved = "saved the model to" in result.stdout
    if nproc > 1 and result.returncode != 0 and saved and aborted_at_exit(result.stderr, result.returncode):
        print(f"{script}: a rank aborted at exit after the run had saved its model; its outputs are checked as they are:\n"
              f"{readable(result.stderr)[-3000:]}")
        result.returncode = 0
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{readable(result.stderr)[-8000:]}")
    return result


def aborted_at_exit(launcher_output, returncode=None):
    """Did a torchrun rank abort (SIGABRT) at interpreter exit? That is after the final barrier, so after every output
    was written: the sharded model keeps the gloo process group, and its threads, alive past destroy_process_group
    (README, FSDP2; DTensor's caches hold its device mesh), and they race interpreter teardown (pytorch/pytorch#179291).
    Rare, but twice in a row in one CI run (2026-12-06) and once here (a rerun then found the first run's reference
    cache, and a test of that cache failed): a rerun is no remedy, it meets the first run's side effects. The run's
    outputs are what a test checks; the exit status is reported instead of failing it."""
    aborted = "exitcode  : -6" in launcher_output or returncode == -6  # torchrun's report; or a forked rank's status
    return aborted and "terminate called without an active exception" in launcher_output


def readable(stderr):
    """A crash report without faulthandler's one-line list of ~170 extension modules, which would push the thread
    stacks (the part that says where it died) out of the tail that a failure message shows."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
