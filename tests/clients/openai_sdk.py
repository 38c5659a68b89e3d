"""The official `openai` Python SDK against `chathub serve --http`.

Usage: openai_sdk.py BASE_URL SLOW_BASE_URL
BASE_URL serves a tiny model; SLOW_BASE_URL one that never stops on its own (for cancelling).
Run by tests/http.rs (`the_official_openai_python_client`).
"""

import sys

import openai
from openai import OpenAI


def check(condition, what):
    if not condition:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def main():
    base, slow_base = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)

    models = client.models.list()
    check(len(models.data) == 1 and models.data[0].id == "tiny", "models.list() names the model")
    check(client.models.retrieve("tiny").id == "tiny", "models.retrieve()")
    try:
        client.models.retrieve("gpt-4o")
        check(False, "an unknown model is a 404")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "an unknown model is NotFoundError")

    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好，请介绍一下你自己"},
    ]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=24
    )
    choice = whole.choices[0]
    check(whole.object == "chat.completion", "a chat.completion object")
    check(isinstance(choice.message.content, str), "content is text")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
    check(whole.usage.completion_tokens > 0, "usage counts reply tokens")
    check(
        whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens,
        "usage adds up",
    )

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                text += c.delta.content
            if c.finish_reason:
                finish = c.finish_reason
    check(roles == ["assistant"], "the stream's first chunk carries the role")
    check(text == choice.message.content, "streamed text equals the whole reply")
    check(finish == choice.finish_reason, "same finish reason streamed")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens,
          "the usage chunk")

    # Content as a list of text parts, and a multi-turn history.
    parts = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "What is "},
                                         {"type": "text", "text": "2 + 2?"}]},
        ],
        temperature=0,
        max_tokens=4,
        seed=7,
    )
    check(isinstance(parts.choices[0].message.content, str), "text parts and history")

    for bad, what in [
        (dict(n=2), "n=2"),
        (dict(temperature=5), "temperature 5"),
        (dict(messages=[{"role": "user", "content": "你好 " * 3000}]), "a prompt beyond the context"),
    ]:
        kwargs = dict(model="tiny", messages=messages, max_tokens=4)
        kwargs.update(bad)
        try:
            client.chat.completions.create(**kwargs)
            check(False, f"{what} is refused")
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"{what} is BadRequestError: {e.message[:60]}")

    # A stream closed early: the server stops generating (tests/http.rs checks its counters).
    slow = OpenAI(base_url=slow_base, api_key="unused", max_retries=0, timeout=120)
    stream = slow.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2000, stream=True
    )
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 5:
            break
    stream.close()
    check(seen == 5, "a long stream read in part and closed")

    print("all checks passed")


if __name__ == "__main__":
    main()
