//! The floor under any proxy on this runtime, for `bench/proxy.sh` (`FLOOR=1`): bytes in,
//! bytes out, with no HTTP library and no work per header. The sidecar's thread layout (one
//! single-threaded runtime per CPU, connections handed out by one acceptor, an upstream pool per
//! thread), its allocator and its yield before sleeping; each request's head is found with
//! `httparse` and copied to a pooled upstream connection unchanged, and the response is copied
//! back the same way.
//!
//! It understands only what the benchmark sends: requests without a body, responses framed by
//! `Content-Length`. Anything else closes the connection. Not a proxy anyone should deploy: it
//! measures what the kernel, tokio and four system calls per request leave for everything else.
//!
//!     cargo run --release --example raw_h1_proxy -- 127.0.0.1:8080 127.0.0.1:9000 [threads]

use std::cell::RefCell;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

thread_local! {
    static IDLE: RefCell<Vec<Conn>> = const { RefCell::new(Vec::new()) };
}

/// A socket and the bytes read from it that the last message did not use.
struct Conn {
    io: TcpStream,
    buf: Vec<u8>,
}

enum Head {
    /// Head length and body length.
    Complete(usize, usize),
    Partial,
    Unsupported,
}

fn request_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let has_body = req.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
                    || h.name.eq_ignore_ascii_case("transfer-encoding")
            });
            if has_body {
                Head::Unsupported
            } else {
                Head::Complete(n, 0)
            }
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Unsupported,
    }
}

fn response_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok());
            match len {
                Some(len) => Head::Complete(n, len),
                None => Head::Unsupported,
            }
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(_) => Head::Unsupported,
    }
}

impl Conn {
    /// Reads until `parse` finds a whole message; returns its length, or None to close.
    async fn read_message(&mut self, parse: fn(&[u8]) -> Head) -> Option<usize> {
        loop {
            match parse(&self.buf) {
                Head::Complete(head, body) => {
                    while self.buf.len() < head + body {
                        self.fill().await?;
                    }
                    return Some(head + body);
                }
                Head::Partial => self.fill().await?,
                Head::Unsupported => return None,
            }
        }
    }

    async fn fill(&mut self) -> Option<()> {
        self.buf.reserve(4096);
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(()),
        }
    }
}

async fn upstream_conn(upstream: &str) -> Option<Conn> {
    if let Some(c) = IDLE.with_borrow_mut(|v| v.pop()) {
        return Some(c);
    }
    let io = TcpStream::connect(upstream).await.ok()?;
    io.set_nodelay(true).ok()?;
    Some(Conn {
        io,
        buf: Vec::with_capacity(4096),
    })
}

async fn serve(io: TcpStream, upstream: &'static str) -> Option<()> {
    let mut client = Conn {
        io,
        buf: Vec::with_capacity(4096),
    };
    loop {
        let n = client.read_message(request_head).await?;
        let mut up = upstream_conn(upstream).await?;
        up.io.write_all(&client.buf[..n]).await.ok()?;
        client.buf.drain(..n);
        let m = up.read_message(response_head).await?;
        client.io.write_all(&up.buf[..m]).await.ok()?;
        up.buf.drain(..m);
        IDLE.with_borrow_mut(|v| v.push(up));
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("listen address");
    let upstream: &'static str = args.next().expect("upstream address").leak();
    let threads: usize = args.next().map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t.parse().expect("threads"),
    );
    let listener = std::net::TcpListener::bind(&listen)?;
    let mut workers = Vec::new();
    for _ in 0..threads {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(std::thread::yield_now)
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                while let Some(s) = rx.recv().await {
                    if let Ok(s) = TcpStream::from_std(s) {
                        tokio::spawn(serve(s, upstream));
                    }
                }
            });
        });
        workers.push(tx);
    }
    for (i, s) in listener.incoming().enumerate() {
        let s = s?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let _ = workers[i % threads].send(s);
    }
    Ok(())
}
