//! Unit tests of the response relay: framings, split reads, interim heads, `RETIRE`
//! races and the heads refused.

use super::*;

fn relay(reads: &[&[u8]], ctx: Ctx) -> (Vec<u8>, Outcome) {
    let mut r = Resp::new(Vec::new());
    let mut out = Vec::new();
    for read in reads {
        match r.feed(read, &ctx, &mut out) {
            Outcome::More => continue,
            o => return (out, o),
        }
    }
    (out, Outcome::More)
}

const KEEP: Ctx = Ctx { head_only: false, v10: false, keep_allowed: true };

#[test]
fn length_response_passes_through() {
    let (out, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nok"], KEEP);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: y\r\n\r\nok".to_vec());
    assert_eq!(o, Outcome::Done(Release::Idle { pre: vec![] }));
}

#[test]
fn split_head_and_body() {
    let (out, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-", b"Length: 3\r", b"\n\r\na", b"bc"], KEEP);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc".to_vec());
    assert!(matches!(o, Outcome::Done(Release::Idle { .. })));
}

#[test]
fn chunked_is_rechunked_and_trailers_dropped() {
    let raw: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n8;x=y\r\nchunked \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n";
    for cut in 1..raw.len() {
        let (out, o) = relay(&[&raw[..cut], &raw[cut..]], KEEP);
        assert!(matches!(o, Outcome::Done(Release::Idle { .. })), "cut {cut}: {o:?}");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(text.ends_with("0\r\n\r\n"));
        // de-chunk what the client got
        let mut body = Vec::new();
        let mut rest = &text.as_bytes()[text.find("\r\n\r\n").unwrap() + 4..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap(), 16).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 4 + n..];
        }
        assert_eq!(body, b"hello chunked world");
    }
}

#[test]
fn close_delimited_to_http10_and_11() {
    let mut r = Resp::new(Vec::new());
    let mut out = Vec::new();
    assert_eq!(r.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil", &KEEP, &mut out), Outcome::More);
    assert_eq!(r.eof(&mut out), Outcome::Done(Release::Broken));
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nuntil\r\n0\r\n\r\n".to_vec());
    let mut r = Resp::new(Vec::new());
    let mut out = Vec::new();
    let v10 = Ctx { head_only: false, v10: true, keep_allowed: true };
    assert_eq!(r.feed(b"HTTP/1.0 200 OK\r\n\r\nabc", &v10, &mut out), Outcome::More);
    assert!(!r.keep);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc".to_vec());
}

#[test]
fn retire_races() {
    let (out, o) = relay(&[b"BDREG/1 RE", b"TIRE\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], KEEP);
    assert_eq!(o, Outcome::Done(Release::Retired));
    assert!(out.starts_with(b"HTTP/1.1 200 OK"));
    let (_, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxBDREG/1 RETIRE\r\n"], KEEP);
    assert_eq!(o, Outcome::Done(Release::Retired));
    let (_, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxBDREG"], KEEP);
    assert_eq!(o, Outcome::Done(Release::Idle { pre: b"BDREG".to_vec() }));
    let (_, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxjunk"], KEEP);
    assert_eq!(o, Outcome::Done(Release::Broken));
}

#[test]
fn interim_heads() {
    let (out, o) = relay(&[b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], KEEP);
    assert!(matches!(o, Outcome::Done(_)));
    assert_eq!(
        out,
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec()
    );
}

#[test]
fn head_and_no_body_statuses() {
    let head = Ctx { head_only: true, v10: false, keep_allowed: true };
    let (out, o) = relay(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"], head);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec());
    assert!(matches!(o, Outcome::Done(Release::Idle { .. })));
    let (out, o) = relay(&[b"HTTP/1.1 304 X\r\n\r\n"], KEEP);
    assert_eq!(out, b"HTTP/1.1 304 X\r\n\r\n".to_vec());
    assert!(matches!(o, Outcome::Done(Release::Idle { .. })));
}

#[test]
fn hop_by_hop_and_bad_heads() {
    let (out, _) = relay(&[b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n"], KEEP);
    assert_eq!(out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec());
    for bad in [
        &b"NOT-HTTP garbage\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 101 Switching\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    ] {
        assert_eq!(relay(&[bad], KEEP).1, Outcome::Fail, "{:?}", String::from_utf8_lossy(bad));
    }
    let huge = [b"HTTP/1.1 200 OK\r\nX: ".to_vec(), vec![b'a'; 70000]].concat();
    assert_eq!(relay(&[&huge], KEEP).1, Outcome::Fail);
}
