"""Per-slice channels -> the CNN's input: the paper's single slice, or 2.5D (the slice and its neighbours).

The paper feeds each slice alone (three windows as channels). With `neighbours` k > 0 (an option, not
the paper), slice i's input is the three windows of slices i-k .. i+k stacked along the channel axis,
3 x (2k + 1) channels, oldest first; slices beyond either end of the series repeat the edge slice.
"Neighbour" means neighbour in the array: the node and training both pass slices sorted along the
slice normal and, for thin series, already combined into slabs (ihd_node.imaging.volume), so index
i +- 1 is the next slice (or slab) in space.

`stack_neighbours` is the one function both sides call: training on its cached windowed channels,
the node's Predictor on prepare_slices' output, batch by batch.
"""

from __future__ import annotations

import torch

WINDOW_CHANNELS = 3  # brain, subdural, soft tissue


def input_channels(neighbours: int) -> int:
    """Channels the CNN's first convolution takes for `neighbours` slices on each side."""
    return WINDOW_CHANNELS * (2 * neighbours + 1)


def input_mode(neighbours: int) -> str:
    """Readable name of the input, as checkpoints and reports show it."""
    return "single slice (paper)" if neighbours == 0 else f"2.5d: {neighbours} neighbour(s) each side"


def neighbour_index(n: int, neighbours: int, start: int = 0, stop: int | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(stop - start, 2k + 1) indices into a series of n slices: row j = slices start+j-k .. start+j+k,
    clamped to [0, n - 1] (the edge slice is repeated)."""
    stop = n if stop is None else stop
    centre = torch.arange(start, stop, device=device).view(-1, 1)
    offsets = torch.arange(-neighbours, neighbours + 1, device=device).view(1, -1)
    return (centre + offsets).clamp_(0, max(n - 1, 0))


def stack_neighbours(x: torch.Tensor, neighbours: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(n, C, S, S) per-slice channels of a whole series in spatial order -> (stop - start, C (2k+1), S, S)
    inputs of slices start..stop-1 (default all). k = 0 returns that slice range itself (no copy)."""
    if x.ndim != 4:
        raise ValueError(f"expected per-slice channels (n, C, S, S), got {tuple(x.shape)}")
    n = x.shape[0]
    stop = n if stop is None else min(stop, n)
    if neighbours == 0:
        return x[start:stop]
    if neighbours < 0:
        raise ValueError(f"neighbours must be >= 0, got {neighbours}")
    index = neighbour_index(n, neighbours, start, stop, device=x.device)  # (m, 2k+1)
    out = x.index_select(0, index.reshape(-1))  # (m (2k+1), C, S, S)
    return out.reshape(stop - start, -1, *x.shape[2:])
