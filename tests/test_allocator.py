"""The caching-allocator model against sequences derived by hand from CUDACachingAllocator.cpp's rules.

Each expected layout below is worked out from the rules quoted in peftplan/planning/allocator.py, not taken
from the model's output.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from peftplan.errors import PlanError
from peftplan.planning.allocator import (AllocatorConfig, CachingAllocator, OutOfMemory, allocation_size,
                                         round_size)

KiB, MiB = 2**10, 2**20
EXPANDABLE = AllocatorConfig(expandable_segments=True)


def layout(a: CachingAllocator) -> list[tuple[int, bool, list[tuple[int, bool]]]]:
    return [(s.total_size, s.is_large, list(s.blocks)) for s in a.snapshot()]


def run(sizes, config=None) -> CachingAllocator:
    a = CachingAllocator(config)
    for n in sizes:
        a.malloc(n)
    return a


def test_rounding_to_512_bytes_and_power2_divisions():
    assert [round_size(n) for n in (1, 511, 512, 513, 1000, 1024)] == [512, 512, 512, 1024, 1024, 1024]
    # roundup_power2_divisions:4 puts 5000 between 4096 and 8192 on a 1024-byte grid -> 5120
    assert round_size(5000, 4) == 5120
    assert round_size(4096, 4) == 4096
    assert round_size(1200, 4) == 1536  # below 512·divisions the 512 B rule applies


def test_segment_sizes():
    assert allocation_size(512) == 2 * MiB  # small pool: 2 MiB segments
    assert allocation_size(MiB) == 2 * MiB  # 1 MiB is still "small"
    assert allocation_size(MiB + 512) == 20 * MiB  # 1..10 MiB share a 20 MiB segment
    assert allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB  # ≥ 10 MiB: its own segment, rounded to 2 MiB
    assert allocation_size(11 * MiB + 1) == 12 * MiB


@pytest.mark.parametrize("config", [None, EXPANDABLE], ids=["segments", "expandable"])
def test_issue_example_1k_1m_9m_11m(config):
    # 1 KiB: small pool, new 2 MiB segment, split (≥ 512 B left): [1K | 2M−1K free]
    # 1 MiB: small (≤ kSmallSize), best fit is the 2M−1K block, split: [1K | 1M | 1M−1K free]
    # 9 MiB: large, new 20 MiB segment (< 10 MiB), split (11 MiB > 1 MiB left): [9M | 11M free]
    # 11 MiB: best fit is exactly the 11 MiB remainder: no new segment
    # expandable: the same pages get mapped (one 2 MiB small page, one 20 MiB large page) and split alike
    a = run([KiB, MiB, 9 * MiB, 11 * MiB], config)
    assert layout(a) == [(2 * MiB, False, [(KiB, True), (MiB, True), (MiB - KiB, False)]),
                         (20 * MiB, True, [(9 * MiB, True), (11 * MiB, True)])]
    assert a.stats.reserved_bytes == 22 * MiB
    assert a.stats.allocated_bytes == KiB + MiB + 20 * MiB


def test_large_block_splits_only_above_1mib_remainder():
    # 19 MiB -> 20 MiB segment; 1 MiB would remain, not > kSmallSize: the whole block is handed out
    a = run([19 * MiB])
    assert layout(a) == [(20 * MiB, True, [(20 * MiB, True)])]
    assert a.stats.allocated_bytes == 20 * MiB  # torch counts the block, not the request
    # under expandable segments every block splits when ≥ 512 B remain
    b = run([19 * MiB], EXPANDABLE)
    assert layout(b) == [(20 * MiB, True, [(19 * MiB, True), (MiB, False)])]


def test_small_block_split_keeps_512_byte_remainders():
    b = run([MiB, MiB - 512])  # both small: one 2 MiB segment, 512 B left over
    assert layout(b) == [(2 * MiB, False, [(MiB, True), (MiB - 512, True), (512, False)])]


def test_best_fit_picks_the_smallest_block_that_fits():
    a = CachingAllocator()
    x, y = a.malloc(14 * MiB), a.malloc(12 * MiB)  # two segments of 14 and 12 MiB
    a.free(x), a.free(y)
    a.malloc(11 * MiB)  # 12 MiB is the tightest fit; 1 MiB left is not > 1 MiB: taken whole
    assert a.stats.reserved_bytes == 26 * MiB
    assert sorted(layout(a)) == [(12 * MiB, True, [(12 * MiB, True)]), (14 * MiB, True, [(14 * MiB, False)])]


def test_no_merging_across_segments_but_merging_inside_one():
    a = CachingAllocator()
    x, y = a.malloc(12 * MiB), a.malloc(12 * MiB)
    a.free(x), a.free(y)
    a.malloc(20 * MiB)  # 24 MiB cached, but in two segments: a new 20 MiB segment
    assert a.stats.reserved_bytes == 44 * MiB
    b = CachingAllocator()
    p, q = b.malloc(3 * MiB), b.malloc(3 * MiB)  # one 20 MiB segment: [3M | 3M | 14M free]
    b.free(p), b.free(q)  # merge back into one free 20 MiB block
    b.malloc(18 * MiB)  # served from the merged block; 2 MiB left > 1 MiB: split
    assert b.stats.reserved_bytes == 20 * MiB
    assert layout(b) == [(20 * MiB, True, [(18 * MiB, True), (2 * MiB, False)])]


def test_max_split_size():
    conf = AllocatorConfig(max_split_size_mb=64)
    a = CachingAllocator(conf)
    a.free(a.malloc(100 * MiB))  # a cached 100 MiB oversize block
    a.malloc(30 * MiB)  # smaller than max_split: may not take an oversize block -> new 30 MiB segment
    assert a.stats.reserved_bytes == 130 * MiB
    a.malloc(70 * MiB)  # oversize request: 100 ≥ 70 + 20 -> refused, new 70 MiB segment
    assert a.stats.reserved_bytes == 200 * MiB
    a.malloc(90 * MiB)  # 100 < 90 + 20: the cached block serves it, unsplit
    assert a.stats.reserved_bytes == 200 * MiB
    assert a.stats.allocated_bytes == (30 + 70 + 100) * MiB


@pytest.mark.parametrize("config,reserved", [(None, 38 * MiB), (EXPANDABLE, 40 * MiB)])
def test_expandable_segments_grow_one_segment_by_pages(config, reserved):
    # segments: 25 MiB -> its own 26 MiB segment (1 MiB left: no split); 12 MiB -> new 12 MiB segment
    # expandable: 25 MiB maps two 20 MiB pages and splits [25M | 15M free]; 12 MiB fits in the 15 MiB
    a = run([25 * MiB, 12 * MiB], config)
    assert a.stats.reserved_bytes == reserved
    assert len(a.snapshot()) == (2 if config is None else 1)


def test_expandable_segment_extends_a_free_tail():
    a = CachingAllocator(EXPANDABLE)
    x = a.malloc(15 * MiB)  # page 1: [15M | 5M free | unmapped]
    a.malloc(30 * MiB)  # the 5 MiB tail plus 25 MiB more: two more pages -> 60 MiB mapped
    assert a.stats.reserved_bytes == 60 * MiB
    assert layout(a) == [(60 * MiB, True, [(15 * MiB, True), (30 * MiB, True), (15 * MiB, False)])]
    a.free(x)
    assert layout(a)[0][2][0] == (15 * MiB, False)


def test_garbage_collection_frees_old_cached_blocks_under_a_limit():
    # limit 100 MiB, threshold 0.5: a 30 MiB block cached at call 1, a 40 MiB one at call 2; the 50 MiB
    # request (call 3) finds nothing: reserved 70 > 50 -> GC frees blocks of age ≥ mean (2, 1 -> 1.5):
    # the 30 MiB one; then a new 50 MiB segment: reserved 40 + 50
    gc = AllocatorConfig(garbage_collection_threshold=0.5, memory_limit_bytes=100 * MiB)
    a = CachingAllocator(gc)
    a.free(a.malloc(30 * MiB))
    a.free(a.malloc(40 * MiB))
    a.malloc(50 * MiB)
    assert a.stats.reserved_bytes == 90 * MiB
    # no GC: 70 + 50 > 100 fails, so every unsplit cached block is released and the malloc retried
    b = CachingAllocator(AllocatorConfig(memory_limit_bytes=100 * MiB))
    b.free(b.malloc(30 * MiB))
    b.free(b.malloc(40 * MiB))
    b.malloc(50 * MiB)
    assert b.stats.reserved_bytes == 50 * MiB and b.stats.alloc_retries == 1


def test_out_of_memory_names_reserved_but_unallocated():
    a = CachingAllocator(AllocatorConfig(memory_limit_bytes=40 * MiB))
    a.malloc(3 * MiB)  # a 20 MiB segment, split: 17 MiB cached but pinned by the live 3 MiB
    a.malloc(18 * MiB)  # new 18 MiB segment: 38 MiB reserved
    with pytest.raises(OutOfMemory, match="reserved but unallocated"):
        a.malloc(18 * MiB)  # 17 MiB cached cannot serve it; 38 + 18 > 40 even after releasing unsplit blocks


def test_streams_do_not_share_blocks():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB, stream=0))
    a.malloc(12 * MiB, stream=1)
    assert a.stats.reserved_bytes == 24 * MiB


def test_parse_alloc_conf():
    c = AllocatorConfig.parse("expandable_segments:True, max_split_size_mb:128,garbage_collection_threshold:0.6")
    assert c.expandable_segments and c.max_split_size == 128 * MiB and c.garbage_collection_threshold == 0.6
    for bad in ("max_split_size_mb:10", "expandable_segments:yes", "foo:1", "garbage_collection_threshold:2",
                "roundup_power2_divisions:3", "max_split_size_mb", "max_split_size_mb:x"):
        with pytest.raises(PlanError):
            AllocatorConfig.parse(bad)


def test_planning_modules_import_no_torch():
    code = ("import sys, peftplan.planning.allocator, peftplan.planning.replay; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
