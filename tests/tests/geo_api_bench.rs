//! Benchmark driver for bench/geo_api.sh (issue 4): /retrieve throughput vs nginx, the
//! sidecar's peak RSS, catalog scan rate vs sha256sum, long-poll latency. Prints `RESULT k=v`
//! lines; the script turns them into BENCHMARKS.md figures.

use geoforge_crds::auth::{Scope, SigningKey, TokenData};
use geoforge_tests::{Sidecar, site_key, wait_until};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

/// GET and discard the body; returns (status, bytes, seconds).
fn download(port: u16, path: &str, auth: Option<&str>) -> (u16, u64, f64) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let start = Instant::now();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut header: Vec<u8> = vec![];
    let mut body_start = None;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if body_start.is_none() {
            header.extend_from_slice(&buf[..n]);
            if let Some(i) = header.windows(4).position(|w| w == b"\r\n\r\n") {
                body_start = Some(i + 4);
                total += (header.len() - i - 4) as u64;
            }
        } else {
            total += n as u64;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let status = String::from_utf8_lossy(&header[..12.min(header.len())])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, total, secs)
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn primary_yaml(dir: &Path, key: &Path, peer_pub: &str, storage: &Path) -> String {
    format!(
        r#"siteId: paris
role: primary
externalUrl: "http://127.0.0.1"
allowInsecure: true
stateDir: "{state}"
storageRoot: "{storage}"
forge: {{ embedded: {{}}, hookTokenFile: "{hook}" }}
keys:
  kid: paris.1
  privateKeyFile: "{key}"
  trusted:
    - {{ kid: tokyo.1, publicKey: "{peer_pub}" }}
geo: {{ rescanInterval: 1h }}
log: {{ level: warn }}
replicables:
  - {{ name: files, type: blob, sourcePath: files, include: ["**"] }}
"#,
        state = dir.join("state").display(),
        storage = storage.display(),
        hook = dir.join("hook").display(),
        key = key.display(),
    )
}

fn write_secret(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    writeln!(f, "{content}").unwrap();
}

fn status(s: &Sidecar, admin: &str) -> serde_json::Value {
    let (code, body) = get_json(s.admin, "/-/geo/status", Some(admin));
    assert_eq!(code, 200);
    body
}

fn get_json(port: u16, path: &str, auth: Option<&str>) -> (u16, serde_json::Value) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(a) = auth {
        head.push_str(&format!("Authorization: {a}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    let i = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let code = String::from_utf8_lossy(&raw[..i])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (
        code,
        serde_json::from_slice(&raw[i + 4..]).unwrap_or(serde_json::Value::Null),
    )
}

fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).unwrap();
    String::from_utf8_lossy(&raw[..12])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
