//! Log lines are written in batches by a thread of their own, as nginx's buffered access log
//! is: a request's thread only appends its line to its own batch.
//!
//! Each thread that logs fills a batch of its own (an uncontended lock; no other thread is
//! woken). A full batch goes to the writer thread, which also collects partly filled ones
//! every [`FLUSH_EVERY`], so a line is out within that time. When `capacity` bytes of
//! batches are waiting (the sink is stalled), a further batch is dropped and its lines
//! counted: a slow log must never hold a request up. On exit the guard writes out everything,
//! waiting for the sink up to a bound.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// A batch is handed to the writer thread when it reaches this size: one system call per
/// line costed about a fifth of the gateway's throughput at load.
const BATCH: usize = 32 << 10;
/// The longest a line waits in a partly filled batch.
pub(super) const FLUSH_EVERY: Duration = Duration::from_millis(100);

enum Message {
    Batch(Vec<u8>),
    /// Write out everything, then stop.
    Finish,
}

type Batch = Arc<Mutex<Vec<u8>>>;

/// What the threads that log and the writer thread share.
struct Shared {
    /// Every thread's batch, for the writer to collect partly filled ones.
    batches: Mutex<Vec<Batch>>,
    full: SyncSender<Message>,
    dropped: AtomicU64,
}

thread_local! {
    /// This thread's batch, once it has logged, and the writer it belongs to.
    static MINE: RefCell<Option<(Weak<Shared>, Batch)>> = const { RefCell::new(None) };
}

/// The handle the subscriber writes through.
#[derive(Clone)]
pub struct BatchedLines {
    shared: Arc<Shared>,
}

/// Held until the process ends; dropping it writes out every line logged.
pub struct Flush {
    shared: Arc<Shared>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    /// The longest the exit waits for a stalled sink.
    bound: Duration,
}

/// Starts the writer thread over `sink`; up to `capacity` bytes of lines may wait for it.
///
/// `hold` delays every batch before it is written (zero in the gateway): with it, no line
/// reaches the sink sooner than `hold` after it was logged, unless at exit.
pub(super) fn spawn(
    sink: impl Write + Send + 'static,
    capacity: usize,
    bound: Duration,
    hold: Duration,
) -> io::Result<(BatchedLines, Flush)> {
    let (full, batches) = mpsc::sync_channel(capacity.div_ceil(BATCH).max(1));
    let shared = Arc::new(Shared {
        batches: Mutex::default(),
        full,
        dropped: AtomicU64::new(0),
    });
    let (finished, done) = mpsc::channel();
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("oa-bypass-log".to_owned())
        .spawn(move || {
            write_batches(&writer, &batches, hold, sink);
            let _ = finished.send(());
        })?;
    let flush = Flush {
        shared: Arc::clone(&shared),
        done,
        thread: Some(thread),
        bound,
    };
    Ok((BatchedLines { shared }, flush))
}

