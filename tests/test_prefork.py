"""tests/prefork.py (script runs forked from a process that has imported torch) against `python script.py` and torchrun;
conftest.run_script's allowance for gloo's abort at exit."""
import os
import subprocess
import sys
import time

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
    model before a rank aborted are returned; an abort with no save is a failure. Forked ranks (the rank's status), and
    once under real torchrun (its report, "exitcode  : -6"; an environment of its own is never forked)."""
    script = tmp_path / "abort_at_exit.py"
    script.write_text(ABORT_AT_EXIT)
    for env in (SCRIPT_ENV, dict(SCRIPT_ENV, LAUNCHER="torchrun")):
        result = run_script(script, "after", nproc=2, env=env)
        assert result.returncode == 0 and "saved the model to somewhere" in result.stdout
    with pytest.raises(AssertionError, match="failed"):
        run_script(script, "before", nproc=2)


RANKS = """import os, sys, time
import torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
if sys.argv[1] == "fail":  # rank 1 fails while rank 0 works on (no collective would notice): torchrun stops rank 0
    time.sleep(300) if rank == 0 else sys.exit("error: rank 1 failed")
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
dist.destroy_process_group()  # eval.py's vLLM path: the group destroyed, then rebuilt on the launcher's store
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), 2, is_master=False)
dist.init_process_group("gloo", store=dist.PrefixStore("again", store), rank=rank, world_size=2)
dist.all_reduce(total)
# what torchrun sets, but the port and the run's id (its own each run) and two files and signals for its agent only
agent_only = ["MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE"]
added = sorted((k, v) for k, v in os.environ.items() if k not in os.environ["BASE_KEYS"].split(",") + agent_only)
os.write(1, f"{rank} {total.item()} {added}\\n".encode())  # one write: the ranks' lines do not interleave
dist.destroy_process_group()
"""


@pytest.mark.skipif(not PREFORK, reason="prefork is Linux-only, or PREFORK=0")
def test_forked_ranks_are_a_torchrun_run(tmp_path):
    """Two ranks forked from tests/prefork.py against `torchrun --standalone --nproc_per_node 2`: the same environment
    (every variable torchrun sets for its workers but its agent's own), the same rendezvous and collective; a failed
    rank fails the run, with its message in stderr, and gets the other stopped."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = dict(SCRIPT_ENV, BASE_KEYS=",".join(SCRIPT_ENV) + ",BASE_KEYS")
    for case in ("ok", "fail"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, case]
        torchrun = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        start = time.time()
        forked = run_forked([sys.executable, str(script), case], env, timeout=120, nproc=2)
        if case == "ok":
            assert torchrun.returncode == forked.returncode == 0, (torchrun.stderr, forked.stderr)
            assert sorted(forked.stdout.splitlines()) == sorted(torchrun.stdout.splitlines())
            assert [line[:6] for line in sorted(forked.stdout.splitlines())] == ["0 6.0 ", "1 6.0 "]
            assert "('RANK', '1')" in forked.stdout and "('LOCAL_WORLD_SIZE', '2')" in forked.stdout
        else:
            assert torchrun.returncode != 0 and forked.returncode == 1, forked.stderr
            assert "error: rank 1 failed" in torchrun.stderr and "error: rank 1 failed" in forked.stderr
            assert time.time() - start < 20  # rank 0 was stopped at once, not left to finish its 300 s
    assert run_forked([sys.executable, str(script), "ok"], env, nproc=2).returncode == 0  # the next run goes on
