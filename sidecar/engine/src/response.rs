//! One response on a session, re-framed for the client: the native twin of
//! `sessionconn.SessionConn` (parsing, RETIRE races) and `ClientProtocol.resp_*`
//! (the client-side head and framing), sans-IO.
//!
//! `Resp::feed` takes the bytes of one session read and appends what the client must
//! receive to `out`: the status line re-emitted as `HTTP/1.1` with the service's reason,
//! the fields minus hop-by-hop and Connection-named ones, the proxy's own framing
//! (`Content-Length` passed through; chunked and close-delimited bodies re-chunked for
//! HTTP/1.1 clients, close-delimited for HTTP/1.0 ones), interim 1xx heads other than
//! 100 for HTTP/1.1 clients.  Trailers are dropped.  Anything that is not a strictly
//! well-formed response fails the request (`Outcome::Fail`): the caller answers 502 or
//! cuts a response already under way, and discards the session.
//!
//! Before the status line an exact `BDREG/1 RETIRE` line is stripped (the service
//! retired the session while our request crossed it); after the response only that
//! line, or its beginning, may follow.

use crate::head::{is_tchar, is_value_byte};

mod wire;
use wire::{chunk_size, find_blank, hex, is_hop, push_fields, status_line, trim};

pub const RETIRE_LINE: &[u8] = b"BDREG/1 RETIRE\r\n";
pub const MAX_HEAD: usize = 64 * 1024;

/// How a finished session goes back (`control.ReleaseState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Clean and reusable; `pre` holds the beginning of a RETIRE line that followed.
    Idle {
        pre: Vec<u8>,
    },
    Retired,
    Broken,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    More,
    Done(Release),
    Fail,
}

/// What the client side of this request allows.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub head_only: bool,
    pub v10: bool,
    /// The client connection may stay open after this response (its keep-alive,
    /// unless the worker drains with nothing else queued).
    pub keep_allowed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Head,
    Body,
    Done,
}

/// How the body is read from the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    None,
    Length(u64),
    Chunked(Chunk),
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size {
        digits: u8,
        value: u64,
    },
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer section: a field line (or the blank line) is being read.
    Trailer {
        cr: bool,
        empty: bool,
    },
}

/// How the body is framed towards the client (`http1.BodyMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Raw,
    Chunk,
    None,
}

pub struct Resp {
    phase: Phase,
    pre: Vec<u8>,
    hbuf: Vec<u8>,
    head_total: usize,
    /// A response byte arrived (RETIRE lines aside): no retry on another session.
    pub started: bool,
    retired: bool,
    close: bool,
    pub status: u16,
    /// The final response head went to the client.
    pub head_sent: bool,
    src: Src,
    pub framing: Framing,
    /// The client connection stays open after this response.
    pub keep: bool,
    /// The client must be closed after this response because its body is close-delimited.
    pub eof_framed: bool,
    /// Body bytes relayed (for progress and the large-body counters).
    pub body_bytes: u64,
}

impl Default for Resp {
    fn default() -> Self {
        Resp::new(Vec::new())
    }
}

