"""A process that imports torch and transformers once, then forks one child per stage-script run.

Why: `python sft.py` spends ~3 s of this 2-core machine importing torch, transformers and Llama's modeling code before
its first line of work, and the suite starts a stage script about a hundred times. A child forked from here runs the
script as `python script.py ARGS` would: from its first line as `__main__` (runpy), with the script's directory first on
sys.path, its own working directory, environment, stdout and stderr, and leaving through the interpreter's normal exit
(a traceback or `sys.exit("message")` prints and sets the status exactly as there); only those imports are done already.
No project module is imported here, and the fork happens while this process has a single thread (checked), so no lock
or thread pool is inherited half-held: that leaves `datasets` out (~0.3 s), whose pyarrow starts jemalloc's thread.
tests/conftest.py's run_script uses it for one-process runs in the suite's own environment; PREFORK=0 starts every
script as a fresh process instead.

Protocol: one JSON request per line on stdin, {"argv", "cwd", "env", "path", "stdout", "stderr"} (the last two: files
to write); two lines back on stdout per request: the child's pid when it starts (so that a caller can kill it), then
its exit status, negative for a signal, as subprocess reports it.
"""
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
