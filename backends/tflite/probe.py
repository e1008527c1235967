"""Open a ``.tflite`` with the TFLite interpreter in a child process and print its inputs.

The interpreter trusts the flatbuffer: a signature naming a subgraph that does
not exist, for one, crashes it with SIGSEGV. compressor opens every input
``.tflite`` here first (:func:`compressor_tflite.loading.probe_inputs`), so a
crash ends this child and becomes a one-line error, not the end of the run.
Prints the inputs as JSON on stdout, or one line on stderr and exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from compressor.plugin import CompressorError
    from compressor_tflite.loading import session_inputs

    path = Path(argv[0])
    try:
        specs = session_inputs(path.read_bytes(), path)
    except CompressorError as error:
        print(error.message, file=sys.stderr)
        return 1
    print(json.dumps([spec.to_json() for spec in specs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