impl Resp {
    /// A response about to be read; `pre` is the beginning of a RETIRE line the idle
    /// session received before this request.
    pub fn new(pre: Vec<u8>) -> Resp {
        Resp {
            phase: Phase::Start,
            pre,
            hbuf: Vec::new(),
            head_total: 0,
            started: false,
            retired: false,
            close: false,
            status: 0,
            head_sent: false,
            src: Src::None,
            framing: Framing::None,
            keep: true,
            eof_framed: false,
            body_bytes: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether a read now would belong to this response's body (for flow control).
    pub fn in_body(&self) -> bool {
        self.phase == Phase::Body
    }

    pub fn feed(&mut self, data: &[u8], ctx: &Ctx, out: &mut Vec<u8>) -> Outcome {
        if data.is_empty() {
            return Outcome::More;
        }
        if self.phase == Phase::Start {
            self.phase = Phase::Head;
            self.started = true;
            if !self.pre.is_empty() || data[0] == b'B' {
                let mut owned = std::mem::take(&mut self.pre);
                owned.extend_from_slice(data);
                let n = owned.len().min(RETIRE_LINE.len());
                if owned[..n] == RETIRE_LINE[..n] {
                    if n < RETIRE_LINE.len() {
                        self.pre = owned; // the rest of the line is still to come
                        self.phase = Phase::Start;
                        self.started = false;
                        return Outcome::More;
                    }
                    self.retired = true;
                    owned.drain(..RETIRE_LINE.len());
                    if owned.is_empty() {
                        self.phase = Phase::Start;
                        self.started = false;
                        return Outcome::More;
                    }
                }
                return self.run(&owned, ctx, out);
            }
        }
        if !self.hbuf.is_empty() {
            // A head split over reads (rare): judge it whole.
            let mut owned = std::mem::take(&mut self.hbuf);
            owned.extend_from_slice(data);
            return self.run(&owned, ctx, out);
        }
        self.run(data, ctx, out)
    }

    /// The session reached end-of-file with this response in flight.
    pub fn eof(&mut self, out: &mut Vec<u8>) -> Outcome {
        if self.started && self.phase == Phase::Body && self.src == Src::Eof {
            // Close-delimited body: end-of-file is its end.  The session is gone.
            if self.framing == Framing::Chunk {
                out.extend_from_slice(b"0\r\n\r\n");
            }
            self.phase = Phase::Done;
            return Outcome::Done(Release::Broken);
        }
        Outcome::Fail
    }

    fn run(&mut self, mut data: &[u8], ctx: &Ctx, out: &mut Vec<u8>) -> Outcome {
        loop {
            match self.phase {
                Phase::Head => {
                    let end = match find_blank(data, 0) {
                        Some(e) => e,
                        None => {
                            if self.head_total + data.len() > MAX_HEAD {
                                return Outcome::Fail;
                            }
                            self.hbuf.extend_from_slice(data);
                            return Outcome::More;
                        }
                    };
                    self.head_total += end;
                    if self.head_total > MAX_HEAD {
                        return Outcome::Fail;
                    }
                    if !self.head(&data[..end], ctx, out) {
                        return Outcome::Fail;
                    }
                    data = &data[end..];
                    if self.phase == Phase::Done {
                        return self.finish(data);
                    }
                }
                Phase::Body => {
                    let used = match self.body(data, out) {
                        Ok(n) => n,
                        Err(()) => return Outcome::Fail,
                    };
                    data = &data[used..];
                    if self.phase == Phase::Done {
                        if self.framing == Framing::Chunk {
                            out.extend_from_slice(b"0\r\n\r\n");
                        }
                        return self.finish(data);
                    }
                    return Outcome::More;
                }
                Phase::Start | Phase::Done => return Outcome::Fail,
            }
        }
    }

    /// The response is complete; `extra` are the bytes that followed it in this read.
    fn finish(&mut self, extra: &[u8]) -> Outcome {
        self.phase = Phase::Done;
        let mut state = if self.retired || self.close { Release::Retired } else { Release::Idle { pre: Vec::new() } };
        if !extra.is_empty() {
            if extra == RETIRE_LINE {
                state = Release::Retired;
            } else if RETIRE_LINE.starts_with(extra) && matches!(state, Release::Idle { .. }) {
                state = Release::Idle { pre: extra.to_vec() };
            } else {
                state = Release::Broken;
            }
        }
        Outcome::Done(state)
    }

    /// One complete head (interim or final); false when it is not well-formed.
    fn head(&mut self, raw: &[u8], ctx: &Ctx, out: &mut Vec<u8>) -> bool {
        // Status line: HTTP/1.x SP 3DIGIT [SP reason] CRLF
        let line_end = match raw.windows(2).position(|w| w == b"\r\n") {
            Some(e) => e,
            None => return false,
        };
        let line = &raw[..line_end];
        if line.len() < 12 || &line[..7] != b"HTTP/1." || line[8] != b' ' {
            return false;
        }
        let v11 = match line[7] {
            b'1' => true,
            b'0' => false,
            _ => return false,
        };
        if !line[9..12].iter().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let status = (line[9] - b'0') as u16 * 100 + (line[10] - b'0') as u16 * 10 + (line[11] - b'0') as u16;
        if !(100..=599).contains(&status) {
            return false;
        }
        let reason: &[u8] = match line.len() {
            12 => b"",
            _ if line[12] == b' ' => &line[13..],
            _ => return false,
        };
        if !reason.iter().all(|&b| is_value_byte(b)) {
            return false;
        }
        // Fields.
        let mut fields: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(8);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut named: Vec<Vec<u8>> = Vec::new();
        let mut conn_close = false;
        let mut pos = line_end + 2;
        loop {
            let end = match raw[pos..].windows(2).position(|w| w == b"\r\n") {
                Some(e) => pos + e,
                None => return false,
            };
            if end == pos {
                break;
            }
            let fl = &raw[pos..end];
            if fl.iter().any(|&b| b == b'\r' || b == b'\n') {
                return false;
            }
            let colon = match fl.iter().position(|&b| b == b':') {
                Some(c) if c > 0 => c,
                _ => return false,
            };
            if !fl[..colon].iter().all(|&b| is_tchar(b)) {
                return false;
            }
            let mut vs = colon + 1;
            while vs < fl.len() && (fl[vs] == b' ' || fl[vs] == b'\t') {
                vs += 1;
            }
            let value = &fl[vs..];
            if !value.iter().all(|&b| is_value_byte(b)) {
                return false;
            }
            let name = &fl[..colon];
            match name.len() {
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    if length.is_some()
                        || value.is_empty()
                        || value.len() > 18
                        || !value.iter().all(|b| b.is_ascii_digit())
                    {
                        return false;
                    }
                    let mut n = 0u64;
                    for &b in value {
                        n = n * 10 + (b - b'0') as u64;
                    }
                    length = Some(n);
                    fields.push((pos, pos + colon, pos + vs, end));
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    // Only "chunked" itself: another coding cannot be re-framed faithfully.
                    if chunked || !trim(value).eq_ignore_ascii_case(b"chunked") {
                        return false;
                    }
                    chunked = true;
                }
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in value.split(|&b| b == b',') {
                        let t = trim(token);
                        if t.eq_ignore_ascii_case(b"close") {
                            conn_close = true;
                        } else if !t.is_empty()
                            && !t.eq_ignore_ascii_case(b"keep-alive")
                            && !t.eq_ignore_ascii_case(b"upgrade")
                        {
                            named.push(t.to_ascii_lowercase());
                        }
                    }
                }
                _ if is_hop(name) => {}
                _ => fields.push((pos, pos + colon, pos + vs, end)),
            }
            pos = end + 2;
        }
        if length.is_some() && chunked {
            return false; // llhttp refuses both as well
        }
        // HTTP/1.0 keep-alive is not worth the risk: such a session is retired after use.
        if conn_close || !v11 {
            self.close = true;
        }
        if !named.is_empty() {
            fields.retain(|&(ns, ne, _, _)| {
                let n = &raw[ns..ne];
                !named.iter().any(|x| x.len() == n.len() && n.eq_ignore_ascii_case(x))
            });
        }
        if (100..200).contains(&status) {
            if status == 101 {
                return false; // switching protocols on a request that did not ask
            }
            if !ctx.v10 && status != 100 {
                status_line(out, status, reason);
                push_fields(out, raw, &fields);
                out.extend_from_slice(b"\r\n");
            }
            return true; // the final head follows
        }
        self.status = status;
        self.src = if ctx.head_only || status == 204 || status == 304 {
            Src::None
        } else if chunked {
            Src::Chunked(Chunk::Size { digits: 0, value: 0 })
        } else if let Some(n) = length {
            if n == 0 {
                Src::None
            } else {
                Src::Length(n)
            }
        } else {
            Src::Eof
        };
        // body_mode(status, head_only, length, v10)
        let body_allowed = !(ctx.head_only || status == 204 || status == 304);
        self.framing = if !body_allowed {
            Framing::None
        } else if length.is_some() {
            Framing::Raw
        } else if ctx.v10 {
            self.eof_framed = true;
            Framing::Raw
        } else {
            Framing::Chunk
        };
        self.keep = ctx.keep_allowed && !self.eof_framed;
        status_line(out, status, reason);
        push_fields(out, raw, &fields);
        if self.framing == Framing::Chunk {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if !self.keep {
            out.extend_from_slice(b"Connection: close\r\n\r\n");
        } else if ctx.v10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n\r\n");
        } else {
            out.extend_from_slice(b"\r\n");
        }
        self.head_sent = true;
        self.phase = if self.src == Src::None { Phase::Done } else { Phase::Body };
        true
    }

