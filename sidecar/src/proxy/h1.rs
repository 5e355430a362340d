//! The upstream HTTP/1.1 exchange: our own client codec, driven by the proxied request's own
//! task.
//!
//! Why not hyper's client: it runs each connection as a task fed through a channel and
//! answers through a oneshot, so every proxied request cost a second task wake-up, two channel
//! operations, a generic head encoder and a response decode into a fresh map. Replacing it cut
//! the sidecar's user-space instructions per proxied request by 22 % (41,500 → 32,300 in the
//! non-LTO callgrind build; BENCHMARKS.md). Like nginx and Pingora, this module drives the
//! exchange inline instead:
//! - the request head is serialised once into bytes, which a retry sends again as they are
//!   (no copy of the request is kept for it), and this hop's own headers (forwarding, request
//!   id, Geo headers) are written there rather than inserted into the request's map first;
//! - the response head is parsed by httparse where it lies in the read buffer, its values
//!   shared with that buffer, hop-by-hop headers left out as it is read;
//! - a body that arrived with its head is handed over in the same poll, and its connection is
//!   back in the pool before the client has seen a byte.
//!
//! What an upstream may send and what happens:
//! - 1xx other than 101: skipped. 101: the connection is handed to the caller (a tunnel).
//! - Body framing per RFC 9112 §6.3: none after HEAD, 204 and 304; chunked when
//!   `Transfer-Encoding` ends in `chunked` (any other coding: until close); `Content-Length`
//!   (repeated values must agree); otherwise until close. Trailers of a chunked body are read
//!   and dropped. A response with both `Transfer-Encoding` and `Content-Length` is read as
//!   chunked and its connection closed afterwards (a smuggling attempt or a broken upstream).
//! - A connection is reused only when its response was read to the end, the request body was
//!   sent whole, the upstream did not say `Connection: close` (or spoke HTTP/1.0 without
//!   keep-alive), and nothing followed the response.
//!
//! Request bodies go out with `Content-Length` when their size is known, else chunked, and are
//! sent while the response is watched for: an upstream that answers before reading an upload
//! (an error, a redirect to log in) is heard rather than deadlocked against.

use crate::proxy::coarse_timer::Deadline;
use crate::proxy::headers;
use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Response headers beyond this many are refused (hyper's client had the same limit).
const MAX_HEADERS: usize = 100;
/// A chunk-size line, or all trailers of a chunked body, beyond this is refused.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;
/// Read sizes: a head is small; a body is read in pieces that double, from 16 KiB up to
/// 512 KiB, while each read fills what it was given (a large download then takes a few
/// system calls per megabyte, and a small body never gets a large buffer). What was read is
/// handed on as it is, so no more than one piece per connection waits in the proxy.
const HEAD_READ: usize = 8 * 1024;
const BODY_READ_MIN: usize = 16 * 1024;
const BODY_READ_MAX: usize = 512 * 1024;

/// Any byte stream an upstream connection runs on (TCP, TLS over TCP, a test pipe).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// An upstream connection between exchanges: the stream and what was read but not consumed.
pub struct Conn {
    pub io: Box<dyn Stream>,
    pub rbuf: BytesMut,
    /// The wait for a response head: kept with the connection and reset for each exchange.
    deadline: Option<Deadline>,
}

impl Conn {
    pub fn new(io: Box<dyn Stream>) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::new(),
            deadline: None,
        }
    }

    /// Whether an idle connection can carry a request: nothing — no end of stream, no stray
    /// byte — has arrived since its last response. While the socket has had no event this
    /// costs no system call (the runtime knows it is not readable).
    pub fn is_idle_open(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut rb)
            .is_pending()
    }

    /// Reads up to `want` bytes of what is there into `rbuf`, making room for them first when
    /// it is short. `Ok(0)`: the upstream closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        let mut limited = bytes::BufMut::limit(&mut self.rbuf, want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited)
    }
}

// ---------------------------------------------------------------------------------------------
// Request

/// How a request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqFraming {
    /// No body (`Content-Length: 0` is sent where a body is expected).
    Empty,
    Length(u64),
    Chunked,
}

impl ReqFraming {
    /// From the body itself: its end known already, its exact size known, or neither. The
    /// client's own `Content-Length` is not trusted for this (the server side has checked the
    /// body against it, and the body's size hint says the same).
    pub fn of(body: &Body) -> ReqFraming {
        if body.is_end_stream() {
            ReqFraming::Empty
        } else {
            match body.size_hint().exact() {
                Some(n) => ReqFraming::Length(n),
                None => ReqFraming::Chunked,
            }
        }
    }
}

/// What this hop adds to a request on its way upstream.
#[derive(Default, Clone, Copy)]
pub struct Hop<'a> {
    /// `X-Forwarded-*` and `Forwarded` (none for the sidecar's own requests).
    pub forwarding: Option<&'a headers::Forwarding>,
    /// `X-Request-Id`, replacing the client's.
    pub request_id: Option<&'a HeaderValue>,
    /// Headers the sidecar sets (the Geo proxy headers; ingress removed any a client sent).
    pub extra: &'a [(HeaderName, HeaderValue)],
}

/// An upstream request head, before it is serialised.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The upstream URL's path prefix, then the request's path and query.
    pub prefix: &'a str,
    pub path_and_query: &'a str,
    pub host: &'a HeaderValue,
    /// The protocol the client asked to switch to.
    pub upgrade: Option<&'a HeaderValue>,
    pub headers: &'a HeaderMap,
    pub hop: Hop<'a>,
    pub framing: ReqFraming,
}

impl RequestHead<'_> {
    /// Serialises the head: `method prefix+path_and_query HTTP/1.1`, `Host`, the client's
    /// headers except hop-by-hop ones (also those named in `Connection`), its `Host`, its
    /// framing headers and the forwarding headers this hop writes anew; then the hop's
    /// headers, `Connection: upgrade` with the protocol when asked, and our framing.
    /// Filtering here rather than removing from the map first: the map is dropped afterwards,
    /// and a removal costs a hash lookup and a shift of the map's entries.
    pub fn encode(&self) -> Bytes {
        let RequestHead {
            method,
            prefix,
            path_and_query,
            host,
            upgrade,
            headers,
            hop,
            framing,
        } = *self;
        let mut size = method.as_str().len() + prefix.len() + path_and_query.len() + host.len();
        size += 256
            + hop
                .extra
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>();
        for (n, v) in headers {
            size += n.as_str().len() + v.len() + 4;
        }
        // one lookup; no allocation unless `Connection` names another header
        let named = headers::connection_named(headers);
        let mut b = Vec::with_capacity(size);
        b.extend_from_slice(method.as_str().as_bytes());
        b.push(b' ');
        b.extend_from_slice(prefix.as_bytes());
        b.extend_from_slice(path_and_query.as_bytes());
        b.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        b.extend_from_slice(host.as_bytes());
        b.extend_from_slice(b"\r\n");
        let mut had_length = false;
        let mut forwarded_seen = false;
        for (n, v) in headers {
            if *n == header::CONTENT_LENGTH {
                had_length = true;
                continue;
            }
            if hop.forwarding.is_some() && headers::Forwarding::replaces(n) {
                forwarded_seen = true;
                continue;
            }
            if hop.request_id.is_some() && *n == headers::X_REQUEST_ID {
                continue;
            }
            if *n == header::HOST || headers::is_hop_by_hop(n) || named.contains(n) {
                continue;
            }
            headers::push_line(&mut b, n, v.as_bytes());
        }
        if let Some(f) = hop.forwarding {
            f.write(headers, forwarded_seen, &mut b);
        }
        if let Some(id) = hop.request_id {
            headers::push_line(&mut b, &headers::X_REQUEST_ID, id.as_bytes());
        }
        for (n, v) in hop.extra {
            headers::push_line(&mut b, n, v.as_bytes());
        }
        if let Some(proto) = upgrade {
            b.extend_from_slice(b"connection: upgrade\r\n");
            headers::push_line(&mut b, &header::UPGRADE, proto.as_bytes());
        }
        match framing {
            ReqFraming::Empty => {
                if had_length || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                    b.extend_from_slice(b"content-length: 0\r\n");
                }
            }
            ReqFraming::Length(n) => {
                b.extend_from_slice(b"content-length: ");
                push_decimal(&mut b, n);
                b.extend_from_slice(b"\r\n");
            }
            ReqFraming::Chunked => b.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        b.extend_from_slice(b"\r\n");
        Bytes::from(b)
    }
}

