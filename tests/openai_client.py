"""The official `openai` package against llmsd's HTTP door (run by tests/http.rs).

Usage: openai_client.py BASE_URL KEY_A KEY_B

KEY_A and KEY_B are API keys of two different apps. Every check is an assert; on success the
script prints one JSON line with what it saw, for the Rust test to check further.
"""

import json
import sys

import openai
from openai import OpenAI

QUESTION = "What is the capital of France?"


def main() -> None:
    base, key_a, key_b = sys.argv[1:4]
    a = OpenAI(base_url=f"{base}/v1", api_key=key_a, max_retries=0, timeout=120)
    b = OpenAI(base_url=f"{base}/v1", api_key=key_b, max_retries=0, timeout=120)
    out = {"openai_version": openai.__version__}

    # Models: the one loaded model.
    models = a.models.list()
    assert len(models.data) == 1, models
    model = models.data[0].id
    assert models.data[0].object == "model"
    out["model"] = model

    # Chat, not streamed (any model name is accepted; the real id comes back).
    chat = a.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.object == "chat.completion"
    assert chat.model == model
    assert chat.id.startswith("chatcmpl-")
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    text = choice.message.content
    assert text, chat
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.prompt_tokens_details.cached_tokens == 0
    out["chat"] = text

    # Chat, streamed with usage: the same text, then a usage chunk without choices.
    stream = a.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.content:
                parts.append(delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == text, (parts, text)
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    out["chat_stream"] = "".join(parts)

    # Chat with log-probabilities.
    lp = a.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)

    # JSON mode.
    js = a.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": 'Return a JSON object with one key "answer" holding the capital of France.',
            }
        ],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(js.choices[0].message.content), dict)

    # Text completions, plain, echoed and streamed.
    comp = a.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    assert comp.object == "text_completion"
    ctext = comp.choices[0].text
    assert ctext, comp
    out["completion"] = ctext
    echo = a.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, echo=True, logprobs=1
    )
    assert echo.choices[0].text == "1, 2, 3, 4," + ctext
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert "".join(echo.choices[0].logprobs.tokens) == echo.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in a.completions.create(
            model=model, prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == ctext, (streamed, ctext)
    stopped = a.completions.create(
        model=model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=["7"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert "7" not in stopped.choices[0].text

    # The context extension: a persistent conversation through extra_body / extra_headers.
    ctx = a.post("/contexts", body={"system": "You are a helpful assistant."}, cast_to=dict)
    cid = ctx["id"]
    first = a.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
        extra_body={"context": cid},
    )
    extra = first.model_dump()
    assert extra["context"] == cid, extra
    second = a.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "And of Italy?"}],
        max_tokens=8,
        temperature=0,
        extra_headers={"X-Llmsd-Context": cid},
    )
    assert second.headers["x-llmsd-context"] == cid
    second = second.parse().model_dump()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first.usage.prompt_tokens, second
    assert second["timings"]["prefilled_tokens"] < second["usage"]["prompt_tokens"], second
    out["second_turn"] = {
        "prompt_tokens": second["usage"]["prompt_tokens"],
        "cached_tokens": cached,
        "prefilled_tokens": second["timings"]["prefilled_tokens"],
    }
    # A third turn streamed in the same context.
    third = a.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "And of Spain?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"context": cid},
    )
    last = None
    for chunk in third:
        last = chunk
    assert last.usage.prompt_tokens_details.cached_tokens > cached
    info = a.get(f"/contexts/{cid}", cast_to=dict)
    assert info["messages"] == 7, info  # system + 3 turns of user and assistant

    # Another app cannot see or use it.
    try:
        b.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body={"context": cid},
        )
        raise AssertionError("app b used app a's context")
    except openai.NotFoundError:
        pass
    assert all(c["id"] != cid for c in b.get("/contexts", cast_to=dict)["data"])

    # Errors arrive as the package's typed exceptions.
    try:
        a.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=2
        )
        raise AssertionError("n=2 accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "n", e.body
    try:
        OpenAI(base_url=f"{base}/v1", api_key="sk-not-a-key", max_retries=0).models.list()
        raise AssertionError("unknown key accepted")
    except openai.AuthenticationError as e:
        assert e.body["code"] == "invalid_api_key", e.body

    a.delete(f"/contexts/{cid}", cast_to=dict)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
