"""README's commands are the ones that work: CI runs exactly the test command it shows."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv &&")]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_cmds = [c for c in commands if c.endswith("python -m pytest -q -n 2 --dist loadfile tests")]
    assert len(test_cmds) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in ci


def test_readme_run_command_runs_the_demo_and_shares_the_setup():
    run_cmds = [c for c in readme_commands() if c.endswith("rlhf run configs/demo.yaml")]
    assert len(run_cmds) == 1
    setup = run_cmds[0].rsplit(" && ", 1)[0]
    test_setup = [c for c in readme_commands() if c.endswith(" tests") and "-m pytest" in c][0].rsplit(" && ", 1)[0]
    assert setup == test_setup
    assert (ROOT / "configs" / "demo.yaml").exists()