pub(crate) fn push_decimal(b: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.extend_from_slice(&digits[i..]);
}

// ---------------------------------------------------------------------------------------------
// Response head

/// A parsed response head, its hop-by-hop headers already removed (what they said about
/// framing, reuse and upgrading is kept in the other fields).
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The upstream lets the connection be reused after this response.
    pub keep_alive: bool,
    /// The `Upgrade` header (a 101's protocol).
    pub upgrade: Option<HeaderValue>,
    /// `Transfer-Encoding` was sent; its last coding is `chunked`.
    transfer_encoding: Option<bool>,
    /// `Content-Length`, all values agreeing (`Err`: they did not, or one was not a number).
    content_length: Option<Result<u64, &'static str>>,
    /// With [`Passthrough`]: the end-to-end lines that are not in `headers`.
    pub raw: Option<RawLines>,
}

/// Which response header lines may stay as they came, unparsed (see [`RawLines`]): every
/// end-to-end line except those named here, which some response filter reads or replaces.
#[derive(Clone, Copy, Debug)]
pub struct Passthrough {
    names: &'static [&'static str],
    /// Bit n set: one of `names`, of the hop-by-hop names or `content-length` is n bytes
    /// long. Most lines are told apart by their length alone.
    lengths: u32,
}

impl Passthrough {
    /// `names` in lower case, each shorter than 32 bytes.
    pub const fn new(names: &'static [&'static str]) -> Passthrough {
        Passthrough {
            names,
            lengths: lengths_of(names)
                | lengths_of(&headers::HOP_BY_HOP)
                | lengths_of(&["content-length"]),
        }
    }

    pub fn names(&self) -> &'static [&'static str] {
        self.names
    }

    fn classify(&self, name: &[u8]) -> RawClass {
        let n = name.len();
        if n >= 32 || self.lengths >> n & 1 == 0 {
            return RawClass::Line;
        }
        if headers::eq_lower(name, b"content-length") {
            RawClass::Length
        } else if headers::eq_lower(name, b"connection") {
            RawClass::Connection
        } else if named_in(name, &headers::HOP_BY_HOP) || named_in(name, self.names) {
            RawClass::Parsed
        } else {
            RawClass::Line
        }
    }
}

/// What happens to a response header line when lines may pass through.
enum RawClass {
    Line,
    Length,
    Connection,
    /// Into the map, or dropped as hop-by-hop, as without passthrough.
    Parsed,
}

const fn lengths_of(names: &[&str]) -> u32 {
    let (mut mask, mut i) = (0u32, 0);
    while i < names.len() {
        assert!(names[i].len() < 32);
        mask |= 1 << names[i].len();
        i += 1;
    }
    mask
}

/// Response header lines kept as the upstream sent them, for a writer that copies them to the
/// client as they are (the service port's HTTP/1.1 fast path): building a `HeaderMap` entry
/// for each and encoding it again was a sixth of a proxied request's instructions.
///
/// Only end-to-end lines are here: hop-by-hop lines, `Content-Length` (its value is in
/// [`RawLines::content_length`]) and the [`Passthrough`] names go to the response's map as
/// before. The lines are whole (name, `:`, value, CRLF), validated by httparse exactly as the
/// map's values would have been; a line not ending in CRLF goes to the map instead.
/// They reach the writer through a [`RawSlot`] it lends to the request's path (no allocation
/// per response, and no extension that a map-only writer could overlook); without a slot
/// they are put into the map ([`RawLines::append_to`]).
#[derive(Clone, Debug)]
pub struct RawLines {
    head: Bytes,
    /// (start, end) of runs of adjacent lines in `head`
    runs: [(u32, u32); RAW_RUNS],
    count: u8,
    /// One of the lines is `Date`.
    pub date: bool,
    /// The response's `Content-Length`, when it had a valid one.
    pub content_length: Option<u64>,
}

/// Where the raw lines of a proxied response are left for the writer that lent the slot: the
/// response that request's path returns is the one they belong to.
#[derive(Debug, Default)]
pub struct RawSlot(std::sync::Mutex<Option<RawLines>>);

impl RawSlot {
    pub fn put(&self, lines: RawLines) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(lines);
    }

    pub fn take(&self) -> Option<RawLines> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Runs of adjacent raw lines a head may have; lines that would start another go to the map.
/// (Few: a run is cut only by a line that is not passed through.)
const RAW_RUNS: usize = 4;

impl RawLines {
    /// Adds the line at `start..end`, to the last run when it follows it. `false`: no room.
    fn push(&mut self, start: usize, end: usize) -> bool {
        let n = self.count as usize;
        if n > 0 && self.runs[n - 1].1 as usize == start {
            self.runs[n - 1].1 = end as u32;
        } else if n < RAW_RUNS {
            self.runs[n] = (start as u32, end as u32);
            self.count += 1;
        } else {
            return false;
        }
        true
    }

    /// The runs of lines, each a whole number of `name: value\r\n` lines.
    pub fn runs(&self) -> impl Iterator<Item = &[u8]> {
        self.runs[..self.count as usize]
            .iter()
            .map(|&(s, e)| &self.head[s as usize..e as usize])
    }

