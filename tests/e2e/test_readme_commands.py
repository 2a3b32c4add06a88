"""The README's operator walk-through runs as written: each command of its marked shell block,
in order, against a real gateway (the demo layout in a temporary directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from gateway.devenv import REPO, make_demo_env, start_gateway


def readme_block(marker: str, language: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- {marker}")
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def demo_gateway(tmp_path_factory):
    env = make_demo_env(tmp_path_factory.mktemp("readme"))
    gw = start_gateway(env)
    yield gw
    gw.stop()


def test_every_readme_command_runs_as_written(demo_gateway):
    gw = demo_gateway
    lines = [line for line in readme_block("readme-commands", "sh").splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) > 20
    environment = {**os.environ, "GATEWAY_TARGET": gw.target}
    outputs = {}
    for line in lines:
        command = line.replace(".venv/bin/gateway", f"{sys.executable} -m gateway")
        proc = subprocess.run(command, shell=True, cwd=gw.env.root, env=environment,
                              capture_output=True, text=True, timeout=120)
        expected = 1 if "(exit 1)" in line else 0  # the README says so where a call is denied
        assert proc.returncode == expected, f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        outputs[line.split("#")[0].strip()] = proc.stdout
    report = next(out for line, out in outputs.items() if "shadow-report" in line)
    assert "+ spiffe://demo.local/team/audit/auditor metadata demo-mlp  x1" in report
