//! A secondary proxying to an `https://` primary: the certificate is verified against the
//! roots the sidecar trusts (here a test CA given through `SSL_CERT_FILE`); an untrusted
//! certificate is a 503, never a silent plain-text fallback. Certificates come from `openssl`,
//! the TLS server is Python's; the test is skipped (with a message) when either is missing.

use geoforge_tests::httpd;
use geoforge_tests::{Sidecar, free_port, site_key, wait_until};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn secondary(dir: &Path, primary: &str) -> Sidecar {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let k = site_key(dir, "tokyo");
    let p = site_key(dir, "paris");
    let yaml = format!(
        r#"siteId: tokyo
role: secondary
externalUrl: https://tokyo.example.test
stateDir: {state}
storageRoot: {data}
primary: {{ staticUrl: "{primary}" }}
keys:
  kid: tokyo.1
  privateKeyFile: {key}
  trusted: [{{ kid: paris.1, publicKey: {pk} }}]
"#,
        state = dir.join("state").display(),
        data = dir.join("data").display(),
        key = k.file.display(),
        pk = p.public,
    );
    Sidecar::start(dir, "tokyo", &yaml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_primary_verified_against_trusted_roots() {
    if Command::new("openssl").arg("version").output().is_err()
        || Command::new("python3").arg("--version").output().is_err()
    {
        eprintln!("skipped: openssl or python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=geoforge test CA",
    ]);
    openssl(d, &a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(d, &a);
    std::fs::write(
        d.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "1",
            "-extfile",
            "ext",
        ],
    );
    let port = free_port();
    // A threaded TLS server: the secondary's replication client talks to the primary URL
    // too, so a one-connection-at-a-time server (`openssl s_server`) would stall the test.
    let server_py = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = b"tls upstream ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    do_POST = do_GET
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("srv.pem", "srv.key")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;
    let _server = Kill(
        Command::new("python3")
            .current_dir(d)
            .args(["-c", server_py, &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(10), "TLS server listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let primary = format!("https://127.0.0.1:{port}");

    // Trusting the test CA: proxied over TLS (the server's answer comes back).
    // SAFETY: this test binary has this one test; no other thread reads the environment now.
    unsafe { std::env::set_var("SSL_CERT_FILE", d.join("ca.pem")) };
    let trusting = secondary(&d.join("a"), &primary);
    unsafe { std::env::remove_var("SSL_CERT_FILE") };
    let r = httpd::get(&format!("{}/", trusting.url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("tls upstream ok"), "{}", r.text());

    // Not trusting it: the handshake fails, the client gets a 503, never plain text.
    unsafe { std::env::set_var("SSL_CERT_FILE", d.join("srv.csr")) };
    let untrusting = secondary(&d.join("b"), &primary);
    unsafe { std::env::remove_var("SSL_CERT_FILE") };
    let r = httpd::get(&format!("{}/", untrusting.url()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
}
