"""A process that imports torch and transformers once, then forks the processes of each stage-script run.

Why: `python sft.py` spends ~3 s of this 2-core machine importing torch, transformers and Llama's modeling code before
its first line of work, and the suite starts a stage script about a hundred times. A child forked from here runs the
script as `python script.py ARGS` would: from its first line as `__main__` (runpy), with the script's directory first on
sys.path, its own working directory, environment, stdout and stderr, and leaving through the interpreter's normal exit
(a traceback or `sys.exit("message")` prints and sets the status exactly as there); only those imports are done already.
Then what common.py and the stages import from other packages (`datasets` with pandas and pyarrow, nltk, torch's
distributed checkpoint; ~1.5 s more a run). No project module is imported here, and the fork happens while this
process has a single thread (checked), so no lock or thread pool is inherited half-held. pyarrow would start one,
jemalloc's background purging thread; it is turned off here (JE_ARROW_MALLOC_CONF), which changes nothing a script
computes: arrow allocates from mimalloc by default, jemalloc's is only the pool `ARROW_DEFAULT_MEMORY_POOL` can pick.
Should a release of those packages start a thread all the same, this process starts over without them.
A run of N > 1 ranks stands in for `torchrun --standalone --nproc_per_node N script.py ARGS` (a tiny two-rank sft.py
run: ~9.5 s there, ~2.5 s here): N children, each with the environment torchrun's agent gives its workers
(torch/distributed/elastic/agent/server/local_elastic_agent.py), meeting at a TCPStore that a forked process serves as
the agent serves its own, writing to one stdout and one stderr; a failed rank gets the others stopped, as torchrun
stops them. What a fork copies, torchrun's workers draw each for itself: numpy's global random state, Python's string
hash seed (`hash()`, set order); the stage scripts use neither. tests/test_prefork.py compares both with the real
ones. tests/conftest.py's run_script uses it for runs in the suite's own environment; PREFORK=0 starts every script as
a fresh process (or torchrun) instead.

Protocol: one JSON request per line on stdin, {"argv", "cwd", "env", "path", "stdout", "stderr", "nproc"} ("stdout" and
"stderr": files to write); two lines back on stdout per request: the children's pids when they start (so that a caller
can kill them), then the exit status, negative for a signal, as subprocess reports it (of N ranks: the first failed
one's).
"""
import contextlib
import gc
import json
import os
import runpy
import signal
import socket
import sys
import time

import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import tqdm  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401  (lazy in transformers)

if len(os.listdir("/proc/self/task")) != 1:  # a thread started by an import: forking would copy its locks mid-use
    sys.exit(f"prefork: {len(os.listdir('/proc/self/task'))} threads after the imports; run with PREFORK=0")
if os.environ.get("PREFORK_DATA_IMPORTS") != "0":
    os.environ["JE_ARROW_MALLOC_CONF"] = "background_thread:false"  # read once, when pyarrow loads jemalloc
    import datasets  # noqa: F401
    import langdetect  # noqa: F401
    import nltk.tokenize.punkt  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    from datasets.arrow_writer import ArrowWriter  # noqa: F401
    if len(os.listdir("/proc/self/task")) != 1:  # another release starts a thread: start over without these (slower)
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, PREFORK_DATA_IMPORTS="0"))
# Out of the cyclic collector's sight from here on (gc.freeze's documented use before fork): a child's collections,
# and its exit's, then do not write to every imported object's header, which copied the parent's pages one by one
# (an empty script's exit: 1.2 s -> 0.35 s here). A child's own objects are collected as in any process.
gc.freeze()
requests, replies = os.fdopen(os.dup(0), "r"), os.dup(1)  # private copies: a child's stdin/stdout are its own
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)


MASTER_ADDR = socket.getfqdn()  # torchrun's: its node's address (elastic/rendezvous/api.py, RendezvousStoreInfo)


def torchrun_store():
    """A forked process serving the TCPStore that the ranks of one run meet at, as torchrun's agent serves its own
    (TORCHELASTIC_USE_AGENT_STORE=True: every rank is a client, torch/distributed/rendezvous.py); its port, which the
    OS chose, then the process to kill once the ranks are done."""
    read_end, write_end = os.pipe()
    prefork = os.getpid()
    pid = os.fork()
    if pid == 0:
        requests.close()  # not the protocol's pipes: conftest must see EOF when this process is gone
        os.close(replies)
        os.close(read_end)
        import torch.distributed as dist

        store = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
        os.write(write_end, f"{store.port}\n".encode())
        os.close(write_end)
        while os.getppid() == prefork:  # until killed, or this process is gone (no orphan serving a port forever)
            time.sleep(1)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        return int(f.readline()), pid


def run_ranks(request):
    """Fork the request's ranks and wait for them; their exit status, the first failed rank's if one failed. As
    torchrun does, a failed rank gets the others a SIGTERM, then a SIGKILL after 30 s."""
    nproc = request.get("nproc", 1)
    rank_envs, store = [request["env"]], None
    if nproc > 1:  # what torchrun --standalone --nproc_per_node N gives each worker (its local_elastic_agent.py)
        port, store = torchrun_store()
        rank_envs = [dict(request["env"], RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                          ROLE_NAME="default", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1",
                          ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR=MASTER_ADDR, MASTER_PORT=str(port),
                          TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="prefork",
                          TORCHELASTIC_USE_AGENT_STORE="True",
                          TORCH_NCCL_ASYNC_ERROR_HANDLING=request["env"].get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"))
                     for rank in range(nproc)]
    # opened here, so that the ranks share each file and its offset, as torchrun's workers share the launcher's stdout
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    outputs = [os.open(request[name], flags) for name in ("stdout", "stderr")]
    pids = []
    for env in rank_envs:
        pid = os.fork()
        if pid == 0:
            if nproc > 1:  # a group of its own, as torchrun starts each worker (start_new_session): it and the
                os.setpgid(0, 0)  # processes it starts (tokenizing workers) are stopped together
            requests.close()
            os.close(replies)
            for fd, file in zip((1, 2), outputs):
                os.dup2(file, fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(env)
            sys.argv = request["argv"]
            sys.path[:1] = request["path"]  # what `python script.py` puts first: the script's directory, PYTHONPATH
            runpy.run_path(sys.argv[0], run_name="__main__")
            sys.exit(0)  # an exception or SystemExit from the script leaves through here too: the interpreter's exit
        if nproc > 1:
            with contextlib.suppress(ProcessLookupError):  # (also here: no killpg may come before the child's own)
                os.setpgid(pid, pid)
        pids.append(pid)
    for file in outputs:
        os.close(file)
    os.write(replies, (" ".join(map(str, pids)) + "\n").encode())
    status, running, deadline = 0, set(pids), None
    while running:
        pid, wait_status = os.waitpid(-1, os.WNOHANG) if deadline else os.waitpid(-1, 0)
        if pid == 0:  # (polling: the others were told to stop)
            if time.time() > deadline:
                for other in running:
                    os.killpg(other, signal.SIGKILL)  # (only ranks of a run of several have others to stop)
                deadline = float("inf")
            time.sleep(0.05)
            continue
        if pid not in running:  # the store, gone before its time (the ranks then fail on their own)
            store = None
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0 and status == 0:
            status, deadline = code, time.time() + 30
            for other in running:
                os.killpg(other, signal.SIGTERM)
    if store:
        os.kill(store, signal.SIGKILL)
        os.waitpid(store, 0)
    return status


for line in requests:
    os.write(replies, f"{run_ranks(json.loads(line))}\n".encode())
