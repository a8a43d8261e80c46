"""custom-fsdp's packing, without processes: the collectives are simulated on the flat
buffers (all_gather_into_tensor = concatenating the ranks' shards in rank order;
reduce_scatter_tensor = summing the ranks' buffers and taking each rank's slice), while the
packing, sharding, optimizer grouping and checkpoint resharding are the very functions
the strategies run."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fgpt import tree
from fgpt.parallel.module_wrapper import dim0_shard_range
from fgpt.parallel.optimizer_state import SavedOptimizer, optimizer_pieces
from fgpt.parallel.custom_fsdp import adamw_groups, attach_grads, leaf_parts, segment_params
from fgpt.parallel.flat import FlatLayout
from helpers import assert_same_tree

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def trees(draw) -> dict:
    """Nested dicts (and lists, like `h`) of small leaves, many smaller than the world size."""
    names = draw(st.lists(st.sampled_from(["weight", "bias", "attn", "mlp", "ln"]), min_size=1,
                          max_size=3, unique=True))
    node = {}
    for name in names:
        kind = draw(st.sampled_from(["leaf", "leaf", "dict", "list"]))
        if kind == "leaf":
            node[name] = torch.randn(draw(shapes))
        elif kind == "dict":
            node[name] = {"weight": torch.randn(draw(shapes)), "bias": torch.randn(draw(shapes))}
        else:
            node[name] = [{"w": torch.randn(draw(shapes))} for _ in range(draw(st.integers(1, 3)))]
    return node


worlds = st.integers(1, 5)


def all_gather(layout: FlatLayout, shards: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards)  # rank order, as all_gather_into_tensor lays it out


@given(trees(), worlds)
def test_shard_then_gather_is_the_identity(unit, world):
    layout = FlatLayout(unit, world)
    flat = layout.pack(unit)
    shards = [layout.shard(flat, r).clone() for r in range(world)]
    assert all(s.numel() == layout.shard_numel for s in shards)  # even split, padding included
    gathered = all_gather(layout, shards)
    assert_same_tree(layout.views(gathered), unit)
    assert torch.all(gathered[layout.numel:] == 0)


@given(trees(), worlds)
def test_views_tile_the_unpadded_buffer_exactly_with_decayed_leaves_first(unit, world):
    layout = FlatLayout(unit, world)
    assert layout.padded_numel % world == 0 and 0 <= layout.padded_numel - layout.numel < world
    ends = 0
    for slot in layout.slots:  # contiguous, no overlap, nothing reaches the padding
        assert slot.offset == ends
        ends += slot.numel
    assert ends == layout.numel == tree.count(unit)
    ndims = [len(s.shape) >= 2 for s in layout.slots]
    assert ndims == sorted(ndims, reverse=True)
    # a view of a full buffer never sees a byte of padding
    flat = layout.pack(unit)
    flat[layout.numel:] = float("nan")
    assert not any(torch.isnan(v).any() for v in tree.leaves(layout.views(flat)))


@given(trees(), worlds)
def test_segments_cover_every_parameter_once_and_never_padding(unit, world):
    layout = FlatLayout(unit, world)
    decayed_at = torch.zeros(layout.padded_numel, dtype=torch.int8)  # 1 decayed, 2 not
    for r in range(world):
        for seg in layout.segments(r):
            span = slice(r * layout.shard_numel + seg.lo, r * layout.shard_numel + seg.hi)
            assert torch.all(decayed_at[span] == 0)  # covered once
            decayed_at[span] = 1 if seg.decay else 2
    expected = torch.zeros_like(decayed_at)
    for s in layout.slots:
        expected[s.offset:s.offset + s.numel] = 1 if len(s.shape) >= 2 else 2
    assert torch.equal(decayed_at, expected)


@given(trees(), worlds)
def test_reduce_scatter_of_padded_gradients_gives_the_mean_tree(unit, world):
    layout = FlatLayout(unit, world)
    grads = [tree.tree_map(lambda x: torch.randn_like(x), unit) for _ in range(world)]
    total = torch.stack([layout.pack(g) for g in grads]).sum(0)  # what reduce-scatter sums
    shards = [layout.shard(total, r) / world for r in range(world)]
    got = tree.flatten(layout.views(all_gather(layout, shards)))
    for k in got:
        torch.testing.assert_close(got[k], torch.stack([tree.flatten(g)[k] for g in grads]).mean(0))


@given(trees(), worlds, st.floats(0.0, 0.5))
def test_adamw_on_shards_decays_only_matrices_and_leaves_padding_alone(unit, world, weight_decay):
    """A zero-gradient AdamW step is pure decay: >=2-D leaves shrink by (1 - lr*wd), 1-D
    leaves stay; gradient noise planted in the padding reaches nothing."""
    lr = 0.1
    layout = FlatLayout(unit, world)
    flat = layout.pack(unit)
    masters = [layout.shard(flat, r).clone() for r in range(world)]
    grads = [torch.zeros(layout.shard_numel) for _ in range(world)]
    for r in range(world):  # garbage in the padding part of each gradient shard
        lo = max(0, layout.numel - r * layout.shard_numel)
        grads[r][lo:] = 1e3
    for r in range(world):
        segments = segment_params(layout, masters[r], r)
        attach_grads(segments, grads[r])
        torch.optim.AdamW(adamw_groups(segments, weight_decay), lr=lr).step()
    stepped = all_gather(layout, masters)
    assert torch.all(stepped[layout.numel:] == 0)
    expected = tree.tree_map(lambda x: x * (1 - lr * weight_decay) if x.ndim >= 2 else x, unit)
    got = layout.views(stepped)
    for k, v in tree.flatten(expected).items():
        torch.testing.assert_close(tree.flatten(got)[k], v)


def saved_pieces(unit: dict, layout: str, world: int) -> list[dict]:
    """Each rank's optimizer_state() for a unit whose exp_avg is the unit itself, cut the way
    a strategy keeps it: whole leaves (single, ddp), dim-0 shards (fsdp) or flat shards
    (custom-fsdp), by the strategies' own range functions."""
    leaves = tree.flatten(unit)
    ranks = []
    for rank in range(world):
        if layout == "flat":
            parts = {path: lo for path, (lo, _), _ in leaf_parts(FlatLayout(unit, world), rank)}
            ends = {path: hi for path, (_, hi), _ in leaf_parts(FlatLayout(unit, world), rank)}
        else:
            rng = {p: (0, t.numel()) if layout == "whole" else dim0_shard_range(tuple(t.shape), rank, world)
                   for p, t in leaves.items()}
            parts, ends = {p: r[0] for p, r in rng.items()}, {p: r[1] for p, r in rng.items()}
        ranks.append(optimizer_pieces(7.0, {p: (parts[p], {"exp_avg": leaves[p].reshape(-1)[parts[p]:ends[p]]})
                                            for p in parts}))
    return ranks


