"""PyTorch's CUDA caching allocator, rule by rule, in pure Python: what `torch.cuda.max_memory_reserved()`
would say for a given sequence of allocations and frees.

Source: `c10/cuda/CUDACachingAllocator.cpp` of pytorch/pytorch, read at commit
001074d25084fdb87a799823e395a50f5ec044d3 (the newest version of the file in the stored index; its
`DeviceCachingAllocator` is the one torch 2.x ships). The index serves the file by character offset, not by
line, so each rule below names the function of that file (`§name`) it mirrors rather than a line number.

Rules (names as in the source):
- §round_size: requests round up to 512 B (kMinBlockSize), or to a power-of-2 division when
  `roundup_power2_divisions` is set.
- §get_pool: ≤ 1 MiB (kSmallSize) goes to the small pool, the rest to the large pool.
- §get_allocation_size: a new segment is 2 MiB (kSmallBuffer) for the small pool, 20 MiB (kLargeBuffer) for
  requests < 10 MiB (kMinLargeAlloc), otherwise the request rounded up to 2 MiB (kRoundLarge).
- §get_free_block: best fit: the smallest cached free block of the pool on the same stream with size ≥ request
  (ties: lowest address, BlockComparatorSize); a block ≥ max_split_size never serves a smaller request, and a
  request ≥ max_split_size takes a cached block only if it is less than 20 MiB larger.
- §should_split: small-pool blocks (and every block under expandable segments) split when ≥ 512 B remain;
  large-pool blocks split only when the request is < max_split_size and more than 1 MiB remains.
- §alloc_found_block: the request takes the front of the block; the remainder stays cached.
- §free_block / §try_merge_blocks: a freed block merges with its free neighbours of the same segment only
  (segments are separate cudaMallocs: never merged across).
- §malloc: when no cached block fits: garbage collection (only with a memory fraction set and
  garbage_collection_threshold > 0), then a new segment; if that fails, §release_available_cached_blocks
  (oversize blocks, only with max_split_size set), retry, then §release_cached_blocks (every unsplit cached
  block), retry, else out of memory. `empty_cache()` is never called in the middle of a step.
- Expandable segments (Note [Expandable Segments], §find_expandable_block, §map_block,
  §try_allocate_expandable_block): one segment per stream and pool whose physical pages (2 MiB small, 20 MiB
  large) are mapped on demand at the lowest free address; reserved grows by whole pages.
- §garbage_collect_cached_blocks: frees unsplit cached large blocks older than the average age until reserved
  is under the threshold fraction of the allowed memory.

Options mirror `PYTORCH_CUDA_ALLOC_CONF` (`AllocatorConfig.parse`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from peftplan.errors import PlanError

MiB = 2**20
K_MIN_BLOCK_SIZE = 512  # §kMinBlockSize: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 * MiB  # §kSmallSize: largest "small" allocation
K_SMALL_BUFFER = 2 * MiB  # §kSmallBuffer: small allocations are packed in 2 MiB segments
K_LARGE_BUFFER = 20 * MiB  # §kLargeBuffer: requests between 1 and 10 MiB share 20 MiB segments
K_MIN_LARGE_ALLOC = 10 * MiB  # §kMinLargeAlloc
K_ROUND_LARGE = 2 * MiB  # §kRoundLarge: larger segments are rounded up to 2 MiB
NO_LIMIT = 2**63  # max_split_size unset (std::numeric_limits<size_t>::max())


@dataclass(frozen=True)
class AllocatorConfig:
    """The `PYTORCH_CUDA_ALLOC_CONF` options the model honours, plus the memory the allocator may use.

    memory_limit_bytes: what cudaMalloc can get (device memory minus context and other processes); None means
    unlimited (then no out-of-memory and no garbage collection is modelled). As in torch, garbage collection
    runs only under a memory limit (torch: `set_per_process_memory_fraction`).
    """

    max_split_size_mb: int | None = None
    expandable_segments: bool = False
    garbage_collection_threshold: float = 0.0
    roundup_power2_divisions: int = 0
    memory_limit_bytes: int | None = None

    @property
    def max_split_size(self) -> int:
        return NO_LIMIT if self.max_split_size_mb is None else self.max_split_size_mb * MiB

    @classmethod
    def parse(cls, conf: str, memory_limit_bytes: int | None = None) -> AllocatorConfig:
        """Parse a `PYTORCH_CUDA_ALLOC_CONF` string ("expandable_segments:True,max_split_size_mb:128").

        Raises PlanError on an unknown key or a bad value (torch's CUDAAllocatorConfig limits: max_split_size_mb
        > 20, 0 < garbage_collection_threshold < 1, roundup_power2_divisions a power of 2).
        """
        kw: dict = {"memory_limit_bytes": memory_limit_bytes}
        for item in filter(None, (s.strip() for s in conf.split(","))):
            key, sep, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if not sep:
                raise PlanError(f"allocator option '{item}' is not key:value")
            try:
                if key == "max_split_size_mb":
                    mb = int(value)
                    if mb <= K_LARGE_BUFFER // MiB:
                        raise PlanError(f"max_split_size_mb must be > {K_LARGE_BUFFER // MiB}, got {mb}")
                    kw[key] = mb
                elif key == "expandable_segments":
                    if value not in ("True", "False"):
                        raise PlanError(f"expandable_segments must be True or False, got '{value}'")
                    kw[key] = value == "True"
                elif key == "garbage_collection_threshold":
                    t = float(value)
                    if not 0 < t < 1:
                        raise PlanError(f"garbage_collection_threshold must be in (0, 1), got {t}")
                    kw[key] = t
                elif key == "roundup_power2_divisions":
                    d = int(value)
                    if d != 0 and d & (d - 1):
                        raise PlanError(f"roundup_power2_divisions must be a power of 2, got {d}")
                    kw[key] = d
                else:
                    raise PlanError(f"unknown allocator option '{key}' (known: max_split_size_mb, "
                                    "expandable_segments, garbage_collection_threshold, roundup_power2_divisions)")
            except ValueError as e:
                if isinstance(e, PlanError):
                    raise
                raise PlanError(f"allocator option {key}: bad value '{value}'") from None
        return cls(**kw)


class OutOfMemory(PlanError):
    """The modelled allocator could not satisfy a request under `memory_limit_bytes`."""


def round_size(size: int, divisions: int = 0) -> int:
    """§round_size: bytes a request of `size` bytes occupies in a block."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)  # §roundup_power2_next_division
        step = floor // divisions
        if step == 0:
            return floor << 1
        low = size & ~(step - 1)
        return size if low == size else low + step
    return -(-size // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE


def allocation_size(size: int) -> int:
    """§get_allocation_size: bytes of the segment cudaMalloc'd for a rounded request that nothing cached fits."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class Block:
    """A span of one segment: allocated, cached free, or (expandable segments) unmapped address space."""

    __slots__ = ("addr", "size", "stream", "small", "segment", "prev", "next", "allocated", "mapped",
                 "expandable", "gc_base")

    def __init__(self, addr: int, size: int, stream: int, small: bool, segment: int, expandable: bool = False):
        self.addr, self.size, self.stream, self.small, self.segment = addr, size, stream, small, segment
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False
        self.mapped = True
        self.expandable = expandable
        self.gc_base = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Pool:
    """§BlockPool: cached free blocks ordered by (stream, size, address); unmapped ones by (stream, address)."""

    def __init__(self, small: bool):
        self.small = small
        self.keys: list[tuple[int, int, int]] = []
        self.by_addr: dict[int, Block] = {}
        self.unmapped: list[tuple[int, int]] = []
        self.unmapped_by_addr: dict[int, Block] = {}
        self.get_free_blocks_calls = 0

    def insert(self, b: Block) -> None:
        b.gc_base = self.get_free_blocks_calls
        bisect.insort(self.keys, (b.stream, b.size, b.addr))
        self.by_addr[b.addr] = b

    def erase(self, b: Block) -> None:
        i = bisect.bisect_left(self.keys, (b.stream, b.size, b.addr))
        del self.keys[i]
        del self.by_addr[b.addr]

    def insert_unmapped(self, b: Block) -> None:
        bisect.insort(self.unmapped, (b.stream, b.addr))
        self.unmapped_by_addr[b.addr] = b

    def erase_unmapped(self, b: Block) -> None:
        i = bisect.bisect_left(self.unmapped, (b.stream, b.addr))
        del self.unmapped[i]
        del self.unmapped_by_addr[b.addr]


@dataclass(frozen=True)
class SegmentInfo:
    """One segment as `torch.cuda.memory._snapshot()` lists it: address order, block sizes and states."""

    address: int
    total_size: int
    stream: int
    is_large: bool
    is_expandable: bool
    blocks: tuple[tuple[int, bool], ...]  # (size bytes, allocated)

    @property
    def allocated_size(self) -> int:
        return sum(s for s, a in self.blocks if a)


@dataclass
class Stats:
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    segments: int = 0
    allocations: int = 0
    device_allocs: int = 0  # cudaMalloc / page-map calls
    device_frees: int = 0
    ooms: int = 0
    alloc_retries: int = 0


class CachingAllocator:
    """One device's caching allocator (§DeviceCachingAllocator). `malloc` returns a block handle (its address)
    that `free` takes back. Sizes in bytes; `stream` is any integer id (the trace uses one stream, 0)."""

    def __init__(self, config: AllocatorConfig | None = None):
        self.config = config or AllocatorConfig()
        self.pools = {True: _Pool(True), False: _Pool(False)}
        self.active: dict[int, Block] = {}
        self.stats = Stats()
        self._next_addr = 1 << 32
        self._segment_ids = 0
        self._max_split = self.config.max_split_size
        self._gc = self.config.memory_limit_bytes is not None and self.config.garbage_collection_threshold > 0

    # ------------------------------------------------------------------ public
    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """§malloc. Raises OutOfMemory when a memory limit is set and the request cannot be met."""
        size = round_size(nbytes, self.config.roundup_power2_divisions)
        small = size <= K_SMALL_SIZE
        pool = self.pools[small]
        alloc_size = allocation_size(size)
        block = self._get_free_block(pool, stream, size)
        if block is None:
            if self._gc:
                self._garbage_collect()
            block = (self._alloc_block(pool, stream, size, alloc_size)
                     or (self._release_available_cached_blocks(pool, stream, size)
                         and self._alloc_block(pool, stream, size, alloc_size))
                     or (self._release_cached_blocks() and self._retry(pool, stream, size, alloc_size)))
            if block is None:
                self.stats.ooms += 1
                s = self.stats
                raise OutOfMemory(f"out of memory: tried to allocate {alloc_size / MiB:.2f} MiB; "
                                  f"{s.allocated_bytes / MiB:,.0f} MiB allocated, "
                                  f"{(s.reserved_bytes - s.allocated_bytes) / MiB:,.0f} MiB reserved but unallocated")
        return self._alloc_found_block(pool, block, size, self._should_split(block, size)).addr

    def free(self, addr: int) -> None:
        """§free → §free_block: cache the block, merged with its free neighbours in the same segment."""
        block = self.active.pop(addr)
        block.allocated = False
        self.stats.allocated_bytes -= block.size
        self.stats.allocations -= 1
        pool = self.pools[block.small]
        for other in (block.prev, block.next):
            self._try_merge(block, other, pool)
        pool.insert(block)

    def block_size(self, addr: int) -> int:
        return self.active[addr].size

    def largest_free_block(self) -> int:
        """§cacheInfo: the largest cached (mapped, unallocated) block, in bytes."""
        return max((k[1] for p in self.pools.values() for k in p.keys), default=0)

    def snapshot(self) -> list[SegmentInfo]:
        """§snapshot: segments in address order; an expandable segment reports each contiguous mapped range."""
        heads: list[Block] = []
        for b in list(self.active.values()) + [b for p in self.pools.values() for b in p.by_addr.values()]:
            if b.prev is None or not b.prev.mapped:
                heads.append(b)
        out = []
        for h in sorted(heads, key=lambda b: b.addr):
            blocks, b = [], h
            while b is not None and b.mapped:
                blocks.append((b.size, b.allocated))
                b = b.next
            out.append(SegmentInfo(h.addr, sum(s for s, _ in blocks), h.stream, not h.small, h.expandable,
                                   tuple(blocks)))
        return out

    # ------------------------------------------------------------------ rules
    def _get_free_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        """§get_free_block."""
        if self._gc:
            pool.get_free_blocks_calls += 1
        keys = pool.keys
        i = bisect.bisect_left(keys, (stream, size, -1))
        if i == len(keys) or keys[i][0] != stream:
            return None
        block = pool.by_addr[keys[i][2]]
        if block.expandable:
            if self.config.expandable_segments:
                # the block at the end of a segment can grow into the unmapped space after it: best fit
                # compares what a block can expand to, so walk on while the next is a tighter fit
                def expandable_size(b: Block) -> int:
                    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

                j = i + 1
                while (block.expandable and j < len(keys) and keys[j][0] == stream
                       and expandable_size(nb := pool.by_addr[keys[j][2]]) < expandable_size(block)):
                    block, j = nb, j + 1
            else:  # expandable segments turned off after some were made: only plain blocks serve
                j = i
                while j < len(keys) and keys[j][0] == stream and pool.by_addr[keys[j][2]].expandable:
                    j += 1
                if j == len(keys) or keys[j][0] != stream:
                    return None
                block = pool.by_addr[keys[j][2]]
        if size < self._max_split <= block.size:
            return None  # do not hand out an oversize block for a smaller request
        if size >= self._max_split and block.size >= size + K_LARGE_BUFFER:
            return None  # an oversize request may round up by less than 20 MiB only
        pool.erase(block)
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        """§should_split."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self._max_split and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, pool: _Pool, block: Block, size: int, split: bool) -> Block:
        """§alloc_found_block: the request takes the front; the remainder goes back to the pool."""
        if split:
            rest = block
            block = Block(rest.addr, size, rest.stream, rest.small, rest.segment, rest.expandable)
            block.prev, block.next = rest.prev, rest
            if rest.prev is not None:
                rest.prev.next = block
            rest.prev = block
            rest.addr += size
            rest.size -= size
            pool.insert(rest)
        block.allocated = True
        self.active[block.addr] = block
        s = self.stats
        s.allocated_bytes += block.size
        s.allocations += 1
        s.peak_allocated_bytes = max(s.peak_allocated_bytes, s.allocated_bytes)
        return block

    def _try_merge(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        """§try_merge_blocks: absorb a free neighbour of the same segment; returns the bytes absorbed."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            pool.erase(src)
        else:
            pool.erase_unmapped(src)
        if dst.prev is src:  # [src dst]: dst (never in the pool while merging) takes src's start
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _reserve(self, nbytes: int) -> bool:
        limit = self.config.memory_limit_bytes
        return limit is None or self.stats.reserved_bytes + nbytes <= limit

    def _grow(self, nbytes: int) -> None:
        s = self.stats
        s.reserved_bytes += nbytes
        s.peak_reserved_bytes = max(s.peak_reserved_bytes, s.reserved_bytes)
        s.device_allocs += 1

    def _alloc_block(self, pool: _Pool, stream: int, size: int, alloc_size: int) -> Block | None:
        """§alloc_block: a new cudaMalloc'd segment of alloc_size bytes (or mapped pages, expandable)."""
        if not self._reserve(alloc_size):
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, stream, size)
        self._segment_ids += 1
        block = Block(self._next_addr, alloc_size, stream, pool.small, self._segment_ids)
        self._next_addr += -(-alloc_size // K_ROUND_LARGE) * K_ROUND_LARGE
        self.stats.segments += 1
        self._grow(alloc_size)
        return block

    def _retry(self, pool: _Pool, stream: int, size: int, alloc_size: int) -> Block | None:
        self.stats.alloc_retries += 1
        return self._alloc_block(pool, stream, size, alloc_size)

    # ------------------------------------------------------------------ expandable segments
    def _page(self, pool: _Pool) -> int:
        return K_SMALL_BUFFER if pool.small else K_LARGE_BUFFER

    def _find_expandable_block(self, pool: _Pool, stream: int, size: int) -> Block:
        """§find_expandable_block: the lowest address with `size` bytes of free + unmapped space after it."""
        def room(b: Block | None) -> bool:
            n = 0
            while n < size and b is not None and not b.allocated:
                n += b.size
                b = b.next
            return n >= size

        i = bisect.bisect_left(pool.unmapped, (stream, -1))
        while i < len(pool.unmapped) and pool.unmapped[i][0] == stream:
            c = pool.unmapped_by_addr[pool.unmapped[i][1]]
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            if room(c):
                return c
            i += 1
        # a new segment: address space for 9/8 of the device (or far more than any step needs, unlimited)
        limit = self.config.memory_limit_bytes
        span = (limit + limit // 8) if limit else 1 << 44
        page = self._page(pool)
        span = -(-span // page) * page
        self._segment_ids += 1
        self._next_addr = -(-self._next_addr // page) * page
        c = Block(self._next_addr, span, stream, pool.small, self._segment_ids, expandable=True)
        self._next_addr += span
        c.mapped = False
        pool.insert_unmapped(c)
        self.stats.segments += 1
        return c

    def _map_block(self, pool: _Pool, b: Block, size: int) -> bool:
        """§map_block: map whole pages covering the first `size` bytes of an unmapped block."""
        page = self._page(pool)
        mapped = -(-size // page) * page
        if not self._reserve(mapped):
            return False
        pool.erase_unmapped(b)
        b.mapped = True
        if mapped < b.size:
            rest = Block(b.addr + mapped, b.size - mapped, b.stream, b.small, b.segment, expandable=True)
            rest.mapped = False
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            pool.insert_unmapped(rest)
            b.size = mapped
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        pool.insert(b)
        self._grow(mapped)
        return True

    def _try_allocate_expandable_block(self, pool: _Pool, stream: int, size: int) -> Block | None:
        """§try_allocate_expandable_block."""
        c = self._find_expandable_block(pool, stream, size)
        if not c.mapped and not self._map_block(pool, c, min(c.size, size)):
            return None
        while c.size < size:
            nxt = c.next
            if not self._map_block(pool, nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt
        pool.erase(c)
        return c

    # ------------------------------------------------------------------ giving memory back
    def _release_block(self, pool: _Pool, b: Block) -> None:
        """§release_block: cudaFree an unsplit cached segment."""
        pool.erase(b)
        self.stats.reserved_bytes -= b.size
        self.stats.segments -= 1
        self.stats.device_frees += 1

    def _unmap_block(self, pool: _Pool, b: Block) -> None:
        """§unmap_block: give back the whole pages inside a free block of an expandable segment."""
        page = self._page(pool)
        base = self._segment_base(b)
        begin = base + -(-(b.addr - base) // page) * page
        end = base + (b.addr + b.size - base) // page * page
        if begin >= end:
            return
        pool.erase(b)
        if begin > b.addr:
            before = Block(b.addr, begin - b.addr, b.stream, b.small, b.segment, expandable=True)
            before.prev, before.next = b.prev, b
            if b.prev is not None:
                b.prev.next = before
            b.prev = before
            pool.insert(before)
        if b.addr + b.size > end:
            after = Block(end, b.addr + b.size - end, b.stream, b.small, b.segment, expandable=True)
            after.prev, after.next = b, b.next
            if b.next is not None:
                b.next.prev = after
            b.next = after
            pool.insert(after)
        b.addr, b.size, b.mapped = begin, end - begin, False
        freed = b.size
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        pool.insert_unmapped(b)
        self.stats.reserved_bytes -= freed
        self.stats.device_frees += 1

    @staticmethod
    def _segment_base(b: Block) -> int:
        while b.prev is not None:
            b = b.prev
        return b.addr

    def _release_available_cached_blocks(self, pool: _Pool, stream: int, size: int) -> bool:
        """§release_available_cached_blocks: free oversize cached blocks (only with max_split_size set)."""
        if self._max_split == NO_LIMIT:
            return False
        want = max(size, self._max_split)
        cands = [pool.by_addr[k[2]] for k in pool.keys if k[0] == stream and not pool.by_addr[k[2]].expandable]
        fit = [b for b in cands if b.size >= want]
        if fit:
            self._release_block(pool, fit[0])
            return True
        released = 0
        for b in sorted((b for b in cands if b.size >= self._max_split), key=lambda b: (b.size, b.addr),
                        reverse=True):
            if released >= want:
                break
            released += b.size
            self._release_block(pool, b)
        return released >= want

    def _release_cached_blocks(self) -> bool:
        """§release_cached_blocks → §release_blocks: free every unsplit cached segment, unmap free pages."""
        for pool in self.pools.values():
            for b in list(pool.by_addr.values()):
                if b.expandable:
                    self._unmap_block(pool, b)
                elif not b.is_split():
                    self._release_block(pool, b)
        return True

    def _garbage_collect(self) -> None:
        """§garbage_collect_cached_blocks: free old unsplit large cached blocks down to the threshold."""
        limit = self.config.memory_limit_bytes or 0
        threshold = int(self.config.garbage_collection_threshold * limit)
        if self.stats.reserved_bytes <= threshold:
            return
        target = self.stats.reserved_bytes - threshold
        pool = self.pools[False]

        def age(b: Block) -> int:
            return pool.get_free_blocks_calls - b.gc_base

        freeable = [b for b in pool.by_addr.values() if not b.is_split() and not b.expandable]
        total_age, count, reclaimed, freed = sum(age(b) for b in freeable), len(freeable), 0, True
        while reclaimed < target and freed and count > 0:
            threshold_age, freed = total_age / count, False
            for k in list(pool.keys):
                b = pool.by_addr.get(k[2])
                if b is not None and not b.is_split() and not b.expandable and age(b) >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= age(b)
                    count -= 1
                    self._release_block(pool, b)
