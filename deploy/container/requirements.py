"""Build stage of the image: split pyproject.toml's runtime dependencies into torch.txt (torch and torchvision,
installed first from the variant's wheel index) and requirements.txt (the rest), with the project's own
version ranges, so the image installs what `pip install .` would and the two layers stay cached until the
dependencies change. Standard library only (it runs before anything is installed)."""

import re
import sys
import tomllib
from pathlib import Path


def split(pyproject: Path) -> tuple[list[str], list[str]]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    torch = [d for d in deps if re.match(r"(torch|torchvision)\b(?![-_.\w])", d)]
    names = sorted(re.match(r"[\w.-]+", d).group(0) for d in torch)
    if names != ["torch", "torchvision"]:
        sys.exit(f"{pyproject}: expected torch and torchvision among the dependencies, found {names}")
    return torch, [d for d in deps if d not in torch]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: requirements.py PYPROJECT OUTDIR")
    torch, rest = split(Path(sys.argv[1]))
    out = Path(sys.argv[2])
    (out / "torch.txt").write_text("\n".join(torch) + "\n")
    (out / "requirements.txt").write_text("\n".join(rest) + "\n")
