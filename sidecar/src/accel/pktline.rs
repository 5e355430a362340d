//! Git pkt-line framing (gitprotocol-common): 4 hex digits of length, then the payload;
//! `0000` flush, `0001` delimiter (v2), `0002` response end (v2).

/// One pkt-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt<'a> {
    Data(&'a [u8]),
    Flush,
    Delim,
    ResponseEnd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PktError {
    #[error("truncated pkt-line")]
    Truncated,
    #[error("bad pkt-line length")]
    BadLength,
}

/// Splits a buffer into pkt-lines. Trailing bytes that do not form a whole pkt-line are an error.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Pkt<'_>>, PktError> {
    let mut out = vec![];
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err(PktError::Truncated);
        }
        let len = std::str::from_utf8(&buf[..4])
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or(PktError::BadLength)?;
        match len {
            0 => out.push(Pkt::Flush),
            1 => out.push(Pkt::Delim),
            2 => out.push(Pkt::ResponseEnd),
            3 => return Err(PktError::BadLength),
            n => {
                if buf.len() < n {
                    return Err(PktError::Truncated);
                }
                out.push(Pkt::Data(&buf[4..n]));
                buf = &buf[n..];
                continue;
            }
        }
        buf = &buf[4..];
    }
    Ok(out)
}

/// Encodes one data pkt-line.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", payload.len() + 4).into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The payload as text without its trailing newline.
pub fn text(payload: &[u8]) -> &str {
    std::str::from_utf8(payload)
        .unwrap_or("")
        .trim_end_matches('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = encode(b"want abc\n");
        buf.extend_from_slice(b"0000");
        buf.extend_from_slice(b"0001");
        buf.extend_from_slice(&encode(b"done\n"));
        let p = parse(&buf).unwrap();
        assert_eq!(
            p,
            vec![
                Pkt::Data(b"want abc\n"),
                Pkt::Flush,
                Pkt::Delim,
                Pkt::Data(b"done\n")
            ]
        );
        assert_eq!(parse(b"00"), Err(PktError::Truncated));
        assert_eq!(parse(b"zzzz"), Err(PktError::BadLength));
        assert_eq!(parse(b"0010abc"), Err(PktError::Truncated));
    }
}
