//! Push detection: reads receive-pack's report-status from a response stream as it passes
//! (pkt-lines, possibly inside side-band-64k) without buffering the stream, and reports the
//! refs it marked `ok` once the stream ends.
//!
//! An HTTP 200 alone is not a push: only `unpack ok` followed by at least one `ok <ref>`
//! counts (DESIGN §4). [`PushDetectBody`] forwards the response with a delay of one chunk
//! and, at the end of the stream, awaits [`PushSink::push_completed`] before releasing the
//! last chunk (which carries the final flush-pkt), so the event is durable before the client
//! sees its push acknowledged.

use crate::context::{CompletedPush, PushSink};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

/// Largest pkt-line (LARGE_PACKET_MAX) plus its 4-byte header.
const MAX_PKT: usize = 65520;
/// Report-status bytes kept at most (band-1 data of a receive-pack response is only that).
const MAX_REPORT: usize = 4 * 1024 * 1024;

/// Incremental report-status parser.
#[derive(Debug, Default)]
pub struct ReportStatusParser {
    outer: Vec<u8>,
    /// `None` until the first pkt says whether side-band framing is in use.
    sideband: Option<bool>,
    inner: Vec<u8>,
    unpack_ok: bool,
    ok_refs: Vec<String>,
    broken: bool,
}

impl ReportStatusParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the response body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.broken {
            return;
        }
        self.outer.extend_from_slice(data);
        let mut outer = std::mem::take(&mut self.outer);
        if drain_pkts(&mut outer, |payload| {
            self.outer_payload(payload);
            !self.broken
        })
        .is_err()
        {
            self.broken = true;
        }
        self.outer = outer;
    }

    fn outer_payload(&mut self, payload: &[u8]) {
        let sideband = *self
            .sideband
            .get_or_insert_with(|| matches!(payload.first(), Some(1..=3)));
        if !sideband {
            self.line(payload);
            return;
        }
        match payload.first() {
            Some(1) => {
                if self.inner.len() + payload.len() > MAX_REPORT {
                    self.broken = true;
                    return;
                }
                self.inner.extend_from_slice(&payload[1..]);
                let mut inner = std::mem::take(&mut self.inner);
                if drain_pkts(&mut inner, |line| {
                    self.line(line);
                    true
                })
                .is_err()
                {
                    self.broken = true;
                }
                self.inner = inner;
            }
            Some(2) => {}            // progress
            _ => self.broken = true, // band 3: fatal error, or garbage
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line == b"unpack ok" {
            self.unpack_ok = true;
        } else if let Some(r) = line.strip_prefix(b"ok ")
            && let Ok(r) = std::str::from_utf8(r)
            && self.ok_refs.len() < 100_000
        {
            self.ok_refs.push(r.to_string());
        }
    }

    /// The refs updated, when report-status said the push succeeded (at least partly).
    pub fn updated_refs(&self) -> Option<&[String]> {
        (self.unpack_ok && !self.ok_refs.is_empty()).then_some(&self.ok_refs[..])
    }
}

/// Hands every complete data pkt in `buf` to `on_data` (until it returns false) and removes
/// what was consumed; an incomplete tail stays for the next call. `Err` on a malformed pkt.
fn drain_pkts(buf: &mut Vec<u8>, mut on_data: impl FnMut(&[u8]) -> bool) -> Result<(), ()> {
    let mut pos = 0;
    let result = loop {
        match next_pkt(&buf[pos..]) {
            Pkt::Incomplete => break Ok(()),
            Pkt::Invalid => break Err(()),
            Pkt::Special(n) => pos += n,
            Pkt::Data(n) => {
                let keep_going = on_data(&buf[pos + 4..pos + n]);
                pos += n;
                if !keep_going {
                    break Ok(());
                }
            }
        }
    };
    buf.drain(..pos.min(buf.len()));
    result
}

enum Pkt {
    Incomplete,
    Invalid,
    /// flush/delim/response-end: length consumed.
    Special(usize),
    /// A data pkt of this total length (header included).
    Data(usize),
}

fn next_pkt(buf: &[u8]) -> Pkt {
    if buf.len() < 4 {
        return Pkt::Incomplete;
    }
    let Some(len) = std::str::from_utf8(&buf[..4])
        .ok()
        .and_then(|s| usize::from_str_radix(s, 16).ok())
    else {
        return Pkt::Invalid;
    };
    match len {
        0..=2 => Pkt::Special(4),
        3 => Pkt::Invalid,
        n if n > MAX_PKT => Pkt::Invalid,
        n if buf.len() < n => Pkt::Incomplete,
        n => Pkt::Data(n),
    }
}

