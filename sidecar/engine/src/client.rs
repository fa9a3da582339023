//! The client side of the native engine: `proxy.ClientProtocol` for the common case.
//!
//! Requests are served strictly one at a time per connection, in order; the next head
//! is parsed only when the previous response is complete and the client is taking its
//! output.  A head outside the native subset (see `head.rs`), a body that did not arrive
//! with its head, or a policy the engine cannot classify hands the connection to the
//! Python path at that request, once everything before it has been answered and written.
//! A request that may not wait (control revision 3) stays here: it asks (`Book::ask`).

use crate::book::Who;
use crate::core::{Core, Deadline, Hook, Req, SState, DISK, MEMORY, RESPONSE, T_CLIENT};
use crate::head::{self, Limits, Verdict};
use crate::response::{Ctx, Release, Resp};
use crate::stats::{canned, Rejection};
use crate::sys;

/// Client bytes read ahead while a request is served, before reading pauses.
const INBUF_CAP: usize = 256 * 1024;

impl Core {
    pub fn set_deadline(&mut self, slot: usize, kind: Deadline, seconds: f64) {
        let c = self.clients.at(slot);
        c.dkind = kind;
        c.deadline = if seconds > 0.0 { sys::now() + seconds } else { 0.0 };
    }

    /// Keep the memory budget's count of held client bytes equal to `inbuf`.
    fn rebook(&mut self, slot: usize) {
        let c = self.clients.at(slot);
        let delta = c.inbuf.len() as i64 - c.booked_in;
        c.booked_in += delta;
        self.budgets[MEMORY].used += delta;
    }

    pub(crate) fn client_interest(&mut self, slot: usize) {
        let gen = self.clients.gens[slot];
        let c = self.clients.at(slot);
        let mut want = 0;
        let reading_paused = c.eof || c.handover || c.close_after || (c.inbuf.len() >= INBUF_CAP);
        if !reading_paused {
            want |= sys::IN;
        }
        if c.pending() > 0 {
            want |= sys::OUT;
        }
        if want != c.interest {
            c.interest = want;
            let _ = self.ep.modify(c.fd, crate::core::token(T_CLIENT, slot, gen), want);
        }
    }

    pub fn client_readable(&mut self, slot: usize, gen: u32) {
        let fd = self.clients.at(slot).fd;
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = sys::recv(fd, &mut scratch);
        match res {
            Ok(0) => {
                self.scratch = scratch;
                self.client_eof(slot);
            }
            Ok(n) => {
                let idle = {
                    let c = self.clients.at(slot);
                    c.inbuf.extend_from_slice(&scratch[..n]);
                    c.dkind == Deadline::Idle
                };
                self.scratch = scratch;
                self.rebook(slot);
                if idle {
                    let t = self.settings.request_timeout;
                    self.set_deadline(slot, Deadline::Request, t);
                }
                self.client_advance(slot);
                if self.clients.alive(slot, gen) {
                    self.client_interest(slot);
                }
            }
            Err(e) => {
                self.scratch = scratch;
                if !sys::would_block(&e) {
                    self.client_drop(slot);
                }
            }
        }
    }

    fn client_eof(&mut self, slot: usize) {
        let idle = {
            let c = self.clients.at(slot);
            c.eof = true;
            c.active.is_none()
        };
        if idle {
            // Answer what was pipelined before the FIN (client_advance closes after it).
            self.client_advance(slot);
        }
        if let Some(c) = self.clients.items[slot].as_ref() {
            let _ = c;
            self.client_interest(slot);
        }
    }

