//! Locating and reporting problems: the `file:line:column` of serde's first structural error,
//! the `file:line: context: message` of every validation error, and the list printed to the
//! operator (one `error:` line each, in line order).

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
    let mut message = error.message().trim_end().to_owned();
    if keys.is_some_and(|k| k.ends_with("service") || k.ends_with("backend"))
        && message.contains("expected a sequence")
    {
        message.push_str("; write [[service]] and [[service.backend]] with double brackets (one table per entry)");
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
pub(super) struct Report<'a> {
    file: String,
    text: &'a str,
    /// (line, message); reported in line order.
    errors: Vec<(usize, String)>,
}

impl<'a> Report<'a> {
    pub(super) fn new(path: &Path, text: &'a str) -> Self {
        Report {
            file: path.display().to_string(),
            text,
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

    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        line_column(self.text, span.start).0
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
