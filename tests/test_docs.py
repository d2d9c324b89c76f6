"""The docs' runnable example does what the docs say it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_example_prints_what_docs_api_md_says():
    text = (ROOT / "docs" / "api.md").read_text()
    example = text[text.index("## Example"):]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", example, flags=re.S)[:2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed
