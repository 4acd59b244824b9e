// Recognises a WAV file through a speech endpoint with the official Azure Speech SDK for
// JavaScript, continuous recognition from a push stream, as an application would. Driven by
// tests/azure_conformance.rs against the fake Azure; prints one JSON line per SDK event.
//
// usage: node recognize.js <ws-url> <key> <wav-file> <language> <segmentation-silence-ms> [<languages>]
//
// With <languages> (comma-separated, e.g. "ms-MY,en-US") the recognizer identifies the language
// of every phrase among them (AutoDetectSourceLanguageConfig in Continuous mode), as
// Microsoft's language identification guide shows it, and prints each phrase's language.
"use strict";
const fs = require("fs");
const sdk = require("microsoft-cognitiveservices-speech-sdk");

const [url, key, wavPath, language, segmentationMs, languages] = process.argv.slice(2);
if (!segmentationMs) {
  console.error("usage: node recognize.js <ws-url> <key> <wav-file> <language> <segmentation-silence-ms>");
  process.exit(64);
}

function readWav(path) {
  const b = fs.readFileSync(path);
  if (b.toString("ascii", 0, 4) !== "RIFF" || b.toString("ascii", 8, 12) !== "WAVE") {
    throw new Error(`${path} is not a WAV file`);
  }
  let at = 12;
  let rate = 0;
  let bits = 0;
  let channels = 0;
  while (at + 8 <= b.length) {
    const id = b.toString("ascii", at, at + 4);
    const size = b.readUInt32LE(at + 4);
    if (id === "fmt ") {
      channels = b.readUInt16LE(at + 10);
      rate = b.readUInt32LE(at + 12);
      bits = b.readUInt16LE(at + 22);
    } else if (id === "data") {
      return { rate, bits, channels, pcm: b.subarray(at + 8, at + 8 + size) };
    }
    at += 8 + size + (size % 2);
  }
  throw new Error(`${path} has no data chunk`);
}

const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const wav = readWav(wavPath);

const speechConfig = sdk.SpeechConfig.fromEndpoint(new URL(url), key);
speechConfig.speechRecognitionLanguage = language;
speechConfig.setProperty(sdk.PropertyId.Speech_SegmentationSilenceTimeoutMs, segmentationMs);

const format = sdk.AudioStreamFormat.getWaveFormatPCM(wav.rate, wav.bits, wav.channels);
const stream = sdk.AudioInputStream.createPushStream(format);
// 100 ms writes; the SDK re-chunks as it likes.
const step = (wav.rate * wav.channels * wav.bits) / 8 / 10;
for (let i = 0; i < wav.pcm.length; i += step) {
  const chunk = wav.pcm.subarray(i, Math.min(i + step, wav.pcm.length));
  stream.write(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength));
}
stream.close();

const audioConfig = sdk.AudioConfig.fromStreamInput(stream);
let recognizer;
if (languages) {
  const autoDetect = sdk.AutoDetectSourceLanguageConfig.fromLanguages(languages.split(","));
  autoDetect.mode = sdk.LanguageIdMode.Continuous;
  recognizer = sdk.SpeechRecognizer.FromConfig(speechConfig, autoDetect, audioConfig);
} else {
  recognizer = new sdk.SpeechRecognizer(speechConfig, audioConfig);
}
const languageOf = (result) =>
  languages ? sdk.AutoDetectSourceLanguageResult.fromResult(result).language : undefined;
let done = false;
const finish = (code) => {
  if (done) return;
  done = true;
  recognizer.stopContinuousRecognitionAsync(
    () => { recognizer.close(); process.exit(code); },
    () => process.exit(code),
  );
};
recognizer.recognizing = (_, e) =>
  emit({ event: "recognizing", text: e.result.text, language: languageOf(e.result) });
recognizer.recognized = (_, e) =>
  emit({ event: "recognized", reason: sdk.ResultReason[e.result.reason], text: e.result.text,
         offset: e.result.offset, duration: e.result.duration, language: languageOf(e.result) });
recognizer.canceled = (_, e) => {
  emit({ event: "canceled", reason: sdk.CancellationReason[e.reason],
         code: sdk.CancellationErrorCode[e.errorCode], details: e.errorDetails });
  finish(e.reason === sdk.CancellationReason.EndOfStream ? 0 : 1);
};
recognizer.sessionStopped = () => { emit({ event: "sessionStopped" }); finish(0); };
setTimeout(() => { emit({ event: "timeout" }); finish(2); }, 60000).unref();
recognizer.startContinuousRecognitionAsync(
  () => emit({ event: "started" }),
  (err) => { emit({ event: "startFailed", details: String(err) }); finish(1); },
);
