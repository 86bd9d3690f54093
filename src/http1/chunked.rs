//! Chunked transfer coding (RFC 9112 §7.1): decoding the upstream's, framing the client's.

use bytes::{BufMut, BytesMut};

use super::response::BadResponse;

/// Writes one chunk of a chunked body: size line, data, CRLF.
pub(crate) fn put_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.put_slice(format_hex(data.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The last chunk, without trailers.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn format_hex(mut n: usize) -> HexBuf {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    HexBuf { digits, at }
}

struct HexBuf {
    digits: [u8; 16],
    at: usize,
}

impl HexBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.digits[self.at..]
    }
}

/// Decodes a chunked body (RFC 9112 §7.1) as it arrives, as strictly as hyper: every line
/// ends in CRLF. Chunk extensions and trailers are read and dropped, as hyper's path drops
/// them.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: ChunkState,
    /// Data bytes left in the current chunk, or the size being read.
    size: u64,
    /// Bytes of framing read on the current line, against [`MAX_LINE`].
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size digits.
    SizeSpace,
    /// `;` and what follows, up to CR.
    Extension,
    /// CR of the size line seen.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a line after the last chunk: a trailer or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// What [`Chunked::step`] found at the front of the input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// `skip` bytes of framing, then `len` bytes of data.
    Data { skip: usize, len: usize },
    /// All of the input was framing; more is needed.
    More,
    /// The body ends after `used` bytes.
    End { used: usize },
}

/// Longest framing line accepted: a size with extensions, or a trailer.
const MAX_LINE: usize = 4096;

impl Chunked {
    /// Reads framing from the front of `input` up to the next data or the end.
    pub(crate) fn step(&mut self, input: &[u8]) -> Result<Step, BadResponse> {
        use ChunkState as S;
        let mut at = 0;
        while at < input.len() {
            if self.state == S::Data {
                let len = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - at);
                self.size -= len as u64;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                return Ok(Step::Data { skip: at, len });
            }
            let byte = input[at];
            at += 1;
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(BadResponse::BadChunk);
            }
            self.state = match (self.state, byte) {
                (S::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (byte as char).to_digit(16).unwrap_or(0);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|size| size.checked_add(u64::from(digit)))
                        .ok_or(BadResponse::BadChunk)?;
                    S::Size
                }
                (S::Size | S::SizeSpace, b' ' | b'\t') if self.line > 1 => S::SizeSpace,
                (S::Size | S::SizeSpace, b';') if self.line > 1 => S::Extension,
                (S::Size | S::SizeSpace | S::Extension, b'\r') if self.line > 1 => S::SizeLf,
                (S::Extension, b'\n') => return Err(BadResponse::BadChunk),
                (S::Extension, _) => S::Extension,
                (S::SizeLf, b'\n') => {
                    self.line = 0;
                    if self.size == 0 {
                        S::TrailerStart
                    } else {
                        S::Data
                    }
                }
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => {
                    self.line = 0;
                    S::Size
                }
                (S::TrailerStart, b'\r') => S::EndLf,
                (S::Trailer, b'\r') => S::TrailerLf,
                (S::TrailerStart | S::Trailer, b'\n') => return Err(BadResponse::BadChunk),
                (S::TrailerStart | S::Trailer, _) => S::Trailer,
                (S::TrailerLf, b'\n') => {
                    self.line = 0;
                    S::TrailerStart
                }
                (S::EndLf, b'\n') => {
                    self.state = S::Done;
                    return Ok(Step::End { used: at });
                }
                (S::Done, _) => return Ok(Step::End { used: at - 1 }),
                _ => return Err(BadResponse::BadChunk),
            };
        }
        if self.state == S::Done {
            return Ok(Step::End { used: 0 });
        }
        Ok(Step::More)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes, as reads would deliver it.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), BadResponse> {
        let mut chunked = Chunked::default();
        let mut data = Vec::new();
        let mut pending = BytesMut::new();
        let mut fed = 0;
        loop {
            match chunked.step(&pending)? {
                Step::Data { skip, len } => {
                    data.extend_from_slice(&pending[skip..skip + len]);
                    let _ = pending.split_to(skip + len);
                }
                Step::More => {
                    pending.clear();
                    if fed == input.len() {
                        return Err(BadResponse::BadChunk);
                    }
                    let end = (fed + step).min(input.len());
                    pending.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
                Step::End { used } => {
                    let _ = pending.split_to(used);
                    return Ok((data, input.len() - fed + pending.len()));
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_the_same_however_they_are_cut() {
        let body = b"5\r\nhello\r\n7;name=value\r\n, world\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\nOther: y\r\n\r\nREST";
        for step in 1..body.len() {
            let (data, left) = decode(body, step).unwrap();
            assert_eq!(data, b"hello, world0123456789abcdef", "step {step}");
            assert_eq!(left, 4, "step {step}: what follows the body is left");
        }
        assert_eq!(decode(b"0\r\n\r\n", 3).unwrap().0, b"");
        assert_eq!(
            decode(b"A \t;x\r\n0123456789\r\n0\r\n\r\n", 2).unwrap().0,
            b"0123456789"
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"\r\n",
            b"g\r\n",
            b";x\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            for step in [1, 3, bad.len()] {
                assert!(
                    decode(bad, step).is_err(),
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        let long_extension = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_LINE));
        assert!(decode(long_extension.as_bytes(), 512).is_err());
    }
}