    /// Appends the lines to `map`, for a writer that writes only the map (and a
    /// `Content-Length` header of the length, if any).
    pub fn append_to(&self, map: &mut HeaderMap) {
        for &(s, e) in &self.runs[..self.count as usize] {
            let run = self.head.slice(s as usize..e as usize);
            let mut at = 0;
            while let Some(n) = run[at..].windows(2).position(|w| w == b"\r\n") {
                let line = &run[at..at + n];
                if let Some(colon) = line.iter().position(|&c| c == b':')
                    && let Ok(name) = HeaderName::from_bytes(&line[..colon])
                {
                    let v = line[colon + 1..].trim_ascii();
                    let start = v.as_ptr() as usize - run.as_ptr() as usize;
                    if let Ok(value) =
                        HeaderValue::from_maybe_shared(run.slice(start..start + v.len()))
                    {
                        map.append(name, value);
                    }
                }
                at += n + 2;
            }
        }
        if let Some(n) = self.content_length
            && !map.contains_key(header::CONTENT_LENGTH)
        {
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

fn named_in(name: &[u8], names: &[&str]) -> bool {
    names.iter().any(|n| headers::eq_lower(name, n.as_bytes()))
}

/// Where header lines lie in a head: (name start, name len, value start, value len), kept to
/// build values that share the head's bytes once it is split off its buffer (httparse borrows
/// the buffer). A few inline, more in a vector: zeroing room for the most a head may have
/// was a kilobyte or more per head.
pub(crate) struct Spans {
    inline: [(u32, u32, u32, u32); INLINE_SPANS],
    len: usize,
    more: Vec<(u32, u32, u32, u32)>,
}

const INLINE_SPANS: usize = 24;

impl Spans {
    pub(crate) fn new() -> Spans {
        Spans {
            inline: [(0, 0, 0, 0); INLINE_SPANS],
            len: 0,
            more: Vec::new(),
        }
    }

    /// Records the line `name: value`, both within `base`'s buffer (at `base`).
    pub(crate) fn push(&mut self, base: usize, name: &[u8], value: &[u8]) {
        let s = (
            (name.as_ptr() as usize - base) as u32,
            name.len() as u32,
            (value.as_ptr() as usize - base) as u32,
            value.len() as u32,
        );
        if self.len < INLINE_SPANS && self.more.is_empty() {
            self.inline[self.len] = s;
            self.len += 1;
        } else {
            if self.more.is_empty() {
                self.more.extend_from_slice(&self.inline[..self.len]);
            }
            self.more.push(s);
        }
    }

    pub(crate) fn as_slice(&self) -> &[(u32, u32, u32, u32)] {
        if self.more.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.more
        }
    }
}

/// Parses a response head at the start of `buf` and removes it from there. `Ok(None)`: not
/// complete yet. The head may not exceed `max` bytes. With `passthrough`, the end-to-end lines
/// it allows are kept raw ([`RawLines`]) instead of going to the map (never for a 1xx, nor
/// when `Connection` names an end-to-end header to remove).
pub fn parse_response_head(
    buf: &mut BytesMut,
    max: usize,
    passthrough: Option<Passthrough>,
) -> Result<Option<Head>, &'static str> {
    let mut spans = Spans::new();
    let (len, code, minor) = {
        // uninitialised: httparse writes what it finds (no 3 KiB of empty headers per parse)
        let mut raw = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut r, buf, &mut raw)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > max => {
                return Err("response head too large");
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
            Err(_) => return Err("malformed response head"),
        };
        if len > max {
            return Err("response head too large");
        }
        let base = buf.as_ptr() as usize;
        for h in r.headers.iter() {
            spans.push(base, h.name.as_bytes(), h.value);
        }
        (len, r.code.unwrap_or(0), r.version.unwrap_or(1))
    };
    let status = StatusCode::from_u16(code).map_err(|_| "bad response status")?;
    let raw = buf.split_to(len).freeze();
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let spans = spans.as_slice();
    let count = spans.len();
    // lines are copied whole, so the head must end in CRLF CRLF (a bare LF head goes to the map)
    let passthrough = passthrough.filter(|_| {
        !status.is_informational() && raw.ends_with(b"\r\n\r\n") && !names_others(&raw, spans)
    });
    let mut lines = passthrough.map(|_| RawLines {
        head: raw.clone(),
        runs: [(0, 0); RAW_RUNS],
        count: 0,
        date: false,
        content_length: None,
    });
    let mut head = Head {
        status,
        version,
        headers: HeaderMap::with_capacity(if lines.is_some() { 0 } else { count }),
        keep_alive: false,
        upgrade: None,
        transfer_encoding: None,
        content_length: None,
        raw: None,
    };
    let (mut close, mut keep_alive) = (false, false);
    let mut named: Vec<HeaderName> = Vec::new();
    for (i, &(ns, nl, vs, vl)) in spans.iter().enumerate() {
        let name = &raw[ns as usize..(ns + nl) as usize];
        if let (Some(l), Some(pass)) = (&mut lines, passthrough) {
            let value = &raw[vs as usize..(vs + vl) as usize];
            match pass.classify(name) {
                RawClass::Line => {
                    // the line ends where the next begins (or the empty line does), in CRLF
                    let end = spans.get(i + 1).map_or(len - 2, |n| n.0 as usize);
                    if raw[..end].ends_with(b"\r\n") && l.push(ns as usize, end) {
                        l.date |= headers::eq_lower(name, b"date");
                        continue;
                    }
                }
                RawClass::Length => {
                    head.content_length = Some(content_length(head.content_length, value));
                    continue;
                }
                RawClass::Connection => {
                    // (it names no end-to-end header: see `names_others`)
                    for t in headers::connection_tokens(value) {
                        close |= headers::eq_lower(t, b"close");
                        keep_alive |= headers::eq_lower(t, b"keep-alive");
                    }
                    continue;
                }
                RawClass::Parsed => {}
            }
        }
        let name = HeaderName::from_bytes(name).map_err(|_| "bad response header name")?;
        let value = HeaderValue::from_maybe_shared(raw.slice(vs as usize..(vs + vl) as usize))
            .map_err(|_| "bad response header value")?;
        if name == header::CONTENT_LENGTH {
            head.content_length = Some(content_length(head.content_length, value.as_bytes()));
        } else if headers::is_hop_by_hop(&name) {
            if name == header::CONNECTION {
                for t in headers::connection_tokens(value.as_bytes()) {
                    close |= t.eq_ignore_ascii_case(b"close");
                    keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                    named.extend(headers::named_by_connection(t));
                }
            } else if name == header::TRANSFER_ENCODING {
                // the last coding of the last value counts
                let last = value.as_bytes().rsplit(|&c| c == b',').next();
                head.transfer_encoding =
                    Some(last.is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked")));
            } else if name == header::UPGRADE {
                head.upgrade = Some(value);
            }
            continue;
        }
        head.headers.append(name, value);
    }
    for n in named {
        head.headers.remove(n);
    }
    head.keep_alive = !close && (version == Version::HTTP_11 || keep_alive);
    if let Some(mut l) = lines {
        l.content_length = head.content_length.and_then(Result::ok);
        head.raw = Some(l);
    }
    Ok(Some(head))
}

/// `Connection` names an end-to-end header (which must then be removed wherever it is: the
/// map's path does that).
fn names_others(raw: &[u8], spans: &[(u32, u32, u32, u32)]) -> bool {
    spans.iter().any(|&(ns, nl, vs, vl)| {
        nl == 10
            && headers::eq_lower(&raw[ns as usize..(ns + nl) as usize], b"connection")
            && headers::connection_tokens(&raw[vs as usize..(vs + vl) as usize])
                .any(|t| headers::named_by_connection(t).is_some())
    })
}

/// Folds one `Content-Length` value (possibly a list) into what earlier ones said.
fn content_length(
    before: Option<Result<u64, &'static str>>,
    value: &[u8],
) -> Result<u64, &'static str> {
    let mut length = match before {
        Some(Err(e)) => return Err(e),
        Some(Ok(n)) => Some(n),
        None => None,
    };
    for part in value.split(|&c| c == b',') {
        let n = parse_decimal(part.trim_ascii()).ok_or("bad response Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting response Content-Length values");
        }
        length = Some(n);
    }
    length.ok_or("bad response Content-Length")
}

