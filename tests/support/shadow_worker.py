"""A worker double for scheduler unit tests: no model, but real bookkeeping of KV *content*.

Every cache slot records which content it holds: the hash of the sequence's tokens up to and
including that position (a token's real K/V depend on exactly that). A step is applied in the
model's order: first every scheduled token of every sequence writes its slot (in each layer the
real worker writes the K/V of the whole batch before attention reads the cache), then each
sequence reads every position up to its last new token *through its block table* and checks the
slot holds the right content. So a wrong block table, a missed copy-on-write, a bad swap, a stale
prefix-cache hit, or two sequences writing one slot in the same step fails loudly; and a sequence
may read blocks that another sequence writes in the same step (same-step prefix sharing), which
``num_same_step_reads`` counts. The "model" samples ``hash(all tokens, seed) % vocab``:
deterministic, so a scheduler run under memory pressure must give exactly the tokens of an
unconstrained run. Like the real worker, it appends each sampled token to its sequence unless
the scheduler appends for it (beam search).
"""

from __future__ import annotations

import hashlib

from pagedserve.core.step import SampledRow, WorkerResult, WorkerStep
from protos.pagedserve.v1 import worker_pb2


def content(tokens: list[int]) -> bytes:
    return hashlib.blake2b(repr(tokens).encode(), digest_size=8).digest()


def next_token(tokens: list[int], seed: int | None, vocab_size: int) -> int:
    h = hashlib.blake2b(repr((tokens, seed)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % vocab_size


class ShadowWorker:
    def __init__(self, num_gpu_blocks: int = 64, num_cpu_blocks: int = 64, block_size: int = 4,
                 vocab_size: int = 100, max_model_len: int = 4096, eos: int = 0,
                 name: str = "shadow") -> None:
        self.block_size = block_size
        self.num_gpu_blocks, self.num_cpu_blocks = num_gpu_blocks, num_cpu_blocks
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.eos, self.name = eos, name
        self.gpu: dict[int, bytes] = {}
        self.cpu: dict[int, bytes] = {}
        self.seqs: dict[int, dict] = {}
        self.num_steps = 0
        self.num_computed_tokens = 0
        # Context positions read from a slot another sequence wrote in the same step.
        self.num_same_step_reads = 0
        self.fail_next_step = False

    def info(self) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(
            worker_id=self.name, model="shadow", num_gpu_blocks=self.num_gpu_blocks,
            num_cpu_blocks=self.num_cpu_blocks, block_size=self.block_size,
            max_model_len=self.max_model_len, vocab_size=self.vocab_size,
            eos_token_ids=[self.eos], device="cpu", attention_backend="shadow")

    def reset(self) -> None:
        self.seqs.clear()

    def step(self, req: WorkerStep) -> WorkerResult:
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected worker failure")
        self.num_steps += 1
        for seq_id in req.finished_seq_ids:
            del self.seqs[seq_id]
        for new in req.new_seqs:
            assert new.seq_id not in self.seqs, f"seq {new.seq_id} sent twice"
            tokens = (list(self.seqs[new.parent_seq_id]["tokens"])
                      if new.parent_seq_id is not None else [])
            tokens.extend(new.token_ids)
            assert new.params is not None, "the scheduler sends every sequence's params"
            seed = new.params.seed if new.params.HasField("seed") else None
            self.seqs[new.seq_id] = {"tokens": tokens, "table": [], "seed": seed,
                                     "appends": not new.scheduler_appends}
        self._move(req.swap_out, self.gpu, self.cpu)
        self._move(req.swap_in, self.cpu, self.gpu)
        self._move(req.copies, self.gpu, self.gpu)
        rows = req.scheduled.rows()
        for item in rows:
            seq = self.seqs[item.seq_id]
            seq["tokens"].extend(item.append_token_ids)
            if item.replace_block_table:
                seq["table"] = list(item.new_block_ids)
            else:
                seq["table"].extend(item.new_block_ids)
        written: dict[int, int] = {}  # slot -> seq id that wrote it in this step
        for item in rows:  # every write of the step before any read, as in each model layer
            self._write(item.seq_id, item.num_computed_tokens, item.num_new_tokens, written)
        sampled = []
        for item in rows:
            seq = self.seqs[item.seq_id]
            self._read(item.seq_id, item.num_computed_tokens, item.num_new_tokens, written)
            if item.sample:
                assert item.num_computed_tokens + item.num_new_tokens == len(seq["tokens"])
                token = next_token(seq["tokens"], seq["seed"], self.vocab_size)
                sampled.append(SampledRow(item.seq_id, token, -1.0))
        for row in sampled:
            seq = self.seqs[row.seq_id]
            if seq["appends"]:
                seq["tokens"].append(row.token_id)
        return WorkerResult.from_rows(sampled, req.step_id)

    def _slot(self, table: list[int], pos: int) -> int:
        block = pos // self.block_size
        assert block < len(table), f"position {pos} beyond block table of {len(table)} blocks"
        return table[block] * self.block_size + pos % self.block_size

    def _write(self, seq_id: int, start: int, num: int, written: dict[int, int]) -> None:
        seq = self.seqs[seq_id]
        tokens, table = seq["tokens"], seq["table"]
        assert start + num <= len(tokens), "computing tokens the worker was never sent"
        for pos in range(start, start + num):
            slot = self._slot(table, pos)
            assert slot not in written, (
                f"seq {seq_id} writes slot {slot} that seq {written[slot]} wrote in this step")
            written[slot] = seq_id
            self.gpu[slot] = content(tokens[: pos + 1])
        self.num_computed_tokens += num

    def _read(self, seq_id: int, start: int, num: int, written: dict[int, int]) -> None:
        """Attention of the new tokens: every position up to the last one must hold exactly this
        sequence's prefix (the cached context, and its own new K/V not overwritten)."""
        seq = self.seqs[seq_id]
        tokens, table = seq["tokens"], seq["table"]
        for pos in range(start + num):
            slot = self._slot(table, pos)
            got = self.gpu.get(slot)
            assert got == content(tokens[: pos + 1]), f"seq {seq_id}: stale KV at position {pos}"
            if pos < start and written.get(slot, seq_id) != seq_id:
                self.num_same_step_reads += 1

    def _move(self, pairs, src: dict, dst: dict) -> None:
        snapshot = dict(src)
        bs = self.block_size
        for src_block, dst_block in pairs:
            for off in range(bs):
                if src_block * bs + off in snapshot:
                    dst[dst_block * bs + off] = snapshot[src_block * bs + off]
                else:
                    dst.pop(dst_block * bs + off, None)


def reference_output(prompt: list[int], max_tokens: int, seed: int | None, vocab_size: int = 100,
                     eos: int | None = None) -> list[int]:
    tokens = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        t = next_token(tokens, seed, vocab_size)
        tokens.append(t)
        out.append(t)
        if eos is not None and t == eos:
            break
    return out
