//! A client of BIRD's control socket (what `birdc` speaks), for the two commands announcement
//! needs: `enable PROTOCOL` and `disable PROTOCOL`.
//!
//! The protocol is lines of text. BIRD greets with `0001 BIRD x.y ready.`; each command's reply
//! is one or more lines `CODE-text` (more follow) or ` text` (continuing the previous code),
//! ended by a line `CODE text` (a four-digit code and a space). Codes 0xxx are success (0008
//! already disabled, 0009 disabled, 0010 already enabled, 0011 enabled), 8xxx run-time errors,
//! 9xxx parse errors (9001 for a protocol name BIRD does not know).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one exchange (connect and greeting, or a command and its reply) may take; BIRD
/// answers these in microseconds unless it is stuck.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(2);
/// A reply line longer than this is not BIRD.
const MAX_LINE: usize = 4096;

/// One open connection to BIRD's control socket.
pub struct Bird {
    stream: BufReader<UnixStream>,
    path: PathBuf,
}

/// What BIRD said to an `enable`/`disable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The protocol changed state now.
    Changed,
    /// It already was in that state.
    Already,
}

impl Bird {
    /// Connects and reads BIRD's greeting.
    pub async fn connect(path: &Path) -> anyhow::Result<Self> {
        let exchange = async {
            let stream = UnixStream::connect(path)
                .await
                .context("connecting to BIRD's control socket")?;
            let mut bird = Self {
                stream: BufReader::new(stream),
                path: path.to_path_buf(),
            };
            let (code, text) = bird.reply().await.context("reading BIRD's greeting")?;
            if code != 1 {
                bail!("unexpected greeting {code:04} {text:?} (is this BIRD's control socket?)");
            }
            anyhow::Ok(bird)
        };
        tokio::time::timeout(EXCHANGE_LIMIT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("BIRD did not greet within {EXCHANGE_LIMIT:?}"))?
            .with_context(|| format!("BIRD at {}", path.display()))
    }

    /// `enable PROTOCOL` or `disable PROTOCOL`: what happened, or (inner `Err`) why BIRD
    /// refused. The outer `Err` is trouble with the connection, which is then unusable.
    /// `protocol` is a validated BIRD symbol, so it goes on the line as written (quoted, BIRD
    /// would take it as a pattern).
    pub async fn set(
        &mut self,
        protocol: &str,
        enabled: bool,
    ) -> anyhow::Result<Result<Outcome, String>> {
        let verb = if enabled { "enable" } else { "disable" };
        let exchange = async {
            let line = format!("{verb} {protocol}\n");
            self.stream
                .get_mut()
                .write_all(line.as_bytes())
                .await
                .context("sending the command")?;
            self.outcome(protocol).await
        };
        tokio::time::timeout(EXCHANGE_LIMIT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no reply within {EXCHANGE_LIMIT:?}"))?
            .with_context(|| format!("BIRD at {}: {verb} {protocol}", self.path.display()))
    }

    /// Reads one command's whole reply and tells what happened to the protocol.
    async fn outcome(&mut self, protocol: &str) -> anyhow::Result<Result<Outcome, String>> {
        let mut outcome = Err(format!(
            "BIRD's reply did not say whether {protocol} changed"
        ));
        loop {
            let (code, text, last) = self.line().await?;
            match code {
                Some(8 | 10) => outcome = Ok(Outcome::Already),
                Some(9 | 11) => outcome = Ok(Outcome::Changed),
                Some(9001 | 9002) => {
                    outcome = Err(format!(
                        "BIRD has no protocol {protocol} ({text}); add a static protocol of that name to bird.conf (see config/bird.conf)"
                    ))
                }
                Some(code) if code >= 8000 => {
                    outcome = Err(format!("BIRD refused: {code:04} {text}"))
                }
                _ => {}
            }
            if last {
                return Ok(outcome);
            }
        }
    }

    /// The code and text of a reply that is one line (the greeting).
    async fn reply(&mut self) -> anyhow::Result<(u32, String)> {
        let (code, text, _) = self.line().await?;
        Ok((code.unwrap_or(0), text))
    }

    /// One reply line: its code (none on a ` text` continuation), text, and whether it ends
    /// the reply.
    async fn line(&mut self) -> anyhow::Result<(Option<u32>, String, bool)> {
        let mut raw = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut raw)
            .await
            .context("reading BIRD's reply")?;
        if read == 0 {
            bail!("BIRD closed the control connection");
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        Ok(parse_line(line))
    }
}

/// `CODE-text` (more follows), `CODE text` (the last line), or ` text` (a continuation).
fn parse_line(line: &str) -> (Option<u32>, String, bool) {
    let digits = line
        .get(..4)
        .filter(|d| d.bytes().all(|b| b.is_ascii_digit()));
    match (digits, line.as_bytes().get(4)) {
        (Some(code), Some(b'-')) => (code.parse().ok(), line[5..].to_string(), false),
        (Some(code), Some(b' ') | None) => (
            code.parse().ok(),
            line.get(5..).unwrap_or("").to_string(),
            true,
        ),
        _ => (None, line.trim_start().to_string(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_line;

    #[test]
    fn reply_lines_read_as_bird_writes_them() {
        assert_eq!(
            parse_line("0011-vip_mx: enabled"),
            (Some(11), "vip_mx: enabled".into(), false)
        );
        assert_eq!(parse_line("0000 "), (Some(0), String::new(), true));
        assert_eq!(
            parse_line("9001 syntax error, unexpected CF_SYM_UNDEFINED"),
            (
                Some(9001),
                "syntax error, unexpected CF_SYM_UNDEFINED".into(),
                true
            )
        );
        assert_eq!(parse_line(" continued"), (None, "continued".into(), false));
    }
}
