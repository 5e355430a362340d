//! Test harness: real `geo-sidecar` processes, real `git`, loopback HTTP.
//!
//! The binary comes from the same target directory as the test (built by
//! `cargo test --workspace`, which builds every binary before running tests).

pub mod httpd;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built: run `cargo test --workspace` (or `cargo build -p geo-sidecar`) first",
        bin.display()
    );
    bin
}

pub fn sidecar_bin() -> PathBuf {
    workspace_bin("geo-sidecar")
}

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How often the waits below look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `f` every `every` until it returns `Some`; `None` once `timeout` has passed. Every
/// wait in the harness and the tests is a bounded poll built on this (or its async twin).
pub fn poll_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, POLL_INTERVAL, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Async variant of [`wait_until`].
pub async fn wait_until_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A generated site key: private key file (0600) and public key.
pub struct SiteKey {
    pub kid: String,
    pub file: PathBuf,
    pub public: String,
}

/// Writes a new key pair for `site` into `dir` (kid `<site>.1`).
pub fn site_key(dir: &Path, site: &str) -> SiteKey {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let k = geoforge_crds::auth::generate_key();
    let file = dir.join(format!("{site}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)
        .unwrap();
    f.write_all(k.private_pem.as_bytes()).unwrap();
    SiteKey {
        kid: format!("{site}.1"),
        file,
        public: k.public_key,
    }
}

/// A running sidecar; killed on drop. Its stderr goes to `<dir>/<name>.log`.
pub struct Sidecar {
    pub name: String,
    pub child: Option<Child>,
    pub service: u16,
    pub admin: u16,
    pub config_file: PathBuf,
    pub log_file: PathBuf,
}

impl Sidecar {
    /// Starts `geo-sidecar --config <file>` with the given config YAML (listen addresses are
    /// appended by this function: do not set `listen` in `yaml`) and waits until the admin
    /// port answers `/-/health`.
    pub fn start(dir: &Path, name: &str, yaml: &str) -> Sidecar {
        let service = free_port();
        let admin = free_port();
        Self::start_on(dir, name, yaml, service, admin)
    }

    /// Like [`Sidecar::start`] on given ports (restarts reuse the ports).
    pub fn start_on(dir: &Path, name: &str, yaml: &str, service: u16, admin: u16) -> Sidecar {
        let config_file = dir.join(format!("{name}.yaml"));
        let text = format!(
            "{yaml}\nlisten: {{ service: \"127.0.0.1:{service}\", admin: \"127.0.0.1:{admin}\" }}\n"
        );
        std::fs::write(&config_file, text).unwrap();
        let log_file = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .unwrap();
        let child = Command::new(sidecar_bin())
            .arg("--config")
            .arg(&config_file)
            .env(
                "GEO_LOG",
                std::env::var("GEO_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn geo-sidecar");
        let mut s = Sidecar {
            name: name.into(),
            child: Some(child),
            service,
            admin,
            config_file,
            log_file,
        };
        s.wait_healthy(Duration::from_secs(20));
        s
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let admin = format!("127.0.0.1:{}", self.admin);
        let healthy = poll_until(timeout, POLL_INTERVAL, || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited with {status} during start-up:\n{}",
                    self.name,
                    self.log()
                );
            }
            (http_get_status(&admin, "/-/health") == Some(200)).then_some(())
        });
        if healthy.is_none() {
            panic!(
                "{} not healthy after {timeout:?}:\n{}",
                self.name,
                self.log()
            );
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.service)
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit (bounded); returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_kill(c.id() as i32, 15);
        match poll_until(timeout, POLL_INTERVAL, || c.try_wait().unwrap()) {
            Some(st) => st.code(),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "{} did not exit within {timeout:?} after SIGTERM",
                    self.name
                );
            }
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    // No libc dependency: use the kill(1) command.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Minimal blocking HTTP/1.1 GET returning the status code (for health polling).
pub fn http_get_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `git` with a clean, deterministic environment; panics with its output on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_cmd(dir).args(args).output().expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A `git` command with test identity and no user config.
pub fn git_cmd(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    c
}

/// Creates a bare repository at `path` with `commits` commits on `main`.
pub fn make_bare_repo(path: &Path, commits: usize) {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q", "-b", "main"]);
    for i in 0..commits {
        std::fs::write(work.path().join("file.txt"), format!("content {i}\n")).unwrap();
        git(work.path(), &["add", "file.txt"]);
        git(work.path(), &["commit", "-q", "-m", &format!("commit {i}")]);
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    git(
        work.path(),
        &["clone", "-q", "--bare", ".", path.to_str().unwrap()],
    );
}

/// A response read by [`http_request`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// A blocking HTTP/1.1 request with `Connection: close` (no chunked request bodies).
/// Decodes chunked responses. For tests only.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<RawResponse> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = vec![];
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(i) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..i])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 || b.len() < i + 2 + size {
            break;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + size]);
        b = &b[(i + 4 + size).min(b.len())..];
    }
    out
}

/// The value of one metric sample (exact name and labels as exposed, e.g.
/// `geo_accel_served_locally_total{route="git_upload_pack"}`), 0 when absent.
pub fn metric(admin_addr: &str, sample: &str) -> f64 {
    let Ok(r) = http_request(admin_addr, "GET", "/-/metrics", &[], b"") else {
        return 0.0;
    };
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// A credentials-file line `user:<hash>` for the embedded forge, made by the real
/// `geo-sidecar hash-password`.
pub fn credentials_line(user: &str, password: &str) -> String {
    use std::io::Write;
    let mut c = Command::new(sidecar_bin())
        .args(["hash-password", "--user", user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run geo-sidecar hash-password");
    writeln!(c.stdin.take().expect("stdin"), "{password}").expect("write password");
    let out = c.wait_with_output().expect("hash-password output");
    assert!(out.status.success(), "hash-password failed");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}
