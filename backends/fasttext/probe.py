"""``python -m compressor_fasttext.probe MODEL``: load MODEL with fastText and exit.

Run as a child process before compressor loads a model itself, so that a file
which makes fastText abort kills only this child.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import fasttext

    try:
        fasttext.load_model(argv[0])
    except ValueError as error:
        print(str(error).strip().splitlines()[0] if str(error).strip() else "load failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
