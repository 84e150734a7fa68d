"""A sequence may read K/V that another sequence of the same step writes (same-step prefix
sharing: the scheduler points a request's table at blocks whose prompt is computed in this very
step). That is correct only because every attention path writes the K/V of *all* tokens of the
step (slot mapping) before it reads the cache, and reads every position, new ones included,
from the cache rather than from the in-batch tensors. Checked here for each path, with the
computing sequence's rows before and after the sharers' rows in the flat batch, against dense
attention over the K/V as they were produced (no cache involved):

- ``paged_attention_reference`` (the oracle);
- ``TorchAttentionBackend`` on plain torch ops (SDPA prefill per sequence, decode buckets);
- ``TorchAttentionBackend`` through the fused C++ kernels (``cpu_ops``: prefill + paged decode;
  the whole-model ``LayerStack`` path calls the same ``write_kv`` then these kernels);
- ``TritonAttentionBackend`` (interpreted without CUDA; prefill kernel on mixed steps, the
  flash-decoding kernel on decode-only steps).

Every cache slot starts as large random garbage (finite, so that the padding positions some
paths read and mask out stay harmless), so a path that reads a slot before the step writes it,
or reads the wrong slot, gives a different result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.kernel_cases import DEVICE
from worker.attention.metadata import AttentionMetadata
from worker.attention.torch_backend import TorchAttentionBackend, paged_attention_reference
from worker.kernels import cpu_ops

BS, KVH, GROUP, D = 16, 2, 2, 64
NUM_BLOCKS = 8


class _Reference:
    def write_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        TorchAttentionBackend().write_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key_cache, value_cache, meta, scale) -> torch.Tensor:
        return paged_attention_reference(query, key_cache, value_cache, meta, scale)


def _backend(name: str, monkeypatch: pytest.MonkeyPatch):
    if name == "reference":
        return _Reference()
    if name == "torch":
        monkeypatch.setattr(cpu_ops, "load", lambda: None)
        return TorchAttentionBackend()
    if name == "torch-fused":
        ops = cpu_ops.load()
        if DEVICE != "cpu" or ops is None or not ops.prefill_attention_supported(D):
            pytest.skip("fused CPU kernels unavailable here")
        return TorchAttentionBackend()
    pytest.importorskip("triton")
    from worker.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(decode_partition_size=64)


# A step of three sequences. ``a`` computes its prompt: 37 new tokens over physical blocks
# 3, 6, 1. ``b`` (3-token suffix) and ``c`` (1-token suffix: the decode path) were admitted in the
# same step on a's first two blocks: their context is K/V that a writes in this step.
MIXED = {  # name: (cached context, new tokens, block table, context source)
    "a": (0, 37, [3, 6, 1], None),
    "b": (32, 3, [3, 6, 4], "a"),
    "c": (32, 1, [3, 6, 0], "a"),
}
# Decode only: ``a`` writes the last slot of block 5 (its first 15 positions are older context);
# ``b`` shares block 5, so its context ends with the K/V a writes in this step.
DECODE = {
    "a": (15, 1, [5], None),
    "b": (16, 1, [5, 2], "a"),
}


def _run_case(case: dict, order: list[str], backend) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, BS, KVH, D)
    key_cache = 10 * torch.randn(shape, generator=gen)
    value_cache = 10 * torch.randn(shape, generator=gen)
    # Full K/V of each sequence, position by position: older context (already in the cache),
    # then this step's new rows. A sharer's context is its source's K/V.
    keys: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for name, (ctx, new, table, source) in case.items():
        if source is not None:
            old_k, old_v = keys[source][:ctx], values[source][:ctx]
        else:
            old_k, old_v = torch.randn(ctx, KVH, D, generator=gen), torch.randn(ctx, KVH, D,
                                                                                generator=gen)
            for pos in range(ctx):
                key_cache[table[pos // BS], pos % BS] = old_k[pos]
                value_cache[table[pos // BS], pos % BS] = old_v[pos]
        keys[name] = torch.cat([old_k, torch.randn(new, KVH, D, generator=gen)])
        values[name] = torch.cat([old_v, torch.randn(new, KVH, D, generator=gen)])
    queries = {name: torch.randn(new, KVH * GROUP, D, generator=gen)
               for name, (_, new, _, _) in case.items()}

    rows_k, rows_v, rows_q, slots, seq_lens, query_lens = [], [], [], [], [], []
    width = max(len(t) for _, _, t, _ in case.values()) + 1
    tables = torch.zeros(len(order), width, dtype=torch.int32)
    for b, name in enumerate(order):
        ctx, new, table, _ = case[name]
        rows_k.append(keys[name][ctx:])
        rows_v.append(values[name][ctx:])
        rows_q.append(queries[name])
        slots += [table[p // BS] * BS + p % BS for p in range(ctx, ctx + new)]
        seq_lens.append(ctx + new)
        query_lens.append(new)
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=starts.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), block_size=BS,
        is_decode_only=all(n == 1 for n in query_lens))
    scale = D**-0.5
    key_cache, value_cache = key_cache.to(DEVICE), value_cache.to(DEVICE)

    # One layer of the model: the whole step's K/V into the cache, then attention.
    backend.write_kv(torch.cat(rows_k).to(DEVICE), torch.cat(rows_v).to(DEVICE), key_cache,
                     value_cache, meta.slot_mapping)
    out = backend.forward(torch.cat(rows_q).to(DEVICE), key_cache, value_cache, meta, scale)

    for b, name in enumerate(order):
        expected = _dense(queries[name], keys[name], values[name], scale)
        got = out[starts[b] : starts[b + 1]].float().cpu()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"sequence {name}")


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions over ``k``/``v`` (``[L, KVH, D]``)."""
    lq, length = q.shape[0], k.shape[0]
    allowed = torch.arange(length)[None, :] <= (length - lq + torch.arange(lq))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=allowed,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


BACKENDS = ["reference", "torch", "torch-fused", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "b", "a"], ["b", "a", "c"]])
def test_sharers_read_prefix_blocks_written_in_the_same_step(backend, order, monkeypatch):
    _run_case(MIXED, order, _backend(backend, monkeypatch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_decode_only_step_reads_a_slot_written_in_the_same_step(backend, order, monkeypatch):
    _run_case(DECODE, order, _backend(backend, monkeypatch))
