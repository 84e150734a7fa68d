"""OpenAI request bodies -> GenerateRequests, responses built from GenerateResponses, and the one
gRPC-code -> HTTP-status table (``router/openai_protocol.py``); no server involved."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from pagedserve.core.errors import InvalidArgument, ModelNotFound, ResourceExhausted, Unavailable
from protos.pagedserve.v1 import common_pb2, generation_pb2
from router.openai_protocol import (
    HTTP_STATUS,
    ResponseBuilder,
    error_response,
    parse_chat_request,
    parse_completion_request,
)

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_every_grpc_code_has_one_http_status() -> None:
    assert {code.name for code in grpc.StatusCode} == set(HTTP_STATUS)
    assert (HTTP_STATUS["INVALID_ARGUMENT"], HTTP_STATUS["UNAUTHENTICATED"],
            HTTP_STATUS["NOT_FOUND"], HTTP_STATUS["RESOURCE_EXHAUSTED"],
            HTTP_STATUS["UNAVAILABLE"], HTTP_STATUS["DEADLINE_EXCEEDED"]) == (
                400, 401, 404, 429, 503, 504)


def test_error_responses_have_openai_shape_and_the_clients_field_names() -> None:
    parsed = parse_chat_request({**CHAT, "max_completion_tokens": 5}, "r")
    status, body = error_response(InvalidArgument("params.max_tokens", "must be at most 4"),
                                  parsed.param_name)
    assert status == 400 and body == {"error": {
        "message": "max_completion_tokens: must be at most 4", "type": "invalid_request_error",
        "param": "max_completion_tokens", "code": "invalid_argument"}}
    status, body = error_response(ModelNotFound("gpt-5", "smollm2"))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert error_response(ResourceExhausted("queue full"))[0] == 429
    assert error_response(Unavailable("no healthy worker"))[1]["error"]["type"] == "server_error"
    status, body = error_response(RuntimeError("secret detail"))
    assert status == 500 and "secret" not in body["error"]["message"]


@pytest.mark.parametrize(("body", "ours", "index", "theirs"), [
    ({"prompt": "x"}, "params.top_p", 0, "top_p"),
    ({"prompt": "x"}, "params.stop[2]", 0, "stop[2]"),
    ({"prompt": "x"}, "params.logprobs", 0, "logprobs"),
    ({"prompt": [1, 2]}, "prompt.token_ids[1]", 0, "prompt[1]"),
    ({"prompt": ["a", [1, 2]]}, "prompt.token_ids[1]", 1, "prompt[1][1]"),
    ({"prompt": ["a", "b"]}, "prompt.text", 1, "prompt[1]"),
    ({"prompt": "x"}, "prompt", 0, "prompt"),
    ({"prompt": "x", "use_beam_search": True, "best_of": 3}, "params.beam_width", 0, "best_of"),
    (CHAT, "prompt.chat.messages[0].role", 0, "messages[0].role"),
    (CHAT, "params.logprobs", 0, "top_logprobs"),
    (CHAT, "params.max_tokens", 0, "max_tokens"),
    (CHAT, "request_id", 0, "X-Request-Id"),
])
def test_param_names_are_the_clients(body: dict[str, Any], ours: str, index: int,
                                     theirs: str) -> None:
    parse = parse_chat_request if "messages" in body else parse_completion_request
    assert parse(body, "").param_name(ours, index) == theirs


def test_sampling_fields_map_onto_ours_and_only_those_set_are_set() -> None:
    parsed = parse_completion_request({
        "prompt": "x", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2, "stop": "\n",
        "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2, "top_k": 5, "min_p": 0.1,
        "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 2, "best_of": 3,
        "logprobs": 0, "user": "ignored"}, "id")
    (request,) = parsed.requests
    p = request.params
    assert (p.max_tokens, p.n, list(p.stop), p.seed, p.top_k, p.min_tokens, p.best_of) == (
        7, 2, ["\n"], 3, 5, 2, 3)
    assert p.temperature == pytest.approx(0.5) and p.repetition_penalty == pytest.approx(1.1)
    assert p.ignore_eos and request.text == "x" and request.request_id == "id"
    assert (p.logprobs, parsed.top_logprobs) == (1, 0)  # asks for 1, shows none
    assert parse_completion_request({"prompt": "x"}, "").requests[0].params.max_tokens == 16
    chat = parse_chat_request({**CHAT, "max_tokens": 3, "max_completion_tokens": 9}, "")
    assert chat.requests[0].params.max_tokens == 9
    assert not parse_chat_request(CHAT, "").requests[0].params.HasField("max_tokens")
    beam = parse_completion_request({"prompt": "x", "use_beam_search": True, "n": 2}, "")
    assert (beam.requests[0].params.beam_width, beam.requests[0].params.HasField("best_of")) == (
        2, False)


def test_prompts_and_messages_in_every_form() -> None:
    batch = parse_completion_request({"prompt": ["a", [5, 6]]}, "rid")
    assert batch.batch and [r.request_id for r in batch.requests] == ["rid-0", "rid-1"]
    assert batch.requests[0].text == "a" and list(batch.requests[1].token_ids.ids) == [5, 6]
    assert list(parse_completion_request({"prompt": [5, 6]}, "").requests[0].token_ids.ids) == [
        5, 6]
    chat = parse_chat_request({"messages": [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]}, "")
    assert [(m.role, m.content) for m in chat.requests[0].chat.messages] == [
        ("system", ""), ("user", "a\nb")]


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt[1]"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"messages": "hi"}, "messages"),
    ([1, 2], "body"),
])
def test_wrong_json_types_and_unsupported_fields_are_refused(body: Any, field: str) -> None:
    parse = (parse_chat_request if isinstance(body, dict) and "messages" in body
             else parse_completion_request)
    with pytest.raises(InvalidArgument) as err:
        parse(body, "")
    assert err.value.field == field


def _message(index: int, text: str, ids: list[int], finish: int = 0,
             usage: tuple[int, int, int] | None = None) -> generation_pb2.GenerateResponse:
    m = generation_pb2.GenerateResponse(index=index, text=text, token_ids=ids,
                                        finish_reason=finish)  # type: ignore[arg-type]
    for i in ids:
        m.logprobs.add(token_id=i, logprob=-0.5, top=[common_pb2.TokenLogprob(
            token_id=i, logprob=-0.5), common_pb2.TokenLogprob(token_id=i + 1, logprob=-1.0)])
    if usage:
        m.usage.CopyFrom(common_pb2.Usage(prompt_tokens=usage[0], completion_tokens=usage[1],
                                          cached_tokens=usage[2]))
    return m


class _Decoder:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def test_chunks_and_the_whole_response_carry_text_logprobs_and_usage() -> None:
    parsed = parse_completion_request({"prompt": "x", "n": 2, "temperature": 1, "logprobs": 1,
                                       "stream": True,
                                       "stream_options": {"include_usage": True}}, "")
    builder = ResponseBuilder(parsed, "abc", "m", 7, _Decoder())  # type: ignore[arg-type]
    builder.set_prompt_tokens([4])
    assert builder.chunk(0, generation_pb2.GenerateResponse(index=0)) is None  # nothing new
    chunk = builder.chunk(0, _message(1, "hi", [10, 11]))
    assert chunk is not None and chunk["usage"] is None
    (choice,) = chunk["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (1, "hi", None)
    assert choice["logprobs"] == {"tokens": ["<10>", "<11>"], "token_logprobs": [-0.5, -0.5],
                                  "top_logprobs": [{"<10>": -0.5}, {"<11>": -0.5}],
                                  "text_offset": [0, 4]}
    last = builder.chunk(0, _message(1, "!", [12], common_pb2.FINISH_REASON_STOP, (4, 3, 2)))
    assert last is not None and last["choices"][0]["logprobs"]["text_offset"] == [8]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert builder.usage_chunk()["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 2}}

    whole = ResponseBuilder(parse_chat_request({**CHAT, "logprobs": True}, ""), "abc", "m", 7,
                            _Decoder())  # type: ignore[arg-type]
    whole.add(0, _message(0, "a", [1]))
    whole.add(0, _message(0, "b", [2], common_pb2.FINISH_REASON_LENGTH, (5, 2, 0)))
    body = whole.response()
    assert body["id"] == "chatcmpl-abc" and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "ab"}
    assert choice["finish_reason"] == "length"
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["<1>", "<2>"]
    assert choice["logprobs"]["content"][0]["top_logprobs"] == []  # top_logprobs 0
    assert body["usage"]["completion_tokens"] == 2


def test_the_http_port_is_off_unless_set_by_flag_or_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from router.config import ServerConfig, add_router_arguments, router_config_from_args

    def config(*argv: str) -> ServerConfig:
        parser = argparse.ArgumentParser()
        add_router_arguments(parser)
        return router_config_from_args(parser.parse_args(list(argv))).server

    assert config().http_port is None
    assert config("--http-port", "8000").http_port == 8000
    monkeypatch.setenv("PAGEDSERVE_ROUTER_HTTP_PORT", "0")
    assert config().http_port == 0  # any free port
    with pytest.raises(ValueError, match="http_port"):
        ServerConfig(http_port=70000)
