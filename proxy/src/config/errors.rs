//! Locating and reporting problems: the `file:line:column` of serde's first structural error
//! (with the key of a duplicate and a table-versus-array mix explained), the
//! `file:line: context: message` of every validation error, the list printed to the operator
//! (one `error:` line each, in line order), and how a value is shown in a message.

use std::fmt;
use std::ops::Range;
use std::path::Path;

/// All problems found in one config file, one per line, each naming file, line and key.
#[derive(Debug)]
pub struct ConfigErrors {
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Formats serde's first error as `file:line:column: message (in key.path)`.
pub(super) fn structural_error(path: &Path, text: &str, error: toml::de::Error) -> String {
    // toml only names the key path in its Display when it has no source text to quote.
    let mut keyless = error.clone();
    keyless.set_input(None);
    let rendered = keyless.to_string();
    let keys = rendered
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("in `").and_then(|l| l.strip_suffix('`')));
    let mut message = cut_quoted(error.message().trim_end());
    if message == "duplicate key"
        && let Some(span) = error.span()
    {
        message = explain_duplicate(text, span.start);
    }
    if keys.is_some_and(|k| k.ends_with("service") || k.ends_with("backend"))
        && message.contains("expected a sequence")
    {
        message.push_str("; write [[service]] and [[service.backend]] with double brackets (one table per entry)");
    }
    if let Some(table @ ("service.health" | "service.xdp")) = keys
        && message.starts_with("invalid type: map")
    {
        message = format!(
            "[[{table}]] makes a list, but each service has one [{table}] table; write it with single brackets"
        );
    }
    let location = match error.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("{}:{line}:{column}", path.display())
        }
        None => path.display().to_string(),
    };
    match keys {
        Some(keys) if !keys.is_empty() => format!("{location}: {keys}: {message}"),
        _ => format!("{location}: {message}"),
    }
}

/// Longest value quoted in a message; a longer one is cut and ends in "…".
pub(super) const MAX_SHOWN: usize = 64;

/// `value` as a message quotes it: in double quotes, escaped, cut to [`MAX_SHOWN`] characters.
pub(super) fn shown(value: &str) -> String {
    let escaped = value.escape_debug().to_string();
    match escaped.char_indices().nth(MAX_SHOWN) {
        Some((cut, _)) => format!("\"{}…\"", &escaped[..cut]),
        None => format!("\"{escaped}\""),
    }
}

/// serde's message with every quoted value (`"..."` or `` `...` ``) cut to [`MAX_SHOWN`].
fn cut_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let close = rest.find(quote).unwrap_or(rest.len());
        let inner = &rest[..close];
        match inner.char_indices().nth(MAX_SHOWN) {
            Some((cut, _)) => {
                out.push_str(&inner[..cut]);
                out.push('…');
            }
            None => out.push_str(inner),
        }
        rest = &rest[close..];
        if let Some(after) = rest.strip_prefix(quote) {
            out.push(quote);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What a line of TOML defines, as far as a duplicate is concerned.
#[derive(PartialEq, Eq)]
enum Definition {
    /// `[path]`
    Table(String),
    /// `[[path]]`
    ArrayEntry(String),
    /// `key = ...`
    Key(String),
}

impl Definition {
    fn of(line: &str) -> Option<Definition> {
        let line = line.trim();
        let path = |inner: &str| {
            inner
                .split_whitespace()
                .collect::<String>()
                .replace(['"', '\''], "")
        };
        if let Some(rest) = line.strip_prefix("[[") {
            return Some(Definition::ArrayEntry(path(rest.split("]]").next()?)));
        }
        if let Some(rest) = line.strip_prefix('[') {
            return Some(Definition::Table(path(rest.split(']').next()?)));
        }
        let (key, _) = line.split_once('=')?;
        Some(Definition::Key(path(key)))
    }

    fn is_header(&self) -> bool {
        !matches!(self, Definition::Key(_))
    }
}

/// toml says only "duplicate key": name the key, where it was first given, and explain the
/// mix of `[x]` and `[[x]]` that most often causes it.
fn explain_duplicate(text: &str, offset: usize) -> String {
    let (line_number, _) = line_column(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let Some(definition) = lines.get(line_number - 1).and_then(|l| Definition::of(l)) else {
        return "duplicate key".to_owned();
    };
    let earlier = lines[..line_number - 1].iter().enumerate().rev();
    match &definition {
        Definition::Key(key) => {
            // The first one is in the same table: between the last header and this line.
            let first = earlier
                .map(|(i, l)| (i + 1, Definition::of(l)))
                .take_while(|(_, d)| !d.as_ref().is_some_and(Definition::is_header))
                .find(|(_, d)| d.as_ref() == Some(&definition))
                .map_or(String::new(), |(line, _)| {
                    format!(" (first set on line {line})")
                });
            format!(
                "duplicate key {}{first}: a key may be given only once in a table",
                shown(key)
            )
        }
        Definition::Table(path) | Definition::ArrayEntry(path) => {
            let first = earlier.map(|(i, l)| (i + 1, Definition::of(l))).find(|(_, d)| {
                matches!(d, Some(Definition::Table(p) | Definition::ArrayEntry(p)) if p == path)
            });
            match first {
                Some((line, Some(Definition::Table(_))))
                    if matches!(definition, Definition::ArrayEntry(_)) =>
                {
                    format!(
                        "[[{path}]] follows [{path}] (line {line}): single brackets define one table, double brackets add an entry to an array of tables, and one key cannot be both; write every entry as [[{path}]]"
                    )
                }
                Some((line, Some(Definition::ArrayEntry(_))))
                    if matches!(definition, Definition::Table(_)) =>
                {
                    format!(
                        "[{path}] follows [[{path}]] (line {line}): single brackets define one table, double brackets add an entry to an array of tables, and one key cannot be both; write every entry as [[{path}]]"
                    )
                }
                Some((line, _)) => {
                    format!("table [{path}] is defined twice (first on line {line})")
                }
                None => format!("duplicate key {}", shown(path)),
            }
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

/// Collects validation errors, each prefixed with `file:line:`.
pub(super) struct Report {
    file: String,
    /// Byte offset where each line after the first starts: a line is found by binary search,
    /// not by counting newlines again for every value (a 1000-backend file asks thousands).
    line_starts: Vec<usize>,
    /// (line, message); reported in line order.
    errors: Vec<(usize, String)>,
}

impl Report {
    pub(super) fn new(path: &Path, text: &str) -> Self {
        Report {
            file: path.display().to_string(),
            line_starts: text
                .bytes()
                .enumerate()
                .filter(|&(_, b)| b == b'\n')
                .map(|(i, _)| i + 1)
                .collect(),
            errors: Vec::new(),
        }
    }

    /// All errors in line order, or `Ok` when there were none.
    pub(super) fn finish(mut self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            return Ok(());
        }
        // Stable: problems found on one line keep the order they were checked in.
        self.errors.sort_by_key(|(line, _)| *line);
        Err(ConfigErrors {
            errors: self.errors.into_iter().map(|(_, text)| text).collect(),
        })
    }

    /// 1-based line of a span's start (as [`line_column`] counts it).
    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        self.line_starts
            .partition_point(|&start| start <= span.start)
            + 1
    }

    pub(super) fn error(&mut self, span: &Range<usize>, context: &str, message: impl fmt::Display) {
        let line = self.line(span);
        let text = if context.is_empty() {
            format!("{}:{line}: {message}", self.file)
        } else {
            format!("{}:{line}: {context}: {message}", self.file)
        };
        self.errors.push((line, text));
    }
}
