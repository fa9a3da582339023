//! The session side of the native engine: `sessionconn.SessionConn` for sessions the
//! engine serves, idle watching included (a RETIRE line or end-of-file on an idle
//! session gives it back at once, so it is never handed to a request after it ended).

use crate::core::{Core, SState, Session, T_SESSION};
use crate::response::{Ctx, Outcome, Release, Resp, RETIRE_LINE};
use crate::sys;

/// A session the pool adopted (a GRANT), as `nativepool` describes it: the acceptor's
/// session id, the descriptor the engine owns from now on, the service and registrant,
/// the (service, slice) key it serves, the slice it is leased for and its control epoch.
pub struct Adopted<'a> {
    pub sid: i64,
    pub fd: i32,
    pub service: &'a str,
    pub registrant: i64,
    pub key_service: &'a str,
    pub key_slice: &'a str,
    pub lease_slice: &'a str,
    pub epoch: u64,
}

impl Core {
    /// A session the pool adopted (a GRANT): watched from now on, not yet idle.
    pub fn add_session(&mut self, a: Adopted<'_>) -> std::io::Result<u64> {
        let Adopted { sid, fd, service, registrant, key_service, key_slice, lease_slice, epoch } = a;
        sys::set_nonblocking(fd)?;
        if sys::is_tcp(fd) {
            sys::set_nodelay(fd);
        }
        let svc = self.services.id(key_service);
        let sl = self.slices.id(key_slice);
        let key = self.key(svc, sl);
        self.next_handle += 1;
        let handle = self.next_handle;
        let session = Session {
            handle,
            sid,
            fd,
            service: service.to_string(),
            slice: lease_slice.to_string(),
            registrant,
            key,
            epoch,
            held: true,
            state: SState::Idle,
            owner: None,
            pre: Vec::new(),
            wpend: Vec::new(),
            interest: sys::IN,
            resp: Resp::default(),
            idle_since: sys::now(),
            discard_until: 0.0,
            head_only: false,
        };
        let (slot, gen) = self.sessions.insert(session);
        if let Err(e) = self.ep.add(fd, crate::core::token(T_SESSION, slot, gen), sys::IN) {
            self.sessions.remove(slot);
            return Err(e);
        }
        self.by_handle.insert(handle, slot);
        Ok(handle)
    }

    fn session_interest(&mut self, slot: usize, paused: Option<bool>) {
        let gen = self.sessions.gens[slot];
        let s = self.sessions.at(slot);
        if s.state == SState::Out {
            return;
        }
        let reading = match paused {
            Some(p) => !p,
            None => s.interest & sys::IN != 0,
        };
        let mut want = if reading { sys::IN } else { 0 };
        if !s.wpend.is_empty() {
            want |= sys::OUT;
        }
        if want != s.interest {
            s.interest = want;
            let _ = self.ep.modify(s.fd, crate::core::token(T_SESSION, slot, gen), want);
        }
    }

    pub fn session_pause(&mut self, slot: usize) {
        self.session_interest(slot, Some(true));
    }

    pub fn session_resume(&mut self, slot: usize) {
        self.session_interest(slot, Some(false));
    }

    pub fn session_writable(&mut self, slot: usize) {
        let res = {
            let s = self.sessions.at(slot);
            let mut res = Ok(());
            while !s.wpend.is_empty() {
                match sys::send(s.fd, &s.wpend) {
                    Ok(n) => {
                        s.wpend.drain(..n);
                    }
                    Err(e) => {
                        if !sys::would_block(&e) {
                            res = Err(());
                        }
                        break;
                    }
                }
            }
            res
        };
        if res.is_err() {
            self.session_failed(slot);
            return;
        }
        self.session_interest(slot, None);
    }

    pub fn session_readable(&mut self, slot: usize) {
        let fd = self.sessions.at(slot).fd;
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = sys::recv(fd, &mut scratch);
        match res {
            Ok(0) => {
                self.scratch = scratch;
                self.session_eof(slot);
            }
            Ok(n) => {
                match self.sessions.at(slot).state {
                    SState::Idle => self.idle_data(slot, &scratch[..n]),
                    SState::Busy => self.relay(slot, &scratch[..n]),
                    SState::Discard => self.discard(slot, &scratch[..n]),
                    SState::Out => {}
                }
                self.scratch = scratch;
            }
            Err(e) => {
                self.scratch = scratch;
                if !sys::would_block(&e) {
                    self.session_eof(slot);
                }
            }
        }
    }

    fn session_eof(&mut self, slot: usize) {
        match self.sessions.at(slot).state {
            SState::Idle => self.lose(slot, "broken"),
            SState::Busy => {
                let owner = self.sessions.at(slot).owner;
                let outcome = match owner {
                    Some((ci, gen)) if self.clients.alive(ci, gen) => {
                        let s = self.sessions.items[slot].as_mut().expect("session");
                        let c = self.clients.items[ci].as_mut().expect("client");
                        s.resp.eof(&mut c.out)
                    }
                    _ => Outcome::Fail,
                };
                self.relay_outcome(slot, outcome, 0);
            }
            SState::Discard => {
                let mut sink = Vec::new();
                let outcome = self.sessions.at(slot).resp.eof(&mut sink);
                self.discard_outcome(slot, outcome);
            }
            SState::Out => {}
        }
    }

