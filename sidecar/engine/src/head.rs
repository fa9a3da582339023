//! The request heads the native engine serves itself, and the upstream head it writes.
//!
//! The engine does not try to be a complete HTTP/1.1 parser.  It recognises a strict
//! subset of well-formed requests (origin-form target, one `Host`, no body or a
//! `Content-Length` one, no `Transfer-Encoding`, `Expect` or `Upgrade`, no forwarding
//! claims from a trusted proxy, only visible ASCII in the request line, field values
//! without control characters) and answers `Verdict::Python` for everything else: the
//! connection is then handed to the Python path at this request, whose llhttp parser
//! and `request.py` rules answer malformed requests (400, 501, 505...) and serve the
//! uncommon ones.  So the native side never has to reproduce an error answer, and it
//! must never *accept* a head that llhttp (strict) or `Request.check_head` refuses:
//! `tests/sidecar/test_engine_parity.py` checks that against the installed llhttp.
//!
//! The upstream head is built exactly as `Request.build_head` builds it: the request
//! line with `HTTP/1.1`, `Host` first, the other fields in order as `name: value`
//! minus hop-by-hop and Connection-named ones and the client's forwarding claims,
//! then the connection's forwarding lines and `Content-Length` when the client sent one.

/// Why a head was not taken, or what it is.
#[derive(Debug)]
pub enum Verdict {
    /// More bytes are needed (no blank line yet).
    Incomplete,
    /// Not in the native subset: the Python path takes the connection from here.
    Python,
    /// A head the engine serves.
    Native(Head),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
}

impl Method {
    fn parse(raw: &[u8]) -> Option<Method> {
        Some(match raw {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            _ => return None,
        })
    }

    /// RFC 9110 idempotent methods (`request.IDEMPOTENT`): retried on a fresh session.
    pub fn idempotent(self) -> bool {
        !matches!(self, Method::Post | Method::Patch)
    }
}

/// A parsed head: offsets into the buffer it was parsed from.
#[derive(Debug)]
pub struct Head {
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    pub method: Method,
    pub target: (usize, usize),
    pub v10: bool,
    /// The Host value as received (empty for an HTTP/1.0 request without one).
    pub host: (usize, usize),
    /// Lower-cased host without port, for routing (`http1.host_key`).
    pub host_key: Vec<u8>,
    /// `Content-Length` when the client sent one.
    pub length: Option<usize>,
    pub keep_alive: bool,
    /// The client sent X-Forwarded-For, Forwarded or X-Real-IP (replaced by ours).
    pub claims: bool,
    /// Fields forwarded as they came: (name, value) spans.
    pub fields: Vec<(usize, usize, usize, usize)>,
    /// Values of the fields slice rules look at: (index into `wanted`, value span).
    pub wanted: Vec<(usize, usize, usize)>,
}

impl Head {
    pub fn path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let t = &buf[self.target.0..self.target.1];
        match t.iter().position(|&b| b == b'?') {
            Some(q) => &t[..q],
            None => t,
        }
    }

    /// The value of wanted field `i` (repeated fields joined with ", "), if present.
    pub fn wanted_value(&self, buf: &[u8], i: usize) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for &(w, s, e) in &self.wanted {
            if w == i {
                match out.as_mut() {
                    None => out = Some(buf[s..e].to_vec()),
                    Some(v) => {
                        v.extend_from_slice(b", ");
                        v.extend_from_slice(&buf[s..e]);
                    }
                }
            }
        }
        out
    }

    /// `Request.build_head`: the upstream head for this request.
    pub fn build(&self, buf: &[u8], forwarding: &[u8], xff: &[u8], out: &mut Vec<u8>) {
        let method: &[u8] = match self.method {
            Method::Get => b"GET",
            Method::Head => b"HEAD",
            Method::Post => b"POST",
            Method::Put => b"PUT",
            Method::Delete => b"DELETE",
            Method::Options => b"OPTIONS",
            Method::Patch => b"PATCH",
        };
        out.extend_from_slice(method);
        out.push(b' ');
        out.extend_from_slice(&buf[self.target.0..self.target.1]);
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(&buf[self.host.0..self.host.1]);
        out.extend_from_slice(b"\r\n");
        for &(ns, ne, vs, ve) in &self.fields {
            out.extend_from_slice(&buf[ns..ne]);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&buf[vs..ve]);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(forwarding);
        out.extend_from_slice(xff);
        if let Some(n) = self.length {
            out.extend_from_slice(b"Content-Length: ");
            push_decimal(out, n as u64);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
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
    out.extend_from_slice(&digits[i..]);
}

/// What a field name means to the proxy (`http1.FIELDS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    Host,
    ContentLength,
    Connection,
    Hop,
    /// Transfer-Encoding, Expect, Upgrade: the Python path serves these.
    Python,
    Claim,
    Xfp,
}

