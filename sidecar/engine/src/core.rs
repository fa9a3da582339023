//! The engine's state and its event loop turn: one `epoll_wait` over the listening
//! socket, the client connections, the sessions and two timers, handled to completion
//! without Python.  What Python must learn (a session to give back, a ticket served, a
//! connection to take over, a waiting count that changed) is queued as a `Hook` and
//! delivered by `lib.rs` after the engine's lock is released, so Python may call the
//! engine again from inside a hook.

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::rc::Rc;

use pyo3::prelude::*;

use crate::book::{Book, KeyId, Waiter, Who};
use crate::response::{Release, Resp};
use crate::route::{Ip, Net, Router};
use crate::spill::Spill;
use crate::stats::{Budget, Counters, Rejection, SliceStats};
use crate::sys::{self, Epoll, Timer};

pub const T_LISTENER: u64 = 1;
pub const T_CLIENT: u64 = 2;
pub const T_SESSION: u64 = 3;
pub const T_TICK: u64 = 4;
pub const T_QUEUE: u64 = 5;

pub fn token(kind: u64, slot: usize, gen: u32) -> u64 {
    (kind << 56) | ((gen as u64 & 0xff_ffff) << 32) | slot as u64
}

pub fn untoken(t: u64) -> (u64, usize, u32) {
    (t >> 56, (t & 0xffff_ffff) as usize, ((t >> 32) & 0xff_ffff) as u32)
}

pub const MEMORY: usize = 0;
pub const DISK: usize = 1;
/// Response bytes held in memory for clients (`ProxyStats.response_memory`, shared with
/// Python's `clientout.ClientOutput`), limited by `--response-memory-total`.
pub const RESPONSE: usize = 2;
/// Bytes a connection may keep in memory whatever the response budget says
/// (`clientout.MEMORY_FLOOR`), so a client that reads is never starved by others.
pub const MEMORY_FLOOR: i64 = 16 * 1024;

pub struct Settings {
    pub max_header_bytes: usize,
    pub max_body: usize,
    pub response_buffer: usize,
    pub response_spill_max: u64,
    pub spill_dir: String,
    pub upstream_timeout: f64,
    pub client_idle_timeout: f64,
    pub drain_idle_grace: f64,
    pub request_timeout: f64,
    pub send_timeout: f64,
    pub max_retries: u32,
    pub tick: f64,
    pub takeover_all: bool,
    pub fd_reserve: usize,
    pub via: Vec<u8>,
    pub proto: Vec<u8>,
    pub trusted: Vec<Net>,
}

/// What Python must hear about; delivered after the lock is released.
pub enum Hook {
    Adopt {
        fd: RawFd,
        data: Vec<u8>,
    },
    GiveBack {
        handle: u64,
        state: &'static str,
    },
    Handoff {
        handle: u64,
        ticket: Py<PyAny>,
        pre: Vec<u8>,
        waited: f64,
    },
    Refused {
        ticket: Py<PyAny>,
        reason: Rejection,
        waited: f64,
    },
    Want {
        urgent: bool,
    },
    /// ASK units are due (`Book::take_unsent`): Python sends them.
    Ask,
    Drained,
    Empty,
    FdRefused,
}

pub fn state_name(r: &Release) -> &'static str {
    match r {
        Release::Idle { .. } => "idle",
        Release::Retired => "retired",
        Release::Broken => "broken",
    }
}

