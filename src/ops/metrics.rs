//! TEMPORARY stand-in; replaced by the real prometheus-client metrics on merge.
#![allow(missing_docs, dead_code, unused_variables)]
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    CallerHangup,
    HangupFrame,
    ErrorFrame,
    ProtocolError,
    AgentHangup,
    Shutdown,
    FirstMessageTimeout,
    WriteFailed,
    IoError,
}
impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallerHangup => "caller_hangup",
            Self::HangupFrame => "hangup_frame",
            Self::ErrorFrame => "error_frame",
            Self::ProtocolError => "protocol_error",
            Self::AgentHangup => "agent_hangup",
            Self::Shutdown => "shutdown",
            Self::FirstMessageTimeout => "first_message_timeout",
            Self::WriteFailed => "write_failed",
            Self::IoError => "io_error",
        }
    }
}
#[derive(Debug, Clone, Copy)]
pub enum RefuseReason {
    NotAllowed,
    OverCapacity,
    Draining,
}
#[derive(Debug, Default)]
pub struct Metrics;
impl Metrics {
    pub fn new() -> Self {
        Self
    }
    pub fn render(&self) -> String {
        String::new()
    }
    pub fn call_started(&self) {}
    pub fn call_ended(&self, r: EndReason, d: Duration) {}
    pub fn connection_refused(&self, r: RefuseReason) {}
    pub fn frames_in(&self, n: u64) {}
    pub fn frames_out(&self, n: u64) {}
    pub fn underrun(&self) {}
    pub fn dtmf(&self) {}
    pub fn inbound_dropped(&self, n: u64) {}
    pub fn pacing_lateness(&self, d: Duration) {}
}
#[derive(Debug, Clone, Copy)]
pub enum Stage { VadEndToSttFinal, SttFinalToLlmFirstToken, LlmFirstTokenToTtsFirstAudio, TtsFirstAudioToWire, SpeechEndToFirstAudio }
#[derive(Debug, Clone, Copy)]
pub enum Provider { Stt, Llm, Tts }
impl Metrics {
    pub fn turn_stage(&self, s: Stage, d: Duration) {}
    pub fn provider_error(&self, p: Provider, kind: &str) {}
    pub fn barge_in(&self) {}
    pub fn llm_usage(&self, prompt: u64, completion: u64, cost: Option<f64>) {}
}
