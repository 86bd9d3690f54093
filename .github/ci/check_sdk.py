"""The official Python SDK through a running gateway: one chat request and one streamed.

Usage: python3 check_sdk.py BASE_URL   (BASE_URL like http://127.0.0.1:3000/v1)

Expects the upstream of mock_openai.py; exits non-zero on the first difference.
"""
import sys

from openai import OpenAI

REPLY = "Hello from the CI upstream"


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="sk-ci-not-a-real-key", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "hello"}]

    chat = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert chat.choices[0].message.content == REPLY, chat
    assert chat.usage is not None and chat.usage.total_tokens == 8, chat
    print("chat ok")

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == REPLY, pieces
    assert len(pieces) > 2, pieces
    print("stream ok:", len(pieces), "chunks")


if __name__ == "__main__":
    main(sys.argv[1])
