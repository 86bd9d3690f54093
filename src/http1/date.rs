//! `Date` values, formatted once a second per thread (hyper does the same).

use std::cell::RefCell;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, BytesMut};

struct Cached {
    text: [u8; 29],
    next: SystemTime,
}

thread_local! {
    static CACHED: RefCell<Cached> = const {
        RefCell::new(Cached { text: [0; 29], next: SystemTime::UNIX_EPOCH })
    };
}

/// Writes the current time as an HTTP date (RFC 9110 §5.6.7).
pub(super) fn put(out: &mut BytesMut) {
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        let now = SystemTime::now();
        if now >= cached.next {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                cached.text.copy_from_slice(text.as_bytes());
            }
            let into_second = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|since| since.subsec_nanos())
                .unwrap_or(0);
            cached.next =
                now + Duration::from_secs(1) - Duration::from_nanos(u64::from(into_second));
        }
        out.put_slice(&cached.text);
    });
}
