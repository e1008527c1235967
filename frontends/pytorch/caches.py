"""torch's own cache folder kept out of ``$TMPDIR``.

transformers imports torchao where it is installed (so do the torch backend's int8 modes), and
torchao's import makes torch's inductor cache folder, ``$TMPDIR/torchinductor_<user>``, which
nothing removes: a run would leave it behind. Within :func:`torch_caches_in_scratch`,
``TORCHINDUCTOR_CACHE_DIR`` (unless the user set it) points into a scratch folder removed on
the way out; torchao reads it only as it is imported, which is what happens inside.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

#: torch's variable for the inductor cache (``torch._inductor.runtime.cache_dir_utils``).
INDUCTOR_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def torch_caches_in_scratch() -> Iterator[None]:
    """Within: torch's inductor cache in a scratch folder of this process, removed afterwards."""
    if os.environ.get(INDUCTOR_CACHE_VARIABLE):
        yield
        return
    from compressor.plugin import scratch_folder

    with scratch_folder() as folder:
        cache = str(folder / "torchinductor")
        os.environ[INDUCTOR_CACHE_VARIABLE] = cache
        try:
            yield
        finally:
            if os.environ.get(INDUCTOR_CACHE_VARIABLE) == cache:
                del os.environ[INDUCTOR_CACHE_VARIABLE]
