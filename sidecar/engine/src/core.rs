//! The engine's state and its event loop turn: one `epoll_wait` over the listening
//! socket, the client connections, the sessions and two timers, handled to completion
//! without Python.  What Python must learn (a session to give back, a ticket served, a
//! connection to take over, a waiting count that changed) is queued as a `Hook` and
//! delivered by `engine.rs` after the engine's lock is released, so Python may call the
//! engine again from inside a hook.  `Core`'s operations live beside it, one concept a
//! file: `accept.rs`, `client.rs`, `output.rs`, `session.rs` and `lease.rs`.

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::rc::Rc;

use pyo3::prelude::*;

use crate::book::{Book, KeyId};
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
    /// `--queued-cpu-policy batch`: SCHED_BATCH while requests wait (cpu.rs).
    pub queued_batch: bool,
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
    /// The worker thread runs SCHED_BATCH now (cpu.rs).
    pub batch: bool,
    /// The worker's CPUs were saturated in the last sample (`Engine.set_contended`).
    pub contended: bool,
    /// Requests waited or asked in this sampling window, and in the one before.
    pub waited: bool,
    pub held: bool,
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
            batch: false,
            contended: false,
            waited: false,
            held: false,
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
}
