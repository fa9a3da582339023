//! The worker's lease book in native form: `leasebook.LeaseBook` and `idlering.IdleRing`.
//!
//! Idle sessions per key (service, slice) are rotated by registrant (invariant 8: the
//! next idle session comes from the registrant that waited longest for a turn), waiting
//! requests are a FIFO per key (native client connections and Python tickets in one
//! queue, so whoever waited longest gets the next session), recalls owed per (service,
//! slice the sessions are leased for; "" = any).
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
    next_id: u64,
}

impl Book {
    pub fn has_waiters(&self, key: KeyId) -> bool {
        self.waiters.get(&key).map_or(false, |q| !q.is_empty())
    }

    /// An idle session of `key`, never jumping the key's waiters.
    pub fn take(&mut self, key: KeyId) -> Option<usize> {
        if self.has_waiters(key) {
            return None;
        }
        self.idle.get_mut(&key)?.take()
    }

    pub fn enqueue(&mut self, key: KeyId, slice: usize, who: Who, now: f64, timeout: f64) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.waiters.entry(key).or_default().push_back(Waiter { id, who, started: now, deadline: now + timeout, slice });
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

    /// The oldest waiter of `key`, out of the queue.
    pub fn pop(&mut self, key: KeyId) -> Option<Waiter> {
        let w = self.waiters.get_mut(&key)?.pop_front()?;
        self.counted_out(w.slice);
        Some(w)
    }

    /// Leave the queue; None when the waiter was already served or refused.
    pub fn cancel(&mut self, key: KeyId, id: u64) -> Option<Waiter> {
        let q = self.waiters.get_mut(&key)?;
        let pos = q.iter().position(|w| w.id == id)?;
        let w = q.remove(pos)?;
        self.counted_out(w.slice);
        Some(w)
    }

    /// Waiters whose deadline passed (oldest first per key), and the earliest deadline left.
    pub fn expire(&mut self, now: f64) -> (Vec<(KeyId, Waiter)>, f64) {
        let mut out = Vec::new();
        let mut earliest = 0.0f64;
        for (&key, q) in self.waiters.iter_mut() {
            while q.front().map_or(false, |w| w.deadline <= now) {
                out.push((key, q.pop_front().unwrap()));
            }
            if let Some(w) = q.front() {
                if earliest == 0.0 || w.deadline < earliest {
                    earliest = w.deadline;
                }
            }
        }
        for (_, w) in &out {
            let s = w.slice;
            self.counted_out(s);
        }
        (out, earliest)
    }

    pub fn earliest(&self) -> f64 {
        let mut earliest = 0.0f64;
        for q in self.waiters.values() {
            if let Some(w) = q.front() {
                if earliest == 0.0 || w.deadline < earliest {
                    earliest = w.deadline;
                }
            }
        }
        earliest
    }

    pub fn drain_waiters(&mut self) -> Vec<(KeyId, Waiter)> {
        let mut out = Vec::new();
        for (&key, q) in self.waiters.iter_mut() {
            while let Some(w) = q.pop_front() {
                out.push((key, w));
            }
        }
        self.waiting_by_slice.clear();
        self.waiting = 0;
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
