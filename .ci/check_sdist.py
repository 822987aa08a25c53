"""Fail when the sdist lacks a file that git tracks under what it should carry."""

from __future__ import annotations

import subprocess
import sys
import tarfile

CARRIED = ("kqueue/", "tests/", "benchmarks/", "docs/")
TOP = {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "docker-compose.yml", "MANIFEST.in", "mkdocs.yml"}


def main(path: str) -> int:
    with tarfile.open(path) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    wanted = [f for f in tracked if f.startswith(CARRIED) or f in TOP]
    missing = [f for f in wanted if f not in names]
    for name in missing:
        print(f"{path}: missing {name}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
