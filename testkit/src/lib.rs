//! Switchyard's test kit, used by the integration tests, the benchmarks and xtask (never by the
//! product): one copy of each test tool.

pub mod balancers;
pub mod bird;
pub mod config_toml;
pub mod harness;
pub mod metrics_text;
pub mod netns;
pub mod ping6;
pub mod raw_syn;
pub mod smtp_client;
pub mod smtp_server;
pub mod supervise;
pub mod topology;
pub mod xdp_run;
