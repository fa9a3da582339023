//! The lease operations on the engine's state: taking, releasing and settling sessions,
//! handing them to waiting and asking requests (native ones or Python tickets), the
//! queue timer, refusals, and closing the queues. The book's data (`book.rs`) says who is
//! next; these decide what happens to the session and what Python must learn (`Hook`).

use crate::book::{KeyId, Waiter, Who};
use crate::core::{state_name, token, Core, Hook, SState, T_SESSION};
use crate::response::Release;
use crate::stats::Rejection;
use crate::sys;

impl Core {
    pub fn record_event(&mut self, kind: &'static str, slot: usize, state: &'static str) {
        if self.record {
            let sid = self.sessions.items[slot].as_ref().map_or(-1, |s| s.sid);
            self.events.push((kind, sid, state));
        }
    }

    /// An idle session of `key` for a request, now busy (`LeaseBook.take`).
    pub fn take(&mut self, key: KeyId) -> Option<usize> {
        if self.record {
            let (svc, sl) = self.key_names[key];
            let names = (self.services.names[svc].clone(), self.slices.names[sl].clone());
            self.acquires.push(names);
        }
        let slot = self.book.take(key)?;
        self.busy += 1;
        let s = self.sessions.at(slot);
        s.state = SState::Busy;
        Some(slot)
    }

    /// A session comes back from a request (`LeasePool.release`).
    pub fn release(&mut self, slot: usize, state: Release) {
        let name = state_name(&state);
        self.record_event("release", slot, name);
        let (held, epoch) = {
            let s = self.sessions.at(slot);
            s.owner = None;
            (s.held, s.epoch)
        };
        self.unbusy(slot);
        if !held {
            self.drop_session(slot); // the acceptor reclaimed it meanwhile
            return;
        }
        let pre = match state {
            Release::Idle { pre } if epoch == self.epoch && !self.closing => pre,
            Release::Idle { .. } => {
                let st = if epoch != self.epoch { "broken" } else { "idle" };
                self.give_back(slot, st);
                return;
            }
            other => {
                self.give_back(slot, state_name(&other));
                return;
            }
        };
        self.sessions.at(slot).pre = pre;
        self.settle(slot);
    }

    fn unbusy(&mut self, slot: usize) {
        let s = self.sessions.at(slot);
        if matches!(s.state, SState::Busy | SState::Out | SState::Discard) {
            s.state = SState::Idle;
            self.busy -= 1;
            if self.closing && self.busy == 0 {
                self.hooks.push(Hook::Drained);
            }
        }
    }

    /// A clean session is free: a recall owed, else the key's oldest waiter, else idle.
    pub fn settle(&mut self, slot: usize) {
        self.settle_as(slot, false);
    }

    /// `settle` for a session just adopted: one granted for an ask (`asked`) goes to the
    /// key's oldest asking request before older waiters (`LeaseBook.settle`).
    pub fn settle_as(&mut self, slot: usize, asked: bool) {
        // Borrowed, not cloned: this runs once per request (owe returns at once without
        // recalls owed).
        let s = self.sessions.at(slot);
        let key = s.key;
        if self.book.owe(&s.service, &s.slice) {
            self.give_back(slot, "idle");
            return;
        }
        if let Some((w, asking)) = self.book.pop(key, asked) {
            let waited = sys::now() - w.started;
            if !asking {
                // An asking request did not wait in the queue.
                self.slice_stats(w.slice).wait.observe(waited);
                self.mark_want(key, false);
            }
            self.busy += 1;
            self.sessions.at(slot).state = SState::Busy;
            self.hand(slot, w.who, waited);
            return;
        }
        let (key, registrant) = {
            let s = self.sessions.at(slot);
            s.state = SState::Idle;
            s.idle_since = sys::now();
            (s.key, s.registrant)
        };
        self.book.idle.entry(key).or_default().push(registrant, slot);
    }

    /// A busy session goes to a request: a native client's is written at the end of this
    /// turn (a burst of hand-offs wakes the services once, not once per request), a Python
    /// ticket's is checked out to it.
    fn hand(&mut self, slot: usize, who: Who, waited: f64) {
        match who {
            Who::Client(ci, gen) => self.handoffs.push((ci, gen, slot)),
            Who::Ticket(ticket) => {
                let (handle, pre) = self.checkout(slot);
                self.hooks.push(Hook::Handoff { handle, ticket, pre, waited });
            }
        }
    }

    /// Asking requests no answer can serve any more (`LeasePool._finish_asks`): an idle
    /// session of the key if there is one now, else the fast 503 `queue_full`.
    pub fn finish_asks(&mut self, asks: Vec<(KeyId, Waiter)>) {
        let now = sys::now();
        for (key, w) in asks {
            let waited = now - w.started;
            if let Some(slot) = self.take(key) {
                self.hand(slot, w.who, waited);
                continue;
            }
            self.slice_stats(w.slice).rejected[Rejection::QueueFull as usize] += 1;
            self.refuse(w.who, Rejection::QueueFull, waited);
        }
        self.arm_queue_timer();
    }

