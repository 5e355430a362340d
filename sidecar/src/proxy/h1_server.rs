//! The service port's HTTP/1.1 fast path: plain requests served without hyper's server.
//!
//! A connection starts here. Each request head is parsed with `httparse`, and a request this
//! module fully understands — HTTP/1.1, origin-form target, no body (neither
//! `Content-Length` nor `Transfer-Encoding`), no `Upgrade`, no `Expect`, at most
//! [`MAX_HEADERS`] header lines within `proxy.maxHeaderBytes` — becomes an `http::Request`
//! for [`Front::handle`], the same request path, filters and limits as every other request,
//! and its response is written here. That is most of a forge's traffic (browsing, `info/refs`,
//! API reads, LFS downloads).
//!
//! Anything else is handed to hyper for the rest of the connection, with the bytes read so
//! far: request bodies, upgrades, HTTP/1.0, HTTP/2 (the h2c preface), and every malformed,
//! oversized or doubtful head, so the 400 and 431 answers, the request-smuggling checks of
//! [`crate::proxy::sniff`] and hyper's framing rules stay in one place. Handing over happens
//! only at the start of a request head, never in the middle of a message.
//!
//! Why: per proxied request, hyper's server (dispatcher, head parser and encoder, its I/O
//! layers) ran about a fifth of the sidecar's user-space instructions, and on a saturated
//! machine they show in requests/s more than their share of CPU time suggests: this path runs
//! 2,900 fewer per request (BENCHMARKS.md, fifth round).
//!
//! What the fast path does as hyper's HTTP/1.1 server did: the header read timeout (for the
//! first head and each following one), keep-alive unless the request says `Connection: close`,
//! pipelined requests answered in order, a `Date` header when the response has none,
//! `Content-Length` from a body of known size or else chunked encoding, no body for `HEAD`,
//! 204 and 304 responses, and on a drain the connection closes after the response in flight
//! (or at once when idle), as does one whose response says `Connection: close`. A request
//! with a `TE` header is not plain: response trailers, which hyper sends only to a client that
//! accepts them, are never sent from here. A body that fails midway, or does not match its
//! length, ends the connection, as with hyper.

use crate::proxy::coarse_timer::Deadline;
use crate::proxy::drain::Drain;
use crate::proxy::front::{Front, Writer};
use crate::proxy::h1::push_decimal;
use crate::proxy::h1::{RawLines, RawSlot, Spans};
use crate::proxy::headers::eq_lower;
use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http::{Uri, header};
use http_body::Body as HttpBody;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Request heads with more header lines than this go to hyper (which allows 100).
pub const MAX_HEADERS: usize = 64;

/// Body pieces up to this size are copied behind the head or chunk framing and written with
/// it in one system call; larger ones are written on their own.
const COALESCE: usize = 16 * 1024;

/// What the fast path leaves of a connection.
pub enum Next {
    /// The connection is done (closed by the client, a timeout, `Connection: close`, a drain
    /// or an error).
    Closed,
    /// hyper serves the rest; these bytes were read and not served.
    Handover(Bytes),
}

/// The limits of the service port that apply here.
#[derive(Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// A plain request head: its parts, and whether the client asked to close after it.
struct Plain {
    request: Request<Body>,
    close: bool,
}

/// Why a head was not taken.
enum Unparsed {
    /// hyper's to serve (see the module docs).
    NotPlain,
    Partial,
}

