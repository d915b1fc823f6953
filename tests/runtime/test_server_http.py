"""The real server (`python -m dllm_runtime`) on a loopback port with a tiny random LLaDA model.

Exercised through real HTTP: the `openai` client for the happy paths and streaming, httpx for the
bad-input matrix, disconnects and concurrency, `/metrics` to check that nothing leaks. The model
has random weights, so tests compare behaviour (streamed == non-streamed text, seeds, counts), never
particular words.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import httpx
import openai
import pytest

from tests.runtime.server_process import ServerProcess

API_KEY = "sk-test-key"
NAME = "tiny"
MAX_MODEL_LEN = 320
BODY_LIMIT = 64 * 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def server(request, tiny_llada_dir, tmp_path_factory):
    """Every test runs against both engine placements: the default (the engine on a worker thread of
    the server process) and `--engine-process` (the engine in a child process behind a pipe), which
    must be indistinguishable over HTTP."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    placement = ["--engine-process"] if request.param == "engine-process" else []
    proc = ServerProcess(
        "--model", str(tiny_llada_dir), "--served-model-name", NAME, "--api-key", API_KEY,
        "--max-model-len", str(MAX_MODEL_LEN), "--max-body-bytes", str(BODY_LIMIT), "--max-n", "4",
        "--default-max-tokens", "4", "--trust-remote-code", "--grace-period", "0", *placement,
        env={"DLLM_MAX_NUM_SEQS": "16"}, log_path=log,
    )
    try:
        proc.wait_ready(NAME)
        assert ("(engine process)" in proc.log()) == bool(placement), proc.log()[-3000:]
        yield proc
    finally:
        code = proc.terminate()  # normally already stopped by the last test
        assert code == 0, proc.log()[-3000:]


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(server, path: str, body, headers=None, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base_url + path, content=content, headers={**AUTH, **(headers or {})}, timeout=60, **kw)


# ------------------------------------------------------------------------------ happy paths


