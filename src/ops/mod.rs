//! Everything an operator touches: configuration, logs, metrics, the admin HTTP server,
//! systemd integration and call records.

pub mod admin;
pub mod config;
pub mod console;
pub mod live;
pub mod log_filter;
pub mod logging;
pub mod metrics;
pub mod profiles;
pub mod records;
pub mod rlimit;
pub mod systemd;
