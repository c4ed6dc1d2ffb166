//! The `switchyard` binary: command line, logging, and the hand-off to the control plane (or,
//! for `ctl`, to the admin socket's client).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::{announce, config, ctl, server};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "SMTP-aware layer-4 load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer in the foreground (logs to stderr; RUST_LOG adjusts verbosity).
    Run {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// At shutdown, also write the per-backend totals to this file as one JSON object
        /// (the same object the `totals` log line carries).
        #[arg(long, value_name = "FILE")]
        totals: Option<PathBuf>,
    },
    /// Validate a configuration and print a summary of its services and backends.
    Check {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Withdraw every VIP the configuration announces through BIRD (`announce = true`), with
    /// no switchyard running: for systemd's ExecStopPost, so a killed or crashed balancer stops
    /// drawing traffic. Exits 0 when BIRD confirmed every withdrawal, 1 otherwise.
    Withdraw {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask a running balancer over its admin socket: show its state, drain, disable or
    /// re-weight a backend, reload or check its configuration. Exits 0 when done, 1 otherwise.
    Ctl(ctl::CtlArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ctl(args) => ctl::main(args),
        Command::Check { config } => match config::load(&config) {
            Ok(cfg) => {
                print!("{}", cfg.summary());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Withdraw { config } => {
            let outcome = config::load(&config)
                .map_err(|errors| errors.to_string())
                .and_then(|cfg| announce::withdraw_all(&cfg));
            match outcome {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(report) => {
                    eprint!("{report}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config, totals } => {
            init_logging();
            let cfg = match config::load(&config) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            match server::run(
                cfg,
                server::RunOptions {
                    totals_file: totals,
                },
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are for people at a terminal, not for journald or log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