/// A response body that detects a completed push (see the module docs).
pub struct PushDetectBody<B> {
    inner: B,
    parser: ReportStatusParser,
    held: Option<Bytes>,
    pending: Option<BoxFuture<'static, ()>>,
    /// What to emit after the sink resolved: the trailers frame or an error, if any.
    after: Option<Result<Frame<Bytes>, axum::Error>>,
    sink: Option<Arc<dyn PushSink>>,
    url_path: String,
    finished: bool,
}

impl<B> PushDetectBody<B> {
    pub fn new(inner: B, sink: Arc<dyn PushSink>, url_path: String) -> Self {
        PushDetectBody {
            inner,
            parser: ReportStatusParser::new(),
            held: None,
            pending: None,
            after: None,
            sink: Some(sink),
            url_path,
            finished: false,
        }
    }

    /// Takes the sink future if the report says refs were updated (once).
    fn record(&mut self) -> Option<BoxFuture<'static, ()>> {
        let refs = self.parser.updated_refs()?.to_vec();
        let sink = self.sink.take()?;
        let push = CompletedPush {
            url_path: self.url_path.clone(),
            updated_refs: refs,
        };
        tracing::info!(path = %push.url_path, refs = push.updated_refs.len(), "push completed");
        Some(Box::pin(async move { sink.push_completed(push).await }))
    }
}

impl<B> Drop for PushDetectBody<B> {
    fn drop(&mut self) {
        // The client went away before the end: the refs may still have been updated; record
        // in the background rather than lose the event (the rescan would find it later).
        if let Some(f) = self.pending.take().or_else(|| self.record())
            && let Ok(h) = tokio::runtime::Handle::try_current()
        {
            h.spawn(f);
        }
    }
}

impl<B> HttpBody for PushDetectBody<B>
where
    B: HttpBody<Data = Bytes, Error = axum::Error> + Unpin,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(f) = this.pending.as_mut() {
                ready!(f.as_mut().poll(cx));
                this.pending = None;
            }
            if this.finished {
                if let Some(b) = this.held.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                return Poll::Ready(this.after.take());
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.parser.feed(&data);
                        if data.is_empty() {
                            continue;
                        }
                        if let Some(prev) = this.held.replace(data) {
                            return Poll::Ready(Some(Ok(Frame::data(prev))));
                        }
                    }
                    Err(trailers) => {
                        this.after = Some(Ok(trailers));
                        this.finished = true;
                        this.pending = this.record();
                    }
                },
                Some(Err(e)) => {
                    this.after = Some(Err(e));
                    this.finished = true;
                    this.pending = this.record();
                }
                None => {
                    this.finished = true;
                    this.pending = this.record();
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &[u8]) -> Vec<u8> {
        let mut v = format!("{:04x}", s.len() + 4).into_bytes();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn plain_report() {
        let mut body = pkt(b"unpack ok\n");
        body.extend(pkt(b"ok refs/heads/main\n"));
        body.extend(pkt(b"ng refs/heads/x non-fast-forward\n"));
        body.extend(b"0000");
        let mut p = ReportStatusParser::new();
        for c in body.chunks(3) {
            p.feed(c);
        }
        assert_eq!(p.updated_refs().unwrap(), ["refs/heads/main"]);
    }

    #[test]
    fn sideband_report_and_rejections() {
        let mut inner = pkt(b"unpack ok\n");
        inner.extend(pkt(b"ok refs/heads/a\n"));
        inner.extend(b"0000");
        let mut band1 = vec![1u8];
        band1.extend(&inner);
        let mut body = pkt(b"\x02remote: hello\n");
        body.extend(pkt(&band1));
        body.extend(b"0000");
        let mut p = ReportStatusParser::new();
        for c in body.chunks(5) {
            p.feed(c);
        }
        assert_eq!(p.updated_refs().unwrap(), ["refs/heads/a"]);

        // A hook rejection: unpack ok but every ref `ng`.
        let mut inner = pkt(b"unpack ok\n");
        inner.extend(pkt(b"ng refs/heads/a pre-receive hook declined\n"));
        inner.extend(b"0000");
        let mut band1 = vec![1u8];
        band1.extend(&inner);
        let mut p = ReportStatusParser::new();
        p.feed(&pkt(&band1));
        assert!(p.updated_refs().is_none());

        let mut p = ReportStatusParser::new();
        p.feed(&pkt(b"unpack index-pack abnormal exit\n"));
        p.feed(&pkt(b"ok refs/heads/a\n"));
        assert!(p.updated_refs().is_none());
    }
}