    /// Serve the next request of an idle connection, or hand the connection over.
    pub fn client_advance(&mut self, slot: usize) {
        let gen = self.clients.gens[slot];
        let c = self.clients.at(slot);
        if c.active.is_some() || c.close_after || c.write_paused || c.spill.is_some() {
            return;
        }
        if c.handover {
            if c.pending() == 0 {
                self.handover(slot);
            }
            return;
        }
        if c.inbuf.is_empty() {
            if c.eof || self.draining {
                self.client_close(slot);
            } else {
                if c.inbuf.capacity() > 16 * 1024 {
                    c.inbuf = Vec::new();
                }
                let t = self.settings.client_idle_timeout;
                self.set_deadline(slot, Deadline::Idle, t);
            }
            return;
        }
        let trusted = c.peer.trusted;
        let limits = Limits {
            max_header_bytes: self.settings.max_header_bytes,
            max_body: self.settings.max_body,
            trusted_peer: trusted,
            wanted: &self.router.wanted,
        };
        let verdict = head::parse(&c.inbuf, &limits);
        let h = match verdict {
            Verdict::Incomplete => {
                if c.eof {
                    self.client_close(slot); // a request cut by the client's FIN
                } else if c.dkind != Deadline::Request {
                    let t = self.settings.request_timeout;
                    self.set_deadline(slot, Deadline::Request, t);
                }
                return;
            }
            Verdict::Python => return self.start_handover(slot),
            Verdict::Native(h) => h,
        };
        let body = h.length.unwrap_or(0);
        if c.inbuf.len() < h.len + body || self.router.python_only {
            return self.start_handover(slot); // a body still arriving: spooled by Python
        }
        if body > 0 && self.budgets[MEMORY].used > self.budgets[MEMORY].limit {
            return self.start_handover(slot); // Python spools it or answers 503
        }
        let (svc_idx, slice_idx) = self.router.classify(&c.inbuf, &h, c.peer.ip.as_ref());
        let key = self.key(svc_idx, slice_idx);
        let c = self.clients.at(slot);
        let mut wire = Vec::with_capacity(h.len + 160 + body);
        h.build(&c.inbuf, &c.peer.forwarding, &c.peer.xff, &mut wire);
        wire.extend_from_slice(&c.inbuf[h.len..h.len + body]);
        c.inbuf.drain(..h.len + body);
        c.booked_in -= body as i64; // the body stays booked, by the request now
        self.rebook(slot);
        if h.claims {
            self.stats.untrusted_forwarding += 1;
        }
        let req = Req {
            wire,
            key,
            slice: slice_idx,
            head_only: h.method == head::Method::Head,
            v10: h.v10,
            keep_alive: h.keep_alive,
            idempotent: h.method.idempotent(),
            retries: 0,
            t0: sys::now(),
            booked: body as i64,
            waiter: None,
        };
        let c = self.clients.at(slot);
        c.active = Some(Box::new(req));
        self.stats.requests_active += 1;
        self.acquire(slot, gen);
    }

    fn start_handover(&mut self, slot: usize) {
        let c = self.clients.at(slot);
        c.handover = true;
        if c.pending() == 0 && c.spill.is_none() {
            self.handover(slot);
        }
    }

    /// The connection goes to the Python path with the bytes it has not been served.
    pub fn handover(&mut self, slot: usize) {
        let c = match self.clients.remove(slot) {
            Some(c) => c,
            None => return,
        };
        self.ep.delete(c.fd);
        self.budgets[MEMORY].used -= c.booked_in;
        self.budgets[RESPONSE].used -= c.booked_out;
        self.handover_fd(c.fd, c.inbuf);
        self.after_client_gone();
    }

    fn after_client_gone(&mut self) {
        if self.shutting_down && self.clients.len == 0 {
            self.hooks.push(Hook::Empty);
        }
    }

    /// A session for the active request: an idle one now, else a place in the queue, else
    /// (no room in this worker's part of it) ask the acceptor for one now, else 503.
    pub fn acquire(&mut self, slot: usize, gen: u32) {
        let (key, slice) = {
            let r = self.clients.at(slot).active.as_ref().expect("active request");
            (r.key, r.slice)
        };
        if let Some(s) = self.take(key) {
            return self.send_on(slot, s);
        }
        self.set_deadline(slot, Deadline::None, 0.0); // the slice's queue timeout bounds it
        if self.closing {
            self.slice_stats(slice).rejected[Rejection::Draining as usize] += 1;
            return self.unavailable(slot, Rejection::Draining);
        }
        let (timeout, share) = match self.queues.get(&slice).copied() {
            Some(q) => q,
            None => {
                self.slice_stats(slice).rejected[Rejection::QueueFull as usize] += 1;
                return self.unavailable(slot, Rejection::QueueFull);
            }
        };
        let now = sys::now();
        let id = if self.book.waiting_in(slice) < share {
            let id = self.book.enqueue(key, slice, Who::Client(slot, gen), now, timeout);
            self.mark_want(key, true);
            id
        } else if self.asking {
            // No room to wait and no idle session here: one idle now at the acceptor or in
            // another worker still serves it.  Python sends the ASK records of this turn
            // together (`Hook::Ask`); the answer (GRANT `asked` or REFUSE) comes at once.
            let (id, first) = self.book.ask(key, slice, Who::Client(slot, gen), now, timeout);
            if first {
                self.hooks.push(Hook::Ask);
            }
            id
        } else {
            self.slice_stats(slice).rejected[Rejection::QueueFull as usize] += 1;
            return self.unavailable(slot, Rejection::QueueFull);
        };
        if let Some(r) = self.clients.at(slot).active.as_mut() {
            r.waiter = Some(id);
        }
        self.arm_queue_timer();
    }

