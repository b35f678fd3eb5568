//! The process's log: text or JSON lines on stderr, and the one rule that keeps a logged
//! value from forging a line of its own.
//!
//! Many logged values come from outside: a webhook's status, error titles and details, the
//! Graph API's error messages, a customer's number. A value with a newline could write a
//! line that looks like the server's own (`…\n2026-01-01T00:00:00Z ERROR …`), and a NUL or
//! an escape sequence reaches whoever reads the log. So the text format escapes every
//! control character in every field and message ([`escape_control`], applied by the field
//! formatter itself, so no call site can forget it), and the JSON format (`log: { format:
//! json }`) writes each event as one JSON object, whose strings JSON escapes. Colours only
//! when stderr is a terminal and `NO_COLOR` is unset.

use std::borrow::Cow;
use std::fmt::Write as _;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::{Writer, debug_fn};

use crate::config::LogFormat;

/// `text` with every control character (and the Unicode line and paragraph separators,
/// which some viewers break lines on) written as an escape: `\n`, `\r`, `\t`, `\0`, else
/// `\u{1b}`. Text without any is returned as it is.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The subscriber for `format`, writing to `writer`: `filter` picks the events, `ansi`
/// colours the text format.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
        LogFormat::Text => Box::new(
            builder
                .with_ansi(ansi)
                .fmt_fields(debug_fn(escaped_field).delimited(" "))
                .finish(),
        ),
    }
}

/// One field of the text format: `name=value` (the message alone), escaped.
fn escaped_field(
    writer: &mut Writer<'_>,
    field: &tracing::field::Field,
    value: &dyn std::fmt::Debug,
) -> std::fmt::Result {
    let text = format!("{value:?}");
    let text = escape_control(&text);
    match field.name() {
        "message" => write!(writer, "{text}"),
        name => write!(writer, "{}={text}", name.strip_prefix("r#").unwrap_or(name)),
    }
}

/// Installs the process's log on stderr; colours only when stderr is a terminal and
/// `NO_COLOR` is unset.
pub fn init(format: LogFormat, filter: EnvFilter) {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ =
        tracing::subscriber::set_global_default(subscriber(format, filter, ansi, std::io::stderr));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, to read what the subscriber wrote.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    const FORGED: &str = "sent\n2026-12-03T00:00:00.000000Z ERROR flowgate: forged\u{0}\u{1b}[31m";

    fn logged(format: LogFormat) -> String {
        let buffer = Buffer::default();
        let subscriber = subscriber(format, EnvFilter::new("info"), false, buffer.clone());
        tracing::subscriber::with_default(subscriber, || {
            let status = FORGED.to_string();
            tracing::warn!(status = %status, title = FORGED, "a status: {}", FORGED);
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("plain text é"), "plain text é");
        assert!(matches!(escape_control("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\nb\r\tc\0d\u{1b}e\u{7f}f\u{2028}"),
            "a\\nb\\r\\tc\\0d\\u{1b}e\\u{7f}f\\u{2028}"
        );
    }

    #[test]
    fn a_forged_line_stays_in_one_escaped_text_line() {
        let out = logged(LogFormat::Text);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.ends_with('\n'));
        let line = out.trim_end_matches('\n');
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains(" WARN "), "{line}");
        assert!(
            line.contains(
                "status=sent\\n2026-12-03T00:00:00.000000Z ERROR flowgate: forged\\0\\u{1b}[31m"
            ),
            "{line}"
        );
        assert!(line.contains("a status: sent\\n2026"), "{line}");
    }

    #[test]
    fn json_lines_carry_the_value_intact_and_escaped() {
        let out = logged(LogFormat::Json);
        assert_eq!(out.lines().count(), 1, "{out}");
        let event: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(event["level"], "WARN");
        assert_eq!(event["status"], FORGED);
        assert_eq!(event["message"], format!("a status: {FORGED}"));
    }
}
