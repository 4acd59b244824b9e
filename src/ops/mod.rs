//! Everything an operator touches: configuration, logs, metrics, the admin HTTP server,
//! systemd integration and call records.

pub mod config;
pub mod metrics;
pub mod admin;
pub mod logging;
pub mod systemd;
pub mod records;
