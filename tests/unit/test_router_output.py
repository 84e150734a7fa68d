"""OutputProcessor: scheduler token stream -> client messages (stops, n > 1, beams, usage)."""

from __future__ import annotations

import pytest

from pagedserve.core.models import default_model_path
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2, scheduler_pb2
from router.output import OutputProcessor
from router.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


def processor(tokenizer: Tokenizer, **sampling: object) -> OutputProcessor:
    params = resolve_sampling_params(make_sampling_params(**sampling), num_prompt_tokens=4,
                                     max_model_len=2048, max_tokens_limit=1024,
                                     eos_token_ids=tokenizer.eos_token_ids)
    return OutputProcessor("req", tokenizer, params, num_prompt_tokens=4)


def seq(index: int, ids: list[int], finish: int = 0, **kw: object) -> scheduler_pb2.SubmitResponse:
    return scheduler_pb2.SubmitResponse(
        outputs=[scheduler_pb2.SeqOutput(index=index, token_ids=ids, finish_reason=finish, **kw)]
    )


def run(proc: OutputProcessor, responses: list[scheduler_pb2.SubmitResponse]) -> list:
    messages = []
    for response in responses:
        messages += proc.process(response)
        if proc.all_finished:
            break
    return messages


def test_eos_ends_the_output_without_its_text_and_reports_usage(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" Hello there")
    proc = processor(tokenizer)
    messages = run(proc, [seq(0, [i]) for i in ids] + [seq(0, [2], STOP, num_cached_tokens=3)])
    assert "".join(m.text for m in messages) == " Hello there"
    last = messages[-1]
    assert last.finish_reason == STOP and list(last.token_ids) == [2]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.cached_tokens) == (4, len(ids) + 1, 3)
    assert proc.all_finished


def test_stop_string_finishes_the_output_before_the_scheduler_does(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four")
    proc = processor(tokenizer, stop=["three"])
    messages = run(proc, [seq(0, [i]) for i in ids])
    assert "".join(m.text for m in messages) == "one two "
    assert messages[-1].finish_reason == STOP and proc.all_finished


def test_each_of_n_outputs_streams_and_finishes_independently(tokenizer: Tokenizer) -> None:
    a, b = tokenizer.encode("alpha"), tokenizer.encode("beta gamma")
    proc = processor(tokenizer, n=2, stop=["gamma"])
    messages = run(proc, [seq(0, a), seq(1, b), seq(0, [2], STOP)])
    by_index = {i: "".join(m.text for m in messages if m.index == i) for i in (0, 1)}
    assert by_index == {0: "alpha", 1: "beta "}
    assert proc.all_finished


def test_length_finish_flushes_held_stop_prefix(tokenizer: Tokenizer) -> None:
    proc = processor(tokenizer, stop=["END"])
    messages = run(proc, [seq(0, tokenizer.encode("wait E")),
                          seq(0, tokenizer.encode("N"), LENGTH)])
    assert "".join(m.text for m in messages) == "wait EN"
    assert messages[-1].finish_reason == LENGTH


def test_beam_replacement_sends_the_full_text_once_finished(tokenizer: Tokenizer) -> None:
    proc = processor(tokenizer, beam_width=2)
    first, final = tokenizer.encode("The cat"), tokenizer.encode("The dog sat")
    messages = run(proc, [seq(0, first, replaces=True), seq(0, final, LENGTH, replaces=True)])
    assert len(messages) == 1
    assert messages[0].text == "The dog sat" and list(messages[0].token_ids) == final
    assert messages[0].usage.completion_tokens == len(final)


def test_stream_that_ends_early_is_reported_as_abort(tokenizer: Tokenizer) -> None:
    proc = processor(tokenizer)
    run(proc, [seq(0, tokenizer.encode("partial"))])
    [message] = proc.abort_unfinished()
    assert message.finish_reason == common_pb2.FINISH_REASON_ABORT
