//! xtask's SMTP sink: the test kit's SMTP server as a process (`cargo xtask sink`) and on
//! threads of this process ([`SinkThread`]), accepting everything or rejecting at a chosen
//! stage. Used where Postfix's smtp-sink is not installed, by the load generator's tests, and
//! to hold idle sessions for the memory measurement.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testkit::smtp_server::{Behaviour, RejectAt, SmtpServer};

/// The name the sink greets with.
const NAME: &str = "sink.switchyard.invalid";

/// Where the sink rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Greets with this code and closes.
    Greeting(u16),
    /// Answers the command of this stage with this code.
    At(RejectAt, u16),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SinkConfig {
    /// `None` accepts everything.
    pub reject: Option<Reject>,
}

impl SinkConfig {
    fn behaviour(self) -> Behaviour {
        let mut behaviour = Behaviour {
            // A sink runs for long: counters only.
            keep_records: false,
            ..Behaviour::default()
        };
        match self.reject {
            None => {}
            Some(Reject::Greeting(code)) => behaviour.greeting_code = code,
            Some(Reject::At(stage, code)) => behaviour.reject = Some((stage, code)),
        }
        behaviour
    }
}

/// Sinks serving on threads of their own, so that they never share a runtime with the load.
pub struct SinkThread {
    pub addrs: Vec<SocketAddr>,
    pub servers: Vec<SmtpServer>,
}

impl SinkThread {
    /// Starts one sink per address (port 0 picks a free port).
    pub fn start(addrs: &[SocketAddr], config: SinkConfig) -> Result<Self> {
        let servers = addrs
            .iter()
            .map(|a| serve(*a, config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            addrs: servers.iter().map(SmtpServer::addr).collect(),
            servers,
        })
    }
}

fn serve(addr: SocketAddr, config: SinkConfig) -> Result<SmtpServer> {
    let listener = TcpListener::bind(addr).with_context(|| format!("sink: binding {addr}"))?;
    SmtpServer::serve(NAME, config.behaviour(), listener)
}

/// `cargo xtask sink`: serves until SIGTERM or SIGINT, then stops like an MTA being shut down
/// gracefully: closes its listeners at once (new connections are refused) and lets the sessions
/// in progress finish (up to 10 s). Prints what each address saw before exiting.
pub fn run_process(addrs: &[SocketAddr], config: SinkConfig) -> Result<()> {
    let sinks = SinkThread::start(addrs, config)?;
    for a in &sinks.addrs {
        println!("sink listening on {a}");
    }
    wait_for_stop_signal()?;
    for server in &sinks.servers {
        server.pause();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sinks.servers.iter().any(|s| s.open() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for (a, s) in sinks.addrs.iter().zip(&sinks.servers) {
        println!(
            "sink {a} stopped: sessions={} messages={} unfinished={}",
            s.connections(),
            s.messages(),
            s.open()
        );
    }
    Ok(())
}

fn wait_for_stop_signal() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })
}