/// Serves plain requests on `io` until the connection ends or a request is not plain. Once
/// `drain` has begun, the connection closes after the response in flight (or at once when
/// idle).
pub async fn serve(
    io: &mut TcpStream,
    peer: SocketAddr,
    front: &'static Front,
    limits: Limits,
    drain: &Drain,
) -> io::Result<Next> {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4 * 1024);
    // a proxied response's header lines as the upstream sent them (see `encode_head`)
    let slot = RawSlot::default();
    let mut timer = HeadTimer {
        timeout: limits.header_read_timeout,
        deadline: None,
        waited: false,
    };
    loop {
        timer.waited = false;
        let plain = loop {
            if !buf.is_empty() {
                match parse_request(&mut buf, limits.max_header_bytes) {
                    Ok(p) => break p,
                    Err(Unparsed::NotPlain) => return Ok(Next::Handover(buf.freeze())),
                    Err(Unparsed::Partial) if buf.len() > limits.max_header_bytes => {
                        return Ok(Next::Handover(buf.freeze()));
                    }
                    Err(Unparsed::Partial) => {}
                }
            }
            match read_head_bytes(io, &mut buf, &mut timer, drain).await? {
                Fill::Read => {}
                Fill::End => return Ok(Next::Closed),
            }
        };
        let head_only = plain.request.method() == Method::HEAD;
        let response = front
            .handle(peer, plain.request, Writer::CopiesRawLines(&slot))
            .await;
        let close = plain.close || drain.is_draining();
        if !write_response(io, &mut out, response, slot.take(), head_only, close).await? {
            return Ok(Next::Closed);
        }
    }
}

enum Fill {
    Read,
    /// End of stream, the header read timeout, or a drain while no head had begun.
    End,
}

/// A connection's header read timeout: one deadline, reset when a head first has to wait,
/// running until the head is whole however slowly its bytes arrive.
struct HeadTimer {
    timeout: Duration,
    deadline: Option<Deadline>,
    /// The current head has waited (its time is running).
    waited: bool,
}

impl HeadTimer {
    fn poll_expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if !self.waited {
            self.waited = true;
            Deadline::reset_or_arm(&mut self.deadline, self.timeout);
        }
        let d = self.deadline.as_mut().expect("set when first waited");
        Pin::new(d).poll(cx).is_ready()
    }
}

/// Reads more of a request head, within the head's time.
async fn read_head_bytes(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    timer: &mut HeadTimer,
    drain: &Drain,
) -> io::Result<Fill> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    poll_fn(|cx| {
        if buf.is_empty() && drain.is_draining() {
            return Poll::Ready(Ok(Fill::End));
        }
        // `read_buf` keeps no state between polls; a fresh one each poll is the same read
        let read = pin!(io.read_buf(&mut *buf)).poll(cx);
        match read {
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Fill::End)),
            Poll::Ready(Ok(_)) => return Poll::Ready(Ok(Fill::Read)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if timer.poll_expired(cx) {
            return Poll::Ready(Ok(Fill::End));
        }
        Poll::Pending
    })
    .await
}

/// Parses the head at the start of `buf`; a plain one is split off the buffer.
fn parse_request(buf: &mut BytesMut, max_header_bytes: usize) -> Result<Plain, Unparsed> {
    let mut spans = Spans::new();
    let (len, method, target, close) = {
        let mut raw = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut r = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut r, buf, &mut raw)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Err(Unparsed::Partial),
            Err(_) => return Err(Unparsed::NotPlain),
        };
        if len > max_header_bytes || r.version != Some(1) {
            return Err(Unparsed::NotPlain);
        }
        let (Some(method), Some(path)) = (r.method, r.path) else {
            return Err(Unparsed::NotPlain);
        };
        if !path.starts_with('/') || method == "CONNECT" {
            return Err(Unparsed::NotPlain);
        }
        let base = buf.as_ptr() as usize;
        let mut close = false;
        for h in r.headers.iter() {
            let n = h.name.as_bytes();
            if eq_lower(n, b"content-length")
                || eq_lower(n, b"transfer-encoding")
                || eq_lower(n, b"upgrade")
                || eq_lower(n, b"expect")
                || eq_lower(n, b"te")
            {
                return Err(Unparsed::NotPlain);
            }
            if eq_lower(n, b"connection") {
                for t in crate::proxy::headers::connection_tokens(h.value) {
                    if eq_lower(t, b"upgrade") {
                        return Err(Unparsed::NotPlain);
                    }
                    close |= eq_lower(t, b"close");
                }
            }
            spans.push(base, n, h.value);
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Err(Unparsed::NotPlain);
        };
        let target = ((path.as_ptr() as usize - base) as u32, path.len() as u32);
        (len, method, target, close)
    };
    // httparse validated the head; the `http` types check a few things more (the target as a
    // URI, above all). A head they refuse goes back in front of the buffer, for hyper.
    let raw = buf.split_to(len).freeze();
    let build = || -> Option<Request<Body>> {
        let uri =
            Uri::from_maybe_shared(raw.slice(target.0 as usize..(target.0 + target.1) as usize))
                .ok()?;
        let spans = spans.as_slice();
        let mut headers = HeaderMap::with_capacity(spans.len());
        for &(ns, nl, vs, vl) in spans {
            let name = HeaderName::from_bytes(&raw[ns as usize..(ns + nl) as usize]).ok()?;
            let value =
                HeaderValue::from_maybe_shared(raw.slice(vs as usize..(vs + vl) as usize)).ok()?;
            headers.append(name, value);
        }
        let mut request = Request::new(Body::empty());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some(request)
    };
    match build() {
        Some(request) => Ok(Plain { request, close }),
        None => {
            // give the head back: rebuild the buffer as the head followed by what came after
            let mut whole = BytesMut::with_capacity(raw.len() + buf.len());
            whole.extend_from_slice(&raw);
            whole.extend_from_slice(buf);
            *buf = whole;
            Err(Unparsed::NotPlain)
        }
    }
}

