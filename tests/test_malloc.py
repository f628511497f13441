"""fishnet_pl.keep_freed_memory: a CPU step's large blocks come back from the heap, not from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

STEPS = """
import resource, torch, fishnet_pl
kept = fishnet_pl.keep_freed_memory()
def step():  # a step's activation-sized blocks, written, then freed
    blocks = [torch.ones(10_000_000) for _ in range(3)]  # 40 MB each: above glibc's largest mmap threshold
    del blocks
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "FISHNET_PL_MALLOC": malloc}
    result = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    kept, faults = result.stdout.split()
    return kept, int(faults)


def test_kept_memory_is_reused_without_page_faults_and_the_default_can_be_chosen():
    kept, faults = _run("keep")
    default_kept, default_faults = _run("default")
    assert (kept, default_kept) == ("True", "False")
    # glibc's default maps the 8 MB blocks in anew: ~2,000 faults per block and step (5 steps x 8 blocks).
    # Kept: none, or one block's worth now and then (this machine's kernel reclaims idle memory).
    assert default_faults > 20_000
    assert faults < default_faults / 5
