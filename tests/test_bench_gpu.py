"""bench/gpu.sh runs on the CPU at toy sizes, so the GPU benchmark cannot rot while no GPU is at hand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_runs_on_the_cpu_at_tiny_sizes() -> None:
    env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^device: CPU: .+; torch ", out.stdout, re.M), out.stdout
    assert re.search(r"one 6-slice study end to end with Grad-CAM for 2 slices x 6 classes: [\d.]+ ms", out.stdout)
    assert re.search(r"CNN training [\d.]+ slices/s at 64 px", out.stdout), out.stdout


def test_gpu_bench_says_so_when_there_is_no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        return  # the message is for machines without CUDA
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device here" in out.stdout
