"""The official `openai` SDK as a client of the fake OpenRouter (tests/openai_conformance.rs).

Usage: openai_stream.py BASE_URL API_KEY MODEL CASE
CASE is `reply` (a plain streamed reply), `tool` (the hang-up turn, offering end_call),
`reasoning` (with OpenRouter's `reasoning` object, via extra_body) or `tools` (two tools
offered; the calls the model makes are answered with `tool` messages in a second request,
whose reply is `second_text`). Prints one JSON object: what the SDK assembled from the stream
(text, reasoning, tool calls, finish reason, usage).
Any SDK error (a chunk it cannot parse, a bad status) exits non-zero with the traceback.
"""

import json
import sys

from openai import OpenAI

END_CALL_TOOL = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "End the phone call after saying goodbye.",
        "parameters": {"type": "object", "properties": {}},
    },
}


LOOKUP_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": "Look something up.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    for name in ("order_status", "weather")
]


def collect(stream):
    """What the SDK's chunks add up to."""
    text, reasoning, finish, usage, chunks = "", "", None, None, 0
    tool_calls = {}
    content_before_reasoning = False
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = {
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
                "total_tokens": chunk.usage.total_tokens,
                "cost": (chunk.usage.model_extra or {}).get("cost"),
            }
        for choice in chunk.choices:
            delta = choice.delta
            extra = delta.model_extra or {}
            if extra.get("reasoning"):
                if text:
                    content_before_reasoning = True
                reasoning += extra["reasoning"]
            if delta.content:
                text += delta.content
            for tc in delta.tool_calls or []:
                slot = tool_calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    return {
        "text": text,
        "reasoning": reasoning,
        "content_before_reasoning": content_before_reasoning,
        "tool_calls": [tool_calls[i] for i in sorted(tool_calls)],
        "finish_reason": finish,
        "usage": usage,
        "chunks": chunks,
    }


def tools_case(client, model) -> None:
    messages = [
        {"role": "system", "content": "Anda ejen khidmat pelanggan."},
        {"role": "user", "content": "Di mana pesanan saya?"},
    ]
    first = collect(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=200,
            tools=LOOKUP_TOOLS, tool_choice="auto",
        )
    )
    messages.append(
        {
            "role": "assistant",
            "content": first["text"] or None,
            "tool_calls": [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in first["tool_calls"]
            ],
        }
    )
    for c in first["tool_calls"]:
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": '{"ok": true}'})
    second = collect(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, max_tokens=200,
            tools=LOOKUP_TOOLS, tool_choice="none",
        )
    )
    first["second_text"] = second["text"]
    print(json.dumps(first))


def main() -> None:
    base_url, api_key, model, case = sys.argv[1:5]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    if case == "tools":
        tools_case(client, model)
        return
    user = "Okey, itu sahaja. Terima kasih!" if case == "tool" else "Berapa harga pakej?"
    kwargs = {}
    if case == "tool":
        kwargs["tools"] = [END_CALL_TOOL]
        kwargs["tool_choice"] = "auto"
    if case == "reasoning":
        kwargs["extra_body"] = {"reasoning": {"effort": "low"}}
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Anda ejen khidmat pelanggan."},
            {"role": "user", "content": user},
        ],
        stream=True,
        max_tokens=200,
        temperature=0.7,
        **kwargs,
    )
    text, reasoning, finish, usage, chunks = "", "", None, None, 0
    tool_calls = {}
    content_before_reasoning = False
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = {
                "prompt_tokens": chunk.usage.prompt_tokens,
                "completion_tokens": chunk.usage.completion_tokens,
                "total_tokens": chunk.usage.total_tokens,
                # OpenRouter's extra field, kept by the SDK's models.
                "cost": (chunk.usage.model_extra or {}).get("cost"),
            }
        for choice in chunk.choices:
            delta = choice.delta
            extra = delta.model_extra or {}
            if extra.get("reasoning"):
                if text:
                    content_before_reasoning = True
                reasoning += extra["reasoning"]
            if delta.content:
                text += delta.content
            for tc in delta.tool_calls or []:
                slot = tool_calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    slot["id"] = tc.id
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    print(
        json.dumps(
            {
                "text": text,
                "reasoning": reasoning,
                "content_before_reasoning": content_before_reasoning,
                "tool_calls": [tool_calls[i] for i in sorted(tool_calls)],
                "finish_reason": finish,
                "usage": usage,
                "chunks": chunks,
            }
        )
    )


if __name__ == "__main__":
    main()
