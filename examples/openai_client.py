"""Streams a chat completion from `lutra serve` with the official `openai` package.

    cargo run --release -- serve --port 8080            # in one terminal
    pip install openai && python examples/openai_client.py [--base-url http://127.0.0.1:8080/v1] [--api-key KEY]

Prints the reply as it arrives, then the finish reason and the token counts.
"""

import argparse
import sys

from openai import OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    # The server checks the key only when started with --api-key; the client must send one anyway.
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("prompt", nargs="?", default="Name three uses of a paperclip.")
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"model: {model}", file=sys.stderr)

    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
            {"role": "user", "content": args.prompt},
        ],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    print()
    print(f"finish_reason: {finish}", file=sys.stderr)
    if usage is not None:
        print(
            f"usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion"
            f" = {usage.total_tokens} tokens",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
