"""Run the optimizer-step benchmark: the same as ``polyak bench``.

Usage::

    python benchmarks/run.py [--optimizers sgd,adam,adamw] [--cases small,mlp,convnet,gpt2]
        [--rounds N] [--threads N] [--quick] [--markdown] [--no-peers] [--out FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polyak.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
