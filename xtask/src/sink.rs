//! A fast SMTP sink of our own: accepts everything (or rejects at a chosen stage), answers
//! pipelined commands in one write, never times out an idle client, and counts the sessions and
//! messages it saw. Used where Postfix's smtp-sink is not installed, by the load generator's
//! tests, and to hold idle sessions for the memory measurement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the sink answers with a rejection instead of accepting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectAt {
    Greeting,
    Mail,
    Rcpt,
    Data,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SinkConfig {
    /// Stage and code (4xx or 5xx) of a rejection; `None` accepts everything.
    pub reject: Option<(RejectAt, u16)>,
}

/// What a sink saw; shared with whoever started it.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub sessions: AtomicU64,
    pub active: AtomicU64,
    pub messages: AtomicU64,
    pub message_bytes: AtomicU64,
}

impl SinkStats {
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
}

/// Binds `addr` and serves SMTP on the current runtime until the returned task is aborted.
pub async fn serve(
    addr: SocketAddr,
    config: SinkConfig,
) -> Result<(SocketAddr, Arc<SinkStats>, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("sink: binding {addr}"))?;
    let local = listener.local_addr()?;
    let stats = Arc::new(SinkStats::default());
    let task_stats = stats.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let stats = task_stats.clone();
            tokio::spawn(async move {
                stats.sessions.fetch_add(1, Ordering::Relaxed);
                stats.active.fetch_add(1, Ordering::Relaxed);
                let _ = converse(stream, config, &stats).await;
                stats.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok((local, stats, task))
}

/// Sinks running on a thread of their own, so that they never share a runtime with the load.
pub struct SinkThread {
    pub addrs: Vec<SocketAddr>,
    pub stats: Vec<Arc<SinkStats>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SinkThread {
    /// Starts one sink per address (port 0 picks a free port) on a new thread.
    pub fn start(addrs: &[SocketAddr], config: SinkConfig) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let addrs = addrs.to_vec();
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut started = Vec::new();
                    for addr in addrs {
                        match serve(addr, config).await {
                            Ok(s) => started.push(s),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let info = started
                        .iter()
                        .map(|(a, s, _)| (*a, s.clone()))
                        .collect::<Vec<_>>();
                    let _ = ready_tx.send(Ok(info));
                    let _ = stop_rx.await;
                    for (_, _, task) in started {
                        task.abort();
                    }
                });
            })
            .context("starting the sink thread")?;
        let info = ready_rx
            .recv()
            .context("sink thread died while starting")??;
        Ok(Self {
            addrs: info.iter().map(|(a, _)| *a).collect(),
            stats: info.into_iter().map(|(_, s)| s).collect(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for SinkThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Mode {
    Command,
    Data,
}

async fn converse(
    mut stream: TcpStream,
    config: SinkConfig,
    stats: &SinkStats,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let reject = |at: RejectAt| {
        config
            .reject
            .filter(|(stage, _)| *stage == at)
            .map(|(_, c)| c)
    };
    if let Some(code) = reject(RejectAt::Greeting) {
        stream
            .write_all(format!("{code} sink.switchyard.invalid rejecting\r\n").as_bytes())
            .await?;
        return Ok(());
    }
    stream
        .write_all(b"220 sink.switchyard.invalid ESMTP\r\n")
        .await?;
    let mut input: Vec<u8> = Vec::with_capacity(8192);
    let mut output: Vec<u8> = Vec::with_capacity(512);
    let mut mode = Mode::Command;
    let mut message_bytes = 0u64;
    loop {
        let len = input.len();
        input.resize(len + 8192, 0);
        let n = stream.read(&mut input[len..]).await?;
        input.truncate(len + n);
        if n == 0 {
            return Ok(());
        }
        let mut consumed = 0;
        let mut quit = false;
        while let Some(nl) = input[consumed..].iter().position(|&b| b == b'\n') {
            let line = &input[consumed..consumed + nl + 1];
            consumed += nl + 1;
            match mode {
                Mode::Data => {
                    if line == b".\r\n" || line == b".\n" {
                        mode = Mode::Command;
                        stats.messages.fetch_add(1, Ordering::Relaxed);
                        stats
                            .message_bytes
                            .fetch_add(message_bytes, Ordering::Relaxed);
                        output.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    } else {
                        message_bytes += line.len() as u64;
                    }
                }
                Mode::Command => {
                    let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
                    match verb.as_deref() {
                        Some(b"EHLO") => output.extend_from_slice(
                            b"250-sink.switchyard.invalid\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n",
                        ),
                        Some(b"HELO") => output.extend_from_slice(b"250 sink.switchyard.invalid\r\n"),
                        Some(b"MAIL") => reply(&mut output, reject(RejectAt::Mail), b"250 2.1.0 Ok\r\n"),
                        Some(b"RCPT") => reply(&mut output, reject(RejectAt::Rcpt), b"250 2.1.5 Ok\r\n"),
                        Some(b"DATA") => match reject(RejectAt::Data) {
                            Some(code) => reply(&mut output, Some(code), b""),
                            None => {
                                mode = Mode::Data;
                                message_bytes = 0;
                                output.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                            }
                        },
                        Some(b"RSET") | Some(b"NOOP") => output.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                        Some(b"QUIT") => {
                            output.extend_from_slice(b"221 2.0.0 Bye\r\n");
                            quit = true;
                            break;
                        }
                        _ => output.extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
                    }
                }
            }
        }
        input.drain(..consumed);
        // Answer everything that arrived together in one write, as a pipelining server does.
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if quit {
            return Ok(());
        }
    }
}

fn reply(output: &mut Vec<u8>, reject: Option<u16>, ok: &[u8]) {
    match reject {
        Some(code) => output.extend_from_slice(
            format!("{code} {}.7.1 rejected by test sink\r\n", code / 100).as_bytes(),
        ),
        None => output.extend_from_slice(ok),
    }
}

/// `cargo xtask sink`: serves until SIGTERM or SIGINT, then stops like an MTA being shut down
/// gracefully: closes its listeners at once (new connections are refused) and lets the sessions
/// in progress finish (up to 10 s). Prints what each address saw before exiting.
pub fn run_process(addrs: &[SocketAddr], config: SinkConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut served = Vec::new();
        for a in addrs {
            let s = serve(*a, config).await?;
            println!("sink listening on {}", s.0);
            served.push(s);
        }
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        for (_, _, task) in &served {
            task.abort();
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while served.iter().any(|(_, s, _)| s.active() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for (a, s, _) in &served {
            println!(
                "sink {a} stopped: sessions={} messages={} unfinished={}",
                s.sessions(),
                s.messages(),
                s.active()
            );
        }
        anyhow::Ok(())
    })
}
