"""``Worker``: the domain object behind the Worker gRPC service (which is a thin adapter over it).

A step is a ``pagedserve.core.step.WorkerStep`` applied in the contract's fixed order (see
``pagedserve.core.step``); each sampled token is appended to its sequence here, unless the scheduler
appends for that sequence (beam search). With ``check_steps`` (the default, and always behind the
gRPC servicer) every step is validated before anything is mutated, so a bad step raises
``InvalidArgument``/``NotFound`` and changes nothing; the offline ``LLM``, whose scheduler is this
same process, turns the check off.

Tensor parallel (``worker/parallel.py``): the worker is one rank of a group and its model and KV
pool are that rank's slice. The leader's ``step`` validates the step, sends it to the followers,
then applies it like a whole worker; a follower's ``follow_leader`` applies each step it
receives with the same code (``_execute``), without logits: it appends the samples the leader
shares. Once a step has gone out, any error on a rank fails the whole group (``GroupFailure``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pagedserve.core.models import resolve_model_path
from pagedserve.core.step import NewSeq, ScheduledRow, WorkerResult, WorkerStep
from protos.pagedserve.v1 import common_pb2, worker_pb2
from worker.cache_engine import GIB, CacheEngine, block_bytes, num_blocks_for_budget
from worker.config import WorkerConfig
from worker.cpu_kernels import CpuKernels, cpu_kernels
from worker.metrics import WorkerMetrics
from worker.model_runner import ModelRunner, ScheduledWork, StepResult
from worker.models.config import ModelConfig
from worker.models.llama import AttentionBackend
from worker.models.loader import load_model
from worker.models.sharding import TensorShard
from worker.parallel import (
    HEARTBEAT,
    RESET,
    SHUTDOWN,
    CommandKind,
    GroupCommand,
    GroupFailure,
    Heartbeat,
    init_group,
)
from worker.sampler import ResolvedParams, Sampler
from worker.sequence_state import SequenceState
from worker.step_validation import validate_step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    backend: AttentionBackend


class Worker:
    """Owns the model, the KV memory and every sequence's mirrored state.

    Thread-safety: ``step``/``reset`` are serialised by a lock (the servicer runs them in a
    thread so the event loop stays responsive); in a tensor-parallel group the lock also orders
    the leader's commands and their collectives.

    ``model_config`` is the whole model's shape; ``model.config`` is this rank's slice (the
    same, unless tensor parallel), from which the KV pool is built."""

    def __init__(self, config: WorkerConfig, check_steps: bool = True) -> None:
        self.config = config
        self.check_steps = check_steps
        self.placement = resolve_placement(config)
        self.model_path = resolve_model_path(config.load.model)
        self.group = init_group(config.parallel, self.placement.device)
        self.model, self.model_config = load_model(
            self.model_path, self.placement.dtype, self.placement.device, self.placement.backend,
            self.group.shard if self.group is not None else TensorShard(),
        )
        if self.group is not None:
            self.model.use_all_reduce(self.group.all_reduce)
        self.cpu_kernels: CpuKernels = cpu_kernels(self.placement.device, self.placement.dtype)
        logger.info("cpu kernels: %s", self.cpu_kernels.describe())
        # The stop set arrives in each request's params; the model's EOS serves min_tokens.
        self.sampler = Sampler(self.model_config.eos_token_ids, seed=config.seed)
        self.runner = ModelRunner(
            self.model, self.sampler, config.cache.block_size, self.placement.device,
            tensor_parallel_size=config.parallel.size,
        )
        logger.info("execution path: %s", self.runner.execution.describe())
        num_gpu, num_cpu = self._size_pools()
        self.cache = CacheEngine(
            self.model.config, config.cache.block_size, num_gpu, num_cpu,
            self.placement.dtype, self.placement.device,
        )
        self.seqs: dict[int, SequenceState] = {}
        self.metrics: WorkerMetrics | None = None  # set by the server when metrics are on
        # Seconds spent in the model forward (logits included) and in sampling, all steps so
        # far: where a step's time goes, for benchmarks (the metrics have them per step).
        self.forward_seconds = 0.0
        self.sample_seconds = 0.0
        self._lock = threading.Lock()
        self.instance_id = uuid.uuid4().hex
        self.block_hashes: dict[int, bytes] = {}  # block id -> content hash (cached_blocks)
        self._heartbeat: Heartbeat | None = None
        self._last_command = time.monotonic()  # the leader's last command to its followers
        if self.group is not None:
            self._join_group()

    # ---------------------------------------------------------------------------------- public

    def info(self) -> worker_pb2.WorkerInfo:
        mc = self.model_config
        return worker_pb2.WorkerInfo(
            worker_id=self.config.server.worker_id,
            model=mc.name,
            num_gpu_blocks=self.cache.num_gpu_blocks,
            num_cpu_blocks=self.cache.num_cpu_blocks,
            block_size=self.config.cache.block_size,
            max_model_len=mc.max_position_embeddings,
            vocab_size=mc.vocab_size,
            eos_token_ids=list(mc.eos_token_ids),
            device=str(self.placement.device),
            attention_backend=self.placement.backend.name,
            instance_id=self.instance_id,
            cached_blocks=[worker_pb2.BlockHash(block_id=b, block_hash=h)
                           for b, h in self.block_hashes.items()],
            max_num_batched_tokens=self.config.batch.max_num_batched_tokens,
            max_num_seqs=self.config.batch.max_num_seqs,
            attention_break_even_context=mc.attention_break_even_context,
        )

    @property
    def rank(self) -> int:
        return self.group.rank if self.group is not None else 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of this rank's model parameters and buffers (packed projections included)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step(self, step: WorkerStep) -> WorkerResult:
        """A step from the scheduler (a whole worker, or a group's leader)."""
        with self._lock:
            rows = step.scheduled.rows()
            if self.check_steps:
                validate_step(step, rows, self.seqs, self.cache, self.model_config.vocab_size)
            with self._for_the_group(GroupCommand(CommandKind.STEP, step)):
                result = self._execute(step, rows)
        return self._result(step.step_id, result)

    def reset(self) -> None:
        """Drops every sequence; KV memory is left as is (the scheduler forgets it too)."""
        with self._lock, self._for_the_group(RESET):
            self.seqs.clear()

    def follow_leader(self) -> None:
        """Follower: runs the leader's commands until it sends shutdown. Raises
        ``GroupFailure`` when the group fails (the leader died or hangs: no command within
        the timeout)."""
        assert self.group is not None and not self.group.is_leader
        while (command := self.group.receive()).kind is not CommandKind.SHUTDOWN:
            with self._lock:
                try:
                    if command.step is not None:
                        self._execute(command.step, command.step.scheduled.rows())
                    elif command.kind is CommandKind.RESET:
                        self.seqs.clear()
                except Exception as exc:
                    raise self.group.fail(exc) from exc
        logger.info("tensor-parallel leader shut the group down")

    def heartbeat(self) -> None:
        """Leader: a no-op command when no other went out for a while (``worker/parallel.py``)."""
        assert self.group is not None
        with self._lock:
            if time.monotonic() - self._last_command >= self.group.timeout_s / 3:
                self._send(HEARTBEAT)

    def close(self) -> None:
        """Leader: tells the followers to exit; any rank: leaves the group."""
        if self.group is None:
            return
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.group.is_leader and not self.group.failed.is_set():
            with self._lock:
                try:
                    self._send(SHUTDOWN)
                except GroupFailure:
                    logger.warning("a follower was gone before shutdown")
        self.group.close()

    # -------------------------------------------------------------------------------- internal

    def _join_group(self) -> None:
        """After loading and sizing: the leader logs every rank's weight bytes and starts the
        heartbeat."""
        assert self.group is not None
        per_rank = self.group.gather_ints(self.weight_bytes)
        if self.group.is_leader:
            logger.info("tensor-parallel group ready: %d ranks, weight MiB per rank %s, "
                        "%d KV blocks", self.group.size,
                        [round(b / 2**20, 1) for b in per_rank], self.cache.num_gpu_blocks)
            self._heartbeat = Heartbeat(self.heartbeat, self.group.timeout_s / 3)

    def _send(self, command: GroupCommand) -> None:
        assert self.group is not None
        self.group.send(command)
        self._last_command = time.monotonic()

    @contextmanager
    def _for_the_group(self, command: GroupCommand) -> Iterator[None]:
        """Leader: sends ``command`` to the followers, then runs the block; an error after the
        send fails the group (the followers are already running it). A whole worker: just
        the block."""
        if self.group is None:
            yield
            return
        self._send(command)
        try:
            yield
        except Exception as exc:
            raise self.group.fail(exc) from exc

    def _execute(self, step: WorkerStep, rows: list[ScheduledRow]) -> StepResult:
        """Phases 1-6 of the step contract on this rank; the leader's samples are shared with
        the followers before they are appended."""
        for seq_id in step.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        self._register(step.new_seqs)
        for block_id, block_hash in step.cached:  # computed earlier: before this step writes
            self.block_hashes[block_id] = block_hash
        self.cache.swap_out(step.swap_out)
        self.cache.swap_in(step.swap_in)
        self.cache.copy_blocks(step.copies)
        work = [self._apply_scheduled(s) for s in rows]
        self._forget_written(step, work)
        result = self.runner.execute(work, self.cache.gpu_cache)
        if self.group is not None:
            result.output.token_ids = self.group.share_token_ids(result.output.token_ids,
                                                                 len(result.seq_ids))
        self._append_samples(result)
        self.forward_seconds += result.forward_seconds
        self.sample_seconds += result.sample_seconds
        logger.debug("step %d: %d seqs, %d sampled, forward %.4fs", step.step_id, len(work),
                     len(result.seq_ids), result.forward_seconds)
        if self.metrics is not None:
            self.metrics.observe_step(sum(w.num_new_tokens for w in work), len(result.seq_ids),
                                      result.forward_seconds, len(self.seqs),
                                      sampling_s=result.sample_seconds)
        return result

    def _register(self, new_seqs: list[NewSeq]) -> None:
        """Appends of this step come later (phase 5), so a fork copies its parent's tokens as
        they stand before this step; a parent may itself be new in this step."""
        for n in new_seqs:
            params = ResolvedParams.from_proto(n.params) if n.params is not None else None
            if n.parent_seq_id is not None:
                parent = self.seqs[n.parent_seq_id]
                seq = parent.fork(n.seq_id, params or parent.params, n.num_prompt_tokens)
                seq.append(n.token_ids)
            else:
                params = params or ResolvedParams.from_proto(common_pb2.SamplingParams())
                seq = SequenceState(n.seq_id, n.token_ids, n.num_prompt_tokens, params)
            seq.appends_samples = not n.scheduler_appends
            self.seqs[n.seq_id] = seq

    def _append_samples(self, result: StepResult) -> None:
        """Each sampled token joins its sequence, as the scheduler's copy will (phase 6)."""
        seqs = self.seqs
        for seq_id, token_id in zip(result.seq_ids, result.output.token_ids, strict=False):
            seq = seqs[seq_id]
            if seq.appends_samples:
                seq.append_one(token_id)

    def _forget_written(self, step: WorkerStep, work: list[ScheduledWork]) -> None:
        """Blocks this step writes no longer hold the content their hash names."""
        if not self.block_hashes:
            return
        for _, dst in (*step.copies, *step.swap_in):
            self.block_hashes.pop(dst, None)
        bs = self.config.cache.block_size
        for w in work:
            first = w.num_computed_tokens // bs
            last = -(-(w.num_computed_tokens + w.num_new_tokens) // bs)
            for block_id in w.seq.block_table[first:last]:
                self.block_hashes.pop(block_id, None)

    def _apply_scheduled(self, s: ScheduledRow) -> ScheduledWork:
        seq = self.seqs[s.seq_id]
        seq.append(s.append_token_ids)
        if s.replace_block_table:
            seq.block_table = s.new_block_ids
        else:
            seq.block_table.extend(s.new_block_ids)
        return ScheduledWork(seq, s.num_computed_tokens, s.num_new_tokens, s.sample)

    @staticmethod
    def _result(step_id: int, result: StepResult) -> WorkerResult:
        out, num = result.output, len(result.seq_ids)
        tops = out.top_logprobs[:num]
        return WorkerResult(step_id, result.seq_ids, out.token_ids[:num], out.logprobs[:num],
                            tops if any(tops) else [], result.forward_seconds,
                            result.sample_seconds)

    def _size_pools(self) -> tuple[int, int]:
        """(device, host) blocks. In a group each rank sizes its own pools (its blocks hold
        only its KV heads) and the group takes the smallest: every rank has every block id."""
        num_gpu, num_cpu = self._size_own_pools()
        if self.group is None:
            return num_gpu, num_cpu
        return self.group.min_over_ranks(num_gpu), self.group.min_over_ranks(num_cpu)

    def _size_own_pools(self) -> tuple[int, int]:
        cc, mc = self.config.cache, self.model.config
        per_block = block_bytes(mc, cc.block_size, self.placement.dtype)
        num_cpu = num_blocks_for_budget(cc.swap_space_gib * GIB, per_block)
        if cc.num_gpu_blocks is not None:
            return cc.num_gpu_blocks, num_cpu
        if self.placement.device.type != "cuda":
            return num_blocks_for_budget(cc.kv_cache_memory_gib * GIB, per_block), num_cpu
        return self._profile_gpu_blocks(mc, per_block), num_cpu

    def _profile_gpu_blocks(self, mc: ModelConfig, per_block: int) -> int:
        """(total × utilization − peak of a max-batch dummy step) / block bytes."""
        bc, bs = self.config.batch, self.config.cache.block_size
        dummy = CacheEngine(mc, bs, -(-bc.max_num_batched_tokens // bs), 0,
                            self.placement.dtype, self.placement.device)
        peak = self.runner.profile_peak_memory(
            bc.max_num_batched_tokens, bc.max_num_seqs, dummy.gpu_cache
        )
        del dummy
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.placement.device).total_memory
        budget = total * self.config.cache.gpu_memory_utilization - peak
        num = num_blocks_for_budget(budget, per_block)
        logger.info(
            "profiled peak %.2f GiB of %.2f GiB: %d KV blocks", peak / GIB, total / GIB, num
        )
        if num <= 0:
            raise RuntimeError(
                "no memory left for the KV cache: raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return num


def resolve_placement(config: WorkerConfig) -> Placement:
    """Device "auto" -> cuda if available; dtype "auto" -> float32 on CPU, bfloat16 on CUDA;
    backend "auto" -> triton on CUDA when it imports, else torch."""
    load = config.load
    name = load.device if load.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available: use --device cpu")
    dtype_name = load.dtype if load.dtype != "auto" else (
        "float32" if device.type == "cpu" else "bfloat16")
    return Placement(device, getattr(torch, dtype_name), _backend(load.attention_backend, device))


def _backend(choice: str, device: torch.device) -> AttentionBackend:
    from worker.attention.torch_backend import TorchAttentionBackend

    if device.type != "cuda" or choice == "torch":
        if choice == "triton":
            raise ValueError("attention_backend triton needs a CUDA device")
        return TorchAttentionBackend()
    try:  # the module imports anywhere; its kernels are imported when the backend is built
        from worker.attention.triton_backend import TritonAttentionBackend

        backend: AttentionBackend = TritonAttentionBackend()
    except (ImportError, RuntimeError) as exc:
        if choice == "triton":
            raise ValueError(f"attention_backend triton is unavailable: {exc}") from exc
        logger.warning("Triton attention backend unavailable (%s); using torch", exc)
        return TorchAttentionBackend()
    return backend