    /// Write the active request onto session `s` (`ClientProtocol._send`).
    pub fn send_on(&mut self, slot: usize, s: usize) {
        let gen = self.clients.gens[slot];
        let res = {
            let c = self.clients.items[slot].as_mut().expect("client");
            let sess = self.sessions.items[s].as_mut().expect("session");
            let r = c.active.as_ref().expect("active request");
            sess.owner = Some((slot, gen));
            sess.head_only = r.head_only;
            sess.resp = Resp::new(std::mem::take(&mut sess.pre));
            c.session = Some(s);
            c.seen = c.progress;
            sys::send(sess.fd, &r.wire)
        };
        let sent = match res {
            Ok(n) => Some(n),
            Err(e) if sys::would_block(&e) => Some(0),
            Err(_) => None, // the session is gone already: nothing of the request reached it
        };
        if let Some(sent) = sent {
            let c = self.clients.items[slot].as_ref().expect("client");
            let wire = &c.active.as_ref().expect("active").wire;
            if sent < wire.len() {
                // The rest goes when the session's socket takes it (session_writable).
                let rest = wire[sent..].to_vec();
                let sgen = self.sessions.gens[s];
                let sess = self.sessions.at(s);
                sess.wpend = rest;
                sess.interest |= sys::OUT;
                let _ = self.ep.modify(sess.fd, crate::core::token(crate::core::T_SESSION, s, sgen), sess.interest);
            }
            let t = self.settings.upstream_timeout;
            self.set_deadline(slot, Deadline::Upstream, t);
        } else {
            self.session_failed(s);
        }
    }

    pub fn unavailable(&mut self, slot: usize, reason: Rejection) {
        self.stats.unavailable[reason as usize] += 1;
        let ra = self.retry_after;
        self.respond_error(slot, 503, ra);
    }

    /// A complete request is buffered (pipelined) behind the current one.
    fn queued_request(&self, slot: usize) -> bool {
        let c = self.clients.items[slot].as_ref().expect("client");
        c.inbuf.windows(4).any(|w| w == b"\r\n\r\n")
    }

    /// `ClientProtocol._respond_error`: a canned answer in turn, then close or go on.
    pub fn respond_error(&mut self, slot: usize, status: u16, retry_after: i64) {
        let queued = self.queued_request(slot);
        let (bytes, close) = {
            let c = self.clients.at(slot);
            let r = c.active.as_ref().expect("active request");
            let close = !r.keep_alive || (self.draining && !queued);
            (canned(status, close, !close && r.v10, r.head_only, retry_after), close)
        };
        self.client_write(slot, &bytes);
        if !self.client_alive(slot) {
            return;
        }
        self.finish(slot, status);
        if close {
            self.client_close(slot);
        } else {
            self.client_advance(slot);
        }
    }

    fn client_alive(&self, slot: usize) -> bool {
        self.clients.items.get(slot).map_or(false, |c| c.is_some())
    }

    /// The request is answered: count it and free what it held.
    pub fn finish(&mut self, slot: usize, status: u16) {
        let r = match self.clients.at(slot).active.take() {
            Some(r) => r,
            None => return,
        };
        self.clients.at(slot).session = None;
        self.stats.requests_active -= 1;
        self.budgets[MEMORY].used -= r.booked;
        let now = sys::now();
        let st = self.slice_stats(r.slice);
        let code = if (100..600).contains(&status) { status as usize } else { 0 };
        st.status[code] += 1;
        st.latency.observe(now - r.t0);
    }

    // -- closing ------------------------------------------------------------------------------
    /// `ClientProtocol._close`: flush what is buffered, then close.
    pub fn client_close(&mut self, slot: usize) {
        let c = self.clients.at(slot);
        if c.pending() > 0 || c.spill.is_some() {
            c.close_after = true;
            self.client_interest(slot);
            return;
        }
        self.client_drop(slot);
    }

    /// Abort at once: buffered output is dropped.
    pub fn client_kill(&mut self, slot: usize) {
        self.client_drop(slot);
    }

