"""Child process for the benchmark: run one omnimerge merge through the public API (what ``omnimerge merge``
calls) and print its MergeReport as JSON on the last line of stdout."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
t0 = time.perf_counter()
from omnimerge.cli import import_engine  # noqa: E402

import_engine()  # as `omnimerge merge` does
from omnimerge.api import merge  # noqa: E402

t_import = time.perf_counter() - t0
recipe, out = sys.argv[1], sys.argv[2]
workers = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "0" else None
hash_inputs = sys.argv[4] if len(sys.argv) > 4 else "xxh3"  # the model card's input digests: xxh3|sha256|none
sync = not (len(sys.argv) > 5 and sys.argv[5] == "nosync")  # --no-sync: the output is not fsync'ed
rep = merge(recipe, out, overwrite=True, workers=workers, progress=False, hash_inputs=hash_inputs, sync=sync)
print(json.dumps({"seconds": rep.seconds, "import_seconds": t_import, "input_bytes": rep.input_bytes,
                  "output_bytes": rep.output_bytes, "merged": rep.merged, "copied": rep.copied}))