fn field_kind(name: &[u8]) -> Field {
    let eq = |s: &[u8]| name.len() == s.len() && name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if eq(b"te") => Field::Hop,
        4 if eq(b"host") => Field::Host,
        6 if eq(b"expect") => Field::Python,
        7 if eq(b"upgrade") => Field::Python,
        7 if eq(b"trailer") => Field::Hop,
        9 if eq(b"forwarded") => Field::Claim,
        9 if eq(b"x-real-ip") => Field::Claim,
        10 if eq(b"connection") => Field::Connection,
        10 if eq(b"keep-alive") => Field::Hop,
        14 if eq(b"content-length") => Field::ContentLength,
        14 if eq(b"http2-settings") => Field::Hop,
        15 if eq(b"x-forwarded-for") => Field::Claim,
        16 if eq(b"proxy-connection") => Field::Hop,
        17 if eq(b"transfer-encoding") => Field::Python,
        17 if eq(b"x-forwarded-proto") => Field::Xfp,
        19 if eq(b"proxy-authorization") => Field::Hop,
        _ => Field::Other,
    }
}

/// RFC 9110 tchar.
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// A field value byte llhttp (strict) accepts: HTAB, SP, visible ASCII, obs-text.
pub fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// `http1.host_key`: lower-cased host without port; None when not a valid Host value.
pub fn host_key(value: &[u8]) -> Option<Vec<u8>> {
    const OK: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%";
    if value.iter().any(|b| !OK.contains(b)) {
        return None;
    }
    let lower: Vec<u8> = value.to_ascii_lowercase();
    if lower.first() == Some(&b'[') {
        let end = lower.iter().position(|&b| b == b']')?;
        let rest = &lower[end + 1..];
        if !rest.is_empty() && rest[0] != b':' {
            return None;
        }
        return Some(lower[..end + 1].to_vec());
    }
    match lower.iter().position(|&b| b == b':') {
        None => Some(lower),
        Some(colon) => {
            let port = &lower[colon + 1..];
            // str.isdigit: every byte a digit and at least one
            if !port.is_empty() && !port.iter().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(lower[..colon].to_vec())
        }
    }
}

pub struct Limits<'a> {
    /// `max_header_bytes`, counted as `Request.add_header` counts (name + value + 4).
    pub max_header_bytes: usize,
    /// Bodies up to this size are read natively; longer ones go to the Python path.
    pub max_body: usize,
    /// The peer is a trusted proxy: its forwarding claims need the Python path.
    pub trusted_peer: bool,
    /// Lower-case names of the fields slice rules look at.
    pub wanted: &'a [Vec<u8>],
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        match buf[i] {
            b'\r' => {
                return if i + 1 < buf.len() {
                    if buf[i + 1] == b'\n' {
                        Some(i)
                    } else {
                        None // bare CR: refused by llhttp, answered by the Python path
                    }
                } else {
                    Some(usize::MAX) // the LF is still to come
                };
            }
            b'\n' => return None, // bare LF
            _ => i += 1,
        }
    }
    Some(usize::MAX)
}