    /// `ClientProtocol.connection_lost`: leave the queue, let a whole request finish on its
    /// session into the void (released clean), free the budgets.
    pub fn client_drop(&mut self, slot: usize) {
        let c = match self.clients.remove(slot) {
            Some(c) => c,
            None => return,
        };
        self.ep.delete(c.fd);
        sys::close(c.fd);
        self.stats.connections_active -= 1;
        self.budgets[MEMORY].used -= c.booked_in;
        self.budgets[RESPONSE].used -= c.booked_out;
        if let Some(sp) = c.spill {
            self.budgets[DISK].used -= sp.pending() as i64;
            self.spill_files -= 1;
        }
        if let Some(r) = c.active {
            if let Some(id) = r.waiter {
                if self.book.cancel(r.key, id).is_some() {
                    self.mark_want(r.key, false);
                }
            }
            if let Some(s) = c.session {
                let unsent = !self.sessions.at(s).wpend.is_empty();
                if unsent {
                    self.release(s, Release::Broken); // a half-sent request: unusable
                } else {
                    // The request is whole on the session: finish it into the void.
                    self.stats.client_aborts += 1;
                    let until = sys::now() + self.settings.upstream_timeout;
                    let sess = self.sessions.at(s);
                    sess.owner = None;
                    sess.state = SState::Discard;
                    sess.discard_until = until;
                    self.session_resume(s);
                }
            }
            self.stats.requests_active -= 1;
            self.budgets[MEMORY].used -= r.booked;
        }
        self.after_client_gone();
    }

    // -- timeouts -----------------------------------------------------------------------------
    pub fn on_deadline(&mut self, slot: usize, gen: u32, now: f64) {
        let (kind, session, active, head_sent) = {
            let c = self.clients.at(slot);
            let kind = c.dkind;
            if kind == Deadline::Send && c.sent != c.sent_seen && (c.session.is_none() || c.progress != c.seen) {
                // The client is reading (and the session still delivering).
                c.sent_seen = c.sent;
                c.seen = c.progress;
                c.deadline = now + self.settings.send_timeout;
                return;
            }
            if kind == Deadline::Upstream && c.progress != c.seen {
                c.seen = c.progress;
                c.deadline = now + self.settings.upstream_timeout;
                return;
            }
            c.deadline = 0.0;
            (kind, c.session, c.active.is_some(), false)
        };
        let _ = head_sent;
        let head_sent = session.map_or(false, |s| self.sessions.at(s).resp.head_sent);
        match kind {
            Deadline::Upstream if active => {
                self.stats.upstream_timeouts += 1;
                let status = session.map_or(0, |s| self.sessions.at(s).resp.status);
                self.abandon_upstream(slot);
                if head_sent {
                    self.finish(slot, status);
                    self.client_kill(slot);
                } else {
                    self.respond_error(slot, 504, -1);
                }
            }
            Deadline::Request if !active => {
                // Nothing in flight: safe to answer in order.
                let bytes = canned(408, true, false, false, -1);
                self.client_write(slot, &bytes);
                if self.clients.alive(slot, gen) {
                    self.clients.at(slot).inbuf.clear();
                    self.rebook(slot);
                    self.client_close(slot);
                }
            }
            Deadline::Idle => self.client_close(slot),
            _ => {
                if active && session.is_some() {
                    let status = session.map_or(0, |s| self.sessions.at(s).resp.status);
                    self.abandon_upstream(slot);
                    self.finish(slot, if status == 0 { 408 } else { status });
                }
                self.client_kill(slot);
            }
        }
    }

    fn abandon_upstream(&mut self, slot: usize) {
        let (session, waiter) = {
            let c = self.clients.at(slot);
            let s = c.session.take();
            let w = c.active.as_mut().and_then(|r| r.waiter.take().map(|id| (r.key, id)));
            (s, w)
        };
        if let Some(s) = session {
            self.release(s, Release::Broken);
        }
        if let Some((key, id)) = waiter {
            if self.book.cancel(key, id).is_some() {
                self.mark_want(key, false);
            }
        }
    }

    /// Graceful stop: idle connections get `drain_idle_grace` for one more request.
    pub fn drain_idle(&mut self) {
        self.draining = true;
        self.shutting_down = true;
        let grace = self.settings.drain_idle_grace;
        for slot in self.clients.slots() {
            let c = self.clients.at(slot);
            if c.active.is_none() && c.inbuf.is_empty() {
                self.set_deadline(slot, Deadline::Idle, grace);
            }
        }
        if self.clients.len == 0 {
            self.hooks.push(Hook::Empty);
        }
    }

    pub fn abort_all(&mut self) -> usize {
        let slots = self.clients.slots();
        let n = slots.len();
        for slot in slots {
            self.client_kill(slot);
        }
        n
    }

    pub fn ctx(&self, slot: usize) -> Ctx {
        let c = self.clients.items[slot].as_ref().expect("client");
        let r = c.active.as_ref().expect("active request");
        let queued = self.queued_request(slot);
        Ctx { head_only: r.head_only, v10: r.v10, keep_allowed: r.keep_alive && (queued || !self.draining) }
    }
}
