//! The worker's lease book in native form: `leasebook.LeaseBook` and `idlering.IdleRing`.
//!
//! Idle sessions per key (service, slice) are rotated by registrant (invariant 8: the
//! next idle session comes from the registrant that waited longest for a turn), waiting
//! requests are a FIFO per key (native client connections and Python tickets in one
//! queue, so whoever waited longest gets the next session), recalls owed per (service,
//! slice the sessions are leased for; "" = any).  Requests that may not wait (control
//! revision 3, `LeaseBook.ask` ... `forget_asks`) are a second FIFO per key: not waiters
//! (not counted, not in WANT), they keep their place in line while an ASK unit not sent
//! or not answered yet, or a session being adopted, may still serve them, and are
//! refused (`uncovered`) once none can.
//! Values are session slots and waiter records; the engine owns the sessions.

use std::collections::{HashMap, VecDeque};

use pyo3::prelude::*;

pub type KeyId = usize;

#[derive(Default)]
pub struct IdleRing {
    by_reg: HashMap<i64, VecDeque<usize>>,
    ring: VecDeque<i64>,
    count: usize,
}

impl IdleRing {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn push(&mut self, registrant: i64, slot: usize) {
        let q = self.by_reg.entry(registrant).or_default();
        if q.is_empty() {
            self.ring.push_back(registrant);
        }
        q.push_back(slot);
        self.count += 1;
    }

    /// The next registrant's oldest idle session; that registrant goes to the back.
    pub fn take(&mut self) -> Option<usize> {
        let reg = self.ring.pop_front()?;
        let q = self.by_reg.get_mut(&reg)?;
        let slot = q.pop_front()?;
        self.count -= 1;
        if q.is_empty() {
            self.by_reg.remove(&reg);
        } else {
            self.ring.push_back(reg);
        }
        Some(slot)
    }

    pub fn remove(&mut self, registrant: i64, slot: usize) -> bool {
        let q = match self.by_reg.get_mut(&registrant) {
            Some(q) => q,
            None => return false,
        };
        let pos = match q.iter().position(|&s| s == slot) {
            Some(p) => p,
            None => return false,
        };
        q.remove(pos);
        self.count -= 1;
        if q.is_empty() {
            self.by_reg.remove(&registrant);
            if let Some(p) = self.ring.iter().position(|&r| r == registrant) {
                self.ring.remove(p);
            }
        }
        true
    }

    pub fn slots(&self) -> Vec<usize> {
        self.by_reg.values().flat_map(|q| q.iter().copied()).collect()
    }
}

pub enum Who {
    /// A native client connection: (slot, generation).
    Client(usize, u32),
    /// A Python `Ticket` (its waiter is a `ClientProtocol` or the app prober).
    Ticket(Py<PyAny>),
}

pub struct Waiter {
    pub id: u64,
    pub who: Who,
    pub started: f64,
    pub deadline: f64,
    pub slice: usize,
}

#[derive(Default)]
pub struct Book {
    pub idle: HashMap<KeyId, IdleRing>,
    pub waiters: HashMap<KeyId, VecDeque<Waiter>>,
    /// Waiting requests per slice, across services (queue.maxWaiting bounds the slice).
    pub waiting_by_slice: HashMap<usize, usize>,
    pub waiting: usize,
    /// Pending recalls by (actual service, slice the sessions are leased for; "" = any).
    pub recall: HashMap<(String, String), u32>,
    /// Requests that may not wait, per key, while the acceptor is asked for a session now.
    pub asks: HashMap<KeyId, VecDeque<Waiter>>,
    pub asking: usize,
    /// ASK units per key not sent yet, and sent but not answered yet.
    pub unsent: HashMap<KeyId, u32>,
    pub asked: HashMap<KeyId, u32>,
    /// Sessions granted for each key and still being adopted (any of them may serve one of
    /// the oldest asking requests: `LeaseBook.adopting`, counted per key).
    pub adopting: HashMap<KeyId, u32>,
    next_id: u64,
}

fn less(counts: &mut HashMap<KeyId, u32>, key: KeyId, n: u32) {
    if let Some(c) = counts.get_mut(&key) {
        if *c > n {
            *c -= n;
        } else {
            counts.remove(&key);
        }
    }
}

fn earliest_of<'a>(queues: impl Iterator<Item = &'a VecDeque<Waiter>>, mut earliest: f64) -> f64 {
    for q in queues {
        if let Some(w) = q.front() {
            if earliest == 0.0 || w.deadline < earliest {
                earliest = w.deadline;
            }
        }
    }
    earliest
}