/// How a response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes (the connection is not reused).
    Close,
}

/// The framing of a response (RFC 9112 §6.3), and whether its connection must be closed after
/// it whatever the upstream said.
pub fn response_framing(
    head_request: bool,
    head: &Head,
) -> Result<(RespFraming, bool), &'static str> {
    let status = head.status;
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((RespFraming::Empty, false));
    }
    if let Some(chunked) = head.transfer_encoding {
        let with_length = head.content_length.is_some();
        return Ok(if chunked {
            (RespFraming::Chunked, with_length)
        } else {
            (RespFraming::Close, true)
        });
    }
    Ok(match head.content_length {
        Some(Err(e)) => return Err(e),
        Some(Ok(0)) => (RespFraming::Empty, false),
        Some(Ok(n)) => (RespFraming::Length(n), false),
        None => (RespFraming::Close, true),
    })
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

// ---------------------------------------------------------------------------------------------
// Chunked bodies

/// An incremental decoder of a chunked body (RFC 9112 §7.1), strict about CRLFs.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// More input is needed.
    More,
    /// The body has ended (trailers consumed).
    End,
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(nl) = memchr::memchr(b'\n', buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err("chunk size line too long")
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    let line = buf[..nl]
                        .strip_suffix(b"\r")
                        .ok_or("chunk size line without CRLF")?;
                    let digits = line
                        .split(|&c| c == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii_end();
                    let size = parse_hex(digits).ok_or("bad chunk size")?;
                    buf.advance(nl + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = left.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = if n == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF");
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(nl) = memchr::memchr(b'\n', buf) else {
                        return if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            Err("chunked trailers too long")
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    if buf[..nl].last() != Some(&b'\r') {
                        return Err("trailer line without CRLF");
                    }
                    self.trailer_bytes += nl + 1;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err("chunked trailers too long");
                    }
                    let last = nl == 1;
                    buf.advance(nl + 1);
                    if last {
                        self.state = ChunkState::Done;
                    }
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &c| {
        let d = (c as char).to_digit(16)?;
        Some(n * 16 + u64::from(d))
    })
}

// ---------------------------------------------------------------------------------------------
// The exchange

/// How far a failed exchange got, which decides whether the request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Failed writing the head; the body was not touched: the whole request can go again.
    Unsent,
    /// The request (or part of it) went out and no byte came back.
    Sent,
    /// Must not be sent again: the upstream answered something, the response head timed out,
    /// or the request body failed.
    Final,
}

impl Fate {
    /// An I/O failure's fate: after any byte of an answer, final; else sent once the head
    /// was written.
    fn of(answered: bool, head_written: bool) -> Fate {
        match (answered, head_written) {
            (true, _) => Fate::Final,
            (false, true) => Fate::Sent,
            (false, false) => Fate::Unsent,
        }
    }
}

#[derive(Debug)]
pub struct Failure {
    pub fate: Fate,
    pub error: ExchangeError,
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("no response head within {0:?} after the request was sent")]
    Timeout(Duration),
    #[error("{0}")]
    Io(String),
    #[error("bad response: {0}")]
    Protocol(&'static str),
    #[error("request body: {0}")]
    RequestBody(String),
}

/// Up to three byte strings waiting to be written (a head; or a chunk's size line, data and
/// CRLF), written with vectored writes.
#[derive(Default)]
struct Out {
    parts: [Bytes; 3],
}

impl Out {
    fn is_empty(&self) -> bool {
        self.parts.iter().all(Bytes::is_empty)
    }

