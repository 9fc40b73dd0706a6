"""A process that imports torch and transformers once, then forks one child per stage-script run.

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
tests/conftest.py's run_script uses it for one-process runs in the suite's own environment; PREFORK=0 starts every
script as a fresh process instead.

Protocol: one JSON request per line on stdin, {"argv", "cwd", "env", "path", "stdout", "stderr"} (the last two: files
to write); two lines back on stdout per request: the child's pid when it starts (so that a caller can kill it), then
its exit status, negative for a signal, as subprocess reports it.
"""
import gc
import json
import os
import runpy
import sys

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
for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        requests.close()
        os.close(replies)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(file, fd)
            os.close(file)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = request["argv"]
        sys.path[:1] = request["path"]  # what `python script.py` puts first: the script's directory, then PYTHONPATH
        runpy.run_path(sys.argv[0], run_name="__main__")
        sys.exit(0)  # an exception or SystemExit from the script leaves through here too: the interpreter's own exit
    os.write(replies, f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    os.write(replies, f"{os.waitstatus_to_exitcode(status)}\n".encode())
