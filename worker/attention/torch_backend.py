"""Torch paged attention: the CPU backend, and the oracle for the Triton kernels.

Reads K/V only through block tables and writes them only through the slot mapping (see
``metadata.py``). Two implementations of the same semantics:

- ``paged_attention_reference``: the oracle. One batched gather pulls each sequence's blocks into
  a padded ``[batch, max_seq_len]`` view and one masked SDPA call attends. Simple, but on CPU it
  pays for padding to the longest sequence and for a fresh multi-MB gather per layer.
- ``TorchAttentionBackend.forward`` (what the worker runs): plans the step once (``_StepPlan``,
  memoized in ``meta.scratch``) and reuses the plan in every layer::

      decode rows (1 new token)   sorted by length, in buckets of <= DECODE_BUCKET sequences; each
                                  bucket gathers only its own blocks into a reused workspace and
                                  runs one SDPA with the GQA group folded into the query axis
                                  (fp32 on CPU: one fused C++ kernel instead, ``cpu_ops.cpp``,
                                  that reads K/V straight from the blocks, with no gather)
      prefill rows (> 1 token)    one gather of exactly the positions [0, seq_len) of each
                                  sequence, then per sequence a causal SDPA (is_causal when there
                                  is no cached context, an offset causal mask otherwise)
                                  (fp32 on CPU: one fused C++ call for all prefill sequences
                                  that reads the blocks directly, ``prefill_attention``)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from worker.attention.metadata import AttentionMetadata, HostMetadata
from worker.kernels import cpu_ops

DECODE_BUCKET = 16  # sequences per decode SDPA call: bounds padding to a bucket's longest


class TorchAttentionBackend:
    """Stateless; safe to share between layers."""

    name = "torch"

    def __init__(self) -> None:
        self._workspace = torch.empty(0)  # gather target reused by every layer and step

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens] int64, negative = padding
    ) -> None:
        write_kv_reference(key, value, key_cache, value_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        ops = _fused_ops(query, key_cache)
        plan = self._plan(meta, query.device, ops, query.shape[-1])
        if ops is not None and plan.fused_decode is not None and not plan.has_prefill:
            fd = plan.fused_decode  # decode only: rows are sequences, in order
            return ops.paged_decode(query, key_cache, value_cache, fd.block_tables, fd.seq_lens,
                                    scale)
        out = torch.empty_like(query)
        if ops is not None and plan.fused_decode is not None:
            fd = plan.fused_decode
            out.index_copy_(0, fd.rows, ops.paged_decode(
                query.index_select(0, fd.rows), key_cache, value_cache, fd.block_tables,
                fd.seq_lens, scale))
        else:
            for bucket in plan.decode:
                self._decode_bucket(query, key_cache, value_cache, bucket, scale, out)
        if plan.fused_prefill is not None:
            assert ops is not None
            fp = plan.fused_prefill
            ops.prefill_attention(query, key_cache, value_cache, fp.block_tables, fp.seq_lens,
                                  fp.q_starts, fp.q_lens, scale, out)
        elif plan.prefill:
            self._prefill(query, key_cache, value_cache, plan, scale, out)
        return out

    def layer_stack_args(self, meta: AttentionMetadata, ops: ModuleType, head_dim: int
                         ) -> tuple[torch.Tensor, ...]:
        """This step's attention plan as the trailing arguments of ``cpu_ops.LayerStack.forward``
        (decode rows, tables, lengths; prefill tables, lengths, query starts and lengths), for
        the fused CPU stack (``worker/models/execution.py``), which runs only where ``ops``
        takes this ``head_dim`` in its prefill kernel."""
        if not ops.prefill_attention_supported(head_dim):
            raise ValueError(f"cpu_ops prefill_attention does not take head_dim {head_dim}")
        plan = self._plan(meta, torch.device("cpu"), ops, head_dim)
        assert not plan.prefill, "a step planned for SDPA prefill"
        fd, fp = plan.fused_decode, plan.fused_prefill
        none64 = torch.empty(0, dtype=torch.int64)
        none32 = torch.empty(0, dtype=torch.int32)
        no_table = torch.empty(0, 1, dtype=torch.int32)
        return (fd.rows if fd else none64, fd.block_tables if fd else no_table,
                fd.seq_lens if fd else none32, fp.block_tables if fp else no_table,
                fp.seq_lens if fp else none64, fp.q_starts if fp else none64,
                fp.q_lens if fp else none64)

    @staticmethod
    def _plan(meta: AttentionMetadata, device: torch.device, ops: ModuleType | None,
              head_dim: int) -> _StepPlan:
        plan = meta.scratch.get("torch_plan")
        if plan is None:
            fused_prefill = ops is not None and ops.prefill_attention_supported(head_dim)
            plan = meta.scratch["torch_plan"] = _StepPlan.build(meta, device, fused_prefill)
        return plan

    def _buffer(self, shape: tuple[int, ...], like: torch.Tensor, slot: int) -> torch.Tensor:
        """A view of the workspace (two halves: ``slot`` 0 for K, 1 for V). Reusing it avoids
        page-faulting a fresh multi-MB buffer per gather, which costs more than the copy."""
        numel = int(np.prod(shape))
        ws = self._workspace
        if ws.numel() < 2 * numel or ws.dtype != like.dtype or ws.device != like.device:
            ws = self._workspace = torch.empty(2 * numel, dtype=like.dtype, device=like.device)
        return ws[slot * numel : (slot + 1) * numel].view(shape)

    def _gather(self, cache: torch.Tensor, index: torch.Tensor, slot: int) -> torch.Tensor:
        """``cache.index_select(0, index)`` into the workspace."""
        out = self._buffer((index.shape[0], *cache.shape[1:]), cache, slot)
        return torch.index_select(cache, 0, index, out=out)

    def _decode_bucket(self, query: torch.Tensor, key_cache: torch.Tensor,
                       value_cache: torch.Tensor, bucket: _DecodeBucket, scale: float,
                       out: torch.Tensor) -> None:
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        n, length = bucket.rows.shape[0], bucket.num_blocks * key_cache.shape[1]
        keys = self._gather(key_cache, bucket.blocks, 0).view(n, length, num_kv_heads, head_dim)
        values = self._gather(value_cache, bucket.blocks, 1).view(n, length, num_kv_heads,
                                                                  head_dim)
        # One query token per sequence: its GQA group becomes the query axis, so SDPA needs no
        # K/V expansion and no causal mask (only the length mask).
        q = query.index_select(0, bucket.rows).view(n, num_kv_heads, -1, head_dim)
        o = F.scaled_dot_product_attention(
            q, keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype),
            attn_mask=bucket.mask, scale=scale)
        out.index_copy_(0, bucket.rows, o.reshape(n, -1, head_dim))

    def _prefill(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 plan: _StepPlan, scale: float, out: torch.Tensor) -> None:
        assert plan.context_slots is not None
        flat_k = key_cache.view(-1, *key_cache.shape[2:])
        flat_v = value_cache.view(-1, *value_cache.shape[2:])
        keys = self._gather(flat_k, plan.context_slots, 0).to(query.dtype)
        values = self._gather(flat_v, plan.context_slots, 1).to(query.dtype)
        for seq in plan.prefill:
            q = query[seq.q_start : seq.q_end].transpose(0, 1)[None]  # [1, H, Lq, D]
            k = keys[seq.ctx_start : seq.ctx_end].transpose(0, 1)[None]
            v = values[seq.ctx_start : seq.ctx_end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=seq.mask, is_causal=seq.mask is None, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1])
            out[seq.q_start : seq.q_end] = o[0].transpose(0, 1)


def _fused_ops(query: torch.Tensor, key_cache: torch.Tensor) -> ModuleType | None:
    """The fused CPU kernels, when query and cache are fp32 on CPU and the kernels built."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or key_cache.dtype != query.dtype:
        return None
    return cpu_ops.load()