/// One client address: the forwarding lines the services see, computed once.
pub struct Peer {
    pub ip: Option<Ip>,
    pub trusted: bool,
    pub forwarding: Vec<u8>,
    pub xff: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Deadline {
    None,
    Idle,
    Request,
    Upstream,
    Send,
}

pub struct Req {
    pub wire: Vec<u8>,
    pub key: KeyId,
    pub slice: usize,
    pub head_only: bool,
    pub v10: bool,
    pub keep_alive: bool,
    pub idempotent: bool,
    pub retries: u32,
    pub t0: f64,
    pub booked: i64,
    pub waiter: Option<u64>,
}

pub struct Client {
    pub fd: RawFd,
    pub peer: Rc<Peer>,
    pub inbuf: Vec<u8>,
    /// Bytes of `inbuf` booked in the memory budget (client bytes held, as Python books
    /// the bodies it holds).
    pub booked_in: i64,
    pub active: Option<Box<Req>>,
    pub session: Option<usize>,
    pub out: Vec<u8>,
    pub out_off: usize,
    pub spill: Option<Spill>,
    /// Output that fitted neither the transport buffer nor the spill file (in order).
    pub held: Vec<Vec<u8>>,
    /// Bytes of `out` (pending) and `held` booked in the response memory budget.
    pub booked_out: i64,
    pub interest: u32,
    pub eof: bool,
    pub close_after: bool,
    pub handover: bool,
    pub write_paused: bool,
    pub streamed: bool,
    pub deadline: f64,
    pub dkind: Deadline,
    pub progress: u64,
    pub seen: u64,
    pub sent: u64,
    pub sent_seen: u64,
}

impl Client {
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_off
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SState {
    Idle,
    /// Serving a native client's request.
    Busy,
    /// A client gone mid-request: the response is read and dropped, then released.
    Discard,
    /// Checked out to Python (a `SessionConn` reads it); not in our epoll set.
    Out,
}

pub struct Session {
    pub handle: u64,
    pub sid: i64,
    pub fd: RawFd,
    pub service: String,
    /// The slice it is leased for (a sliced RECALL names it).
    pub slice: String,
    pub registrant: i64,
    pub key: KeyId,
    pub epoch: u64,
    pub held: bool,
    pub state: SState,
    pub owner: Option<(usize, u32)>,
    pub pre: Vec<u8>,
    pub wpend: Vec<u8>,
    pub interest: u32,
    pub resp: Resp,
    pub idle_since: f64,
    pub discard_until: f64,
    /// The request in flight is a HEAD (its response has no body).
    pub head_only: bool,
}

pub struct Slab<T> {
    pub items: Vec<Option<T>>,
    pub gens: Vec<u32>,
    free: Vec<usize>,
    pub len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { items: Vec::new(), gens: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, item: T) -> (usize, u32) {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.gens[i] = self.gens[i].wrapping_add(1) & 0xff_ffff;
            self.items[i] = Some(item);
            (i, self.gens[i])
        } else {
            self.items.push(Some(item));
            self.gens.push(0);
            (self.items.len() - 1, 0)
        }
    }

    pub fn remove(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i)?.take();
        if item.is_some() {
            self.len -= 1;
            self.free.push(i);
        }
        item
    }

    pub fn get(&self, i: usize, gen: u32) -> Option<&T> {
        if self.gens.get(i) == Some(&gen) {
            self.items[i].as_ref()
        } else {
            None
        }
    }

    pub fn alive(&self, i: usize, gen: u32) -> bool {
        self.get(i, gen).is_some()
    }

    pub fn at(&mut self, i: usize) -> &mut T {
        self.items[i].as_mut().expect("live slab slot")
    }

    pub fn slots(&self) -> Vec<usize> {
        (0..self.items.len()).filter(|&i| self.items[i].is_some()).collect()
    }
}

#[derive(Default)]
pub struct Names {
    pub names: Vec<String>,
    pub index: HashMap<String, usize>,
}

impl Names {
    pub fn id(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), self.names.len() - 1);
        self.names.len() - 1
    }
}

pub struct Core {
    pub ep: Epoll,
    pub tick: Timer,
    pub qtimer: Timer,
    pub listener: Option<RawFd>,
    pub clients: Slab<Client>,
    pub sessions: Slab<Session>,
    pub by_handle: HashMap<u64, usize>,
    pub next_handle: u64,
    pub book: Book,
    pub settings: Settings,
    pub router: Router,
    pub services: Names,
    pub slices: Names,
    pub keys: HashMap<(usize, usize), KeyId>,
    pub key_names: Vec<(usize, usize)>,
    /// Per slice id: (queue timeout, this worker's share of maxWaiting); absent: QueueFull.
    pub queues: HashMap<usize, (f64, usize)>,
    pub retry_after: i64,
    pub stats: Counters,
    pub slice_stats: Vec<SliceStats>,
    pub budgets: [Budget; 3],
    pub hooks: Vec<Hook>,
    pub scratch: Vec<u8>,
    pub handoffs: Vec<(usize, u32, usize)>,
    pub peers: HashMap<String, Rc<Peer>>,
    pub draining: bool,
    pub closing: bool,
    /// The acceptor answers ASK (control revision 3) and the control connection is up: a
    /// request with no idle session and no room in its slice's queue asks (`Book::ask`).
    pub asking: bool,
    pub epoch: u64,
    pub busy: usize,
    pub want_dirty: bool,
    pub want_urgent: bool,
    pub reported: std::collections::HashSet<KeyId>,
    pub python_fds: usize,
    pub fd_limit: usize,
    pub spill_files: usize,
    pub record: bool,
    pub acquires: Vec<(String, String)>,
    pub events: Vec<(&'static str, i64, &'static str)>,
    pub shutting_down: bool,
}

