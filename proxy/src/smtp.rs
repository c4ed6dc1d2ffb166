//! Reading SMTP replies (RFC 5321 §4.2): single- and multi-line, with a bound on size so a
//! misbehaving peer cannot make us buffer without limit.
//!
//! The data path relays the backend socket right after the greeting, so reading must stop
//! exactly at the reply's final line ending: a byte read past it would be lost to the client.
//! [`read_reply`] therefore reads byte-wise from any reader, and [`read_tcp_reply`] reaches
//! the same exactness on a `TcpStream` with few system calls by peeking first.

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// The longest reply accepted, all lines together.
pub const MAX_REPLY: usize = 64 * 1024;

/// One complete SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code (e.g. 220, 421).
    pub code: u16,
    /// The raw bytes of the whole reply, every line with its CRLF, exactly as received, so a
    /// greeting can be relayed to the client byte for byte.
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The text of the reply's first line after the code, for log messages (lossy, trimmed,
    /// at most 200 characters so a hostile banner cannot flood the log).
    pub fn text(&self) -> String {
        let first = self.raw.split(|&b| b == b'\n').next().unwrap_or_default();
        let rest = first.get(4..).unwrap_or_default();
        printable(rest, 200)
    }
}

/// Reads one reply from `reader`. Errors (with context) on EOF, a malformed line, or a reply
/// longer than 64 KiB. Reads no byte beyond the reply's final CRLF, so the stream can be
/// relayed afterwards without losing data. Timeouts are the caller's (wrap in
/// `tokio::time::timeout`).
pub async fn read_reply<R: AsyncRead + Unpin>(reader: &mut R) -> anyhow::Result<Reply> {
    let mut parser = ReplyParser::default();
    let mut byte = [0u8; 1];
    loop {
        let n = reader.read(&mut byte).await.context("reading SMTP reply")?;
        if n == 0 {
            return Err(parser.eof_error());
        }
        if let Some(reply) = parser.push(&byte)?.1 {
            return Ok(reply);
        }
    }
}

/// Like [`read_reply`], for a TCP stream: peeks at what has arrived and consumes exactly the
/// reply's bytes, so a greeting costs a couple of system calls instead of one per byte.
pub async fn read_tcp_reply(stream: &mut TcpStream) -> anyhow::Result<Reply> {
    let mut parser = ReplyParser::default();
    let mut peeked = vec![0u8; 4096];
    loop {
        let n = stream
            .peek(&mut peeked)
            .await
            .context("reading SMTP reply")?;
        if n == 0 {
            return Err(parser.eof_error());
        }
        // Everything before the reply's end belongs to the reply, so consuming a partial
        // reply is safe, and it keeps the next peek from returning the same bytes at once.
        let (used, reply) = parser.push(&peeked[..n])?;
        stream
            .read_exact(&mut peeked[..used])
            .await
            .context("reading SMTP reply")?;
        if let Some(reply) = reply {
            return Ok(reply);
        }
    }
}

/// Reads a backend's greeting: reads whatever `stream` has (no peeking, so a greeting costs one
/// `recv` as a rule) until one complete reply is in, and returns it with any bytes that came
/// after it (a backend that talks ahead), which the caller relays after the greeting. Reads go
/// through a small buffer of the thread's, so a session waiting for its greeting holds no read
/// buffer of its own: with thousands of clients connecting at once, every waiting session's
/// buffer would otherwise stay behind as heap fragmentation once they all relay.
pub async fn read_greeting(stream: &TcpStream) -> anyhow::Result<(Reply, Vec<u8>)> {
    let mut parser = ReplyParser::default();
    loop {
        stream.readable().await.context("reading SMTP reply")?;
        let step = GREETING_READS.with(|buffer| -> anyhow::Result<Option<(Reply, Vec<u8>)>> {
            let mut buffer = buffer.borrow_mut();
            let n = match stream.try_read(&mut buffer[..]) {
                Ok(0) => return Err(parser.eof_error()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(anyhow::Error::new(e).context("reading SMTP reply")),
            };
            let (used, reply) = parser.push(&buffer[..n])?;
            Ok(reply.map(|reply| (reply, buffer[used..n].to_vec())))
        })?;
        if let Some(done) = step {
            return Ok(done);
        }
    }
}

thread_local! {
    /// The read buffer of [`read_greeting`], one per thread.
    static GREETING_READS: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; 2048].into_boxed_slice());
}

/// Incremental reply parser: fed bytes in any split, it says where the reply ends. Public for
/// SMTP clients that buffer their own input (the test kit's client and load generator).
#[derive(Default)]
pub struct ReplyParser {
    raw: Vec<u8>,
    /// Offset in `raw` where the current (incomplete) line starts.
    line_start: usize,
    /// The code of the reply's first line, once seen.
    code: Option<u16>,
    lines: usize,
}