LAYOUTS = st.sampled_from(["whole", "rows", "flat"])


@given(st.integers(0, 40), st.integers(1, 4), worlds)
def test_dim0_shard_range_is_where_fsdp2_puts_each_rank(rows, row, world):
    """fsdp's saved offsets assume torch's own dim-0 cut (DTensor Shard(0), as FSDP2 uses)."""
    from torch.distributed.tensor.placement_types import Shard
    for rank in range(world):
        size, start = Shard(0)._local_shard_size_and_offset(rows, world, rank)
        lo, hi = dim0_shard_range((rows, row), rank, world)
        assert hi - lo == size * row and (size == 0 or lo == start * row)


@given(trees(), LAYOUTS, worlds, LAYOUTS, worlds)
def test_any_saved_layout_gives_every_new_rank_exactly_its_part(unit, saved_as, old_world, load_as, new_world):
    """Resuming with another strategy and world size: whatever layout the pieces were saved
    in, the part a rank of the new layout asks for is the original values, and a rank
    resuming its own layout on the same world size opens no other rank's file."""
    saved = saved_pieces(unit, saved_as, old_world)
    wanted = saved_pieces(unit, load_as, new_world)  # what each new rank must hold
    for rank, want in enumerate(wanted):
        opened = []
        state = SavedOptimizer(old_world, lambda q: opened.append(q) or saved[q])
        assert state.step(rank) == 7.0
        for path, (lo, values) in want["pieces"].items():
            got = state.moment(path, "exp_avg", lo, lo + values["exp_avg"].numel(), rank)
            assert torch.equal(got, values["exp_avg"])
        if (saved_as, old_world) == (load_as, new_world) or saved_as == "whole" and rank < old_world:
            assert set(opened) <= {rank}
