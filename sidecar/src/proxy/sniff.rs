//! Detects HTTP/1.1 requests that carry both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper handles such a request the RFC 9112 way (chunked wins, the `Content-Length` header
//! is dropped, the connection is closed afterwards), which leaves no trace in the parsed
//! request. We refuse them outright with 400 (request-smuggling hygiene): this wrapper reads
//! the client's bytes as they pass to hyper, follows the message framing (heads, fixed-length
//! and chunked bodies) and raises a per-connection flag when a head has both headers. The
//! flag is checked by the request filter. It stops looking at h2c, upgrades, anything it
//! cannot parse (hyper answers those itself), and after a flagged head (hyper closes the
//! connection after that request).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head or chunk-size line followed (hyper refuses larger heads itself).
const MAX_LINE: usize = 256 * 1024;

/// Set when a request head on this connection had both framing headers.
#[derive(Clone, Default, Debug)]
pub struct ConflictFlag(Arc<AtomicBool>);

impl ConflictFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

enum State {
    Head(Vec<u8>),
    Skip(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk; the current line's length.
    Trailers(usize),
    Off,
}

pub struct SniffIo<T> {
    inner: T,
    state: State,
    flag: ConflictFlag,
}

impl<T> SniffIo<T> {
    pub fn new(inner: T) -> (SniffIo<T>, ConflictFlag) {
        let flag = ConflictFlag::default();
        (
            SniffIo {
                inner,
                state: State::Head(Vec::new()),
                flag: flag.clone(),
            },
            flag,
        )
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head(buf) => {
                    if buf.is_empty() {
                        // Empty lines before a request line are allowed (RFC 9112 §2.2).
                        let skip = data
                            .iter()
                            .take_while(|&&b| b == b'\r' || b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        // A head usually arrives in one read: analysed where it lies.
                        if let Some(end) = head_end(data, 0) {
                            self.state = self.analyze(&data[..end]);
                            data = &data[end..];
                            continue;
                        }
                    }
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    match head_end(buf, before) {
                        Some(end) => {
                            data = &data[end - before..];
                            let head = std::mem::take(buf);
                            self.state = self.analyze(&head[..end]);
                        }
                        None => {
                            if buf.len() > MAX_LINE {
                                self.state = State::Off;
                            }
                            return;
                        }
                    }
                }
                State::Skip(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        data = &data[i + 1..];
                        let text = String::from_utf8_lossy(line);
                        let hex = text.split(';').next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(hex, 16) {
                            Ok(0) => State::Trailers(0),
                            Ok(n) => State::ChunkData(n),
                            Err(_) => State::Off,
                        };
                    }
                    None => {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        return;
                    }
                },
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::ChunkEnd;
                    }
                }
                State::ChunkEnd => match data.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        data = &data[i + 1..];
                        self.state = State::ChunkSize(Vec::new());
                    }
                    None => return,
                },
                State::Trailers(len) => {
                    let b = data[0];
                    data = &data[1..];
                    match b {
                        b'\n' if *len == 0 => self.state = State::Head(Vec::new()),
                        b'\n' => *len = 0,
                        b'\r' => {}
                        _ => *len += 1,
                    }
                }
            }
        }
    }

    /// The framing a head announces (bytes, not text: no allocation per head). Lines are found
    /// with `memchr`, and only those starting with `c` or `t` (`Content-Length`,
    /// `Connection`, `Transfer-Encoding`) are looked at further.
    fn analyze(&self, head: &[u8]) -> State {
        let mut lines = memchr::memchr_iter(b'\n', head)
            .chain(std::iter::once(head.len()))
            .scan(0, |start, end| {
                let line = &head[*start..end];
                *start = end + 1;
                Some(line.strip_suffix(b"\r").unwrap_or(line))
            });
        let request_line = lines.next().unwrap_or(b"");
        if request_line.starts_with(b"PRI ") || request_line.starts_with(b"CONNECT ") {
            return State::Off;
        }
        let (mut te, mut cl, mut chunked, mut upgrade) = (false, None::<Option<u64>>, false, false);
        for l in lines {
            if !matches!(l.first(), Some(b'c' | b'C' | b't' | b'T')) {
                continue;
            }
            let Some(colon) = memchr::memchr(b':', l) else {
                continue;
            };
            let name = l[..colon].trim_ascii();
            let value = l[colon + 1..].trim_ascii();
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = true;
                chunked = value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"content-length") {
                cl = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok()),
                );
            } else if name.eq_ignore_ascii_case(b"connection")
                && value.windows(7).any(|w| w.eq_ignore_ascii_case(b"upgrade"))
            {
                upgrade = true;
            }
        }
        if te && cl.is_some() {
            self.flag.0.store(true, Ordering::Relaxed);
            return State::Off;
        }
        if upgrade {
            return State::Off;
        }
        match (te, chunked, cl) {
            (true, true, _) => State::ChunkSize(Vec::new()),
            (true, false, _) => State::Off,
            (false, _, Some(Some(0))) | (false, _, None) => State::Head(Vec::new()),
            (false, _, Some(Some(n))) => State::Skip(n),
            (false, _, Some(None)) => State::Off,
        }
    }
}

/// The end (exclusive) of a head ending in an empty line, searching from near `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buf[start..])
        .map(|i| start + i)
        .find_map(|i| match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        })
}

impl<T: AsyncRead + Unpin> AsyncRead for SniffIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && !matches!(this.state, State::Off)
        {
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SniffIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> bool {
        let (mut s, flag) = SniffIo::new(());
        for c in chunks {
            s.feed(c);
        }
        flag.is_set()
    }

    #[test]
    fn flags_both_headers_in_any_request_of_a_connection() {
        assert!(run(&[
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(run(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        ]));
        assert!(!run(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"]));
        // After a fixed-length body and a chunked body, the third head is still followed,
        // even when split at odd places; body bytes that look like headers are not heads.
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 40\r\n\r\nTransfer-Encoding: x\r\nContent-Length: 1\r\n\
POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
GET /c HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        for split in [1, 3, 7, 64, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(split).collect();
            assert!(run(&chunks), "split {split}");
            let without_last = &stream[..stream.len() - 60];
            let chunks: Vec<&[u8]> = without_last.chunks(split).collect();
            assert!(!run(&chunks), "split {split}");
        }
    }

    #[test]
    fn bare_lf_heads_are_followed_across_any_split() {
        // a first head with a body, then one with both headers; lines end in LF only
        let stream: &[u8] = b"PUT /a HTTP/1.1\nContent-Length: 3\n\nabc\
POST /b HTTP/1.1\ntransfer-encoding: chunked\nCONTENT-LENGTH: 2\n\n";
        for at in 1..stream.len() {
            let (a, b) = stream.split_at(at);
            assert!(run(&[a, b]), "split at {at}");
        }
        let clean = &stream[..stream.len() - 20];
        for at in 1..clean.len() {
            let (a, b) = clean.split_at(at);
            assert!(!run(&[a, b]), "split at {at}");
        }
    }
}