impl Book {
    /// Whether `key` has waiting or asking requests.  On the request path (every `take`):
    /// the totals answer without a hash lookup when nothing waits anywhere.
    pub fn has_waiters(&self, key: KeyId) -> bool {
        (self.waiting > 0 && self.waiters.get(&key).map_or(false, |q| !q.is_empty()))
            || (self.asking > 0 && self.asks.get(&key).map_or(false, |q| !q.is_empty()))
    }

    /// An idle session of `key`, never jumping the key's waiting or asking requests.
    pub fn take(&mut self, key: KeyId) -> Option<usize> {
        if self.has_waiters(key) {
            return None;
        }
        self.idle.get_mut(&key)?.take()
    }

    pub fn enqueue(&mut self, key: KeyId, slice: usize, who: Who, now: f64, timeout: f64) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.waiters.entry(key).or_default().push_back(Waiter {
            id,
            who,
            started: now,
            deadline: now + timeout,
            slice,
        });
        *self.waiting_by_slice.entry(slice).or_insert(0) += 1;
        self.waiting += 1;
        id
    }

    fn counted_out(&mut self, slice: usize) {
        if let Some(n) = self.waiting_by_slice.get_mut(&slice) {
            *n -= 1;
        }
        self.waiting -= 1;
    }

    /// The request a freed session of `key` goes to (`LeaseBook.settle`): the oldest one,
    /// waiting or asking; a session granted for an ask (`asked`) to the oldest asking one.
    /// The flag says it was an asking request.
    pub fn pop(&mut self, key: KeyId, asked: bool) -> Option<(Waiter, bool)> {
        if self.waiting == 0 && self.asking == 0 {
            return None; // every released session at steady state: no lookups
        }
        let ask_first =
            match (self.asks.get(&key).and_then(|q| q.front()), self.waiters.get(&key).and_then(|q| q.front())) {
                (Some(a), Some(w)) => asked || a.started < w.started,
                (Some(_), None) => true,
                _ => false,
            };
        if ask_first {
            let w = self.asks.get_mut(&key)?.pop_front()?;
            self.asking -= 1;
            return Some((w, true));
        }
        let w = self.waiters.get_mut(&key)?.pop_front()?;
        self.counted_out(w.slice);
        Some((w, false))
    }

    /// Leave the queue (waiting or asking); None when the request was already served or
    /// refused.
    pub fn cancel(&mut self, key: KeyId, id: u64) -> Option<Waiter> {
        if let Some(q) = self.waiters.get_mut(&key) {
            if let Some(pos) = q.iter().position(|w| w.id == id) {
                let w = q.remove(pos)?;
                self.counted_out(w.slice);
                return Some(w);
            }
        }
        let q = self.asks.get_mut(&key)?;
        let pos = q.iter().position(|w| w.id == id)?;
        self.asking -= 1;
        q.remove(pos)
    }

    /// Waiting and asking requests whose deadline passed (oldest first per key), and the
    /// earliest deadline left (asking requests are bounded by the queue timeout too).
    pub fn expire(&mut self, now: f64) -> (Vec<(KeyId, Waiter)>, f64) {
        let mut out = Vec::new();
        for (&key, q) in self.waiters.iter_mut() {
            while q.front().map_or(false, |w| w.deadline <= now) {
                out.push((key, q.pop_front().unwrap()));
            }
        }
        for (_, w) in &out {
            let s = w.slice;
            self.counted_out(s);
        }
        for (&key, q) in self.asks.iter_mut() {
            while q.front().map_or(false, |w| w.deadline <= now) {
                out.push((key, q.pop_front().unwrap()));
                self.asking -= 1;
            }
        }
        (out, self.earliest())
    }

    pub fn earliest(&self) -> f64 {
        earliest_of(self.asks.values(), earliest_of(self.waiters.values(), 0.0))
    }

    /// Every waiting and asking request, out of line (the pool is closing).
    pub fn drain_waiters(&mut self) -> Vec<(KeyId, Waiter)> {
        let mut out = Vec::new();
        for (&key, q) in self.waiters.iter_mut().chain(self.asks.iter_mut()) {
            while let Some(w) = q.pop_front() {
                out.push((key, w));
            }
        }
        self.waiting_by_slice.clear();
        self.waiting = 0;
        self.asking = 0;
        out
    }

    // -- asking (requests that may not wait) ----------------------------------------------
    /// A request that may not wait, while the acceptor is asked for a session now (one
    /// more unit of `key` to send); true when it is the first unit to send (a flush is due).
    pub fn ask(&mut self, key: KeyId, slice: usize, who: Who, now: f64, timeout: f64) -> (u64, bool) {
        self.next_id += 1;
        let id = self.next_id;
        self.asks.entry(key).or_default().push_back(Waiter { id, who, started: now, deadline: now + timeout, slice });
        self.asking += 1;
        let first = self.unsent.is_empty();
        *self.unsent.entry(key).or_insert(0) += 1;
        (id, first)
    }

    /// The units to send in ASK records now, counted as sent (not answered yet).
    pub fn take_unsent(&mut self) -> Vec<(KeyId, u32)> {
        let out: Vec<(KeyId, u32)> = self.unsent.drain().collect();
        for &(key, n) in &out {
            *self.asked.entry(key).or_insert(0) += n;
        }
        out
    }

    /// A GRANT entry for `key` (`asked`: it answers one ask unit): its session is on its way.
    pub fn granted(&mut self, key: KeyId, asked: bool) {
        if asked {
            less(&mut self.asked, key, 1);
        }
        *self.adopting.entry(key).or_insert(0) += 1;
    }

    /// A REFUSE of `n` units: the asking requests now left without cover.
    pub fn ask_refused(&mut self, key: KeyId, n: u32) -> Vec<Waiter> {
        less(&mut self.asked, key, n);
        self.uncovered(key)
    }

    /// A session granted for `key` was settled (or could not be used): the asking
    /// requests now left without cover.
    pub fn adopted(&mut self, key: KeyId) -> Vec<Waiter> {
        less(&mut self.adopting, key, 1);
        self.uncovered(key)
    }

    /// The acceptor is gone: no ask will be answered, no grant it made counts; every
    /// asking request, out of line.
    pub fn forget_asks(&mut self) -> Vec<(KeyId, Waiter)> {
        self.unsent.clear();
        self.asked.clear();
        self.adopting.clear();
        let keys: Vec<KeyId> = self.asks.keys().copied().collect();
        let mut out = Vec::new();
        for key in keys {
            out.extend(self.uncovered(key).into_iter().map(|w| (key, w)));
        }
        out
    }

    /// `LeaseBook._uncovered`: an asking request stays in line while something may still
    /// serve it (the oldest ones: sessions being adopted; the newest ones: units not sent
    /// or not answered yet); the rest leave it.
    fn uncovered(&mut self, key: KeyId) -> Vec<Waiter> {
        let q = match self.asks.get_mut(&key) {
            Some(q) if !q.is_empty() => q,
            _ => return Vec::new(),
        };
        let oldest = self.adopting.get(&key).copied().unwrap_or(0) as usize;
        let newest =
            (self.asked.get(&key).copied().unwrap_or(0) + self.unsent.get(&key).copied().unwrap_or(0)) as usize;
        let end = oldest.max(q.len().saturating_sub(newest));
        if end <= oldest {
            return Vec::new();
        }
        let out: Vec<Waiter> = q.drain(oldest..end).collect();
        self.asking -= out.len();
        out
    }

    pub fn waiting_in(&self, slice: usize) -> usize {
        self.waiting_by_slice.get(&slice).copied().unwrap_or(0)
    }

    /// A session of `service` leased for `slice` goes back to the acceptor: count it
    /// against a pending recall of its slice, else of any slice, as the acceptor does
    /// (`LeaseBook.returned`); false when none was pending.
    pub fn owe(&mut self, service: &str, slice: &str) -> bool {
        if self.recall.is_empty() {
            return false;
        }
        for key in [(service.to_string(), slice.to_string()), (service.to_string(), String::new())] {
            if let Some(n) = self.recall.get_mut(&key) {
                if *n > 0 {
                    *n -= 1;
                    if *n == 0 {
                        self.recall.remove(&key);
                    }
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returned_counts_against_own_slice_first() {
        let mut b = Book::default();
        assert!(!b.owe("svc", "bulk"));
        b.recall.insert(("svc".into(), "bulk".into()), 1);
        b.recall.insert(("svc".into(), String::new()), 1);
        assert!(!b.owe("other", "bulk"));
        assert!(b.owe("svc", "bulk"));
        assert_eq!(b.recall.get(&("svc".to_string(), "bulk".to_string())), None);
        assert!(b.owe("svc", "protected")); // the any-slice recall
        assert!(!b.owe("svc", "bulk"));
        assert!(b.recall.is_empty());
    }

    fn client(b: &mut Book, key: KeyId, n: usize, now: f64) -> u64 {
        b.ask(key, 0, Who::Client(n, 0), now, 5.0).0
    }

    fn ids(ws: &[Waiter]) -> Vec<u64> {
        ws.iter().map(|w| w.id).collect()
    }

    #[test]
    fn asking_requests_keep_their_place_but_are_not_waiters() {
        let mut b = Book::default();
        b.idle.entry(0).or_default().push(1, 10);
        let asking = client(&mut b, 0, 1, 1.0);
        assert_eq!((b.asking, b.waiting, b.waiting_in(0)), (1, 0, 0));
        assert_eq!(b.take(0), None); // never jumps an asking request
        let w = b.enqueue(0, 0, Who::Client(2, 0), 2.0, 5.0);
        // The older of the two first, whichever queue; an asked session to the asking one.
        let (first, is_ask) = b.pop(0, false).unwrap();
        assert_eq!((first.id, is_ask), (asking, true));
        let late = client(&mut b, 0, 3, 3.0);
        let (next, is_ask) = b.pop(0, true).unwrap();
        assert_eq!((next.id, is_ask), (late, true));
        let (last, is_ask) = b.pop(0, true).unwrap();
        assert_eq!((last.id, is_ask), (w, false));
        assert_eq!((b.asking, b.waiting), (0, 0));
    }

    #[test]
    fn asks_are_sent_once_and_uncovered_ones_refused() {
        let mut b = Book::default();
        let (a1, first) = b.ask(0, 0, Who::Client(1, 0), 1.0, 5.0);
        assert!(first);
        let (a2, first) = b.ask(0, 0, Who::Client(2, 0), 1.0, 5.0);
        assert!(!first);
        assert_eq!(b.take_unsent(), vec![(0, 2)]);
        assert!(b.take_unsent().is_empty());
        let a3 = client(&mut b, 0, 3, 2.0); // not sent yet: it stays whatever happens
        assert_eq!(b.asked.get(&0), Some(&2));
        // One unit granted (its session on its way), one refused: the oldest stays for
        // the session, the middle one is uncovered, the newest waits for its answer.
        b.granted(0, true);
        assert_eq!(ids(&b.ask_refused(0, 1)), vec![a2]);
        assert_eq!(b.asking, 2);
        // The session arrived and went elsewhere: the oldest is left without cover.
        assert_eq!(ids(&b.adopted(0)), vec![a1]);
        // The acceptor is gone: everything left is out of line, nothing stays counted.
        let gone: Vec<u64> = b.forget_asks().iter().map(|(_, w)| w.id).collect();
        assert_eq!(gone, vec![a3]);
        assert!(b.unsent.is_empty() && b.asked.is_empty() && b.adopting.is_empty());
        assert_eq!(b.asking, 0);
    }

    #[test]
    fn asking_requests_time_out_cancel_and_drain() {
        let mut b = Book::default();
        let a = client(&mut b, 0, 1, 1.0);
        let w = b.enqueue(1, 0, Who::Client(2, 0), 1.5, 5.0);
        let c = client(&mut b, 0, 3, 2.0);
        assert_eq!(b.earliest(), 6.0);
        assert_eq!(b.cancel(0, c).map(|x| x.id), Some(c));
        assert!(b.cancel(0, c).is_none());
        let (out, next) = b.expire(6.2);
        assert_eq!(out.iter().map(|(_, x)| x.id).collect::<Vec<_>>(), vec![a]);
        assert_eq!(next, 6.5);
        assert_eq!((b.asking, b.waiting), (0, 1));
        let d = client(&mut b, 0, 4, 3.0);
        let mut drained: Vec<u64> = b.drain_waiters().iter().map(|(_, x)| x.id).collect();
        drained.sort();
        assert_eq!(drained, vec![w, d]);
        assert_eq!((b.asking, b.waiting, b.earliest()), (0, 0, 0.0));
    }

    #[test]
    fn ring_rotates_by_registrant() {
        let mut r = IdleRing::default();
        r.push(1, 10);
        r.push(1, 11);
        r.push(2, 20);
        assert_eq!(r.take(), Some(10));
        assert_eq!(r.take(), Some(20));
        assert_eq!(r.take(), Some(11));
        assert_eq!(r.take(), None);
        r.push(3, 30);
        r.push(3, 31);
        assert!(r.remove(3, 30));
        assert_eq!(r.len(), 1);
        assert_eq!(r.take(), Some(31));
    }
}
