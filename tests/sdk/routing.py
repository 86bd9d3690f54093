"""Routing by model and failover, as a client meets them through the official `openai` SDK.

Usage: python3 routing.py BASE_URL KEY   (BASE_URL like http://127.0.0.1:8080/v1)

The gateway's `[models.fast]` lists a dead target first; the SDK must see neither the dead
target nor an error, plain or streamed, and `models.list()` must show the alias. Prints one
line per flow and exits non-zero on the first failure.
"""
import sys

from openai import OpenAI


def main(base_url: str, key: str) -> None:
    # No retries of the SDK's own: any that happens is the gateway's.
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    say = [{"role": "user", "content": "hello"}]

    chat = client.chat.completions.create(model="fast", messages=say)
    assert chat.choices[0].message.content == "Hello from the second target", chat
    print("failover ok")

    stream = client.chat.completions.create(model="fast", messages=say, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello streamed", text
    print("streamed failover ok")

    ids = [model.id for model in client.models.list()]
    assert "fast" in ids and "gpt-4o-mini" in ids, ids
    alias = next(model for model in client.models.list() if model.id == "fast")
    assert alias.owned_by == "oa-bypass", alias
    print("models list ok", ids)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