    fn poll_write(
        &mut self,
        io: &mut Box<dyn Stream>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let slices = [
                IoSlice::new(&self.parts[0]),
                IoSlice::new(&self.parts[1]),
                IoSlice::new(&self.parts[2]),
            ];
            let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            for p in &mut self.parts {
                let k = n.min(p.len());
                p.advance(k);
                n -= k;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Sends `head` and then `body` on `conn` while reading the response head, which must arrive
/// within `header_timeout` of the request having been sent completely (an upload is paced by
/// its client, not timed here; the timer is the I/O thread's coarse one). Returns the final
/// head and whether the request body was sent whole.
pub async fn exchange(
    conn: &mut Conn,
    head: &Bytes,
    body: &mut Body,
    framing: ReqFraming,
    max_head: usize,
    header_timeout: Duration,
    passthrough: Option<Passthrough>,
) -> Result<(Head, bool), Failure> {
    let mut out = Out::default();
    out.parts[0] = head.clone();
    let mut head_written = false;
    let mut body_ended = framing == ReqFraming::Empty;
    let mut sent: u64 = 0;
    let mut answered = false;
    let mut timing = false;
    let fail = |fate, error| Failure { fate, error };
    std::future::poll_fn(|cx| {
        loop {
            // the response first: an early answer ends the upload
            match poll_head(conn, cx, max_head, passthrough, &mut answered) {
                Poll::Ready(Ok(h)) => return Poll::Ready(Ok((h, body_ended && out.is_empty()))),
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(fail(Fate::of(answered, head_written), e)));
                }
                Poll::Pending => {}
            }
            if !out.is_empty() {
                match out.poll_write(&mut conn.io, cx) {
                    Poll::Ready(Ok(())) => head_written = true,
                    Poll::Ready(Err(e)) => {
                        // the upstream may have answered and closed: that answer wins
                        if let Poll::Ready(Ok(h)) =
                            poll_head(conn, cx, max_head, passthrough, &mut answered)
                        {
                            return Poll::Ready(Ok((h, false)));
                        }
                        let fate = Fate::of(answered, head_written);
                        return Poll::Ready(Err(fail(fate, ExchangeError::Io(e.to_string()))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if body_ended {
                if !timing {
                    timing = true;
                    Deadline::reset_or_arm(&mut conn.deadline, header_timeout);
                }
                let d = conn.deadline.as_mut().expect("set when the timing began");
                ready!(Pin::new(d).poll(cx));
                return Poll::Ready(Err(fail(
                    Fate::Final,
                    ExchangeError::Timeout(header_timeout),
                )));
            }
            let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                Some(Ok(f)) => f,
                Some(Err(e)) => {
                    return Poll::Ready(Err(fail(
                        Fate::Final, // the request is incomplete: never sent again
                        ExchangeError::RequestBody(e.to_string()),
                    )));
                }
                None => {
                    body_ended = true;
                    match framing {
                        ReqFraming::Chunked => out.parts[0] = Bytes::from_static(b"0\r\n\r\n"),
                        ReqFraming::Length(n) if sent != n => {
                            return Poll::Ready(Err(fail(
                                Fate::Final,
                                ExchangeError::RequestBody(format!(
                                    "ended after {sent} of {n} bytes"
                                )),
                            )));
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            // trailers of a request body are dropped (git and LFS send none)
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            match framing {
                ReqFraming::Length(n) if sent > n => {
                    return Poll::Ready(Err(fail(
                        Fate::Final,
                        ExchangeError::RequestBody(format!("longer than its {n} bytes")),
                    )));
                }
                ReqFraming::Chunked => {
                    out.parts[0] = Bytes::from(format!("{:x}\r\n", data.len()));
                    out.parts[1] = data;
                    out.parts[2] = Bytes::from_static(b"\r\n");
                }
                _ => out.parts[0] = data,
            }
        }
    })
    .await
}

/// Reads until a final response head (1xx other than 101 skipped). `answered`: some byte of a
/// response has arrived.
fn poll_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    max_head: usize,
    passthrough: Option<Passthrough>,
    answered: &mut bool,
) -> Poll<Result<Head, ExchangeError>> {
    loop {
        if !conn.rbuf.is_empty() {
            match parse_response_head(&mut conn.rbuf, max_head, passthrough) {
                // 100 Continue and the like: what follows may be in the buffer already
                Ok(Some(h))
                    if h.status.is_informational()
                        && h.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Ok(Some(h)) => return Poll::Ready(Ok(h)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(ExchangeError::Protocol(e))),
            }
        }
        match ready!(conn.poll_fill(cx, HEAD_READ)) {
            Ok(0) => {
                return Poll::Ready(Err(ExchangeError::Io(
                    "connection closed before a response".into(),
                )));
            }
            Ok(_) => *answered = true,
            Err(e) => return Poll::Ready(Err(ExchangeError::Io(e.to_string()))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Response bodies

/// Where a finished connection goes (the pool), once its response has been read whole.
pub trait Checkin: Send + Unpin + 'static {
    fn put(self, conn: Conn);
}

enum BodyState {
    /// Read already (or empty): yielded once, then the end.
    Ready(Option<Bytes>),
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// A response body read from its upstream connection as the client takes it. Read to its end,
/// a reusable connection goes to its check-in; dropped early, the connection is closed.
pub struct ResponseBody<C: Checkin> {
    conn: Option<Conn>,
    state: BodyState,
    checkin: Option<C>,
    /// The next read's size (see [`BODY_READ_MIN`]).
    read_size: usize,
}

impl<C: Checkin> ResponseBody<C> {
    /// The body of a response framed as `framing` on `conn`; `checkin` is `None` when the
    /// connection must not be reused. A body already read whole is split off at once and the
    /// connection checked in before this returns.
    pub fn new(mut conn: Conn, framing: RespFraming, checkin: Option<C>) -> ResponseBody<C> {
        let state = match framing {
            RespFraming::Empty => BodyState::Ready(None),
            RespFraming::Length(n) if conn.rbuf.len() as u64 >= n => {
                BodyState::Ready(Some(conn.rbuf.split_to(n as usize).freeze()))
            }
            RespFraming::Length(n) => BodyState::Length(n),
            RespFraming::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            RespFraming::Close => BodyState::UntilClose,
        };
        let mut b = ResponseBody {
            conn: Some(conn),
            state,
            checkin,
            read_size: BODY_READ_MIN,
        };
        if matches!(b.state, BodyState::Ready(_)) {
            b.finish(true);
        }
        b
    }

    /// The body has been read whole (`clean`) or has failed: the connection goes back or is
    /// closed.
    fn finish(&mut self, clean: bool) {
        let conn = self.conn.take();
        if let (true, Some(conn), Some(checkin)) = (clean, conn, self.checkin.take())
            && conn.rbuf.is_empty()
        {
            checkin.put(conn);
        }
    }

    fn fail(&mut self, e: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = BodyState::Done;
        self.finish(false);
        Poll::Ready(Some(Err(io::Error::other(e.into()))))
    }
}

/// Reads a piece of a body, doubling the next piece's size when this one came back full.
fn poll_body_fill(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    read_size: &mut usize,
) -> Poll<io::Result<usize>> {
    let n = ready!(conn.poll_fill(cx, *read_size))?;
    if n >= *read_size * 3 / 4 {
        *read_size = (*read_size * 2).min(BODY_READ_MAX);
    }
    Poll::Ready(Ok(n))
}

impl<C: Checkin> HttpBody for ResponseBody<C> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(match &mut this.state {
                    BodyState::Ready(b) => b.take().map(|b| Ok(Frame::data(b))),
                    _ => None,
                });
            };
            match &mut this.state {
                BodyState::Length(left) => {
                    if conn.rbuf.is_empty() {
                        match ready!(poll_body_fill(conn, cx, &mut this.read_size)) {
                            Ok(0) => return this.fail("upstream closed inside a response body"),
                            Ok(_) => {}
                            Err(e) => return this.fail(e.to_string()),
                        }
                    }
                    let n = (*left).min(conn.rbuf.len() as u64);
                    *left -= n;
                    let data = conn.rbuf.split_to(n as usize).freeze();
                    if *left == 0 {
                        this.state = BodyState::Done;
                        this.finish(true);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Chunked(dec) => match dec.decode(&mut conn.rbuf) {
                    Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Decoded::End) => {
                        this.state = BodyState::Done;
                        this.finish(true);
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {
                        match ready!(poll_body_fill(conn, cx, &mut this.read_size)) {
                            Ok(0) => return this.fail("upstream closed inside a chunked body"),
                            Ok(_) => {}
                            Err(e) => return this.fail(e.to_string()),
                        }
                    }
                    Err(e) => return this.fail(e),
                },
                BodyState::UntilClose => {
                    if conn.rbuf.is_empty() {
                        match ready!(poll_body_fill(conn, cx, &mut this.read_size)) {
                            Ok(0) => {
                                this.state = BodyState::Done;
                                this.finish(false);
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e.to_string()),
                        }
                    }
                    let data = conn.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                BodyState::Ready(_) | BodyState::Done => {
                    // finished states hold no connection
                    this.finish(false);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Ready(b) => b.is_none(),
            BodyState::Length(n) => *n == 0,
            BodyState::Done => true,
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            BodyState::Ready(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BodyState::Length(n) => SizeHint::with_exact(*n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn text(b: &Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn request_heads_carry_our_host_upgrade_and_framing_not_the_clients() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("client.example"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("dropped"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let host = HeaderValue::from_static("up:1");
        let ws = HeaderValue::from_static("websocket");
        let head_with = |h: &HeaderMap, m: Method, up, f| {
            text(
                &RequestHead {
                    method: &m,
                    prefix: "/p",
                    path_and_query: "/x?y",
                    host: &host,
                    upgrade: up,
                    headers: h,
                    hop: Hop::default(),
                    framing: f,
                }
                .encode(),
            )
        };
        let head = |m, f| head_with(&h, m, None, f);
        assert_eq!(
            head(Method::PUT, ReqFraming::Length(12345)),
            "PUT /p/x?y HTTP/1.1\r\nhost: up:1\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12345\r\n\r\n"
        );
        assert_eq!(
            head(Method::POST, ReqFraming::Chunked),
            "POST /p/x?y HTTP/1.1\r\nhost: up:1\r\nx-a: 1\r\nx-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            head(Method::GET, ReqFraming::Empty),
            "GET /p/x?y HTTP/1.1\r\nhost: up:1\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 0\r\n\r\n",
            "the client sent a length: it says 0 now"
        );
        let mut h = h.clone();
        h.remove(header::CONTENT_LENGTH);
        assert_eq!(
            head_with(&h, Method::GET, Some(&ws), ReqFraming::Empty),
            "GET /p/x?y HTTP/1.1\r\nhost: up:1\r\nx-a: 1\r\nx-a: 2\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
        assert!(
            head_with(&h, Method::POST, None, ReqFraming::Empty)
                .ends_with("x-a: 2\r\ncontent-length: 0\r\n\r\n")
        );
        let mut b = Vec::new();
        for n in [0, 7, 10, 1_073_741_824, u64::MAX] {
            b.clear();
            push_decimal(&mut b, n);
            assert_eq!(b, n.to_string().as_bytes());
        }
    }

    #[test]
    fn the_hops_own_headers_replace_the_clients() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("theirs"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let fwd = headers::Forwarding::new(&headers::ForwardInfo {
            peer: "10.1.2.3".parse().unwrap(),
            host: None,
            proto: "http",
        });
        let id = HeaderValue::from_static("ours");
        let extra = [(
            HeaderName::from_static("gitlab-workhorse-geo-proxy"),
            HeaderValue::from_static("1"),
        )];
        let head = RequestHead {
            method: &Method::GET,
            prefix: "",
            path_and_query: "/",
            host: &HeaderValue::from_static("up"),
            upgrade: None,
            headers: &h,
            hop: Hop {
                forwarding: Some(&fwd),
                request_id: Some(&id),
                extra: &extra,
            },
            framing: ReqFraming::Empty,
        }
        .encode();
        assert_eq!(
            text(&head),
            "GET / HTTP/1.1\r\nhost: up\r\nx-kept: 1\r\nx-forwarded-for: 10.1.2.3\r\n\
             forwarded: for=10.1.2.3;proto=http\r\nx-forwarded-proto: https\r\n\
             x-request-id: ours\r\ngitlab-workhorse-geo-proxy: 1\r\n\r\n",
            "the client's proto survives (ingress kept it: a trusted hop's)"
        );
    }

    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nServer: up\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 5\r\n\r\nhello";

    #[test]
    fn response_heads_parse_at_any_split() {
        for cut in 0..RESP.len() - 5 {
            let mut buf = BytesMut::from(&RESP[..cut]);
            assert!(
                parse_response_head(&mut buf, 8192, None).unwrap().is_none(),
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut, "an incomplete head is left in place");
        }
        let mut buf = BytesMut::from(RESP);
        let h = parse_response_head(&mut buf, 8192, None).unwrap().unwrap();
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.version, Version::HTTP_11);
        assert!(h.keep_alive);
        assert_eq!(h.headers.get_all(header::SET_COOKIE).iter().count(), 2);
        assert_eq!(h.headers["server"], "up");
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");
    }

    #[test]
    fn response_heads_refused_or_not_kept_alive() {
        let parse = |s: &str, max| parse_response_head(&mut BytesMut::from(s), max, None);
        let alive = |s: &str| parse(s, 8192).unwrap().unwrap().keep_alive;
        assert!(!alive("HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n"));
        assert!(!alive("HTTP/1.0 200 OK\r\n\r\n"));
        assert!(alive("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n"));
        assert!(!alive(
            "HTTP/1.1 200 OK\r\nconnection: upgrade, close\r\n\r\n"
        ));
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nx: y\r\n", 10).unwrap_err(),
            "response head too large"
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nx: y\r\n\r\n", 10).unwrap_err(),
            "response head too large"
        );
        assert_eq!(
            parse("HTTP/1.1 2000 OK\r\n\r\n", 8192).unwrap_err(),
            "malformed response head"
        );
        assert_eq!(
            parse("SSH-2.0-OpenSSH\r\n\r\n", 8192).unwrap_err(),
            "malformed response head"
        );
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(
            parse(&many, 1 << 20).unwrap_err(),
            "too many response headers"
        );
    }

    #[test]
    fn response_framing_table() {
        let f = |head_request, code: u16, headers: &str| {
            let raw = format!("HTTP/1.1 {code} X\r\n{headers}\r\n");
            let head = parse_response_head(&mut BytesMut::from(raw.as_str()), 8192, None)
                .unwrap()
                .unwrap();
            response_framing(head_request, &head)
        };
        use RespFraming::*;
        assert_eq!(f(true, 200, "content-length: 9\r\n"), Ok((Empty, false)));
        assert_eq!(f(false, 204, ""), Ok((Empty, false)));
        assert_eq!(f(false, 304, "content-length: 9\r\n"), Ok((Empty, false)));
        assert_eq!(
            f(false, 200, "content-length: 9\r\n"),
            Ok((Length(9), false))
        );
        assert_eq!(f(false, 200, "content-length: 0\r\n"), Ok((Empty, false)));
        assert_eq!(
            f(false, 200, "content-length: 9, 9\r\n"),
            Ok((Length(9), false))
        );
        assert_eq!(
            f(false, 200, "content-length: 9\r\ncontent-length: 9\r\n"),
            Ok((Length(9), false))
        );
        assert!(f(false, 200, "content-length: 9, 8\r\n").is_err());
        assert!(f(false, 200, "content-length: 9\r\ncontent-length: 8\r\n").is_err());
        assert!(f(false, 200, "content-length: -1\r\n").is_err());
        assert!(f(false, 200, "content-length: +9\r\n").is_err());
        assert!(f(false, 200, "content-length: \r\n").is_err());
        assert_eq!(
            f(false, 200, "transfer-encoding: gzip, Chunked\r\n"),
            Ok((Chunked, false))
        );
        assert_eq!(
            f(false, 200, "transfer-encoding: chunked, gzip\r\n"),
            Ok((Close, true))
        );
        assert_eq!(
            f(
                false,
                200,
                "transfer-encoding: chunked\r\ncontent-length: 9\r\n"
            ),
            Ok((Chunked, true)),
            "both: chunked, and the connection is not reused"
        );
        assert_eq!(f(false, 200, ""), Ok((Close, true)));
    }

    #[test]
    fn response_heads_lose_their_hop_by_hop_headers() {
        let raw = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTrailer: x\r\nX-Kept: 2\r\n\r\n";
        let h = parse_response_head(&mut BytesMut::from(raw), 8192, None)
            .unwrap()
            .unwrap();
        assert_eq!(h.upgrade.as_ref().unwrap(), "websocket");
        let names: Vec<_> = h.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    const PASS: Option<Passthrough> = Some(Passthrough::new(&["location", "set-cookie"]));

    fn runs(h: &Head) -> Vec<String> {
        h.raw.as_ref().map_or(vec![], |r| {
            r.runs()
                .map(|l| String::from_utf8(l.to_vec()).unwrap())
                .collect()
        })
    }

    fn names(m: &HeaderMap) -> Vec<&str> {
        m.keys().map(|k| k.as_str()).collect()
    }

    #[test]
    fn end_to_end_lines_pass_through_and_filtered_ones_are_parsed() {
        let raw = "HTTP/1.1 302 Found\r\nServer: up\r\ndate: x\r\nContent-Length: 0\r\n\
                   X-A: 1 \r\nSet-Cookie: a=1\r\nLOCATION: /l\r\nKeep-Alive: timeout=5\r\n\
                   X-B: 2\r\nConnection: keep-alive\r\n\r\nBODY";
        let mut buf = BytesMut::from(raw);
        let h = parse_response_head(&mut buf, 8192, PASS).unwrap().unwrap();
        assert_eq!(&buf[..], b"BODY");
        assert_eq!(
            runs(&h),
            ["Server: up\r\ndate: x\r\n", "X-A: 1 \r\n", "X-B: 2\r\n"],
            "runs of adjacent lines, cut where a line is not passed through"
        );
        assert_eq!(names(&h.headers), ["set-cookie", "location"]);
        let r = h.raw.as_ref().unwrap();
        assert!(r.date);
        assert_eq!(r.content_length, Some(0));
        assert!(h.keep_alive);
        assert_eq!(response_framing(false, &h), Ok((RespFraming::Empty, false)));
        // what a map-only writer gets: every end-to-end header, values trimmed
        let mut map = h.headers.clone();
        r.append_to(&mut map);
        assert_eq!(
            names(&map),
            [
                "set-cookie",
                "location",
                "server",
                "date",
                "x-a",
                "x-b",
                "content-length"
            ]
        );
        assert_eq!(map["x-a"], "1");
        assert_eq!(map["content-length"], "0");
    }

    #[test]
    fn heads_with_more_lines_than_are_kept_inline_parse_whole() {
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..INLINE_SPANS + 5 {
            raw.push_str(&format!("X-{i}: v{i}\r\n"));
        }
        raw.push_str("\r\n");
        for pass in [None, PASS] {
            let h = parse_response_head(&mut BytesMut::from(raw.as_str()), 8192, pass)
                .unwrap()
                .unwrap();
            let mut map = h.headers.clone();
            if let Some(r) = &h.raw {
                r.append_to(&mut map);
            }
            assert_eq!(map.len(), INLINE_SPANS + 5);
            assert_eq!(map["x-0"], "v0");
            assert_eq!(
                map[format!("x-{}", INLINE_SPANS + 4).as_str()],
                format!("v{}", INLINE_SPANS + 4).as_str()
            );
        }
    }

    #[test]
    fn heads_that_cannot_pass_through_go_to_the_map_whole() {
        let parse = |s: &str| {
            parse_response_head(&mut BytesMut::from(s), 8192, PASS)
                .unwrap()
                .unwrap()
        };
        // bare LF line ends
        let h = parse("HTTP/1.1 200 OK\nX-A: 1\nX-B: 2\n\n");
        assert!(h.raw.is_none());
        assert_eq!(names(&h.headers), ["x-a", "x-b"]);
        // one bare LF line: that line is parsed, the others pass
        let h = parse("HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n");
        assert_eq!(runs(&h), ["X-B: 2\r\n"]);
        assert_eq!(names(&h.headers), ["x-a"]);
        // `Connection` names an end-to-end header: it must go, so everything is parsed
        let h = parse("HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-C: 3\r\n\r\n");
        assert!(h.raw.is_none());
        assert_eq!(names(&h.headers), ["x-c"]);
        // informational heads
        let h = parse("HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n");
        assert!(h.raw.is_none());
        assert_eq!(names(&h.headers), ["link"]);
        // more runs than there is room for: the rest is parsed, nothing is lost
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..10 {
            many.push_str(&format!("X-{i}: {i}\r\nLocation: /{i}\r\n"));
        }
        many.push_str("\r\n");
        let h = parse(&many);
        assert_eq!(runs(&h).len(), RAW_RUNS);
        let mut map = h.headers.clone();
        h.raw.as_ref().unwrap().append_to(&mut map);
        assert_eq!(map.len(), 20);
        assert_eq!(map.get_all("location").iter().count(), 10);
    }

    const CHUNKED: &[u8] = b"5;ext=1\r\nhello\r\n6 \r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        for cut in 0..=CHUNKED.len() {
            let mut dec = ChunkedDecoder::default();
            let mut buf = BytesMut::from(&CHUNKED[..cut]);
            let mut out = Vec::new();
            let mut ended = false;
            let mut fed = false;
            loop {
                match dec.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::End => {
                        ended = true;
                        break;
                    }
                    Decoded::More if !fed => {
                        buf.extend_from_slice(&CHUNKED[cut..]);
                        fed = true;
                    }
                    Decoded::More => break,
                }
            }
            if !fed {
                buf.extend_from_slice(&CHUNKED[cut..]);
            }
            assert!(ended, "cut at {cut}");
            assert_eq!(out, b"hello world", "cut at {cut}");
            assert_eq!(
                &buf[..],
                b"NEXT",
                "what follows the body is left (cut at {cut})"
            );
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let bad = |s: &[u8]| {
            let mut dec = ChunkedDecoder::default();
            let mut buf = BytesMut::from(s);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Decoded::Data(_)) => {}
                    Ok(other) => return Ok(other),
                    Err(e) => return Err(e),
                }
            }
        };
        assert_eq!(bad(b"5\nhello\r\n"), Err("chunk size line without CRLF"));
        assert_eq!(bad(b"zz\r\n"), Err("bad chunk size"));
        assert_eq!(bad(b"\r\n"), Err("bad chunk size"));
        assert_eq!(
            bad(b"1000000000000000\r\n"),
            Err("bad chunk size"),
            "overflow"
        );
        assert_eq!(bad(b"5\r\nhelloXX"), Err("chunk data not followed by CRLF"));
        assert_eq!(bad(b"0\r\nx: y\n\r\n"), Err("trailer line without CRLF"));
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert_eq!(bad(&long), Err("chunk size line too long"));
        assert_eq!(bad(b"5\r\nhel"), Ok(Decoded::More));
    }

    /// A loopback upstream running `serve` on its first connection, and a connection to it.
    async fn upstream<F, Fut>(serve: F) -> Conn
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve(s).await;
        });
        Conn::new(Box::new(TcpStream::connect(addr).await.unwrap()))
    }

    async fn read_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "head cut short");
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    const T: Duration = Duration::from_secs(10);

    fn get() -> Bytes {
        Bytes::from_static(b"GET / HTTP/1.1\r\nhost: up\r\n\r\n")
    }

    /// A `GET /` exchange on `conn`.
    async fn try_get_on(conn: &mut Conn) -> Result<(Head, bool), Failure> {
        exchange(
            conn,
            &get(),
            &mut Body::empty(),
            ReqFraming::Empty,
            8192,
            T,
            None,
        )
        .await
    }

    /// A `GET /` exchange on `conn` that must succeed.
    async fn get_on(conn: &mut Conn) -> (Head, bool) {
        try_get_on(conn).await.unwrap()
    }

    /// Collects a body, and reports what was checked in.
    async fn collect(b: ResponseBody<Slot>) -> Vec<u8> {
        http_body_util::BodyExt::collect(b)
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    /// Keeps what is checked in.
    struct Slot(Arc<Mutex<Option<Conn>>>);

    impl Checkin for Slot {
        fn put(self, conn: Conn) {
            *self.0.lock().unwrap() = Some(conn);
        }
    }

    fn checkin() -> (Option<Slot>, Arc<Mutex<Option<Conn>>>) {
        let slot = Arc::new(Mutex::new(None));
        (Some(Slot(slot.clone())), slot)
    }

    #[tokio::test]
    async fn a_small_body_comes_with_its_head_and_the_connection_goes_back_at_once() {
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            )
            .await
            .unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let (h, whole) = get_on(&mut conn).await;
        assert_eq!(h.status, StatusCode::OK, "100 Continue skipped");
        assert!(whole);
        let (framing, close) = response_framing(false, &h).unwrap();
        let (ci, slot) = checkin();
        let body = ResponseBody::new(conn, framing, (!close).then_some(ci).flatten());
        assert!(
            slot.lock().unwrap().is_some(),
            "checked in before the body is read"
        );
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(collect(body).await, b"hello");
    }

    #[tokio::test]
    async fn a_chunked_body_streams_and_then_checks_in() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            rx.await.unwrap();
            s.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let (h, _) = get_on(&mut conn).await;
        let (framing, _) = response_framing(false, &h).unwrap();
        let (ci, slot) = checkin();
        let mut body = ResponseBody::new(conn, framing, ci);
        let first = http_body_util::BodyExt::frame(&mut body)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.into_data().unwrap(),
            "hello",
            "the first chunk before the rest exists"
        );
        assert!(slot.lock().unwrap().is_none());
        tx.send(()).unwrap();
        assert_eq!(collect(body).await, b" world");
        assert!(slot.lock().unwrap().is_some(), "checked in at the end");
    }

    #[tokio::test]
    async fn a_large_body_streams_whole_in_growing_pieces() {
        const LEN: usize = 3 * 1024 * 1024 + 7;
        let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        let mut conn = upstream(move |mut s| async move {
            read_head(&mut s).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&sent).await.unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let (h, _) = get_on(&mut conn).await;
        let (framing, _) = response_framing(false, &h).unwrap();
        let (ci, slot) = checkin();
        let mut rb = ResponseBody::new(conn, framing, ci);
        let mut got = Vec::with_capacity(LEN);
        let mut largest = 0;
        while let Some(f) = http_body_util::BodyExt::frame(&mut rb).await {
            let d = f.unwrap().into_data().unwrap();
            largest = largest.max(d.len());
            got.extend_from_slice(&d);
        }
        assert!(got == body, "3 MiB arrived intact");
        assert!(
            largest <= BODY_READ_MAX,
            "no piece beyond {BODY_READ_MAX} bytes"
        );
        assert!(slot.lock().unwrap().is_some(), "checked in at the end");
    }

    #[tokio::test]
    async fn a_body_until_close_is_never_checked_in() {
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it")
                .await
                .unwrap();
        })
        .await;
        let (h, _) = get_on(&mut conn).await;
        let (framing, close) = response_framing(false, &h).unwrap();
        assert!(close);
        let (ci, slot) = checkin();
        assert_eq!(
            collect(ResponseBody::new(conn, framing, ci)).await,
            b"all of it"
        );
        assert!(slot.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_short_length_body_is_an_error() {
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await
                .unwrap();
        })
        .await;
        let (h, _) = get_on(&mut conn).await;
        let (framing, _) = response_framing(false, &h).unwrap();
        let (ci, slot) = checkin();
        let r = http_body_util::BodyExt::collect(ResponseBody::new(conn, framing, ci)).await;
        assert!(r.is_err());
        assert!(slot.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn request_bodies_go_out_chunked_or_with_their_length() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut conn = upstream(move |mut s| async move {
            let head = read_head(&mut s).await;
            let mut rest = vec![0u8; b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".len()];
            s.read_exact(&mut rest).await.unwrap();
            s2.lock()
                .unwrap()
                .push(head + &String::from_utf8(rest).unwrap());
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let mut body = Body::new(http_body_util::StreamBody::new(tokio_stream_from(rx)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"de"))))
            .await
            .unwrap();
        drop(tx);
        let head = Bytes::from_static(b"POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        let (h, whole) = exchange(
            &mut conn,
            &head,
            &mut body,
            ReqFraming::Chunked,
            8192,
            T,
            None,
        )
        .await
        .unwrap();
        assert_eq!((h.status, whole), (StatusCode::NO_CONTENT, true));
        assert_eq!(
            seen.lock().unwrap()[0],
            "POST /u HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        );

        // a body longer than its length is refused, not sent on
        let mut conn = upstream(|mut s| async move {
            let _ = s.read(&mut [0u8; 64]).await;
        })
        .await;
        let mut body = Body::from("toolong");
        let f = exchange(
            &mut conn,
            &head,
            &mut body,
            ReqFraming::Length(3),
            8192,
            T,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(f.fate, Fate::Final);
        assert!(
            matches!(f.error, ExchangeError::RequestBody(_)),
            "{:?}",
            f.error
        );
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn an_early_answer_ends_an_upload_that_is_never_finished() {
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let mut sink = [0u8; 1024];
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        // one chunk, then a body that never ends
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        let mut body = Body::new(http_body_util::StreamBody::new(tokio_stream_from(rx)));
        let head = Bytes::from_static(b"PUT /u HTTP/1.1\r\ncontent-length: 1000\r\n\r\n");
        let (h, whole) = exchange(
            &mut conn,
            &head,
            &mut body,
            ReqFraming::Length(1000),
            8192,
            T,
            None,
        )
        .await
        .unwrap();
        assert_eq!(h.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            !whole,
            "the upload did not finish: the connection is not reused"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn each_exchange_on_a_connection_gets_its_own_time_for_the_head() {
        let mut conn = upstream(|mut s| async move {
            for _ in 0..2 {
                read_head(&mut s).await;
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
            }
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let timeout = Duration::from_millis(300);
        let (head, mut body) = (get(), Body::empty());
        for round in ["first", "second"] {
            let (h, _) = exchange(
                &mut conn,
                &head,
                &mut body,
                ReqFraming::Empty,
                8192,
                timeout,
                None,
            )
            .await
            .unwrap_or_else(|f| panic!("the {round} head is in time: {:?}", f.error));
            assert_eq!(h.status, StatusCode::NO_CONTENT);
            // the exchange's deadline passes while the connection is idle (had the next
            // exchange kept it as it is, its head would be late at once)
            let passed = conn.deadline.as_mut().expect("the exchange set one");
            tokio::time::timeout(Duration::from_secs(10), passed)
                .await
                .expect("the deadline passed within 10 s");
        }
    }

    #[tokio::test]
    async fn no_response_head_in_time_is_a_timeout_and_final() {
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            let _ = s.read(&mut [0u8; 1]).await;
        })
        .await;
        let f = exchange(
            &mut conn,
            &get(),
            &mut Body::empty(),
            ReqFraming::Empty,
            8192,
            Duration::from_millis(200),
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(f.error, ExchangeError::Timeout(_)),
            "{:?}",
            f.error
        );
        assert_eq!(f.fate, Fate::Final);
    }

    #[tokio::test]
    async fn a_connection_closed_under_a_request_says_how_far_it_got() {
        // closed after the head arrived, before any answer: sent, nothing back
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
        })
        .await;
        let f = try_get_on(&mut conn).await.unwrap_err();
        assert_eq!(f.fate, Fate::Sent);
        // half a head back, then closed: answered, never sent again
        let mut conn = upstream(|mut s| async move {
            read_head(&mut s).await;
            s.write_all(b"HTTP/1.1 200 O").await.unwrap();
        })
        .await;
        let f = try_get_on(&mut conn).await.unwrap_err();
        assert_eq!(f.fate, Fate::Final);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_open() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut conn = upstream(|s| async move {
            rx.await.unwrap();
            drop(s);
        })
        .await;
        assert!(conn.is_idle_open());
        tx.send(()).unwrap();
        // wait for the socket itself to become readable (the close), then ask again
        tokio::time::timeout(
            T,
            std::future::poll_fn(|cx| {
                let mut byte = [0u8; 1];
                let mut rb = ReadBuf::new(&mut byte);
                Pin::new(&mut conn.io).poll_read(cx, &mut rb).map(|_| ())
            }),
        )
        .await
        .expect("the close arrived within 10 s");
        assert!(!conn.is_idle_open(), "a closed idle connection is not open");
    }
}
