"""The CPU allocator setting: freed large buffers are reused without page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from routelab.core.cpu_allocator import _glibc, tune_cpu_allocator_from_env

# A training-step-like loop: write a 64 MiB and a 16 MiB tensor, free both, sixteen times;
# count the minor page faults (field 10 of /proc/self/stat) of the last eight rounds, once
# the heap has settled (under load the heap can take three or four rounds to settle). Run in a child so the test process keeps its malloc settings.
_CHILD = """
import json, sys, torch
from routelab.core.cpu_allocator import tune_cpu_allocator
applied = tune_cpu_allocator(sys.argv[1] == "tuned") if sys.argv[1] != "untouched" else None

def minor_faults():
    with open("/proc/self/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[7])

faults = []
for _ in range(16):
    before = minor_faults()
    big, small = torch.empty(16 * 2**20).fill_(1.0), torch.empty(4 * 2**20).fill_(1.0)
    del big, small
    faults.append(minor_faults() - before)
print(json.dumps({"applied": applied, "faults": sum(faults[8:]), "pages": 8 * 80 * 2**20 // 4096}))
"""

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="mallopt tuning exists only with glibc on Linux")


def run_child(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    tuned = run_child("tuned")
    assert tuned["applied"] is True
    # steady state is zero faults; allow one late re-fault of the 64 MiB buffer (10% of the pages)
    assert tuned["faults"] < 0.15 * tuned["pages"]


@needs_glibc
def test_system_allocator_faults_every_page_and_restoring_defaults_brings_that_back():
    untouched = run_child("untouched")
    # glibc maps every allocation above 32 MiB afresh: at least the 64 MiB tensor faults each round
    assert untouched["faults"] > 0.75 * untouched["pages"]
    restored = run_child("restored")
    assert restored["applied"] is True
    assert restored["faults"] > 0.9 * restored["pages"]


def test_environment_choice_is_checked(monkeypatch):
    monkeypatch.setenv("ROUTELAB_CPU_ALLOCATOR", "system")
    assert tune_cpu_allocator_from_env() is False
    monkeypatch.setenv("ROUTELAB_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(Exception, match="ROUTELAB_CPU_ALLOCATOR='jemalloc'.*tuned"):
        tune_cpu_allocator_from_env()
