//! Reading what the primary advertised to a client: the tips it may fetch.
//!
//! Protocol v0/v1: the `info/refs?service=git-upload-pack` response lists `<oid> <ref>` lines.
//! Protocol v2: refs come from the `ls-refs` command's response (`<oid> <ref> [attrs]`), whose
//! `peeled:<oid>` attributes also name fetchable objects (annotated tags' targets).

use super::pktline::{self, Pkt};
use std::collections::HashSet;

/// Object ids advertised in a v0/v1 `info/refs` response body, or `None` when the body is not
/// a ref advertisement (e.g. a v2 capability advertisement, which lists no refs).
pub fn v0_tips(body: &[u8]) -> Option<HashSet<String>> {
    let pkts = pktline::parse(body).ok()?;
    let mut tips = HashSet::new();
    let mut saw_ref = false;
    for p in pkts {
        let Pkt::Data(d) = p else { continue };
        let line = pktline::text(d);
        if line.starts_with("# service=") {
            continue;
        }
        if line == "version 2" {
            return None;
        }
        let line = line.split('\0').next().unwrap_or("");
        let Some((oid, name)) = line.split_once(' ') else {
            continue;
        };
        if !is_oid(oid) {
            continue;
        }
        saw_ref = true;
        // `capabilities^{}` with a zero oid means an empty repository.
        if name != "capabilities^{}" {
            tips.insert(oid.to_string());
        }
    }
    saw_ref.then_some(tips)
}

/// Object ids in a v2 `ls-refs` response body (including `peeled:` targets).
pub fn v2_ls_refs_tips(body: &[u8]) -> Option<HashSet<String>> {
    let pkts = pktline::parse(body).ok()?;
    let mut tips = HashSet::new();
    for p in pkts {
        let Pkt::Data(d) = p else { continue };
        let line = pktline::text(d);
        let mut parts = line.split(' ');
        let oid = parts.next()?;
        if oid == "unborn" {
            continue;
        }
        if !is_oid(oid) {
            return None;
        }
        tips.insert(oid.to_string());
        for attr in parts {
            if let Some(peeled) = attr.strip_prefix("peeled:")
                && is_oid(peeled)
            {
                tips.insert(peeled.to_string());
            }
        }
    }
    Some(tips)
}

/// A hex object id (SHA-1 or SHA-256).
pub fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64)
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::pktline::encode;

    #[test]
    fn v0_advertisement() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let mut body = encode(b"# service=git-upload-pack\n");
        body.extend_from_slice(b"0000");
        body.extend_from_slice(&encode(
            format!("{a} HEAD\0multi_ack side-band-64k\n").as_bytes(),
        ));
        body.extend_from_slice(&encode(format!("{a} refs/heads/main\n").as_bytes()));
        body.extend_from_slice(&encode(format!("{b} refs/tags/v1^{{}}\n").as_bytes()));
        body.extend_from_slice(b"0000");
        let tips = v0_tips(&body).unwrap();
        assert_eq!(tips, [a, b].into_iter().collect());
        let mut v2 = encode(b"# service=git-upload-pack\n");
        v2.extend_from_slice(b"0000");
        v2.extend_from_slice(&encode(b"version 2\n"));
        assert!(v0_tips(&v2).is_none());
    }

    #[test]
    fn v2_ls_refs() {
        let a = "a".repeat(40);
        let c = "c".repeat(40);
        let mut body = encode(format!("{a} refs/heads/main symref-target:x\n").as_bytes());
        body.extend_from_slice(&encode(format!("{a} refs/tags/v1 peeled:{c}\n").as_bytes()));
        body.extend_from_slice(b"0000");
        assert_eq!(
            v2_ls_refs_tips(&body).unwrap(),
            [a, c].into_iter().collect()
        );
    }
}