impl ReplyParser {
    /// Takes bytes from `input` up to the end of the reply; returns how many were taken and
    /// the reply once complete. Never takes a byte past the final line ending.
    pub fn push(&mut self, input: &[u8]) -> anyhow::Result<(usize, Option<Reply>)> {
        for (i, &b) in input.iter().enumerate() {
            if self.raw.len() >= MAX_REPLY {
                bail!(
                    "SMTP reply longer than {} KiB ({} lines so far)",
                    MAX_REPLY / 1024,
                    self.lines
                );
            }
            self.raw.push(b);
            if b == b'\n' && self.end_line()? {
                let code = self.code.unwrap_or_default();
                let raw = std::mem::take(&mut self.raw);
                return Ok((i + 1, Some(Reply { code, raw })));
            }
        }
        Ok((input.len(), None))
    }

    /// Checks the line just completed; true when it was the reply's last line.
    fn end_line(&mut self) -> anyhow::Result<bool> {
        let line = &self.raw[self.line_start..];
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        self.lines += 1;
        let code = parse_code(content).map_err(|why| {
            anyhow::anyhow!(
                "malformed SMTP reply line {} ({why}): {:?}",
                self.lines,
                printable(content, 80)
            )
        })?;
        if let Some(first) = self.code
            && first != code
        {
            bail!(
                "SMTP reply line {} has code {code} but the reply started with {first}: {:?}",
                self.lines,
                printable(content, 80)
            );
        }
        self.code = Some(code);
        self.line_start = self.raw.len();
        // "250-text" continues; "250 text" and a bare "250" end the reply.
        Ok(content.get(3) != Some(&b'-'))
    }

    /// The error for a connection that closed before the reply was complete.
    pub fn eof_error(&self) -> anyhow::Error {
        if self.raw.is_empty() {
            anyhow::anyhow!("connection closed before an SMTP reply")
        } else {
            anyhow::anyhow!(
                "connection closed in the middle of an SMTP reply after {} bytes: {:?}",
                self.raw.len(),
                printable(&self.raw, 80)
            )
        }
    }
}

/// The code of one reply line: three digits, the first 2..=5, followed by nothing, a space or
/// a hyphen.
fn parse_code(line: &[u8]) -> Result<u16, &'static str> {
    let digits = line.get(..3).ok_or("shorter than a three-digit code")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err("does not start with a three-digit code");
    }
    if !(b'2'..=b'5').contains(&digits[0]) {
        return Err("reply code outside 2xx-5xx");
    }
    match line.get(3) {
        None | Some(b' ') | Some(b'-') => {}
        Some(_) => return Err("code not followed by a space or hyphen"),
    }
    Ok(digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
}