@dataclass
class _FusedDecode:
    rows: torch.Tensor  # [n] int64 query rows of the decode sequences
    block_tables: torch.Tensor  # [n, max_blocks] int32
    seq_lens: torch.Tensor  # [n] int32


@dataclass
class _FusedPrefill:
    block_tables: torch.Tensor  # [n, max_blocks] int32 of the prefill sequences
    seq_lens: torch.Tensor  # [n] int64
    q_starts: torch.Tensor  # [n] int64 first query row
    q_lens: torch.Tensor  # [n] int64


@dataclass
class _DecodeBucket:
    rows: torch.Tensor  # [n] int64 query rows (= sequences) of this bucket
    blocks: torch.Tensor  # [n * num_blocks] int64 physical blocks, row-major per sequence
    num_blocks: int
    mask: torch.Tensor | None  # [n, 1, 1, num_blocks * block_size] bool; None: all full


@dataclass
class _PrefillSeq:
    q_start: int
    q_end: int
    ctx_start: int  # this sequence's positions [0, seq_len) in the gathered context
    ctx_end: int
    mask: torch.Tensor | None  # [Lq, seq_len] bool; None: no cached context, plain causal


@dataclass
class _StepPlan:
    decode: list[_DecodeBucket]
    prefill: list[_PrefillSeq]
    context_slots: torch.Tensor | None  # [sum of prefill seq_lens] int64 cache slots
    fused_decode: _FusedDecode | None  # the decode rows for the fused kernel; None: no decodes
    fused_prefill: _FusedPrefill | None  # the prefill rows for the fused kernel

    @property
    def has_prefill(self) -> bool:
        return bool(self.prefill) or self.fused_prefill is not None

    @classmethod
    def build(cls, meta: AttentionMetadata, device: torch.device,
              fused_prefill: bool = False) -> _StepPlan:
        host = meta.host or _host_copy(meta)
        starts = np.zeros(len(host.query_lens) + 1, dtype=np.int64)
        np.cumsum(host.query_lens, out=starts[1:])
        is_decode = host.query_lens == 1
        decode = _decode_buckets(np.flatnonzero(is_decode), starts, host, meta.block_size, device)
        fused_decode = _fused_decode(np.flatnonzero(is_decode), starts, host, device)
        prefill_seqs = np.flatnonzero(~is_decode)
        if fused_prefill and len(prefill_seqs) and device.type == "cpu":
            fp = _FusedPrefill(
                torch.from_numpy(np.ascontiguousarray(host.block_tables[prefill_seqs], np.int32)),
                torch.from_numpy(host.seq_lens[prefill_seqs].astype(np.int64)),
                torch.from_numpy(starts[prefill_seqs]),
                torch.from_numpy(host.query_lens[prefill_seqs].astype(np.int64)))
            return cls(decode, [], None, fused_decode, fp)
        prefill, slots = _prefill_plan(prefill_seqs, starts, host, meta.block_size, device)
        return cls(decode, prefill, slots, fused_decode, None)