def test_models_list_and_retrieve(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(NAME).id == NAME
    # KServe's prefix serves the same API
    r = httpx.get(server.base_url + "/openai/v1/models", headers=AUTH)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == NAME


def test_health_liveness_and_readiness(server):
    assert httpx.get(server.base_url + "/").status_code == 200
    assert httpx.get(server.base_url + "/health").status_code == 200
    r = httpx.get(server.base_url + f"/v1/models/{NAME}")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert httpx.get(server.base_url + f"/v2/models/{NAME}/ready").status_code == 200
    assert "trust-remote-code" in server.log()  # accepted and said to be ignored


def test_completion(client):
    out = client.completions.create(model=NAME, prompt="The answer is", max_tokens=4)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and 1 <= out.usage.completion_tokens <= 4
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    diffusion = out.usage.model_extra["diffusion"]
    assert diffusion["forwards"] >= 1
    assert diffusion["tokens_per_forward"] == pytest.approx(out.usage.completion_tokens / diffusion["forwards"], 1e-3)


def test_token_id_prompt_and_echo(client):
    out = client.completions.create(model=NAME, prompt="Hello world", max_tokens=2, echo=True)
    assert out.choices[0].text.startswith("Hello world")
    ids = client.completions.create(model=NAME, prompt=[1000, 1001, 1002], max_tokens=2)
    assert ids.usage.prompt_tokens == 3


def test_diffusion_settings_per_request(client):
    """extra_body fields reach the decoder: LLaDA with 2 steps for 4 tokens is exactly 2 forwards."""
    two = client.completions.create(model=NAME, prompt="Count:", max_tokens=4,
                                    extra_body={"algorithm": "llada", "steps": 2, "block_length": 4})
    four = client.completions.create(model=NAME, prompt="Count:", max_tokens=4,
                                     extra_body={"algorithm": "llada", "steps": 4, "block_length": 4})
    assert two.usage.model_extra["diffusion"]["forwards"] == 2
    assert four.usage.model_extra["diffusion"]["forwards"] == 4


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=4, temperature=1.0, seed=7,
              extra_body={"algorithm": "llada", "steps": 4})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_n_choices_count_prompt_once(client):
    one = client.completions.create(model=NAME, prompt="Hi there", max_tokens=2)
    two = client.completions.create(model=NAME, prompt="Hi there", max_tokens=2, n=2, temperature=1.0, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens


def test_streamed_choices_match_non_streamed(client):
    """n=2 over two prompts = 4 interleaved streamed choices, each equal to its non-streamed twin."""
    kw = dict(model=NAME, prompt=["First prompt", "Second one"], n=2, max_tokens=4, temperature=1.0, seed=11,
              extra_body={"algorithm": "llada", "steps": 4, "block_length": 4})
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    streamed: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert streamed == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    single = client.completions.create(model=NAME, prompt="First prompt", max_tokens=1)
    second = client.completions.create(model=NAME, prompt="Second one", max_tokens=1)
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens + second.usage.prompt_tokens


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=4, user="tester")
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens > 5  # the chat template wraps the messages
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_matches_non_streaming(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Tell me something"}], max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_matches_non_streaming(client, server):
    kw = dict(model=NAME, prompt="Stream this", max_tokens=6, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # raw SSE framing: data lines, [DONE] last
    with httpx.stream("POST", server.base_url + "/v1/completions", headers=AUTH, timeout=60,
                      json={**kw, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------ bad input

TOO_LONG_PROMPT = "word " * (MAX_MODEL_LEN + 10)
C, CH = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD_INPUTS = [
    # (id, path, body, status, param)
    ("invalid-json", C, b'{"prompt": ', 400, None),
    ("not-an-object", C, b"[1, 2]", 400, None),
    ("missing-prompt", C, {"max_tokens": 2}, 400, "prompt"),
    ("max-tokens-string", C, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature-string", C, {"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("prompt-wrong-type", C, {"prompt": {"text": "a"}}, 400, "prompt"),
    ("messages-in-completions", C, {"prompt": "a", "messages": MSG}, 400, "messages"),
    ("prompt-in-chat", CH, {"messages": MSG, "prompt": "a"}, 400, "prompt"),
    ("unknown-field", C, {"prompt": "a", "foo": 1}, 400, "foo"),
    ("max-tokens-zero", C, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", C, {"prompt": "a", "max_tokens": -3}, 400, "max_tokens"),
    ("max-tokens-beyond-model-len", C, {"prompt": "a", "max_tokens": MAX_MODEL_LEN + 1}, 400, "max_tokens"),
    ("max-completion-tokens-zero", CH, {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("empty-prompt", C, {"prompt": ""}, 400, "prompt"),
    ("empty-prompt-list", C, {"prompt": []}, 400, "prompt"),
    ("prompt-too-long", C, {"prompt": TOO_LONG_PROMPT, "max_tokens": 4}, 400, "prompt"),
    ("token-id-outside-vocab", C, {"prompt": [1, 10**9]}, 400, "prompt"),
    ("steps-zero", C, {"prompt": "a", "steps": 0}, 400, "steps"),
    ("unknown-algorithm", C, {"prompt": "a", "algorithm": "nope"}, 400, "algorithm"),
    ("cache-needs-fast-dllm", C, {"prompt": "a", "algorithm": "llada", "cache": "dual"}, 400, "cache"),
    ("d3llm-has-no-dual-cache", C, {"prompt": "a", "algorithm": "d3llm", "cache": "dual"}, 400, "cache"),
    ("cache-delay-type", C, {"prompt": "a", "cache_delay_iter": "two"}, 400, "cache_delay_iter"),
    ("threshold-out-of-range", C, {"prompt": "a", "threshold": 1.5}, 400, "threshold"),
    ("n-zero", C, {"prompt": "a", "n": 0}, 400, "n"),
    ("n-over-limit", C, {"prompt": "a", "n": 5}, 400, "n"),
    ("logprobs-unsupported", C, {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ("stream-options-without-stream", C, {"prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("empty-stop-string", C, {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("no-messages", CH, {"messages": []}, 400, "messages"),
    ("bad-role", CH, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("tools-unsupported", CH, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown-model", C, {"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ("body-too-large", C, {"prompt": "x" * (BODY_LIMIT + 1)}, 413, None),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_client_error(server, path, body, status, param):
    r = post(server, path, body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error


def test_bad_input_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="a", max_tokens=0)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_api_key_required(server, headers):
    r = httpx.post(server.base_url + C, json={"prompt": "a"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.base_url + "/v1/models", headers=headers).status_code == 401
    # probes stay open: kubelet sends no key
    assert httpx.get(server.base_url + f"/v1/models/{NAME}", headers=headers).status_code == 200


def test_unknown_model_readiness_is_404(server):
    assert httpx.get(server.base_url + "/v1/models/other").status_code == 404


# ------------------------------------------------------------------------------ metrics


def test_metrics_present_and_moving(server, client):
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "dllm:batch_occupancy", "dllm:kv_cache_bytes",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
             "dllm:forwards_total", "dllm:request_errors_total", "vllm:time_to_first_token_seconds_count",
             "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
             "vllm:request_prompt_tokens_count", "vllm:request_generation_tokens_count",
             "dllm:request_forwards_count", "dllm:tokens_per_forward_count", "dllm:step_latency_seconds_count",
             "dllm:batch_size_count"]
    before = {n: server.metric(n, model_name=NAME) for n in names}
    text = httpx.get(server.base_url + "/metrics").text
    for n in names:
        assert f"{n}{{" in text, n
    out = client.completions.create(model=NAME, prompt="metrics please", max_tokens=3,
                                    extra_body={"algorithm": "llada", "steps": 3})
    post(server, C, {"prompt": "a", "max_tokens": 0})  # a validation error
    after = {n: server.metric(n, model_name=NAME) for n in names}
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == \
        out.usage.completion_tokens
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"] + 1
    assert after["dllm:forwards_total"] >= before["dllm:forwards_total"] + 3
    assert after["dllm:request_forwards_count"] == before["dllm:request_forwards_count"] + 1
    assert after["dllm:step_latency_seconds_count"] >= before["dllm:step_latency_seconds_count"] + 3
    assert server.metric("dllm:request_errors_total", reason="validation") >= 1
    assert after["vllm:num_requests_running"] == 0


# ------------------------------------------------------------------------------ disconnects, concurrency

#: strictly left to right (one-token blocks): text streams from the first step; a cancelled request is
#: told apart from a finished one by the counters (aborted +1, success unchanged)
LONG = {"prompt": "a long story", "max_tokens": 160, "algorithm": "llada", "steps": 160, "block_length": 1}
#: the concurrency test's leavers: shorter canvases keep its batched forwards cheap
LEAVER = {**LONG, "max_tokens": 48, "steps": 48}


def test_streaming_disconnect_cancels(server):
    aborted = server.metric("dllm:request_errors_total", reason="aborted")
    success = server.metric("vllm:request_success_total")
    with httpx.stream("POST", server.base_url + C, json={**LONG, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the generation is running
    # closed after one chunk: the engine drops the request at its next step
    server.wait_metric("vllm:num_requests_running", lambda v: v == 0, timeout=10)
    server.wait_metric("dllm:request_errors_total", lambda v: v == aborted + 1, reason="aborted")
    assert server.metric("vllm:request_success_total") == success


def test_non_streaming_disconnect_cancels(server):
    aborted = server.metric("dllm:request_errors_total", reason="aborted")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + C, json=LONG, headers=AUTH, timeout=httpx.Timeout(60, read=1.5))
    server.wait_metric("vllm:num_requests_running", lambda v: v == 0, timeout=10)
    server.wait_metric("dllm:request_errors_total", lambda v: v == aborted + 1, reason="aborted")


def test_many_concurrent_streams_with_disconnects(server):
    """64 concurrent streams, every 4th client leaves after its first chunk: the rest all complete."""
    total, leavers = 64, set(range(0, 64, 4))
    aborted = server.metric("dllm:request_errors_total", reason="aborted")
    success = server.metric("vllm:request_success_total")

    async def one(http: httpx.AsyncClient, i: int) -> str:
        body = {**LEAVER, "stream": True} if i in leavers else \
            {"prompt": f"request {i}", "max_tokens": 3, "stream": True, "algorithm": "llada", "steps": 3}
        async with http.stream("POST", C, json=body) as r:
            assert r.status_code == 200
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                    if i in leavers:
                        return "left"
            assert lines[-1] == "data: [DONE]"
            finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
            assert finish in ("stop", "length")
            return "done"

    async def main() -> list[str]:
        limits = httpx.Limits(max_connections=total + 4)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(total)))

    results = asyncio.run(main())
    assert results.count("done") == total - len(leavers)
    server.wait_metric("vllm:num_requests_running", lambda v: v == 0, timeout=30)
    assert server.metric("vllm:num_requests_waiting") == 0
    assert server.metric("dllm:kv_cache_bytes") == 0
    server.wait_metric("dllm:request_errors_total", lambda v: v == aborted + len(leavers), reason="aborted")
    assert server.metric("vllm:request_success_total") == success + total - len(leavers)


# ------------------------------------------------------------------------------ shutdown (runs last)


def test_sigterm_with_grace_spent_aborts_in_flight_and_exits_0(server):
    """This server runs with --grace-period 0: a SIGTERM ends in-flight requests at once with
    finish_reason "abort" (the client still gets a well-formed answer) and the process exits 0.
    (Draining *with* a grace period is covered in test_server_lifecycle.py.)"""
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", post(server, C, LONG)))
    t.start()
    server.wait_metric("vllm:num_requests_running", lambda v: v == 1)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200
    assert result["r"].json()["choices"][0]["finish_reason"] == "abort"
    assert server.proc.wait(60) == 0