/// Bytes as a log-safe string: lossy UTF-8, control characters escaped, capped at `max` chars.
fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .trim_end_matches(['\r', '\n'])
        .trim()
        .chars()
        .take(max)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn parse(mut input: &[u8]) -> anyhow::Result<(Reply, Vec<u8>)> {
        let reply = read_reply(&mut input).await?;
        Ok((reply, input.to_vec()))
    }

    #[tokio::test]
    async fn single_line_reply_and_nothing_more() {
        let (reply, rest) = parse(b"220 mx.example ESMTP\r\nEXTRA").await.unwrap();
        assert_eq!(reply.code, 220);
        assert_eq!(reply.raw, b"220 mx.example ESMTP\r\n");
        assert_eq!(rest, b"EXTRA", "must not read past the reply");
        assert_eq!(reply.text(), "mx.example ESMTP");
        assert!(reply.is_positive());
    }

    #[tokio::test]
    async fn multi_line_reply_kept_byte_for_byte() {
        let input =
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n221 x\r\n";
        let (reply, rest) = parse(input).await.unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(
            reply.raw,
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
        );
        assert_eq!(rest, b"221 x\r\n");
    }

    #[tokio::test]
    async fn bare_code_and_bare_lf_accepted_raw_unchanged() {
        let (reply, rest) = parse(b"250\r\nX").await.unwrap();
        assert_eq!(
            (reply.code, reply.raw.as_slice(), rest.as_slice()),
            (250, &b"250\r\n"[..], &b"X"[..])
        );

        let (reply, rest) = parse(b"421-busy\n421 try later\nY").await.unwrap();
        assert_eq!(reply.code, 421);
        assert_eq!(reply.raw, b"421-busy\n421 try later\n");
        assert_eq!(rest, b"Y");
        assert!(!reply.is_positive());
        assert_eq!(reply.text(), "busy");
    }

    #[tokio::test]
    async fn malformed_lines_are_errors() {
        for bad in [
            &b"hello\r\n"[..],
            b"22 short\r\n",
            b"2x0 letters\r\n",
            b"220x no separator\r\n",
            b"120 not smtp\r\n",
            b"650 out of range\r\n",
            b"\r\n",
        ] {
            let err = parse(bad).await.unwrap_err();
            assert!(
                format!("{err:#}").contains("malformed SMTP reply line 1"),
                "{bad:?}: {err:#}"
            );
        }
    }

    #[tokio::test]
    async fn inconsistent_codes_are_an_error() {
        let err = parse(b"250-a\r\n251 b\r\n").await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("line 2 has code 251") && msg.contains("started with 250"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn eof_is_an_error() {
        let err = parse(b"").await.unwrap_err();
        assert!(format!("{err:#}").contains("closed before"), "{err:#}");
        let err = parse(b"250-first\r\n250 unfinished").await.unwrap_err();
        assert!(
            format!("{err:#}").contains("middle of an SMTP reply"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn reply_over_64k_is_an_error() {
        let mut input = Vec::new();
        while input.len() <= MAX_REPLY {
            input.extend_from_slice(b"250-0123456789012345678901234567890123456789\r\n");
        }
        input.extend_from_slice(b"250 end\r\n");
        let err = parse(&input).await.unwrap_err();
        assert!(format!("{err:#}").contains("longer than 64 KiB"), "{err:#}");

        // Just under the limit is fine.
        let mut input = Vec::new();
        while input.len() + 100 < MAX_REPLY {
            input.extend_from_slice(b"250-0123456789012345678901234567890123456789\r\n");
        }
        input.extend_from_slice(b"250 end\r\n");
        let (reply, _) = parse(&input).await.unwrap();
        assert_eq!(reply.raw, input);
    }

    #[tokio::test]
    async fn reply_split_across_writes_over_a_stream() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in [&b"25"[..], b"0-a\r", b"\n250", b" b\r\n", b"354 next\r\n"] {
                server.write_all(chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            server
        });
        let reply = read_reply(&mut client).await.unwrap();
        assert_eq!(reply.raw, b"250-a\r\n250 b\r\n");
        let next = read_reply(&mut client).await.unwrap();
        assert_eq!(
            (next.code, next.raw.as_slice()),
            (354, &b"354 next\r\n"[..])
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn tcp_reply_consumes_exactly_the_reply() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            // A partial first line, then the rest with bytes after the reply in one segment.
            s.write_all(b"220-mx.exa").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            s.write_all(b"mple\r\n220 ready\r\nAFTER").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let reply = read_tcp_reply(&mut stream).await.unwrap();
        assert_eq!(reply.code, 220);
        assert_eq!(reply.raw, b"220-mx.example\r\n220 ready\r\n");
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"AFTER");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_reply_eof_and_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = std::sync::Arc::new(listener);
        let l = listener.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"220-half").await.unwrap();
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let err = read_tcp_reply(&mut stream).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("middle of an SMTP reply"),
            "{err:#}"
        );
        server.await.unwrap();

        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let line = b"220-0123456789012345678901234567890123456789\r\n";
            for _ in 0..(2 * MAX_REPLY / line.len()) {
                if s.write_all(line).await.is_err() {
                    break;
                }
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let err = read_tcp_reply(&mut stream).await.unwrap_err();
        assert!(format!("{err:#}").contains("longer than 64 KiB"), "{err:#}");
        drop(stream);
        server.await.unwrap();
    }

    /// A connected loopback pair: (ours, the backend's end).
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (ours, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (ours.expect("connect"), accepted.expect("accept").0)
    }

    /// A greeting split over several segments, with bytes after it: the reply is exact and the
    /// bytes after it come back apart, none lost.
    #[tokio::test]
    async fn greeting_split_over_segments_keeps_what_came_after() {
        let (ours, mut backend) = connected_pair().await;
        let writer = tokio::spawn(async move {
            for part in [&b"220-mx.exa"[..], b"mple ESMTP\r\n220 ready\r", b"\nEARLY"] {
                backend.write_all(part).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            backend
        });
        let (reply, rest) = read_greeting(&ours).await.expect("greeting");
        assert_eq!(reply.code, 220);
        assert_eq!(reply.raw, b"220-mx.example ESMTP\r\n220 ready\r\n");
        let _backend = writer.await.expect("writer");
        let mut rest = rest;
        while rest.len() < 5 {
            ours.readable().await.expect("readable");
            let mut more = [0u8; 16];
            if let Ok(n) = ours.try_read(&mut more) {
                rest.extend_from_slice(&more[..n]);
            }
        }
        assert_eq!(rest, b"EARLY");
    }

    #[tokio::test]
    async fn greeting_cut_short_is_an_error() {
        let (ours, mut backend) = connected_pair().await;
        backend.write_all(b"220 half").await.expect("write");
        drop(backend);
        assert!(read_greeting(&ours).await.is_err());
    }
}