def _host_copy(meta: AttentionMetadata) -> HostMetadata:
    starts = meta.query_start_loc.cpu().numpy().astype(np.int64)
    return HostMetadata(meta.seq_lens.cpu().numpy().astype(np.int64), np.diff(starts),
                        meta.block_tables.cpu().numpy())


def _fused_decode(seqs: np.ndarray, starts: np.ndarray, host: HostMetadata,
                  device: torch.device) -> _FusedDecode | None:
    if len(seqs) == 0 or device.type != "cpu":
        return None
    return _FusedDecode(torch.from_numpy(starts[seqs]),
                        torch.from_numpy(np.ascontiguousarray(host.block_tables[seqs], np.int32)),
                        torch.from_numpy(host.seq_lens[seqs].astype(np.int32)))


def _decode_buckets(seqs: np.ndarray, starts: np.ndarray, host: HostMetadata, block_size: int,
                    device: torch.device) -> list[_DecodeBucket]:
    """Sequences sorted by length, cut into buckets; each bucket is padded to its longest.
    Padding columns of a table point at the sequence's first block (always a real block), and
    the mask hides them."""
    order = seqs[np.argsort(host.seq_lens[seqs], kind="stable")]
    buckets = []
    for first in range(0, len(order), DECODE_BUCKET):
        members = order[first : first + DECODE_BUCKET]
        lens = host.seq_lens[members]
        num_blocks = int(-(-lens.max() // block_size))
        own = -(-lens // block_size)
        table = host.block_tables[members, :num_blocks].astype(np.int64)
        pad = np.arange(num_blocks)[None, :] >= own[:, None]
        table = np.where(pad, table[:, :1], table)
        mask = None
        if (lens != num_blocks * block_size).any():
            valid = np.arange(num_blocks * block_size)[None, :] < lens[:, None]
            mask = torch.from_numpy(valid[:, None, None, :]).to(device)
        rows = torch.from_numpy(starts[members]).to(device)
        buckets.append(_DecodeBucket(rows, torch.from_numpy(table.reshape(-1)).to(device),
                                     num_blocks, mask))
    return buckets


def _prefill_plan(seqs: np.ndarray, starts: np.ndarray, host: HostMetadata, block_size: int,
                  device: torch.device) -> tuple[list[_PrefillSeq], torch.Tensor | None]:
    if len(seqs) == 0:
        return [], None
    plan, slots, offset = [], [], 0
    for b in seqs.tolist():
        seq_len, q_len = int(host.seq_lens[b]), int(host.query_lens[b])
        pos = np.arange(seq_len)
        slots.append(host.block_tables[b, pos // block_size].astype(np.int64) * block_size
                     + pos % block_size)
        mask = None
        if seq_len != q_len:  # cached context: query i sits at position seq_len - q_len + i
            allowed = pos[None, :] <= (seq_len - q_len + np.arange(q_len))[:, None]
            mask = torch.from_numpy(allowed).to(device)
        plan.append(_PrefillSeq(int(starts[b]), int(starts[b + 1]), offset, offset + seq_len,
                                mask))
        offset += seq_len
    return plan, torch.from_numpy(np.concatenate(slots)).to(device)


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    flat_k.index_copy_(0, slot_mapping, key.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, value.to(flat_v.dtype))


def gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int
) -> torch.Tensor:
    """``[batch, max_seq_len, num_kv_heads, head_dim]``: each sequence's positions, in order."""
    block_size = cache.shape[1]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()
    gathered = cache[table]  # [batch, num_blocks, block_size, kv_heads, head_dim]
    batch = table.shape[0]
    return gathered.view(batch, num_blocks * block_size, *cache.shape[2:])[:, :max_seq_len]


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    batch, max_len = meta.num_seqs, meta.max_seq_len
    keys = gather_context(key_cache, meta.block_tables, max_len).to(query.dtype)
    values = gather_context(value_cache, meta.block_tables, max_len).to(query.dtype)
    seq_lens = meta.seq_lens.long()
    key_pos = torch.arange(max_len, device=query.device)

    if meta.is_decode_only:
        q = query.view(batch, 1, num_heads, head_dim)
        mask = (key_pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
        out = _sdpa(q, keys, values, mask, scale)
        return out.reshape(num_tokens, num_heads, head_dim)

    # Ragged queries -> padded [batch, max_query_len]; row r of the flat batch is (seq_idx, i).
    starts = meta.query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(batch, device=query.device), query_lens)
    offset = torch.arange(num_tokens, device=query.device) - starts[seq_idx]
    padded = query.new_zeros(batch, meta.max_query_len, num_heads, head_dim)
    padded[seq_idx, offset] = query

    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(
        meta.max_query_len, device=query.device
    )  # [B, Q]
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # causal, also bounds by seq_len
    mask[:, :, 0] = True  # padded query rows attend to something; their output is dropped
    out = _sdpa(padded, keys, values, mask[:, None], scale)
    return out[seq_idx, offset]


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Inputs ``[B, S, H, D]``; GQA is expanded by SDPA. Returns ``[B, Sq, Hq, D]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
