//! The request line's own formatter: the same text and JSON lines tracing-subscriber's fmt
//! layer writes, formatted straight into the thread's batch.
//!
//! Why: through the fmt layer a line cost 10% of loopback throughput as text and 16% as JSON
//! (field visitors, a fresh timestamp, a formatter per event); here it is a few appends to a
//! reused buffer, with the timestamp's date and time formatted once a second. Every other line
//! (warnings, start-up) still goes through tracing. The level filter (`RUST_LOG`, `log.level`)
//! decides for this line as for any other: it is asked through `tracing::enabled!`.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::Level;

use super::writer::BatchedLines;
use crate::config::LogFormat;

/// The target the request lines are logged under, for filters.
const TARGET: &str = "oa_bypass::request";

/// Where request lines go and in which form; unset until [`super::init`], so a process that
/// never installs logging (a test's in-process gateway) writes none.
static OUT: OnceLock<(LogFormat, BatchedLines)> = OnceLock::new();

pub(super) fn install(format: LogFormat, lines: BatchedLines) {
    let _ = OUT.set((format, lines));
}

thread_local! {
    /// The second this thread's timestamp prefix was made for, and the prefix.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    second: u64,
    /// `2026-12-02T04:08:08.` for `second`.
    prefix: Vec<u8>,
}

/// The fields of one line, appended in order.
pub(super) struct Fields<'a> {
    line: &'a mut Vec<u8>,
    json: bool,
}

/// Writes one request line whose fields `fill` appends, if the level filter lets it through.
pub(super) fn write(fill: impl FnOnce(&mut Fields<'_>)) {
    let Some((format, lines)) = OUT.get() else {
        return;
    };
    if !tracing::enabled!(target: TARGET, Level::INFO) {
        return;
    }
    let json = matches!(format, LogFormat::Json);
    SCRATCH.with(|scratch| {
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        lines.append_with(|batch| scratch.format(batch, now, json, fill));
    });
}

impl Scratch {
    /// Appends the line at `now` (since the Unix epoch) to `line`, newline included.
    fn format(
        &mut self,
        line: &mut Vec<u8>,
        now: Duration,
        json: bool,
        fill: impl FnOnce(&mut Fields<'_>),
    ) {
        let Scratch { second, prefix } = self;
        if now.as_secs() != *second || prefix.is_empty() {
            *second = now.as_secs();
            prefix.clear();
            let whole = UNIX_EPOCH + Duration::from_secs(now.as_secs());
            // `2026-12-02T04:08:08Z`: all but the `Z`, then the fraction's dot.
            let _ = write!(prefix, "{}", humantime::format_rfc3339_seconds(whole));
            prefix.pop();
            prefix.push(b'.');
        }
        if json {
            line.extend_from_slice(b"{\"timestamp\":\"");
        }
        line.extend_from_slice(prefix);
        let micros = now.subsec_micros();
        let digits: [u8; 7] = std::array::from_fn(|at| match at {
            6 => b'Z',
            _ => b'0' + (micros / 10u32.pow(5 - at as u32) % 10) as u8,
        });
        line.extend_from_slice(&digits);
        if json {
            line.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        } else {
            line.extend_from_slice(b"  INFO oa_bypass::request: request");
        }
        fill(&mut Fields { line, json });
        if json {
            line.extend_from_slice(b",\"target\":\"oa_bypass::request\"}");
        }
        line.push(b'\n');
    }
}

/// A field's name as each form writes it before the value, made once by [`name!`]:
/// `,"status":` and ` status=`. Why: one copy of a constant per field, where joining the
/// separators and the name at each line took three.
#[derive(Clone, Copy)]
pub(super) struct Name {
    pub(super) json: &'static str,
    pub(super) text: &'static str,
}

/// The [`Name`] of a field: `name!("status")`.
macro_rules! name {
    ($name:literal) => {
        $crate::observe::log::line::Name {
            json: concat!(",\"", $name, "\":"),
            text: concat!(" ", $name, "="),
        }
    };
}
pub(super) use name;

// The field writers are inlined into each call site so that the name, a constant there, is
// copied by a few moves rather than a call to `memcpy` (half of a field's cost before).
impl Fields<'_> {
    #[inline(always)]
    fn name(&mut self, name: Name) {
        // Two copies, each of a constant length, rather than one copy of either length.
        if self.json {
            self.line.extend_from_slice(name.json.as_bytes());
        } else {
            self.line.extend_from_slice(name.text.as_bytes());
        }
    }

    /// A word both forms write in quotes as it is: the caller knows it holds nothing to
    /// escape (a fixed outcome, hex digits).
    #[inline(always)]
    pub(super) fn word(&mut self, name: Name, value: &[u8]) {
        debug_assert!(value.iter().all(|byte| PLAIN[usize::from(*byte)]));
        self.name(name);
        self.line.push(b'"');
        self.line.extend_from_slice(value);
        self.line.push(b'"');
    }

    /// A value the text form writes as it is (a method, a route template).
    #[inline(always)]
    pub(super) fn bare(&mut self, name: Name, value: &str) {
        self.name(name);
        if !self.json {
            self.line.extend_from_slice(value.as_bytes());
        } else if !self.plain_string(value) {
            let _ = serde_json::to_writer(&mut *self.line, value);
        }
    }

    /// A string the text form quotes and escapes.
    #[inline(always)]
    pub(super) fn quoted(&mut self, name: Name, value: &str) {
        self.name(name);
        if self.plain_string(value) {
            return;
        }
        if self.json {
            let _ = serde_json::to_writer(&mut *self.line, value);
        } else {
            let _ = write!(self.line, "{value:?}");
        }
    }

    /// Writes `value` in quotes when it needs no escaping (printable ASCII without a quote or
    /// a backslash), which JSON and Rust's `Debug` then write alike, and says whether it did.
    /// Why: most values are such words (outcomes, routes, models, hex), and the escaping
    /// writers walk them a byte at a time through a formatter.
    fn plain_string(&mut self, value: &str) -> bool {
        let plain = value.bytes().all(|byte| PLAIN[usize::from(byte)]);
        if plain {
            self.line.reserve(value.len() + 2);
            self.line.push(b'"');
            self.line.extend_from_slice(value.as_bytes());
            self.line.push(b'"');
        }
        plain
    }

    #[inline(always)]
    pub(super) fn number(&mut self, name: Name, value: u64) {
        self.name(name);
        let mut digits = itoa::Buffer::new();
        self.line.extend_from_slice(digits.format(value).as_bytes());
    }

    /// A duration in milliseconds with microsecond precision, as the shortest decimal of the
    /// float of it (`1.807`, `1.0`), which both forms write. Why: it is written from the
    /// whole microseconds with integer digits, where formatting the float took several
    /// hundred instructions a field.
    #[inline(always)]
    pub(super) fn millis(&mut self, name: Name, value: Duration) {
        self.name(name);
        // Rounded to the nearest microsecond, as the float's `round` did.
        let micros = value.as_secs() * 1_000_000 + u64::from((value.subsec_nanos() + 500) / 1000);
        write_millis(self.line, micros);
    }
}

/// The bytes a string may hold to be written in quotes as it is: printable ASCII but `"` and
/// `\`. A table, where two range tests a byte cost twice the instructions.
const PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut byte = 0x20;
    while byte < 0x7f {
        plain[byte] = byte != b'"' as usize && byte != b'\\' as usize;
        byte += 1;
    }
    plain
};

