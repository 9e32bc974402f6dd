"""Build DeepSpeed's `deepspeed_shm_comm` op once, where the DeepSpeed tests and launches look for it.

DeepSpeed's CPU accelerator JIT-compiles this C++ op (g++ and ninja, 80-130 s) when its communication backend
starts, in every process that has not got it built: without a build done once, each launch would pay for it.
The op goes to TORCH_EXTENSIONS_DIR, by default `<venv>/torch_extensions` (`make install` runs this script; the
tests set the same folder). Run it with the venv's `bin` first on PATH: the build records which ninja it used.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # noqa: E402

if __name__ == "__main__":
    ShareMemCommBuilder().load(verbose=False)
    print(f"deepspeed_shm_comm ready in {os.environ['TORCH_EXTENSIONS_DIR']}")