/// How a response body goes on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes the response head into `out` and says how the body is framed and whether the
/// connection closes after it (`close`, or the response says `Connection: close`).
///
/// One pass over the headers finds what framing needs (no hashed lookups), a second writes
/// them: a proxied response carries no framing headers of its own (the upstream exchange
/// takes them off), so the body's exact size decides, as it did in hyper.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&RawLines>,
    size: Option<u64>,
    head_only: bool,
    close: bool,
) -> (Framing, bool) {
    let (mut te, mut length, mut date, mut close) = (None, None, false, close);
    // Raw lines have no `Content-Length` (nor hop-by-hop lines): their response's length
    // comes apart and is written as ours, unless the map has one of its own.
    let mut raw_length = raw.and_then(|r| r.content_length);
    if let Some(r) = raw {
        date = r.date;
        length = raw_length.map(Some);
    }
    for (name, value) in headers.iter() {
        if name == header::TRANSFER_ENCODING {
            te = Some(value);
        } else if name == header::CONTENT_LENGTH {
            raw_length = None;
            length = Some(
                std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok()),
            );
        } else if name == header::DATE {
            date = true;
        } else if name == header::CONNECTION {
            close |= crate::proxy::headers::connection_tokens(value.as_bytes())
                .any(|t| t.eq_ignore_ascii_case(b"close"));
        }
    }
    // 1xx and 204 have no body and no framing headers; 304 and HEAD keep what they have
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT;
    let (mut keep_length, mut keep_te) = (!bodiless, !bodiless);
    // a framing header of ours: `Some(Some(n))` a length, `Some(None)` chunked
    let mut add: Option<Option<u64>> = None;
    let framing = if bodiless || head_only || status == StatusCode::NOT_MODIFIED {
        Framing::None
    } else if let Some(te) = te {
        keep_length = false;
        let chunked_last = te
            .as_bytes()
            .rsplit(|&c| c == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if !chunked_last {
            // a coding without `chunked` last: chunked is added, as hyper did
            add = Some(None);
        }
        Framing::Chunked
    } else if let Some(Some(n)) = length {
        Framing::Length(n)
    } else {
        keep_length = false;
        keep_te = false;
        match size {
            Some(n) => {
                add = Some(Some(n));
                Framing::Length(n)
            }
            None => {
                add = Some(None);
                Framing::Chunked
            }
        }
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        if (!keep_length && name == header::CONTENT_LENGTH)
            || (!keep_te && name == header::TRANSFER_ENCODING)
            || (close && name == header::CONNECTION)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(r) = raw {
        for run in r.runs() {
            out.extend_from_slice(run);
        }
        if keep_length && let Some(n) = raw_length {
            add = Some(Some(n));
        }
    }
    match add {
        Some(Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Some(None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    if !date {
        out.extend_from_slice(b"date: ");
        date::push(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, close)
}

/// Writes `response`; `Ok(false)` when the connection cannot carry another one: `close`, the
/// response said `Connection: close`, or the body did not match its framing.
async fn write_response(
    io: &mut TcpStream,
    out: &mut Vec<u8>,
    response: Response<Body>,
    raw: Option<RawLines>,
    head_only: bool,
    close: bool,
) -> io::Result<bool> {
    let (parts, body) = response.into_parts();
    let mut body = pin!(body);
    out.clear();
    let (framing, close) = encode_head(
        out,
        parts.status,
        &parts.headers,
        raw.as_ref(),
        body.size_hint().exact(),
        head_only,
        close,
    );
    if framing == Framing::None || body.is_end_stream() {
        if framing == Framing::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        io.write_all(out).await?;
        return Ok(!close && !matches!(framing, Framing::Length(n) if n > 0));
    }
    let mut sent: u64 = 0;
    loop {
        // What is ready now goes out with what is buffered; before waiting, the buffer is
        // written (the head reaches the client before a slow body's first byte).
        let frame = match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    out.clear();
                }
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                // what was ready goes out; the missing last chunk (or bytes) and the close
                // tell the client the response broke off
                tracing::debug!("response body: {e}");
                io.write_all(out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers (see the module docs)
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if let Framing::Length(n) = framing
                    && sent > n
                {
                    tracing::debug!("response body longer than its Content-Length");
                    io.write_all(out).await?;
                    return Ok(false);
                }
                if framing == Framing::Chunked {
                    push_hex(out, data.len());
                    out.extend_from_slice(b"\r\n");
                }
                write_data(io, out, data).await?;
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(!close
        && match framing {
            Framing::Length(n) => sent == n,
            _ => true,
        })
}

/// Appends `data` to `out`, or writes both when it is large.
async fn write_data(io: &mut TcpStream, out: &mut Vec<u8>, data: Bytes) -> io::Result<()> {
    if data.len() <= COALESCE {
        out.extend_from_slice(&data);
        return Ok(());
    }
    let mut pieces = [io::IoSlice::new(out), io::IoSlice::new(&data)];
    let mut slices: &mut [io::IoSlice<'_>] = &mut pieces;
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, n);
    }
    out.clear();
    Ok(())
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The `Date` header's value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn push(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with_borrow_mut(|(at, value)| {
            if *at != secs || value.is_empty() {
                *at = secs;
                *value = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(value.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> (Result<Plain, Unparsed>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let p = parse_request(&mut buf, 8192);
        (p, buf)
    }

    fn plain(raw: &[u8]) -> (Plain, BytesMut) {
        match parse(raw) {
            (Ok(p), rest) => (p, rest),
            _ => panic!("not plain: {}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn plain_heads_become_requests_and_leave_what_follows() {
        let (p, rest) = plain(
            b"GET /a/b?c=d HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next HTTP/1.1\r\n",
        );
        assert_eq!(p.request.method(), Method::GET);
        assert_eq!(p.request.uri().path(), "/a/b");
        assert_eq!(p.request.uri().query(), Some("c=d"));
        assert_eq!(p.request.version(), Version::HTTP_11);
        assert_eq!(p.request.headers()["host"], "x");
        let two: Vec<_> = p.request.headers().get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert!(!p.close);
        assert_eq!(&rest[..], b"GET /next HTTP/1.1\r\n");

        let (p, _) = plain(b"DELETE /x HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n");
        assert_eq!(p.request.method(), Method::DELETE);
        assert!(p.close);

        // many lines (more than are kept inline while parsing)
        let many: String = (0..40).map(|i| format!("X-{i}: {i}\r\n")).collect();
        let (p, _) = plain(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
        assert_eq!(p.request.headers().len(), 40);
        assert_eq!(p.request.headers()["x-0"], "0");
        assert_eq!(p.request.headers()["x-39"], "39");
    }

    #[test]
    fn anything_else_stays_whole_in_the_buffer_for_hyper() {
        let not_plain: &[&[u8]] = &[
            b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /x HTTP/1.1\r\nTE: trailers\r\n\r\n",
            b"GET /x HTTP/1.0\r\n\r\n",
            b"GET http://other/x HTTP/1.1\r\n\r\n",
            b"CONNECT host:443 HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"THIS IS NOT HTTP\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad Header: y\r\n\r\n",
        ];
        for raw in not_plain {
            let (p, rest) = parse(raw);
            assert!(
                matches!(p, Err(Unparsed::NotPlain)),
                "{}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(&rest[..], *raw, "the buffer is untouched");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET /x HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse(raw.as_bytes()).0, Err(Unparsed::NotPlain)));
        let big = format!("GET /x HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(9000));
        let (p, rest) = parse(big.as_bytes());
        assert!(matches!(p, Err(Unparsed::NotPlain)), "over maxHeaderBytes");
        assert_eq!(rest.len(), big.len());
        assert!(matches!(
            parse(b"GET /x HTTP/1.1\r\nHost: x\r\n").0,
            Err(Unparsed::Partial)
        ));
    }

    fn head(
        status: u16,
        headers: &[(&str, &str)],
        size: Option<u64>,
        head_only: bool,
        close: bool,
    ) -> (String, Framing) {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut out = Vec::new();
        let (f, _) = encode_head(
            &mut out,
            StatusCode::from_u16(status).unwrap(),
            &map,
            None,
            size,
            head_only,
            close,
        );
        (String::from_utf8(out).unwrap(), f)
    }

    /// An upstream's head parsed with its end-to-end lines passed through, then written.
    fn passed_through(upstream: &str, size: Option<u64>, head_only: bool) -> (String, Framing) {
        let mut buf = BytesMut::from(upstream);
        let pass = crate::proxy::h1::Passthrough::new(&["location"]);
        let h = crate::proxy::h1::parse_response_head(&mut buf, 8192, Some(pass))
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        let (f, _) = encode_head(
            &mut out,
            h.status,
            &h.headers,
            h.raw.as_ref(),
            size,
            head_only,
            false,
        );
        (String::from_utf8(out).unwrap(), f)
    }

    #[test]
    fn raw_lines_are_copied_and_framing_is_ours() {
        let up = "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Mon, 23 Nov 2026 10:00:00 GMT\r\n\
                  Content-Length: 5\r\nConnection: keep-alive\r\nX-Odd:  spaced \r\n\
                  Location: /there\r\nETag: \"1\"\r\n\r\n";
        let (h, f) = passed_through(up, Some(5), false);
        assert_eq!(f, Framing::Length(5));
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nlocation: /there\r\nServer: up\r\n\
             Date: Mon, 23 Nov 2026 10:00:00 GMT\r\nX-Odd:  spaced \r\nETag: \"1\"\r\n\
             content-length: 5\r\n\r\n",
            "lines as sent, the filtered name from the map, no hop-by-hop line, one date"
        );
        // HEAD keeps the length the upstream gave; 204 has none; no date: ours is added
        let (h, f) = passed_through(
            "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nX-A: 1\r\n\r\n",
            Some(0),
            true,
        );
        assert_eq!(f, Framing::None);
        assert!(h.contains("X-A: 1\r\ncontent-length: 99\r\ndate: "), "{h}");
        let (h, f) = passed_through(
            "HTTP/1.1 204 No Content\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n",
            Some(0),
            false,
        );
        assert_eq!(f, Framing::None);
        assert!(h.contains("X-A: 1\r\n") && !h.contains("ength"), "{h}");
    }

    #[test]
    fn response_framing_follows_the_body_and_the_status() {
        let date = [("date", "Mon, 23 Nov 2026 10:00:00 GMT")];
        let (h, f) = head(200, &date, Some(5), false, false);
        assert_eq!(f, Framing::Length(5));
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\ndate: Mon, 23 Nov 2026 10:00:00 GMT\r\ncontent-length: 5\r\n\r\n"
        );
        let (h, f) = head(200, &date, None, false, false);
        assert_eq!(f, Framing::Chunked);
        assert!(h.contains("transfer-encoding: chunked\r\n"), "{h}");
        let (h, f) = head(200, &[("content-length", "7")], None, false, false);
        assert_eq!(f, Framing::Length(7));
        assert!(
            h.contains("\r\ndate: ") && h.contains(" GMT\r\n"),
            "a date is added: {h}"
        );
        let (h, f) = head(200, &[("transfer-encoding", "gzip")], Some(3), false, false);
        assert_eq!(f, Framing::Chunked);
        assert!(
            h.contains("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n"),
            "{h}"
        );
        assert!(!h.contains("content-length"), "{h}");
        let (h, f) = head(204, &[("content-length", "3")], Some(3), false, false);
        assert_eq!(f, Framing::None);
        assert!(!h.contains("content-length"), "{h}");
        let (h, f) = head(304, &[("etag", "\"1\"")], Some(0), false, false);
        assert_eq!(f, Framing::None);
        assert!(
            !h.contains("content-length") && !h.contains("transfer-encoding"),
            "{h}"
        );
        // HEAD: the body is empty whatever the length was; nothing is added
        let (h, f) = head(200, &[("content-type", "text/plain")], Some(0), true, false);
        assert_eq!(f, Framing::None);
        assert!(
            !h.contains("content-length") && !h.contains("transfer-encoding"),
            "{h}"
        );
        let (h, _) = head(503, &[("connection", "keep-alive")], Some(2), false, true);
        assert!(h.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{h}");
        assert!(
            h.contains("connection: close\r\n") && !h.contains("keep-alive"),
            "{h}"
        );
        // the response's own `Connection: close` closes the connection too
        let mut map = HeaderMap::new();
        map.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (_, close) = encode_head(
            &mut Vec::new(),
            StatusCode::OK,
            &map,
            None,
            None,
            false,
            false,
        );
        assert!(close);
        let (_, close) = encode_head(
            &mut Vec::new(),
            StatusCode::OK,
            &HeaderMap::new(),
            None,
            None,
            false,
            false,
        );
        assert!(!close);
        let mut hex = Vec::new();
        push_hex(&mut hex, 0x1f40);
        push_hex(&mut hex, 0);
        assert_eq!(hex, b"1f400");
    }

    /// Writes `resp` on a loopback connection; what the client read and what the writer said.
    async fn written(resp: Response<Body>, head_only: bool) -> (String, bool) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        let mut out = Vec::new();
        let reusable = write_response(&mut server, &mut out, resp, None, head_only, false)
            .await
            .unwrap();
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        (String::from_utf8(got).unwrap(), reusable)
    }

    fn streamed(pieces: Vec<Result<Bytes, io::Error>>) -> Response<Body> {
        Response::new(Body::from_stream(futures::stream::iter(pieces)))
    }

    #[tokio::test]
    async fn bodies_go_out_with_their_length_or_chunked() {
        let (got, reusable) = written(Response::new(Body::from("hello")), false).await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("content-length: 5\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nhello"), "{got}");
        assert!(reusable);

        let big = "x".repeat(COALESCE + 1);
        let (got, reusable) = written(
            streamed(vec![
                Ok(Bytes::from_static(b"ab")),
                Ok(Bytes::from(big.clone())),
                Ok(Bytes::new()),
                Ok(Bytes::from_static(b"cd")),
            ]),
            false,
        )
        .await;
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        let body = got.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(
            body,
            format!(
                "2\r\nab\r\n{:x}\r\n{big}\r\n2\r\ncd\r\n0\r\n\r\n",
                big.len()
            )
        );
        assert!(reusable);

        let (got, reusable) = written(Response::new(Body::from("hello")), true).await;
        assert!(got.ends_with("\r\n\r\n"), "HEAD: no body: {got}");
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_body_that_fails_or_falls_short_ends_the_connection() {
        let (got, reusable) = written(
            streamed(vec![
                Ok(Bytes::from_static(b"ab")),
                Err(io::Error::other("upstream gone")),
            ]),
            false,
        )
        .await;
        assert!(got.contains("2\r\nab\r\n"), "{got}");
        assert!(
            !got.ends_with("0\r\n\r\n"),
            "no last chunk after a failure: {got}"
        );
        assert!(!reusable);

        let mut short = streamed(vec![Ok(Bytes::from_static(b"abc"))]);
        short
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let (got, reusable) = written(short, false).await;
        assert!(
            got.contains("content-length: 10\r\n") && got.ends_with("abc"),
            "{got}"
        );
        assert!(
            !reusable,
            "the client waits for 7 more bytes: the connection must close"
        );
    }
}
