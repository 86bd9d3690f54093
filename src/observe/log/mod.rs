//! Logging: the tracing subscriber, and the one line written per request ([`Record`]) or per
//! realtime session.
//!
//! A request line carries method, route template, status, durations, byte counts, the
//! upstream's request ID, the key's hash prefix and the model when the usage tap read it. It
//! must never carry a key, another header value, a body, or the raw path (which could hold an
//! ID the operator does not want in logs): the route template is logged instead.

mod line;
mod record;
mod writer;

pub(crate) use record::{Outcome, Record};

use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use line::name;

use super::traces::{self, Exporting};
use crate::config::{LogConfig, LogFormat, TracingConfig};

/// What logging holds until the process ends: the line writer's thread, whose guard writes
/// out the lines still queued when dropped, and, with traces on, the span exporter.
pub struct Logging {
    pub lines: writer::Flush,
    pub exporting: Option<Exporting>,
}

/// The writer, for its count of lines dropped because `log.buffer` was full.
static DROPPED: OnceLock<writer::BatchedLines> = OnceLock::new();

/// How many log lines were dropped so far because the log sink could not keep up.
pub(crate) fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, writer::BatchedLines::dropped)
}

/// The longest the exit waits for queued lines to be written, when the sink is stalled.
const FLUSH_BOUND: Duration = Duration::from_secs(10);

/// Debug builds only: milliseconds by which the writer holds back every batch. CI runs the
/// tests that read logs again with it set, so a test that reads the log before the writer
/// has written it fails every time, not one time in three. Release builds never read it.
pub(crate) const DEBUG_HOLD_ENV: &str = "OA_BYPASS_DEBUG_LOG_HOLD_MS";

/// How long the writer holds back each batch: nothing, but in a debug build with
/// [`DEBUG_HOLD_ENV`] set.
fn writer_hold() -> Duration {
    let millis = if cfg!(debug_assertions) {
        std::env::var(DEBUG_HOLD_ENV)
            .ok()
            .and_then(|value| value.parse().ok())
    } else {
        None
    };
    Duration::from_millis(millis.unwrap_or(0))
}

/// Installs the global subscriber: `RUST_LOG` if set, else `log.level`; text or JSON lines
/// as `log.format` says; and, when traces are on, the exporter of the gateway's spans.
///
/// Lines go to stdout in batches from a thread of their own ([`writer`]), so no request
/// waits for the write; when `log.buffer` is full, further lines are dropped and counted.
pub fn init(config: &LogConfig, tracing: &TracingConfig) -> Result<Logging, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::builder().parse(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let capacity = usize::try_from(config.buffer).unwrap_or(usize::MAX);
    let (writer, guard) = writer::spawn(std::io::stdout(), capacity, FLUSH_BOUND, writer_hold())
        .map_err(|err| format!("cannot start the log writer thread: {err}"))?;
    let _ = DROPPED.set(writer.clone());
    line::install(config.format, writer.clone());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // The subscriber dispatches log lines only: spans go to their exporter directly.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(writer);
    let _ = match config.format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    Ok(Logging {
        lines: guard,
        exporting: traces::exporter(tracing)?,
    })
}

/// What a realtime (WebSocket) session's line says, written when the session ends.
pub(crate) struct SessionLine<'a> {
    pub route: &'a str,
    pub elapsed: Duration,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub outcome: &'static str,
    pub key_hash: &'a str,
}

/// Writes a realtime session's line.
pub(crate) fn session(line: &SessionLine<'_>) {
    line::write(|fields| {
        fields.bare(name!("method"), "GET");
        fields.bare(name!("route"), line.route);
        fields.number(name!("status"), 101);
        fields.millis(name!("duration_ms"), line.elapsed);
        fields.number(name!("messages_in"), line.messages_in);
        fields.number(name!("messages_out"), line.messages_out);
        fields.number(name!("bytes_in"), line.bytes_in);
        fields.number(name!("bytes_out"), line.bytes_out);
        fields.quoted(name!("outcome"), line.outcome);
        fields.quoted(name!("key_hash"), line.key_hash);
    });
}