    /// Take a session out of our epoll set for a Python `SessionConn` (it stays held).
    pub fn checkout(&mut self, slot: usize) -> (u64, Vec<u8>) {
        let s = self.sessions.at(slot);
        s.state = SState::Out;
        self.ep.delete(s.fd);
        s.interest = 0;
        (s.handle, std::mem::take(&mut s.pre))
    }

    /// Back from Python: watch it again.
    pub fn checkin(&mut self, slot: usize) {
        let gen = self.sessions.gens[slot];
        let s = self.sessions.at(slot);
        s.interest = sys::IN;
        let _ = self.ep.add(s.fd, token(T_SESSION, slot, gen), sys::IN);
    }

    /// Return a session to the acceptor (Python sends the RELEASE record).
    pub fn give_back(&mut self, slot: usize, state: &'static str) {
        let handle = self.sessions.at(slot).handle;
        self.drop_session(slot);
        self.hooks.push(Hook::GiveBack { handle, state });
    }

    /// Forget a session and close our descriptor (the acceptor keeps its own).
    pub fn drop_session(&mut self, slot: usize) {
        let s = match self.sessions.remove(slot) {
            Some(s) => s,
            None => return,
        };
        if s.state == SState::Idle {
            if let Some(ring) = self.book.idle.get_mut(&s.key) {
                ring.remove(s.registrant, slot);
            }
        }
        self.by_handle.remove(&s.handle);
        if s.state != SState::Out {
            self.ep.delete(s.fd);
        }
        sys::close(s.fd);
    }

    /// Waiting counts changed: Python's `_mark_want` (called only when it would act).
    pub fn mark_want(&mut self, key: KeyId, enqueued: bool) {
        if self.want_urgent {
            return; // a flush is coming anyway
        }
        let urgent = enqueued && !self.reported.contains(&key);
        if urgent || !self.want_dirty {
            self.want_dirty = true;
            self.want_urgent = urgent;
            self.hooks.push(Hook::Want { urgent });
        }
    }

    pub fn arm_queue_timer(&mut self) {
        let earliest = self.book.earliest();
        if earliest == 0.0 {
            if self.qtimer.at != 0.0 {
                self.qtimer.set(0.0);
            }
        } else if self.qtimer.at == 0.0 || earliest < self.qtimer.at {
            self.qtimer.set(earliest);
        }
    }

    pub fn expire_waiters(&mut self) {
        self.qtimer.at = 0.0;
        let now = sys::now();
        let (expired, _) = self.book.expire(now);
        for (key, w) in expired {
            let waited = now - w.started;
            let st = self.slice_stats(w.slice);
            st.rejected[Rejection::Timeout as usize] += 1;
            st.wait.observe(waited);
            self.mark_want(key, false);
            self.refuse(w.who, Rejection::Timeout, waited);
        }
        self.arm_queue_timer();
    }

    /// A waiter that will get no session: a native client is answered 503, a Python ticket
    /// is told through a hook.
    pub fn refuse(&mut self, who: Who, reason: Rejection, waited: f64) {
        match who {
            Who::Client(ci, gen) => {
                if self.clients.alive(ci, gen) {
                    if let Some(r) = self.clients.at(ci).active.as_mut() {
                        r.waiter = None;
                    }
                    self.unavailable(ci, reason);
                }
            }
            Who::Ticket(ticket) => self.hooks.push(Hook::Refused { ticket, reason, waited }),
        }
    }

    pub fn deliver_handoffs(&mut self) {
        while !self.handoffs.is_empty() {
            let batch = std::mem::take(&mut self.handoffs);
            for (ci, gen, slot) in batch {
                let waiting = self.clients.get(ci, gen).map_or(false, |c| c.session.is_none() && c.active.is_some());
                if waiting {
                    if let Some(r) = self.clients.at(ci).active.as_mut() {
                        r.waiter = None;
                    }
                    self.send_on(ci, slot);
                } else {
                    self.release(slot, Release::Idle { pre: Vec::new() }); // never written to
                }
            }
        }
    }

    /// Refuse every waiter (the pool is closing): native ones get 503, tickets a hook.
    pub fn close_queues(&mut self) {
        self.closing = true;
        let now = sys::now();
        for (_, w) in self.book.drain_waiters() {
            let waited = now - w.started;
            self.slice_stats(w.slice).rejected[Rejection::Draining as usize] += 1;
            self.refuse(w.who, Rejection::Draining, waited);
        }
        self.arm_queue_timer();
        if self.busy == 0 {
            self.hooks.push(Hook::Drained);
        }
    }
}
