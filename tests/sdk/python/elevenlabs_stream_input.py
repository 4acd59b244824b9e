"""The official `elevenlabs` SDK's stream-input client (`text_to_speech.convert_realtime`)
against the fake ElevenLabs (tests/elevenlabs_conformance.rs).

Usage: elevenlabs_stream_input.py HTTP_BASE_URL API_KEY VOICE_ID OUTPUT_FORMAT TEXT...
Each TEXT is one piece of streamed text. Prints one JSON object: the audio the SDK yielded,
every server message validated with the SDK's own `AudioOutput`/`FinalOutput` models (the
alignment as the SDK reads it), and the messages the SDK sent.

Two things are not the SDK's own: the SDK always turns its base URL into wss:// (the fake
speaks plain ws://), so its websocket base is pointed back at the fake's http:// URL, which
the SDK's own URL builder maps to ws://; and the websocket `connect` it uses is wrapped to
record the frames both ways. Everything on the wire is the SDK's.
"""

import json
import sys

import elevenlabs.realtime_tts as realtime_tts
from elevenlabs.client import ElevenLabs
from elevenlabs.types import AudioOutput, FinalOutput

sent, received = [], []
_connect = realtime_tts.connect


class Recording:
    """Wraps the SDK's websocket, recording text frames both ways."""

    def __init__(self, ws):
        self._ws = ws

    def __enter__(self):
        self._ws.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ws.__exit__(*exc)

    def send(self, message):
        sent.append(json.loads(message))
        return self._ws.send(message)

    def recv(self, *args, **kwargs):
        message = self._ws.recv(*args, **kwargs)
        received.append(message)
        return message


def recording_connect(*args, **kwargs):
    return Recording(_connect(*args, **kwargs))


realtime_tts.connect = recording_connect


def alignment(a):
    if a is None:
        return None
    return {"chars": a.chars, "start": a.char_start_times_ms, "duration": a.char_durations_ms}


def main() -> None:
    base_url, api_key, voice_id, output_format, *texts = sys.argv[1:]
    client = ElevenLabs(api_key=api_key, base_url=base_url)
    client.text_to_speech._ws_base_url = base_url
    audio = b"".join(
        client.text_to_speech.convert_realtime(
            voice_id,
            text=iter(texts),
            model_id="eleven_flash_v2_5",
            output_format=output_format,
        )
    )
    messages = []
    for raw in received:
        data = json.loads(raw)
        if data.get("audio"):
            m = AudioOutput.model_validate(data)
            messages.append(
                {
                    "kind": "audio",
                    "alignment": alignment(m.alignment),
                    "normalized_alignment": alignment(m.normalized_alignment),
                }
            )
        elif data.get("isFinal") is not None:
            messages.append({"kind": "final", "is_final": FinalOutput.model_validate(data).is_final})
        else:
            messages.append({"kind": "other", "raw": data})
    print(json.dumps({"audio_bytes": len(audio), "messages": messages, "sent": sent}))


if __name__ == "__main__":
    main()
