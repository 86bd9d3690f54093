"""A team's named keys, as their people meet them through the official `openai` Python SDK.

Usage: python3 team_keys.py BASE_URL ALICE_KEY   (BASE_URL like http://127.0.0.1:8080/v1)

Alice's key may use gpt-4o-mini, gpt-4.1* and gpt-4o-transcribe, on Chat and Audio routes.
Each call asserts what the SDK hands back; the Rust test that runs this script checks what
the upstream received. Prints one line per flow and exits non-zero on the first failure.
"""
import io
import sys

import openai
from openai import OpenAI


def refused(call, status, code):
    """Runs `call`, which the gateway must refuse with `status` and `code`; returns the message."""
    try:
        call()
    except openai.APIStatusError as err:
        assert err.status_code == status, (err.status_code, err.body)
        assert err.body["code"] == code, err.body
        return err.body["message"]
    raise AssertionError(f"expected {status} {code}")


def main(base_url: str, key: str) -> None:
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    say = [{"role": "user", "content": "hello"}]

    for model in ["gpt-4o-mini", "gpt-4.1-nano"]:
        chat = client.chat.completions.create(model=model, messages=say)
        assert chat.choices[0].message.content == "Hello from upstream", chat
    print("allowed models ok")

    message = refused(
        lambda: client.chat.completions.create(model="o3", messages=say), 403, "model_not_allowed"
    )
    assert '"alice"' in message and '"o3"' in message and "gpt-4.1*" in message, message
    print("model refused ok", message)

    audio = ("hello.wav", io.BytesIO(b"RIFF" + bytes(20_000)), "audio/wav")
    text = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
    assert text.text == "transcribed", text
    audio = ("hello.wav", io.BytesIO(b"RIFF" + bytes(20_000)), "audio/wav")
    message = refused(
        lambda: client.audio.transcriptions.create(model="whisper-1", file=audio),
        403,
        "model_not_allowed",
    )
    assert '"whisper-1"' in message, message
    print("multipart model ok")

    message = refused(
        lambda: client.embeddings.create(model="gpt-4o-mini", input="hi"),
        403,
        "route_not_allowed",
    )
    assert "Embeddings" in message and "Chat, Audio" in message, message
    refused(lambda: client.files.list(), 403, "route_not_allowed")
    print("tags ok", message)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
