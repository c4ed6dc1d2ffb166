//! Reading `/metrics` the way a scraper does: a plain HTTP/1.1 GET over a TCP socket
//! ([`scrape`]) and a small parser of the Prometheus text exposition ([`Exposition`]: every
//! series as name, labels and value; comments skipped). Enough for the tests and the
//! benchmark to assert on numbers; the format's own linter is `promtool check metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// One series: its name, labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A whole exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

/// The body of `GET /metrics` from the admin listener at `addr` (status 200 required), and
/// its content type.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<(String, String)> {
    get(addr, "/metrics", &[])
}

/// `GET path` with extra header lines (`"Accept: ..."`); the body and content type of a 200.
pub fn get(addr: SocketAddr, path: &str, headers: &[&str]) -> anyhow::Result<(String, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
        .with_context(|| format!("connect to the admin listener {addr}"))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading GET {path} from {addr}"))?;
    let response = String::from_utf8(response).context("the response is not UTF-8")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {status}\n{body}");
    }
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        bail!("GET {path}: a chunked body (this reader expects Content-Length)");
    }
    Ok((body.to_string(), header("content-type").unwrap_or_default()))
}

impl Exposition {
    /// Parses the Prometheus text format (or OpenMetrics: `# EOF` is a comment too).
    pub fn parse(text: &str) -> anyhow::Result<Exposition> {
        let samples = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(n, line)| parse_line(line).with_context(|| format!("line {}: {line:?}", n + 1)))
            .collect::<anyhow::Result<Vec<Sample>>>()?;
        Ok(Exposition { samples })
    }

    /// Scrapes `addr` and parses what came.
    pub fn scrape(addr: SocketAddr) -> anyhow::Result<Exposition> {
        Exposition::parse(&scrape(addr)?.0)
    }

    /// Series called `name` that have every label of `labels` (others may have more).
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
    }

    /// The value of the one series called `name` with `labels`; None when there is none, an
    /// error when several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<Option<f64>> {
        let mut found = self.matching(name, labels);
        let first = found.next().map(|s| s.value);
        if found.next().is_some() {
            bail!("more than one series {name} with {labels:?}");
        }
        Ok(first)
    }

    /// [`Exposition::value`] that must be there.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.value(name, labels) {
            Ok(Some(value)) => value,
            Ok(None) => panic!("no series {name} with {labels:?} in the scrape"),
            Err(error) => panic!("{error}"),
        }
    }

    /// The sum of every series called `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// `name{label="value",...} value [timestamp]`.
fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .context("no value after the series name")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let value = rest.split_whitespace().next().context("no value")?;
    Ok(Sample {
        name,
        labels,
        value: parse_value(value)?,
    })
}

/// Reads `key="value",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(
    mut text: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> anyhow::Result<&'a str> {
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Ok(after);
        }
        let (key, after) = text.split_once("=\"").context("a label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars
                .next()
                .context("a label value without its closing quote")?
            {
                (i, '"') => break i,
                (_, '\\') => match chars.next().context("a lone backslash")?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        text = &after[end + 1..];
    }
}

fn parse_value(text: &str) -> anyhow::Result<f64> {
    Ok(match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => text
            .parse()
            .with_context(|| format!("{text:?} is not a number"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_values_and_skips_comments() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{service=\"mx\",backend=\"m\\\"1\"} 3\nb 0.5\nc_bucket{le=\"+Inf\"} 7\n# EOF\n";
        let exposition = Exposition::parse(text).expect("parse");
        assert_eq!(exposition.samples.len(), 3);
        assert_eq!(exposition.get("a_total", &[("backend", "m\"1")]), 3.0);
        assert_eq!(exposition.get("b", &[]), 0.5);
        assert_eq!(exposition.get("c_bucket", &[("le", "+Inf")]), 7.0);
        assert_eq!(
            exposition
                .value("a_total", &[("service", "other")])
                .expect("one"),
            None
        );
        assert_eq!(exposition.sum("a_total", &[]), 3.0);
        assert!(Exposition::parse("broken{le=\"1\" 3").is_err());
        assert!(Exposition::parse("name notanumber").is_err());
    }
}