    /// Body bytes of one read; how many were used (the rest follows the response).
    fn body(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, ()> {
        match self.src {
            Src::Length(left) => {
                let n = (data.len() as u64).min(left) as usize;
                self.emit(&data[..n], out);
                if left == n as u64 {
                    self.phase = Phase::Done;
                } else {
                    self.src = Src::Length(left - n as u64);
                }
                Ok(n)
            }
            Src::Eof => {
                self.emit(data, out);
                Ok(data.len())
            }
            Src::Chunked(state) => self.chunked(state, data, out),
            Src::None => Ok(0),
        }
    }

    fn emit(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.body_bytes += data.len() as u64;
        if self.framing == Framing::Chunk {
            chunk_size(out, data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else if self.framing == Framing::Raw {
            out.extend_from_slice(data);
        }
    }

    fn chunked(&mut self, mut state: Chunk, data: &[u8], out: &mut Vec<u8>) -> Result<usize, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if let Chunk::Data(left) = state {
                // Data: one client chunk per contiguous run in this read.
                let n = ((data.len() - i) as u64).min(left) as usize;
                self.emit(&data[i..i + n], out);
                i += n;
                state = if left == n as u64 { Chunk::DataCr } else { Chunk::Data(left - n as u64) };
                continue;
            }
            i += 1;
            state = match state {
                Chunk::Size { digits, value } => match hex(b) {
                    Some(d) if digits < 15 => Chunk::Size { digits: digits + 1, value: value * 16 + d as u64 },
                    Some(_) => return Err(()),
                    None if digits > 0 && b == b';' => Chunk::Ext(value),
                    None if digits > 0 && b == b'\r' => Chunk::SizeLf(value),
                    None => return Err(()),
                },
                Chunk::Ext(v) => match b {
                    b'\r' => Chunk::SizeLf(v),
                    b'\t' | 0x20..=0x7e => Chunk::Ext(v),
                    _ => return Err(()),
                },
                Chunk::SizeLf(v) => match (b, v) {
                    (b'\n', 0) => Chunk::Trailer { cr: false, empty: true },
                    (b'\n', v) => Chunk::Data(v),
                    _ => return Err(()),
                },
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size { digits: 0, value: 0 },
                Chunk::DataCr | Chunk::DataLf | Chunk::Data(_) => return Err(()),
                Chunk::Trailer { cr, empty } => {
                    // Trailer fields count against the head limit, and are dropped.
                    self.head_total += 1;
                    if self.head_total > MAX_HEAD {
                        return Err(());
                    }
                    match (cr, b) {
                        (true, b'\n') if empty => {
                            self.phase = Phase::Done;
                            self.src = Src::Chunked(state);
                            return Ok(i);
                        }
                        (true, b'\n') => Chunk::Trailer { cr: false, empty: true },
                        (false, b'\r') => Chunk::Trailer { cr: true, empty },
                        (false, b) if is_value_byte(b) => Chunk::Trailer { cr: false, empty: false },
                        _ => return Err(()),
                    }
                }
            };
        }
        self.src = Src::Chunked(state);
        Ok(i)
    }
}

#[cfg(test)]
mod tests;