/// `micros` as milliseconds: the whole part, a dot, then the fraction's digits without
/// trailing zeros (at least one), as the shortest decimal of the float `micros / 1000` reads.
fn write_millis(line: &mut Vec<u8>, micros: u64) {
    let mut digits = itoa::Buffer::new();
    line.extend_from_slice(digits.format(micros / 1000).as_bytes());
    let fraction = micros % 1000;
    let four = [
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    let kept = four[1..]
        .iter()
        .rposition(|digit| *digit != b'0')
        .map_or(2, |last| last + 2);
    // All four, then the zeros cut: a copy of a constant length is a move, not a call.
    line.extend_from_slice(&four);
    line.truncate(line.len() - (four.len() - kept));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What tracing-subscriber's fmt layer writes, to compare with.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut seen) = self.0.lock() {
                seen.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line with its timestamp (the one part that differs) cut out.
    fn without_timestamp(line: &[u8]) -> String {
        let text = String::from_utf8_lossy(line).into_owned();
        let start = text.find("20").unwrap_or(0);
        let end = text.find('Z').map_or(0, |z| z + 1);
        format!("{}{}", &text[..start], &text[end..])
    }

    /// Milliseconds with microsecond precision as a float: what the line's fields used to
    /// be, and what tracing-subscriber writes for one.
    fn millis(duration: Duration) -> f64 {
        (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
    }

    #[test]
    fn milliseconds_read_as_the_floats_shortest_decimal() {
        let values = (0..5_000u64).chain([
            10_000,
            100_000,
            1_000_000,
            1_234_567,
            86_400_000_000,
            999_999_999_999,
        ]);
        for micros in values {
            let mut ours = Vec::new();
            write_millis(&mut ours, micros);
            let float = millis(Duration::from_micros(micros));
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                format!("{float:?}"),
                "{micros}"
            );
            assert_eq!(format!("{float:?}"), serde_json::to_string(&float).unwrap());
        }
    }

    const ODD: &str = "quote \" backslash \\ tab \t newline \n é \u{7f} end";

    #[test]
    fn the_line_is_what_tracing_subscriber_would_write_in_both_formats() {
        for json in [false, true] {
            let captured = Captured::default();
            let sink = captured.clone();
            let builder = tracing_subscriber::fmt()
                .with_target(true)
                .with_ansi(false)
                .with_writer(move || sink.clone());
            let dispatch: tracing::Dispatch = if json {
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .into()
            } else {
                builder.into()
            };
            tracing::dispatcher::with_default(&dispatch, || {
                tracing::info!(
                    target: "oa_bypass::request",
                    method = %"POST",
                    route = %"/v1/files/{file_id}",
                    status = 200_u16,
                    duration_ms = millis(Duration::from_micros(1_000)),
                    upstream_ttfb_ms = millis(Duration::ZERO),
                    bytes_in = 12_345_678_u64,
                    outcome = "complete",
                    key_hash = "0a1b2c3d",
                    reason = ODD,
                    "request"
                );
            });
            let mut ours = Vec::new();
            Scratch::default().format(
                &mut ours,
                Duration::from_micros(1_764_648_488_000_042),
                json,
                |fields| {
                    fields.bare(name!("method"), "POST");
                    fields.bare(name!("route"), "/v1/files/{file_id}");
                    fields.number(name!("status"), 200);
                    fields.millis(name!("duration_ms"), Duration::from_micros(1_000));
                    fields.millis(name!("upstream_ttfb_ms"), Duration::ZERO);
                    fields.number(name!("bytes_in"), 12_345_678);
                    fields.quoted(name!("outcome"), "complete");
                    fields.word(name!("key_hash"), b"0a1b2c3d");
                    fields.quoted(name!("reason"), ODD);
                },
            );
            let theirs = captured
                .0
                .lock()
                .map(|seen| seen.clone())
                .unwrap_or_default();
            assert_eq!(without_timestamp(&ours), without_timestamp(&theirs));
            assert!(String::from_utf8_lossy(&ours).contains("2025-12-02T04:08:08.000042Z"));
        }
    }
}
