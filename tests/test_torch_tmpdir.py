"""torch's own cache folder never left in ``$TMPDIR``.

transformers imports torchao (where installed) as it loads a model, and torchao's import, like
``torch.export`` and its deserializer's, makes torch's inductor cache folder
``$TMPDIR/torchinductor_<user>``, which nothing removes: compressor keeps it in scratch folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _tiny_llama(folder: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=16, intermediate_size=32, vocab_size=64,
                                      max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _fresh_environment(tmpdir: Path) -> dict[str, str]:
    """A fresh process's environment with ``tmpdir`` as its TMPDIR (torchao and torch's compiler
    not imported yet: what the folder is made by happens in that process)."""
    environment = {**os.environ, "TMPDIR": str(tmpdir), "COMPRESSOR_MIN_SECONDS": "0"}
    environment.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return environment


def test_loading_a_transformers_model_leaves_nothing_in_tmpdir(tmp_path: Path) -> None:
    folder = _tiny_llama(tmp_path / "llama")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    script = ("import os, sys\n"
              "from pathlib import Path\n"
              "from compressor_frontends.pytorch.loading import load_torch_model\n"
              "model, _ = load_torch_model(Path(sys.argv[1]), {}, trust=False)\n"
              "import torchao, torch._dynamo  # already imported: nothing new made\n"
              "print(model.module is not None, os.environ.get('TORCHINDUCTOR_CACHE_DIR'))\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], env=_fresh_environment(tmpdir),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "None"]
    assert list(tmpdir.iterdir()) == []


def test_a_torch_backend_run_leaves_nothing_in_tmpdir(tmp_path: Path) -> None:
    folder = _tiny_llama(tmp_path / "llama")  # in this process: its own torchao import makes nothing there
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    np.savez(tmp_path / "ids.npz", input_ids=np.random.default_rng(0).integers(0, 64, (2, 8)))
    done = subprocess.run([sys.executable, "-m", "compressor", "--quiet", "run", str(folder), "--backend", "torch",
                           "-q", "dynamic", "--data", str(tmp_path / "ids.npz"), "--precision", "off", "--no-cache",
                           "--max-examples", "2", "--out", str(tmp_path / "out")],
                          env=_fresh_environment(tmpdir), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "dynamic.pt2").is_file()
    assert list(tmpdir.iterdir()) == []
