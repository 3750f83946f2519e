"""The README's test command is what CI runs, verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_readme_test_command_verbatim():
    commands = _commands()
    assert len(commands) >= 2
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_main_job_command_runs_the_cli():
    main_cmd = _commands()[0]
    assert main_cmd.rstrip().endswith("vitprune-fast demo")
