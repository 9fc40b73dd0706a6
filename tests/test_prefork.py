"""tests/prefork.py (one-process script runs forked from a process that has imported torch) against `python script.py`;
conftest.run_script's allowance for gloo's abort at exit."""
import os
import subprocess
import sys

import pytest

from conftest import FAKE_VLLM, PREFORK, ROOT, SCRIPT_ENV, VLLM_ENV, run_forked, run_script

SCRIPT = """import os, sys
print(__name__, sys.argv[1:], os.getcwd(), sys.path[0], sys.path[1] == {fake!r}, os.environ.get("PYTHONPATH", ""))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "exit3":
    sys.exit(3)
if sys.argv[1] == "message":
    sys.exit("error: a message")
if sys.argv[1] == "raise":
    raise ValueError("bad row")
if sys.argv[1] == "kill":
    os.kill(os.getpid(), 9)
if sys.argv[1] == "hang":
    import time
    time.sleep(600)
"""


@pytest.mark.skipif(not PREFORK, reason="prefork is Linux-only, or PREFORK=0")
@pytest.mark.parametrize("env", [SCRIPT_ENV, VLLM_ENV], ids=["plain", "fake_vllm"])
def test_a_forked_run_is_a_python_run(tmp_path, env):
    script = tmp_path / "probe.py"  # prints its sys.path[0]: the script's directory, so `import common` works in ROOT
    script.write_text(SCRIPT.format(fake=FAKE_VLLM))
    for case, status in [("ok", 0), ("exit3", 3), ("message", 1), ("raise", 1), ("kill", -9)]:
        command = [sys.executable, str(script), case, "with space"]
        fresh = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        forked = run_forked(command, env)
        assert fresh.returncode == forked.returncode == status, (case, fresh.stderr, forked.stderr)
        assert forked.stdout == fresh.stdout and "__main__ ['%s', 'with space']" % case in forked.stdout
        assert ("True" in forked.stdout) == (env is VLLM_ENV)  # tests/fake_vllm right after the script's directory
        # stderr: the same lines, where a traceback may show prefork's and runpy's frames above the script's
        assert forked.stderr.splitlines()[0] == fresh.stderr.splitlines()[0] == "to stderr"
        assert forked.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]
    if env is VLLM_ENV:
        return
    # a run past its timeout is killed and raises, as subprocess.run's; the next run goes on as before
    for run in (lambda c: subprocess.run(c, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3),
                lambda c: run_forked(c, env, timeout=3)):
        with pytest.raises(subprocess.TimeoutExpired) as timeout:
            run([sys.executable, str(script), "hang"])
        assert b"__main__ ['hang']" in timeout.value.stdout  # what it wrote before (bytes, in subprocess's exception)
    assert run_forked([sys.executable, str(script), "ok"], env).returncode == 0


ABORT_AT_EXIT = """import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
if sys.argv[1] == "after" and rank == 0:
    print("saved the model to somewhere", flush=True)
dist.barrier()
dist.destroy_process_group()
if rank == 1:  # what a std::thread torn down at exit prints, then SIGABRT
    print("terminate called without an active exception", file=sys.stderr, flush=True)
    os.abort()
"""


def test_an_abort_at_exit_counts_only_after_the_model_was_saved(tmp_path):
    """run_script's allowance for gloo's abort at interpreter exit (see conftest): the outputs of a run that saved its
    model before a rank aborted are returned; an abort with no save is a failure."""
    script = tmp_path / "abort_at_exit.py"
    script.write_text(ABORT_AT_EXIT)
    result = run_script(script, "after", nproc=2)
    assert result.returncode == 0 and "saved the model to somewhere" in result.stdout
    with pytest.raises(AssertionError, match="failed"):
        run_script(script, "before", nproc=2)