#[ignore = "benchmark: run bench/geo_api.sh (needs nginx and ~2 GiB of disk)"]
fn geo_api_bench() {
    let work = std::path::PathBuf::from(env_or("GEO_BENCH_DIR", "/tmp/geo-bench"));
    let nginx_port: u16 = env_or("GEO_BENCH_NGINX_PORT", "0").parse().unwrap();
    let blob_dir = work.join("big");
    let big = blob_dir.join("files/big.bin");
    assert!(
        big.is_file(),
        "{} missing (the script creates it)",
        big.display()
    );
    let size = std::fs::metadata(&big).unwrap().len();
    // Leftovers of an earlier run's long-poll rounds.
    for e in std::fs::read_dir(blob_dir.join("files")).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("lp-") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }

    let keys = tempfile::tempdir().unwrap();
    let paris = site_key(keys.path(), "paris");
    let tokyo = site_key(keys.path(), "tokyo");
    write_secret(&keys.path().join("hook"), "bench-hook");
    let tokyo_key = SigningKey::from_pem_file(&tokyo.kid, &tokyo.file).unwrap();
    let paris_key = SigningKey::from_pem_file(&paris.kid, &paris.file).unwrap();
    let admin = paris_key.authorization("paris", &TokenData::scope(Scope::Admin));

    // ---- 1 GiB through /retrieve vs nginx ----
    let _ = std::fs::remove_dir_all(keys.path().join("state"));
    let s = Sidecar::start(
        keys.path(),
        "big",
        &primary_yaml(keys.path(), &paris.file, &tokyo.public, &blob_dir),
    );
    let sum = wait_until(Duration::from_secs(600), "big blob catalogued", || {
        let auth = tokyo_key.authorization("paris", &TokenData::catalog("files"));
        let (c, v) = get_json(s.service, "/api/v4/geo/replicables/files", Some(&auth));
        (c == 200)
            .then(|| {
                v["items"]
                    .as_array()?
                    .iter()
                    .find(|i| i["id"] == "big.bin")?["checksum"]
                    .as_str()
                    .map(str::to_string)
            })
            .flatten()
    });
    let pid = s.child.as_ref().unwrap().id();
    let mut sidecar_best = 0f64;
    let mut nginx_best = 0f64;
    for _ in 0..3 {
        let auth = tokyo_key.authorization("paris", &TokenData::retrieve("files", "big.bin", &sum));
        let (code, n, secs) =
            download(s.service, "/api/v4/geo/retrieve/files/big.bin", Some(&auth));
        assert_eq!((code, n), (200, size));
        sidecar_best = sidecar_best.max(n as f64 / secs / 1e6);
        if nginx_port != 0 {
            let (code, n, secs) = download(nginx_port, "/files/big.bin", None);
            assert_eq!((code, n), (200, size));
            nginx_best = nginx_best.max(n as f64 / secs / 1e6);
        }
    }
    let hwm = vm_hwm_kib(pid);
    println!("RESULT retrieve_mbps={sidecar_best:.0}");
    println!("RESULT nginx_mbps={nginx_best:.0}");
    if nginx_best > 0.0 {
        println!("RESULT retrieve_ratio={:.2}", sidecar_best / nginx_best);
    }
    println!("RESULT peak_rss_mib={:.1}", hwm as f64 / 1024.0);

    // ---- long-poll latency: park a poll, commit through the hook, time the wake-up ----
    let mut lat = vec![];
    for i in 0..20 {
        let head = {
            let auth = tokyo_key.authorization("paris", &TokenData::scope(Scope::Events));
            get_json(s.service, "/api/v4/geo/events?after=0&limit=1", Some(&auth)).1
                ["last_event_id"]
                .as_i64()
                .unwrap()
        };
        let auth = tokyo_key.authorization("paris", &TokenData::scope(Scope::Events));
        let port = s.service;
        let poll = std::thread::spawn(move || {
            get_json(
                port,
                &format!("/api/v4/geo/events?after={head}&wait=20"),
                Some(&auth),
            );
            Instant::now()
        });
        wait_until(Duration::from_secs(10), "poll parked", || {
            let mut s2 = std::net::TcpStream::connect(("127.0.0.1", s.admin)).unwrap();
            s2.write_all(b"GET /-/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut t = String::new();
            s2.read_to_string(&mut t).unwrap();
            t.lines()
                .any(|l| l == "geo_events_long_polls_waiting 1")
                .then_some(())
        });
        std::fs::write(blob_dir.join(format!("files/lp-{i}")), format!("{i}")).unwrap();
        let t0 = Instant::now();
        let code = post(
            s.service,
            "/api/v4/geo/hooks",
            &[("X-Gitlab-Token", "bench-hook")],
            &format!(r#"{{"event":"created","replicable":"files","id":"lp-{i}"}}"#),
        );
        assert_eq!(code, 200);
        let woke = poll.join().unwrap();
        lat.push(woke.saturating_duration_since(t0).as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "RESULT longpoll_ms_median={:.1} longpoll_ms_max={:.1}",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    drop(s);

    // ---- catalog scan of many small files ----
    let small = work.join("small");
    let n_files: u64 = std::fs::read_to_string(work.join("small.count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if n_files > 0 {
        let d2 = tempfile::tempdir().unwrap();
        write_secret(&d2.path().join("hook"), "bench-hook");
        let s = Sidecar::start(
            d2.path(),
            "scan",
            &primary_yaml(d2.path(), &paris.file, &tokyo.public, &small),
        );
        let secs = wait_until(Duration::from_secs(3600), "scan done", || {
            let st = status(&s, &admin);
            st["catalog"][0]["scan"]["last_scan_seconds"].as_f64()
        });
        let st = status(&s, &admin);
        assert_eq!(st["catalog"][0]["items"].as_u64(), Some(n_files));
        println!(
            "RESULT scan_files={n_files} scan_seconds={secs:.2} scan_files_per_s={:.0}",
            n_files as f64 / secs
        );
        let pid = s.child.as_ref().unwrap().id();
        println!(
            "RESULT scan_peak_rss_mib={:.1}",
            vm_hwm_kib(pid) as f64 / 1024.0
        );
        // A rescan with nothing changed (fingerprints only).
        drop(s);
        let s = Sidecar::start(
            d2.path(),
            "scan",
            &primary_yaml(d2.path(), &paris.file, &tokyo.public, &small),
        );
        let secs2 = wait_until(Duration::from_secs(3600), "rescan done", || {
            status(&s, &admin)["catalog"][0]["scan"]["last_scan_seconds"].as_f64()
        });
        println!("RESULT rescan_unchanged_seconds={secs2:.2}");
    }
}
