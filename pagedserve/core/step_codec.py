"""Row views of the columnar step messages (``ScheduledBatch``, ``SampledBatch`` in worker.proto).

The wire format is one packed column per field, so the scheduler's hot path fills a step with a
few ``extend`` calls. Code that thinks one sequence at a time (the worker, its validation, test
doubles and drivers) converts here: ``scheduled_rows``/``add_scheduled`` and
``sampled_rows``/``add_sampled``. Decoding checks that the columns agree in length, so a malformed
message is refused (``InvalidArgument``) before anything reads past a column's end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagedserve.core.errors import InvalidArgument
from protos.pagedserve.v1 import worker_pb2


@dataclass(slots=True)
class ScheduledRow:
    """One sequence's work this step: compute tokens [num_computed_tokens, +num_new_tokens)."""

    seq_id: int
    num_computed_tokens: int = 0
    num_new_tokens: int = 0
    sample: bool = True
    replace_block_table: bool = False
    append_token_ids: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SampledRow:
    """One sampled token; ``top`` holds (token id, log-prob) pairs, best first, when asked for."""

    seq_id: int
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def add_scheduled(batch: worker_pb2.ScheduledBatch, rows: Iterable[ScheduledRow]) -> None:
    """Appends ``rows`` to the columns of ``batch``."""
    rows = list(rows)
    batch.seq_ids.extend(r.seq_id for r in rows)
    batch.num_computed_tokens.extend(r.num_computed_tokens for r in rows)
    batch.num_new_tokens.extend(r.num_new_tokens for r in rows)
    batch.sample.extend(r.sample for r in rows)
    batch.replace_block_table.extend(r.replace_block_table for r in rows)
    batch.num_append_tokens.extend(len(r.append_token_ids) for r in rows)
    batch.append_token_ids.extend(t for r in rows for t in r.append_token_ids)
    batch.num_new_blocks.extend(len(r.new_block_ids) for r in rows)
    batch.new_block_ids.extend(b for r in rows for b in r.new_block_ids)


def scheduled_request(step_id: int = 0, rows: Iterable[ScheduledRow] = (),
                      **fields: object) -> worker_pb2.StepRequest:
    """A ``StepRequest`` with ``rows`` scheduled; ``fields`` are its other fields."""
    # The stub types each keyword separately; ``fields`` is a pass-through of any of them.
    request = worker_pb2.StepRequest(step_id=step_id, **fields)  # type: ignore[arg-type]
    add_scheduled(request.scheduled, rows)
    return request


def scheduled_rows(batch: worker_pb2.ScheduledBatch) -> list[ScheduledRow]:
    """The rows of ``batch``; ``InvalidArgument`` if its columns disagree."""
    seq_ids = list(batch.seq_ids)
    n = len(seq_ids)
    _check_len(batch.num_computed_tokens, n, "scheduled.num_computed_tokens")
    _check_len(batch.num_new_tokens, n, "scheduled.num_new_tokens")
    _check_len(batch.sample, n, "scheduled.sample")
    _check_len(batch.replace_block_table, n, "scheduled.replace_block_table")
    _check_len(batch.num_append_tokens, n, "scheduled.num_append_tokens")
    _check_len(batch.num_new_blocks, n, "scheduled.num_new_blocks")
    appends = _split(batch.append_token_ids, batch.num_append_tokens, "scheduled.append_token_ids")
    blocks = _split(batch.new_block_ids, batch.num_new_blocks, "scheduled.new_block_ids")
    return [ScheduledRow(*cols) for cols in zip(
        seq_ids, batch.num_computed_tokens, batch.num_new_tokens, batch.sample,
        batch.replace_block_table, appends, blocks, strict=True)]


def add_sampled(batch: worker_pb2.SampledBatch, rows: Iterable[SampledRow]) -> None:
    """Appends ``rows`` to the columns of ``batch``; ``num_top`` stays empty if no row has tops."""
    rows = list(rows)
    batch.seq_ids.extend(r.seq_id for r in rows)
    batch.token_ids.extend(r.token_id for r in rows)
    batch.logprobs.extend(r.logprob for r in rows)
    if any(r.top for r in rows) or len(batch.num_top):
        batch.num_top.extend(len(r.top) for r in rows)
        batch.top_token_ids.extend(t for r in rows for t, _ in r.top)
        batch.top_logprobs.extend(lp for r in rows for _, lp in r.top)


def sampled_rows(batch: worker_pb2.SampledBatch) -> list[SampledRow]:
    """The rows of ``batch``; ``InvalidArgument`` if its columns disagree."""
    seq_ids = list(batch.seq_ids)
    n = len(seq_ids)
    _check_len(batch.token_ids, n, "sampled.token_ids")
    _check_len(batch.logprobs, n, "sampled.logprobs")
    if not len(batch.num_top):
        columns = zip(seq_ids, batch.token_ids, batch.logprobs, strict=True)
        return [SampledRow(*cols) for cols in columns]
    tops = split_tops(batch)
    columns_with_tops = zip(seq_ids, batch.token_ids, batch.logprobs, tops, strict=True)
    return [SampledRow(*cols) for cols in columns_with_tops]


def split_tops(batch: worker_pb2.SampledBatch) -> list[list[tuple[int, float]]]:
    """Per sampled row, its (token id, log-prob) top pairs; needs a non-empty ``num_top``."""
    _check_len(batch.num_top, len(batch.seq_ids), "sampled.num_top")
    _check_len(batch.top_logprobs, len(batch.top_token_ids), "sampled.top_logprobs")
    pairs = list(zip(batch.top_token_ids, batch.top_logprobs, strict=True))
    return _split(pairs, batch.num_top, "sampled.top_token_ids")


def _check_len(column: Sequence[object], n: int, name: str) -> None:
    if len(column) != n:
        raise InvalidArgument(name, f"has {len(column)} entries for {n} sequences")


def _split(flat: Sequence[object], counts: Sequence[int], name: str) -> list[list]:
    """``flat`` cut into consecutive runs of ``counts[i]`` items."""
    if sum(counts) != len(flat):
        raise InvalidArgument(name, f"has {len(flat)} entries but the counts add up to "
                                    f"{sum(counts)}")
    ends = list(itertools.accumulate(counts))
    flat = list(flat)
    return [flat[end - count:end] for end, count in zip(ends, counts, strict=True)]
