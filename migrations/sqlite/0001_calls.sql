-- Call history. Times are milliseconds since the Unix epoch (UTC); JSON is stored as text.
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY NOT NULL,
    node_id TEXT NOT NULL,
    status TEXT NOT NULL,            -- open | completed | interrupted
    started_at_ms INTEGER NOT NULL,
    ended_at_ms INTEGER,
    duration_ms INTEGER,
    peer TEXT NOT NULL,
    mode TEXT NOT NULL,
    caller_number TEXT,
    caller_name TEXT,
    did TEXT,
    profile TEXT,
    sample_rate INTEGER,
    end_reason TEXT,
    outcome TEXT,                    -- CallOutcome's dialplan value
    outcome_json TEXT,
    transfer_target TEXT,
    turns INTEGER NOT NULL DEFAULT 0,
    barge_ins INTEGER NOT NULL DEFAULT 0,
    latency_p50_ms INTEGER,
    latency_p95_ms INTEGER,
    latency_max_ms INTEGER,
    cost_llm REAL,
    cost_stt REAL,
    cost_tts REAL,
    cost_total REAL,
    currency TEXT,
    recording_path TEXT,
    record_json TEXT
);
CREATE INDEX IF NOT EXISTS calls_started ON calls (started_at_ms);
CREATE INDEX IF NOT EXISTS calls_open ON calls (status, node_id);

-- What happened during a call, written as it goes: transcript lines, turns (rewritten as
-- their marks arrive), tool calls and provider errors; idx is the position within its kind.
CREATE TABLE IF NOT EXISTS call_events (
    call_id TEXT NOT NULL,
    kind TEXT NOT NULL,              -- transcript | turn | tool | error
    idx INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (call_id, kind, idx)
);

-- The webhook's outbox: one row per call, delivered at least once.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    call_id TEXT PRIMARY KEY NOT NULL,
    body TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    claimed_by TEXT,
    claimed_until_ms INTEGER,
    delivered_at_ms INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_outbox (delivered_at_ms, next_attempt_at_ms);