// The engine runs on one thread (the worker's event loop); the lock in `lib.rs` keeps
// any other thread (tests reading counters) out while it does.
unsafe impl Send for Core {}

impl Core {
    pub fn new(settings: Settings) -> std::io::Result<Core> {
        let ep = Epoll::new()?;
        let tick = Timer::new()?;
        let qtimer = Timer::new()?;
        ep.add(tick.fd, token(T_TICK, 0, 0), sys::IN)?;
        ep.add(qtimer.fd, token(T_QUEUE, 0, 0), sys::IN)?;
        Ok(Core {
            ep,
            tick,
            qtimer,
            listener: None,
            clients: Slab::default(),
            sessions: Slab::default(),
            by_handle: HashMap::new(),
            next_handle: 0,
            book: Book::default(),
            settings,
            router: Router::default(),
            services: Names::default(),
            slices: Names::default(),
            keys: HashMap::new(),
            key_names: Vec::new(),
            queues: HashMap::new(),
            retry_after: 1,
            stats: Counters::default(),
            slice_stats: Vec::new(),
            budgets: [Budget::default(); 3],
            hooks: Vec::new(),
            scratch: vec![0u8; 256 * 1024],
            handoffs: Vec::new(),
            peers: HashMap::new(),
            draining: false,
            closing: false,
            asking: false,
            epoch: 0,
            busy: 0,
            want_dirty: false,
            want_urgent: false,
            reported: Default::default(),
            python_fds: 0,
            fd_limit: sys::fd_limit(),
            spill_files: 0,
            record: false,
            acquires: Vec::new(),
            events: Vec::new(),
            shutting_down: false,
        })
    }

    pub fn key(&mut self, service: usize, slice: usize) -> KeyId {
        if let Some(&k) = self.keys.get(&(service, slice)) {
            return k;
        }
        self.key_names.push((service, slice));
        let k = self.key_names.len() - 1;
        self.keys.insert((service, slice), k);
        k
    }

    pub fn slice_stats(&mut self, slice: usize) -> &mut SliceStats {
        while self.slice_stats.len() <= slice {
            self.slice_stats.push(SliceStats::default());
        }
        &mut self.slice_stats[slice]
    }

    // -- the loop turn --------------------------------------------------------------------
    pub fn run(&mut self) {
        let mut events: [libc::epoll_event; 128] = unsafe { std::mem::zeroed() };
        let n = self.ep.wait(&mut events);
        for ev in events.iter().take(n) {
            let (kind, slot, gen) = untoken(ev.u64);
            let flags = ev.events;
            match kind {
                T_LISTENER => self.accept(),
                T_CLIENT => {
                    if !self.clients.alive(slot, gen) {
                        continue;
                    }
                    if flags & sys::OUT != 0 {
                        self.client_writable(slot, gen);
                    }
                    if flags & (sys::IN | sys::HUP | sys::ERR) != 0 && self.clients.alive(slot, gen) {
                        self.client_readable(slot, gen);
                    }
                }
                T_SESSION => {
                    if !self.sessions.alive(slot, gen) {
                        continue;
                    }
                    if flags & sys::OUT != 0 {
                        self.session_writable(slot);
                    }
                    if flags & (sys::IN | sys::HUP | sys::ERR) != 0 && self.sessions.alive(slot, gen) {
                        self.session_readable(slot);
                    }
                }
                T_TICK => {
                    self.tick.clear();
                    self.sweep();
                }
                T_QUEUE => {
                    self.qtimer.clear();
                    self.expire_waiters();
                }
                _ => {}
            }
        }
    }

    pub fn arm_tick(&mut self) {
        let wanted = self.clients.len > 0 || self.sessions.items.iter().flatten().any(|s| s.state == SState::Discard);
        if wanted && self.tick.at == 0.0 {
            let at = sys::now() + self.settings.tick;
            self.tick.set(at);
        } else if !wanted && self.tick.at != 0.0 {
            self.tick.set(0.0);
        }
    }

    fn sweep(&mut self) {
        self.tick.at = 0.0;
        let now = sys::now();
        for slot in self.clients.slots() {
            let (deadline, gen) = {
                let c = self.clients.items[slot].as_ref().unwrap();
                (c.deadline, self.clients.gens[slot])
            };
            if deadline > 0.0 && now >= deadline {
                self.on_deadline(slot, gen, now);
            }
        }
        for slot in self.sessions.slots() {
            let s = self.sessions.at(slot);
            if s.state == SState::Discard && now >= s.discard_until {
                self.release(slot, Release::Broken); // DrainSink._expire
            }
        }
    }

