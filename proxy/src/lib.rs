//! Switchyard as a library: the control plane and both data planes' userspace side. The
//! `switchyard` binary (`main.rs`) is a thin command line over [`config`] and [`server`]; tests,
//! the test kit and xtask call the same modules in process (config parsing, the SMTP reply
//! parser, the shutdown totals' schema).

pub mod admin;
pub mod announce;
pub mod balance;
pub mod config;
pub mod control;
pub mod counters;
pub mod ctl;
pub mod dashboard;
pub mod dumps;
pub mod events;
pub mod health;
pub mod health_state;
pub mod http;
pub mod limits;
pub mod listeners;
pub mod loops;
pub mod metrics;
pub mod notify;
pub mod proxy_protocol;
pub mod reject;
pub mod relay;
pub mod reload;
pub mod server;
pub mod session;
pub mod sessions;
pub mod show;
pub mod smtp;
pub mod sources;
pub mod state;
pub mod tallies;
pub mod throttle;
pub mod totals;
pub mod xdp;
