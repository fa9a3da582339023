//! The byte-level pieces of the response relay: the status line and fields it writes,
//! chunk-size lines, hop-by-hop names, and the scans for a head's end.

use crate::head::push_decimal;

pub(super) fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

pub(super) fn chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = HEX[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

pub(super) fn push_fields(out: &mut Vec<u8>, raw: &[u8], fields: &[(usize, usize, usize, usize)]) {
    for &(ns, ne, vs, ve) in fields {
        out.extend_from_slice(&raw[ns..ne]);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&raw[vs..ve]);
        out.extend_from_slice(b"\r\n");
    }
}

pub(super) fn is_hop(name: &[u8]) -> bool {
    let eq = |s: &[u8]| name.len() == s.len() && name.eq_ignore_ascii_case(s);
    eq(b"keep-alive")
        || eq(b"proxy-connection")
        || eq(b"proxy-authorization")
        || eq(b"te")
        || eq(b"trailer")
        || eq(b"http2-settings")
        || eq(b"upgrade")
}

pub(super) fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t').unwrap_or(s.len());
    let end = s.iter().rposition(|&b| b != b' ' && b != b'\t').map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// The end of a head (after its blank line) at or after `from`.
pub(super) fn find_blank(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i + 3 < buf.len() {
        match memchr_cr(&buf[i..]) {
            None => return None,
            Some(p) => {
                let at = i + p;
                if at + 3 < buf.len() && &buf[at..at + 4] == b"\r\n\r\n" {
                    return Some(at + 4);
                }
                i = at + 1;
            }
        }
    }
    None
}

fn memchr_cr(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\r')
}
