"""The runtime imports without torch; optional libraries fail with the exact install command."""
import subprocess
import sys

import pytest

from edge_emollama.errors import MissingDependencyError
from edge_emollama.lazy import require

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


def test_the_runtime_runs_without_torch(tiny_artifacts, sample_clip, endpoints):
    """`edge-emollama run` on a file, end to end, in a process where torch and transformers cannot be imported."""
    argv = ["run", "--video", str(sample_clip), "--artifacts", str(tiny_artifacts), "--fast", "--max-windows", "2",
            "--publish", endpoints[0], "--control", endpoints[1]]
    code = BLOCK_TORCH + f"from edge_emollama.cli import main; sys.exit(main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("window ") == 2 and "stopped after 2 estimates" in result.stderr


def test_export_without_torch_names_the_install_command():
    code = BLOCK_TORCH + ("from edge_emollama.cli import main; "
                          "sys.exit(main(['export', '--preset', 'tiny', '--out', '/tmp/edge-emollama-no-torch']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert 'pip install "torch==2.13.0" -e ".[export]"' in result.stderr


def test_require_names_the_package_and_the_fix():
    with pytest.raises(MissingDependencyError, match=r"'tensorrt' is needed for TensorRT engines.*pip install tensorrt"):
        require("tensorrt")
