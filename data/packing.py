"""Best-fit-decreasing packing of variable-length sequences into fixed-capacity rows."""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins (lists of item indices) with sum(lengths) <= capacity each: items longest first (ties in index
    order), each into the bin with the least free space that still holds it, else into a new bin.

    Runs in O(n log C): bins are grouped by free space, and the distinct free-space values are kept sorted.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    by_space: Dict[int, List[int]] = {}  # free space -> bins with exactly that much room
    spaces: List[int] = []  # sorted distinct keys of by_space
    for item in order:
        length = lengths[item]
        if not 0 < length <= capacity:
            raise ValueError(f"item {item} has length {length}, outside (0, {capacity}]")
        j = bisect.bisect_left(spaces, length)
        if j == len(spaces):
            b, room = len(bins), capacity
            bins.append([])
        else:
            room = spaces[j]
            b = by_space[room].pop()
            if not by_space[room]:
                del by_space[room]
                spaces.pop(j)
        bins[b].append(item)
        room -= length
        if room > 0:
            if room not in by_space:
                by_space[room] = []
                bisect.insort(spaces, room)
            by_space[room].append(b)
    return bins
