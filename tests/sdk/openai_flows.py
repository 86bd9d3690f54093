"""Drives the official `openai` Python SDK through the gateway, as a user would.

Usage: python3 openai_flows.py BASE_URL   (BASE_URL like http://127.0.0.1:8080/v1)

Each flow asserts what the SDK hands back; the Rust test that runs this script checks what
the upstream received. Prints one line per flow and exits non-zero on the first failure.
"""
import io
import sys
import warnings

import openai
from openai import OpenAI

KEY = "sk-test-0123456789abcdefSECRET"


def main(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=30)

    chat = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert chat.choices[0].message.content == "Hello from upstream", chat
    print("chat ok", chat.id)

    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["one ", "two ", "three"], pieces
    print("streaming chat ok", pieces)

    emb = client.embeddings.create(
        model="text-embedding-3-small", input="hi", encoding_format="float"
    )
    assert emb.data[0].embedding == [0.25, -0.5, 1.0], emb
    print("embeddings ok")

    upload = client.files.create(
        file=("train.jsonl", io.BytesIO(b'{"prompt":"a"}\n' * 1000), "application/jsonl"),
        purpose="fine-tune",
    )
    assert upload.id == "file-abc123", upload
    print("file upload ok", upload.id)

    content = client.files.content("file-abc123")
    assert content.read() == bytes(range(256)) * 64, "file content changed"
    print("file download ok")

    speech = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    assert speech.read() == b"ID3" + bytes(1000), "speech bytes changed"
    print("speech ok")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assistant = client.beta.assistants.create(model="gpt-4o", name="helper")
    assert assistant.id == "asst_1", assistant
    print("assistants ok", assistant.id)

    try:
        client.models.retrieve("missing-model")
    except openai.NotFoundError as err:
        assert err.status_code == 404 and "does not exist" in str(err), err
        print("typed upstream error ok")
    else:
        raise AssertionError("expected NotFoundError")

    # An empty key, as a misconfigured app sends it: the gateway answers 401 itself.
    try:
        client.models.list(extra_headers={"Authorization": "Bearer"})
    except openai.AuthenticationError as err:
        assert err.status_code == 401, err
        print("gateway 401 ok")
    else:
        raise AssertionError("expected AuthenticationError")


if __name__ == "__main__":
    main(sys.argv[1])