    /// Bytes on an idle session: only a RETIRE line is allowed (`SessionConn._idle_data`).
    fn idle_data(&mut self, slot: usize, data: &[u8]) {
        let s = self.sessions.at(slot);
        let mut buf = std::mem::take(&mut s.pre);
        buf.extend_from_slice(data);
        if buf.len() <= RETIRE_LINE.len() && RETIRE_LINE.starts_with(&buf) {
            if buf.len() < RETIRE_LINE.len() {
                s.pre = buf;
                return;
            }
            return self.lose(slot, "retired");
        }
        self.lose(slot, "broken") // any other byte on an idle session is a protocol error
    }

    /// An idle session ended under us (`LeasePool.lost`): out of the book, back to the acceptor.
    fn lose(&mut self, slot: usize, state: &'static str) {
        self.record_event("lost", slot, state);
        self.give_back(slot, state);
    }

    fn relay(&mut self, slot: usize, data: &[u8]) {
        let (ci, gen) = match self.sessions.at(slot).owner {
            Some(o) => o,
            None => return,
        };
        if !self.clients.alive(ci, gen) {
            return;
        }
        let ctx: Ctx = self.ctx(ci);
        let spilling = self.clients.at(ci).spill.is_some();
        let (outcome, before, parked) = {
            let s = self.sessions.items[slot].as_mut().expect("session");
            let c = self.clients.items[ci].as_mut().expect("client");
            c.progress += 1;
            if spilling {
                // Behind the bytes already parked for this slow client.
                let mut out = Vec::new();
                (s.resp.feed(data, &ctx, &mut out), usize::MAX, out)
            } else {
                let before = c.out.len();
                (s.resp.feed(data, &ctx, &mut c.out), before, Vec::new())
            }
        };
        if !parked.is_empty() && outcome != Outcome::Fail {
            self.client_write(ci, &parked);
        }
        self.relay_outcome(slot, outcome, before);
    }

    /// What a session read ended in, for the client that owns the request.
    fn relay_outcome(&mut self, slot: usize, outcome: Outcome, before: usize) {
        let (ci, gen) = match self.sessions.at(slot).owner {
            Some(o) => o,
            None => {
                if outcome != Outcome::More {
                    self.release(slot, Release::Broken);
                }
                return;
            }
        };
        match outcome {
            Outcome::More => {
                if self.clients.alive(ci, gen) && self.clients.at(ci).spill.is_none() {
                    self.client_flush(ci);
                }
            }
            Outcome::Done(rel) => {
                let (status, keep) = {
                    let s = self.sessions.at(slot);
                    (s.resp.status, s.resp.keep)
                };
                self.clients.at(ci).session = None;
                self.release(slot, rel);
                if self.clients.at(ci).spill.is_none() && !self.client_flush(ci) {
                    return;
                }
                if !self.clients.alive(ci, gen) {
                    return;
                }
                self.finish(ci, status);
                if keep {
                    self.client_advance(ci);
                } else {
                    self.client_close(ci);
                }
            }
            Outcome::Fail => {
                let (started, head_sent, status) = {
                    let s = self.sessions.at(slot);
                    (s.resp.started, s.resp.head_sent, s.resp.status)
                };
                if before != usize::MAX && !head_sent {
                    let c = self.clients.at(ci);
                    c.out.truncate(before.max(c.out_off));
                }
                self.clients.at(ci).session = None;
                self.release(slot, Release::Broken);
                self.resp_failed(ci, started, head_sent, status);
            }
        }
    }

    /// The session failed before or during the response (`ClientProtocol.resp_failed_on`).
    pub fn resp_failed(&mut self, ci: usize, started: bool, head_sent: bool, status: u16) {
        if head_sent {
            // The client has part of a response: all we can do is cut it.
            self.stats.upstream_broken_mid_response += 1;
            self.finish(ci, status);
            self.client_kill(ci);
            return;
        }
        self.stats.upstream_failed += 1;
        let gen = self.clients.gens[ci];
        let retry = {
            let r = self.clients.at(ci).active.as_mut().expect("active request");
            let ok = !started && r.idempotent && r.retries < self.settings.max_retries;
            if ok {
                r.retries += 1;
            }
            ok
        };
        if retry {
            self.stats.retries += 1;
            self.acquire(ci, gen);
        } else {
            self.respond_error(ci, 502, -1);
        }
    }

    /// A session that failed while a native request was on it (write error, garbage).
    pub fn session_failed(&mut self, slot: usize) {
        let (owner, started, head_sent, status, state) = {
            let s = self.sessions.at(slot);
            (s.owner, s.resp.started, s.resp.head_sent, s.resp.status, s.state)
        };
        if state == SState::Discard {
            self.release(slot, Release::Broken);
            return;
        }
        self.release(slot, Release::Broken);
        if let Some((ci, gen)) = owner {
            if self.clients.alive(ci, gen) {
                self.clients.at(ci).session = None;
                self.resp_failed(ci, started, head_sent, status);
            }
        }
    }

    /// A response whose client went away: read it, drop it, release the session.
    fn discard(&mut self, slot: usize, data: &[u8]) {
        let mut sink = Vec::new();
        let s = self.sessions.at(slot);
        let ctx = Ctx { head_only: s.head_only, v10: false, keep_allowed: false };
        let outcome = s.resp.feed(data, &ctx, &mut sink);
        self.discard_outcome(slot, outcome);
    }

    fn discard_outcome(&mut self, slot: usize, outcome: Outcome) {
        match outcome {
            Outcome::More => {}
            Outcome::Done(rel) => self.release(slot, rel),
            Outcome::Fail => self.release(slot, Release::Broken),
        }
    }
}
