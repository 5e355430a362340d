//! Reading a `git-upload-pack` request body: which objects the client wants and which
//! capabilities it needs, to decide whether the local replica can answer it.

use super::advert::is_oid;
use super::pktline::{self, Pkt};

/// What a fetch request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchRequest {
    /// Protocol v2 (`command=fetch`); false for v0/v1.
    pub v2: bool,
    /// The v2 command (`fetch`, `ls-refs`, `object-info`, …); `fetch` for v0/v1.
    pub command: String,
    pub wants: Vec<String>,
    /// Things the local upload-pack cannot be trusted to answer the same way (→ proxy).
    pub unsupported: Vec<String>,
    /// `--filter` spec, if any (served locally with `uploadpack.allowFilter`).
    pub filter: Option<String>,
    /// Shallow/deepen requests (served locally).
    pub shallow: bool,
}

/// Capabilities and arguments the local `git upload-pack` honours exactly like the primary's.
const SUPPORTED_V0_CAPS: &[&str] = &[
    "multi_ack",
    "multi_ack_detailed",
    "no-done",
    "thin-pack",
    "side-band",
    "side-band-64k",
    "ofs-delta",
    "shallow",
    "deepen-since",
    "deepen-not",
    "deepen-relative",
    "no-progress",
    "include-tag",
    "allow-tip-sha1-in-want",
    "allow-reachable-sha1-in-want",
    "filter",
    "object-format=sha1",
    "wait-for-done",
];

/// Parses a request body (already decompressed).
pub fn parse(body: &[u8]) -> Result<FetchRequest, String> {
    let pkts = pktline::parse(body).map_err(|e| e.to_string())?;
    let mut req = FetchRequest::default();
    let first = pkts.iter().find_map(|p| {
        if let Pkt::Data(d) = p {
            Some(pktline::text(d))
        } else {
            None
        }
    });
    match first {
        Some(l) if l.starts_with("command=") => parse_v2(&pkts, &mut req),
        Some(_) => parse_v0(&pkts, &mut req),
        None => return Err("empty request".into()),
    }
    Ok(req)
}

fn parse_v0(pkts: &[Pkt<'_>], req: &mut FetchRequest) {
    req.command = "fetch".into();
    let mut first_want = true;
    for p in pkts {
        let Pkt::Data(d) = p else { continue };
        let line = pktline::text(d);
        if let Some(rest) = line.strip_prefix("want ") {
            let mut parts = rest.split(' ');
            let oid = parts.next().unwrap_or("");
            if is_oid(oid) {
                req.wants.push(oid.to_string());
            } else {
                req.unsupported.push(format!("want {oid}"));
            }
            if first_want {
                for cap in parts.filter(|c| !c.is_empty()) {
                    let name = cap.split('=').next().unwrap_or(cap);
                    if cap.starts_with("agent=") || cap.starts_with("session-id=") {
                        continue;
                    }
                    if !SUPPORTED_V0_CAPS.contains(&cap) && !SUPPORTED_V0_CAPS.contains(&name) {
                        req.unsupported.push(cap.to_string());
                    }
                }
                first_want = false;
            }
        } else if line.starts_with("shallow ") || line.starts_with("deepen") {
            req.shallow = true;
        } else if let Some(f) = line.strip_prefix("filter ") {
            req.filter = Some(f.to_string());
        }
    }
}

fn parse_v2(pkts: &[Pkt<'_>], req: &mut FetchRequest) {
    req.v2 = true;
    let mut in_args = false;
    for p in pkts {
        match p {
            Pkt::Delim => in_args = true,
            Pkt::Flush | Pkt::ResponseEnd => {}
            Pkt::Data(d) => {
                let line = pktline::text(d);
                if !in_args {
                    if let Some(c) = line.strip_prefix("command=") {
                        req.command = c.to_string();
                    } else if let Some(f) = line.strip_prefix("object-format=") {
                        if f != "sha1" {
                            req.unsupported.push(line.to_string());
                        }
                    } else if !(line.starts_with("agent=") || line.starts_with("session-id=")) {
                        req.unsupported.push(line.to_string());
                    }
                    continue;
                }
                if let Some(oid) = line.strip_prefix("want ") {
                    if is_oid(oid) {
                        req.wants.push(oid.to_string());
                    } else {
                        req.unsupported.push(line.to_string());
                    }
                } else if line.starts_with("want-ref ") || line.starts_with("packfile-uris") {
                    // want-ref names refs, which the replica may have at another value.
                    req.unsupported.push(line.to_string());
                } else if line.starts_with("shallow ") || line.starts_with("deepen") {
                    req.shallow = true;
                } else if let Some(f) = line.strip_prefix("filter ") {
                    req.filter = Some(f.to_string());
                } else if !(line.starts_with("have ")
                    || matches!(
                        line,
                        "done"
                            | "thin-pack"
                            | "no-progress"
                            | "include-tag"
                            | "ofs-delta"
                            | "sideband-all"
                            | "wait-for-done"
                    ))
                {
                    req.unsupported.push(line.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::pktline::encode;

    fn body(lines: &[&str], delim_after: Option<usize>) -> Vec<u8> {
        let mut b = vec![];
        for (i, l) in lines.iter().enumerate() {
            b.extend_from_slice(&encode(format!("{l}\n").as_bytes()));
            if delim_after == Some(i) {
                b.extend_from_slice(b"0001");
            }
        }
        b.extend_from_slice(b"0000");
        b
    }

    #[test]
    fn v0_request() {
        let a = "a".repeat(40);
        let r = parse(&body(
            &[
                &format!(
                    "want {a} multi_ack_detailed side-band-64k thin-pack ofs-delta agent=git/2.47"
                ),
                "deepen 1",
            ],
            None,
        ))
        .unwrap();
        assert_eq!(r.wants, vec![a.clone()]);
        assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
        assert!(r.shallow);
        let r = parse(&body(&[&format!("want {a} object-format=sha256")], None)).unwrap();
        assert_eq!(r.unsupported, vec!["object-format=sha256"]);
    }

    #[test]
    fn v2_request() {
        let a = "a".repeat(40);
        let r = parse(&body(
            &[
                "command=fetch",
                "agent=git/2.47",
                "object-format=sha1",
                "thin-pack",
                "ofs-delta",
                &format!("want {a}"),
                "filter blob:none",
                "done",
            ],
            Some(2),
        ))
        .unwrap();
        assert!(r.v2);
        assert_eq!(r.command, "fetch");
        assert_eq!(r.wants, vec![a]);
        assert_eq!(r.filter.as_deref(), Some("blob:none"));
        assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
        let r = parse(&body(
            &["command=fetch", "want-ref refs/heads/main", "done"],
            Some(0),
        ))
        .unwrap();
        assert_eq!(r.unsupported.len(), 1);
        let r = parse(&body(&["command=ls-refs", "peel", "symrefs"], Some(0))).unwrap();
        assert_eq!(r.command, "ls-refs");
    }
}
