"""Start-up: `posttrain --help` and a config error answer without importing torch (or transformers)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys
sys.argv = ["posttrain", *{args!r}]
from posttrain import cli
try:
    code = cli.main()
except SystemExit as exit:
    code = exit.code
print("RESULT", code, "torch" in sys.modules, "transformers" in sys.modules)
"""


def probe(*args: str) -> tuple[str, str, str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return (*line.split()[1:], out.stderr)


@pytest.mark.parametrize("args", [("--help",), ("rl", "--help"),
                                  ("rl", "configs/demo.yaml", "rl.bogus=1"),
                                  ("rl", "configs/demo.yaml", "rl.advantage=grp"),
                                  ("dpo", "configs/demo.yaml", "dpo.loss=dp"),
                                  ("rl", "configs/missing.yaml")])
def test_help_and_config_errors_do_not_import_torch(args):
    code, torch_loaded, transformers_loaded, stderr = probe(*args)
    assert (torch_loaded, transformers_loaded) == ("False", "False"), stderr
    assert code in ("0", "2", "None"), (code, stderr)
    if args[-1] != "--help":
        assert code == "2" and len(stderr.strip().splitlines()) == 1, stderr