/// Recognise one request head at the start of `buf`.
pub fn parse(buf: &[u8], limits: &Limits<'_>) -> Verdict {
    // The request line.
    let line_end = match find_crlf(buf, 0) {
        None => return Verdict::Python,
        Some(usize::MAX) => {
            return if buf.len() > limits.max_header_bytes { Verdict::Python } else { Verdict::Incomplete };
        }
        Some(e) => e,
    };
    let line = &buf[..line_end];
    let sp1 = match line.iter().position(|&b| b == b' ') {
        Some(p) => p,
        None => return Verdict::Python,
    };
    let method = match Method::parse(&line[..sp1]) {
        Some(m) => m,
        None => return Verdict::Python,
    };
    let rest = &line[sp1 + 1..];
    let sp2 = match rest.iter().position(|&b| b == b' ') {
        Some(p) => p,
        None => return Verdict::Python,
    };
    let target = (sp1 + 1, sp1 + 1 + sp2);
    let target_bytes = &rest[..sp2];
    if target_bytes.first() != Some(&b'/') || !target_bytes.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Verdict::Python; // absolute-form, asterisk-form, odd bytes: the Python path
    }
    if target_bytes.len() > limits.max_header_bytes {
        return Verdict::Python; // 431
    }
    let v10 = match &rest[sp2 + 1..] {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Verdict::Python,
    };
    // The fields.
    let mut pos = line_end + 2;
    let mut counted = 0usize;
    let mut fields: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(8);
    let mut wanted: Vec<(usize, usize, usize)> = Vec::new();
    let mut host: Option<(usize, usize)> = None;
    let mut length: Option<usize> = None;
    let mut claims = false;
    let mut conn_close = false;
    let mut conn_keep = false;
    let mut named: Vec<Vec<u8>> = Vec::new();
    loop {
        let end = match find_crlf(buf, pos) {
            None => return Verdict::Python,
            Some(usize::MAX) => {
                return if buf.len() > limits.max_header_bytes { Verdict::Python } else { Verdict::Incomplete };
            }
            Some(e) => e,
        };
        if end == pos {
            pos += 2;
            break; // the blank line
        }
        let fl = &buf[pos..end];
        let colon = match fl.iter().position(|&b| b == b':') {
            Some(c) if c > 0 => c,
            _ => return Verdict::Python, // obs-fold, empty name, no colon
        };
        if !fl[..colon].iter().all(|&b| is_tchar(b)) {
            return Verdict::Python;
        }
        let mut vs = colon + 1;
        while vs < fl.len() && (fl[vs] == b' ' || fl[vs] == b'\t') {
            vs += 1;
        }
        if !fl[vs..].iter().all(|&b| is_value_byte(b)) {
            return Verdict::Python;
        }
        let (ns, ne, vstart, vend) = (pos, pos + colon, pos + vs, end);
        counted += (ne - ns) + (vend - vstart) + 4;
        if counted > limits.max_header_bytes {
            return Verdict::Python; // 431
        }
        let name = &buf[ns..ne];
        let value = &buf[vstart..vend];
        match field_kind(name) {
            Field::Other => {
                fields.push((ns, ne, vstart, vend));
                if !limits.wanted.is_empty() {
                    for (i, w) in limits.wanted.iter().enumerate() {
                        if w.len() == name.len() && name.eq_ignore_ascii_case(w) {
                            wanted.push((i, vstart, vend));
                        }
                    }
                }
            }
            Field::Host => {
                if host.is_some() {
                    return Verdict::Python; // 400: repeated Host
                }
                host = Some((vstart, vend));
            }
            Field::ContentLength => {
                if length.is_some() || value.is_empty() || value.len() > 15 || !value.iter().all(|b| b.is_ascii_digit())
                {
                    return Verdict::Python;
                }
                let mut n = 0usize;
                for &b in value {
                    n = n * 10 + (b - b'0') as usize;
                }
                length = Some(n);
            }
            Field::Connection => {
                for token in value.split(|&b| b == b',') {
                    let t = trim_ows(token);
                    if t.is_empty() {
                        continue;
                    }
                    if !t.iter().all(|&b| is_tchar(b)) {
                        return Verdict::Python;
                    }
                    if t.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        return Verdict::Python;
                    } else {
                        named.push(t.to_ascii_lowercase());
                    }
                }
            }
            Field::Hop | Field::Xfp => {}
            Field::Claim => {
                if limits.trusted_peer {
                    return Verdict::Python; // its chain is believed: realip.py walks it
                }
                claims = true;
            }
            Field::Python => return Verdict::Python,
        }
        pos = end + 2;
    }
    let (host, host_key) = match host {
        Some(h) => match host_key(&buf[h.0..h.1]) {
            Some(k) => (h, k),
            None => return Verdict::Python,
        },
        None if v10 => ((0, 0), Vec::new()),
        None => return Verdict::Python, // 400: HTTP/1.1 needs Host
    };
    if let Some(n) = length {
        if n > limits.max_body {
            return Verdict::Python;
        }
    }
    if !named.is_empty() {
        fields.retain(|&(ns, ne, _, _)| {
            let name = &buf[ns..ne];
            !named.iter().any(|n| n.len() == name.len() && name.eq_ignore_ascii_case(n))
        });
    }
    // llhttp_should_keep_alive: HTTP/1.1 unless "close"; HTTP/1.0 only with "keep-alive".
    let keep_alive = if v10 { conn_keep } else { !conn_close };
    Verdict::Native(Head { len: pos, method, target, v10, host, host_key, length, keep_alive, claims, fields, wanted })
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let Some((&b, rest)) = s.split_first() {
        if b == b' ' || b == b'\t' {
            s = rest;
        } else {
            break;
        }
    }
    while let Some((&b, rest)) = s.split_last() {
        if b == b' ' || b == b'\t' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits<'static> {
        Limits { max_header_bytes: 65536, max_body: 65536, trusted_peer: false, wanted: &[] }
    }

    fn native(raw: &[u8]) -> Head {
        match parse(raw, &limits()) {
            Verdict::Native(h) => h,
            v => panic!("{:?} for {:?}", v, String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn simple_get_is_rewritten_like_build_head() {
        let raw = b"GET /a?b HTTP/1.1\r\nHost: Ex.com:80\r\nUser-Agent: x\r\nAccept:  */* \r\n\r\nNEXT";
        let h = native(raw);
        assert_eq!(h.len, raw.len() - 4);
        assert_eq!(h.host_key, b"ex.com");
        assert_eq!(h.path(raw), b"/a");
        let mut out = Vec::new();
        h.build(raw, b"Via: 1.1 b\r\n", b"X-Forwarded-For: 1.2.3.4\r\n", &mut out);
        assert_eq!(
            out,
            b"GET /a?b HTTP/1.1\r\nHost: Ex.com:80\r\nUser-Agent: x\r\nAccept: */* \r\nVia: 1.1 b\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn hop_by_hop_and_named_fields_are_dropped() {
        let raw = b"GET / HTTP/1.1\r\nX-Secret: 1\r\nHost: a\r\nConnection: x-secret, keep-alive\r\nTE: trailers\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n";
        let h = native(raw);
        assert!(h.claims && h.keep_alive);
        let mut out = Vec::new();
        h.build(raw, b"", b"", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec());
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!native(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!native(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(native(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(native(b"GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn uncommon_and_malformed_heads_go_to_python() {
        for raw in [
            &b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n X: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET /x\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ] {
            assert!(matches!(parse(raw, &limits()), Verdict::Python), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n", &limits()), Verdict::Incomplete));
        assert!(matches!(parse(b"GET / HTTP/1.1\r", &limits()), Verdict::Incomplete));
        assert!(matches!(parse(b"", &limits()), Verdict::Incomplete));
    }

    #[test]
    fn host_keys() {
        assert_eq!(host_key(b"[::1]:80").unwrap(), b"[::1]");
        assert_eq!(host_key(b"A.b"), Some(b"a.b".to_vec()));
        assert_eq!(host_key(b"a:x"), None);
        assert_eq!(host_key(b"a:"), Some(b"a".to_vec()));
        assert_eq!(host_key(b"[::1]x"), None);
    }
}