/// The writer thread: full batches as they come, every thread's partly filled batch each
/// [`FLUSH_EVERY`] (however many full ones arrive meanwhile), and everything at the end.
fn write_batches(shared: &Shared, full: &Receiver<Message>, hold: Duration, sink: impl Write) {
    let mut out = Outbox::new(sink, hold);
    let mut collect_at = Instant::now() + FLUSH_EVERY;
    loop {
        let wait = out.next_due().unwrap_or(collect_at).min(collect_at);
        match full.recv_timeout(wait.saturating_duration_since(Instant::now())) {
            Ok(Message::Batch(batch)) => out.push(batch),
            Ok(Message::Finish) | Err(RecvTimeoutError::Disconnected) => {
                for message in full.try_iter() {
                    if let Message::Batch(batch) = message {
                        out.push(batch);
                    }
                }
                out.push(shared.collect());
                out.write_all();
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= collect_at {
            out.push(shared.collect());
            collect_at = Instant::now() + FLUSH_EVERY;
        }
        out.write_due();
    }
}

/// Where the writer thread's batches go: straight to the sink, or with a hold, after it.
struct Outbox<W> {
    sink: W,
    hold: Duration,
    /// Held batches and when each is due, oldest first.
    held: VecDeque<(Instant, Vec<u8>)>,
}

impl<W: Write> Outbox<W> {
    fn new(sink: W, hold: Duration) -> Self {
        Outbox {
            sink,
            hold,
            held: VecDeque::new(),
        }
    }

    fn push(&mut self, batch: Vec<u8>) {
        if self.hold.is_zero() {
            self.write(&batch);
        } else if !batch.is_empty() {
            self.held.push_back((Instant::now() + self.hold, batch));
        }
    }

    /// When the oldest held batch is due.
    fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(due, _)| *due)
    }

    fn write_due(&mut self) {
        let now = Instant::now();
        while self.next_due().is_some_and(|due| due <= now) {
            if let Some((_, batch)) = self.held.pop_front() {
                self.write(&batch);
            }
        }
    }

    /// Writes out every held batch, due or not: the process is ending.
    fn write_all(&mut self) {
        while let Some((_, batch)) = self.held.pop_front() {
            self.write(&batch);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // A sink that fails loses its lines: stderr, where that could be told, is likely the
        // same broken place.
        let _ = self.sink.write_all(bytes).and_then(|()| self.sink.flush());
    }
}

impl Shared {
    /// Takes the lines waiting in every thread's batch.
    fn collect(&self) -> Vec<u8> {
        let batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lines = Vec::new();
        for batch in batches.iter() {
            let mut batch = batch.lock().unwrap_or_else(PoisonError::into_inner);
            lines.append(&mut batch);
        }
        lines
    }

    /// Appends what `write` writes to this thread's batch, then hands the batch over if it
    /// is full.
    fn append_with(self: &Arc<Self>, write: impl FnOnce(&mut Vec<u8>)) {
        MINE.with(|mine| {
            let mut mine = mine.borrow_mut();
            // Compared by address, not by taking a `Weak` per line, which would bounce the
            // count between cores; the `Weak` kept keeps the address from being reused.
            if mine
                .as_ref()
                .is_none_or(|(of, _)| of.as_ptr() != Arc::as_ptr(self))
            {
                let batch = Batch::default();
                (self.batches.lock().unwrap_or_else(PoisonError::into_inner))
                    .push(Arc::clone(&batch));
                *mine = Some((Arc::downgrade(self), batch));
            }
            let Some((_, batch)) = mine.as_ref() else {
                return;
            };
            let mut batch = batch.lock().unwrap_or_else(PoisonError::into_inner);
            write(&mut batch);
            if batch.len() >= BATCH {
                let taken = std::mem::replace(&mut *batch, Vec::with_capacity(BATCH));
                if let Err(TrySendError::Full(Message::Batch(lost))) =
                    self.full.try_send(Message::Batch(taken))
                {
                    let lines = lost.iter().filter(|&&byte| byte == b'\n').count();
                    self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
                }
            }
        });
    }
}

impl BatchedLines {
    /// Appends a line that `write` writes straight into this thread's batch (the request
    /// line: no copy of it is made).
    pub(super) fn append_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        self.shared.append_with(write);
    }

    /// Lines dropped so far because the sink did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Write for &BatchedLines {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.shared
            .append_with(|batch| batch.extend_from_slice(line));
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Lent, not cloned, per line: a clone would bounce the handle's count between cores.
impl<'a> MakeWriter<'a> for BatchedLines {
    type Writer = &'a BatchedLines;

    fn make_writer(&'a self) -> &'a BatchedLines {
        self
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        // Behind every full batch already queued, once there is room.
        let deadline = Instant::now() + self.bound;
        loop {
            match self.shared.full.try_send(Message::Finish) {
                Ok(()) => break,
                Err(TrySendError::Full(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            // A sink stalled past the bound: exit without it rather than hang.
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records what it was given.
    #[derive(Clone, Default)]
    struct Recording(Arc<Mutex<Vec<u8>>>);

    impl Write for Recording {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut seen = self.0.lock().map_err(|_| io::ErrorKind::Other)?;
            seen.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let sink = Recording::default();
        let (lines, flush) = spawn(
            sink.clone(),
            64 << 20,
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .unwrap();
        let mut expected = Vec::new();
        for i in 0..10_000 {
            let line = format!("line {i}\n");
            (&lines).write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        drop(flush);
        assert_eq!(*sink.0.lock().unwrap(), expected);
        assert_eq!(lines.dropped(), 0);
    }

    #[test]
    fn a_partly_filled_batch_goes_out_without_more_lines() {
        let sink = Recording::default();
        let (lines, _flush) = spawn(
            sink.clone(),
            64 << 20,
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .unwrap();
        (&lines).write_all(b"alone\n").unwrap();
        // Bounded wait: the writer collects it within FLUSH_EVERY.
        for _ in 0..500 {
            if *sink.0.lock().unwrap() == b"alone\n" {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("a lone line was not written");
    }

    #[test]
    fn a_quiet_threads_line_goes_out_while_another_thread_fills_batches() {
        /// Drops what it is given, noting whether the quiet line was in it.
        #[derive(Clone, Default)]
        struct Watch(Arc<std::sync::atomic::AtomicBool>);
        impl Write for Watch {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                if bytes.windows(6).any(|w| w == b"quiet\n") {
                    self.0.store(true, Ordering::Relaxed);
                }
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let watch = Watch::default();
        let (lines, _flush) = spawn(
            watch.clone(),
            64 << 20,
            Duration::from_secs(10),
            Duration::ZERO,
        )
        .unwrap();
        let seen = || watch.0.load(Ordering::Relaxed);
        std::thread::scope(|scope| {
            // Full batches arrive far more often than every FLUSH_EVERY, for up to 10 s.
            let flooding = scope.spawn(|| {
                let line = [[b'x'; 255].as_slice(), b"\n"].concat();
                let until = Instant::now() + Duration::from_secs(10);
                while !seen() && Instant::now() < until {
                    for _ in 0..64 {
                        (&lines).write_all(&line).unwrap();
                    }
                }
            });
            (&lines).write_all(b"quiet\n").unwrap();
            flooding.join().unwrap();
        });
        assert!(
            seen(),
            "a partly filled batch waited while another thread logged"
        );
    }

    #[test]
    fn with_a_hold_no_line_is_written_sooner_than_the_hold() {
        /// Records when the first bytes arrived.
        #[derive(Clone, Default)]
        struct Arrival(Arc<Mutex<Option<Instant>>>);
        impl Write for Arrival {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let mut first = self.0.lock().map_err(|_| io::ErrorKind::Other)?;
                first.get_or_insert_with(Instant::now);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let hold = Duration::from_millis(300);
        let arrival = Arrival::default();
        let (lines, _flush) =
            spawn(arrival.clone(), 64 << 20, Duration::from_secs(10), hold).unwrap();
        let logged = Instant::now();
        (&lines).write_all(b"held\n").unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            if let Some(at) = *arrival.0.lock().unwrap() {
                break at;
            }
            assert!(Instant::now() < until, "a held line was never written");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            arrived - logged >= hold,
            "written after {:?}",
            arrived - logged
        );
    }

    /// A sink that blocks until told to go on.
    struct Stalled(Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_costs_lines_counted_and_never_a_blocked_write() {
        let (_go_on, stalled) = mpsc::channel();
        let (lines, flush) = spawn(
            Stalled(stalled),
            BATCH,
            Duration::from_millis(100),
            Duration::ZERO,
        )
        .unwrap();
        // 100 batches of 8 lines: the writer holds one, the queue one more; the rest drop.
        let line = [[b'x'; 4095].as_slice(), b"\n"].concat();
        for _ in 0..800 {
            (&lines).write_all(&line).unwrap();
        }
        let dropped = lines.dropped();
        assert!(dropped >= 700 && dropped % 8 == 0, "{dropped}");
        // The stalled sink does not hold the exit past the bound.
        drop(flush);
    }
}