    // -- accepting ------------------------------------------------------------------------
    pub fn listen(&mut self, fd: RawFd) -> std::io::Result<()> {
        let own = sys::dup(fd)?;
        sys::set_nonblocking(own)?;
        self.ep.add(own, token(T_LISTENER, 0, 0), sys::IN)?;
        self.listener = Some(own);
        Ok(())
    }

    pub fn unlisten(&mut self) {
        if let Some(fd) = self.listener.take() {
            self.ep.delete(fd);
            sys::close(fd);
        }
    }

    fn fds_in_use(&self) -> usize {
        self.clients.len + self.sessions.len + self.spill_files + self.python_fds
    }

    fn accept(&mut self) {
        let listener = match self.listener {
            Some(fd) => fd,
            None => return,
        };
        for _ in 0..64 {
            let (fd, peer) = match sys::accept(listener) {
                Ok(Some(x)) => x,
                Ok(None) => return,
                Err(_) => return, // EMFILE and friends: the reserve guard keeps us off it
            };
            if fd < 0 {
                continue;
            }
            if self.fds_in_use() + self.settings.fd_reserve >= self.fd_limit {
                // Near the descriptor limit: a clear answer now (liveness.FdGuard).
                let _ = sys::send(fd, &crate::stats::canned(503, true, false, false, 1));
                sys::close(fd);
                self.hooks.push(Hook::FdRefused);
                continue;
            }
            if sys::is_tcp(fd) {
                sys::set_nodelay(fd);
            }
            self.stats.connections_total += 1;
            self.stats.connections_active += 1;
            if self.settings.takeover_all {
                self.handover_fd(fd, Vec::new());
                continue;
            }
            let peer = self.peer(&peer);
            let client = Client {
                fd,
                peer,
                inbuf: Vec::new(),
                booked_in: 0,
                booked_out: 0,
                active: None,
                session: None,
                out: Vec::new(),
                out_off: 0,
                spill: None,
                held: Vec::new(),
                interest: sys::IN,
                eof: false,
                close_after: false,
                handover: false,
                write_paused: false,
                streamed: false,
                deadline: sys::now() + self.settings.client_idle_timeout,
                dkind: Deadline::Idle,
                progress: 0,
                seen: 0,
                sent: 0,
                sent_seen: 0,
            };
            let (slot, gen) = self.clients.insert(client);
            if self.ep.add(fd, token(T_CLIENT, slot, gen), sys::IN).is_err() {
                self.clients.remove(slot);
                self.stats.connections_active -= 1;
                sys::close(fd);
            }
        }
    }

    fn peer(&mut self, ip: &str) -> Rc<Peer> {
        if let Some(p) = self.peers.get(ip) {
            return p.clone();
        }
        let parsed = Ip::parse(ip);
        let trusted = match parsed.as_ref() {
            Some(a) => self.settings.trusted.iter().any(|n| n.contains(a)),
            None => false,
        };
        let node: Vec<u8> = if ip.contains(':') {
            format!("\"[{}]\"", ip).into_bytes()
        } else if ip.is_empty() {
            b"unknown".to_vec()
        } else {
            ip.as_bytes().to_vec()
        };
        let s = &self.settings;
        let mut forwarding = Vec::new();
        forwarding.extend_from_slice(b"Via: 1.1 ");
        forwarding.extend_from_slice(&s.via);
        forwarding.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
        forwarding.extend_from_slice(&s.proto);
        forwarding.extend_from_slice(b"\r\nForwarded: for=");
        forwarding.extend_from_slice(&node);
        forwarding.extend_from_slice(b";proto=");
        forwarding.extend_from_slice(&s.proto);
        forwarding.extend_from_slice(b"\r\n");
        let mut xff = b"X-Forwarded-For: ".to_vec();
        xff.extend_from_slice(if ip.is_empty() { b"unknown" } else { ip.as_bytes() });
        xff.extend_from_slice(b"\r\n");
        let p = Rc::new(Peer { ip: parsed, trusted, forwarding, xff });
        if self.peers.len() < 4096 {
            self.peers.insert(ip.to_string(), p.clone());
        }
        p
    }

    /// Give the connection to Python: the bytes not yet served go with it.
    pub fn handover_fd(&mut self, fd: RawFd, data: Vec<u8>) {
        self.stats.connections_total -= 1;
        self.stats.connections_active -= 1;
        self.stats.handovers += 1;
        self.hooks.push(Hook::Adopt { fd, data });
    }

    // -- the lease book ---------------------------------------------------------------------
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

    fn expire_waiters(&mut self) {
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
