"""Every command a user is shown runs as written: each `python` / `torchrun` line for a stage script in README's code
blocks and in the four scripts' docstrings is accepted by that script's argparse (a renamed or dropped flag would make
the recipe commands fail on the cluster, after the job waited for its nodes)."""
import ast
import os
import re
import shlex

from conftest import ROOT, run_script

SCRIPTS = ("sft", "dpo", "rlvr", "eval")


def shown_commands():
    """(script, [args]) of every distinct stage command in README's ```bash blocks and the scripts' docstrings; lines
    continued with a backslash joined, a shell comment or `&&` ends a command; skipped: `...` (a placeholder) and a bare
    `python script.py` (its defaults: test_missing_model.py)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    texts = re.findall(r"```bash\n(.*?)```", readme, re.S)
    texts += [ast.get_docstring(ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())) for name in SCRIPTS]
    commands = []
    for text in texts:
        for line in re.sub(r"\\\n\s*", " ", text).splitlines():
            for script, rest in re.findall(r"(?:python|torchrun\b[^#&|;]*?)\s+(sft|dpo|rlvr|eval)\.py\b([^&|;#]*)", line):
                args = shlex.split(rest)
                if args and not any("..." in arg for arg in args) and (script, args) not in commands:
                    commands.append((script, args))
    return commands


def test_every_shown_command_parses(tmp_path):
    """Run to the first check after argparse: a model directory that does not exist (appended, so it replaces the
    command's), or for eval.py's --responses commands the responses file, which does not exist here either."""
    commands = shown_commands()
    assert {script for script, _ in commands} == set(SCRIPTS) and len(commands) >= 15, commands
    for script, args in commands:
        stop_early = [] if "--responses" in args else ["--model_name_or_path", tmp_path / "no_model"]
        result = run_script(f"{script}.py", *args, *stop_early, check=False, timeout=120)
        command = f"{script}.py {' '.join(args)}"
        assert result.returncode != 0 and "usage:" not in result.stderr, f"{command}\n{result.stderr[-1500:]}"
        if stop_early:
            assert "no model directory" in result.stderr, f"{command}\n{result.stderr[-1500:]}"
