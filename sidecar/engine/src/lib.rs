//! `backdial_engine`: the sidecar worker's native relay engine (a CPython extension).
//!
//! `Engine` owns an epoll set with the client listening socket, the client connections
//! it serves and the sessions the worker holds, and runs one turn of it per call to
//! `run()`: Python registers `fileno()` with its event loop (`loop.add_reader`), so the
//! worker stays one thread and one loop, and at steady state a request is accepted,
//! parsed, classified, leased, relayed and released without any Python code running.
//! The Python side (`backdial.sidecar.nativeproxy`, `nativepool`) stays the lease
//! authority: it adopts granted sessions into the engine, takes them back on recalls,
//! idle release and drain, sends the control records, and serves every connection the
//! engine hands over (`Hook::Adopt`).  Engine calls into Python happen only through
//! hooks delivered after the engine's lock is released, so Python may call back in.
//!
//! This file holds the class's Python methods (one `#[pymethods]` block: pyo3 is built
//! without `multiple-pymethods`); `engine.rs` holds what they share.

mod accept;
mod book;
mod client;
mod core;
mod cpu;
mod engine;
pub mod head;
mod lease;
mod output;
mod parity;
pub mod response;
mod route;
mod session;
mod spill;
mod stats;
mod sys;

use std::sync::Mutex;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::book::Who;
use crate::core::{Core, SState, Settings, RESPONSE};
use crate::route::Net;
use crate::session::Adopted;

pub use crate::engine::Engine;
use crate::engine::{get, release_of};

#[pymethods]
impl Engine {
    #[new]
    fn new(settings: &Bound<'_, PyDict>) -> PyResult<Engine> {
        let trusted: Vec<String> = get(settings, "trusted_proxies")?;
        let mut nets = Vec::new();
        for t in &trusted {
            nets.push(Net::parse(t).ok_or_else(|| PyValueError::new_err(format!("bad CIDR {t}")))?);
        }
        let s = Settings {
            max_header_bytes: get(settings, "max_header_bytes")?,
            max_body: get(settings, "max_body")?,
            response_buffer: get(settings, "response_buffer")?,
            response_spill_max: get(settings, "response_spill_max")?,
            spill_dir: get(settings, "spill_dir")?,
            upstream_timeout: get(settings, "upstream_timeout")?,
            client_idle_timeout: get(settings, "client_idle_timeout")?,
            drain_idle_grace: get(settings, "drain_idle_grace")?,
            request_timeout: get(settings, "request_timeout")?,
            send_timeout: get(settings, "send_timeout")?,
            max_retries: get(settings, "max_retries")?,
            tick: get(settings, "tick")?,
            takeover_all: get(settings, "takeover_all")?,
            fd_reserve: get(settings, "fd_reserve")?,
            queued_batch: get(settings, "queued_batch")?,
            via: get::<String>(settings, "via")?.into_bytes(),
            proto: get::<String>(settings, "proto")?.into_bytes(),
            trusted: nets,
        };
        let mut core = Core::new(s).map_err(|e| PyOSError::new_err(e.to_string()))?;
        core.budgets[RESPONSE].limit = get(settings, "response_memory_total")?;
        Ok(Engine { core: Mutex::new(core), hooks: Mutex::new(None) })
    }

    fn set_hooks(&self, hooks: Py<PyAny>) -> PyResult<()> {
        *self.hooks.lock().map_err(|_| PyRuntimeError::new_err("poisoned"))? = Some(hooks);
        Ok(())
    }

    /// The worker's CPUs as last sampled (`cpuload.CpuWatch`); the policy follows now.
    fn set_contended(&self, contended: bool) -> PyResult<()> {
        self.lock()?.sample_cpu(contended);
        Ok(())
    }

    fn fileno(&self) -> PyResult<i32> {
        Ok(self.lock()?.ep.fd)
    }

    /// One turn: handle what is ready, then deliver the hooks it produced.
    fn run(&self, py: Python<'_>) -> PyResult<()> {
        self.lock()?.run();
        self.deliver(py)
    }

    fn listen(&self, fd: i32) -> PyResult<()> {
        self.lock()?.listen(fd).map_err(|e| PyOSError::new_err(e.to_string()))
    }

    fn unlisten(&self) -> PyResult<()> {
        self.lock()?.unlisten();
        Ok(())
    }

    /// The routing and slicing tables of a policy generation (built by `nativeproxy`).
    fn configure(
        &self,
        routes: Vec<(Option<Vec<u8>>, Vec<u8>, String)>,
        default_service: String,
        slices: Vec<(String, Vec<route::RuleArgs>)>,
        default_slice: String,
        queues: Vec<(String, f64, usize)>,
        retry_after: i64,
    ) -> PyResult<bool> {
        let mut core = self.lock()?;
        let c = &mut *core;
        let router = route::compile(c, routes, &default_service, slices, &default_slice);
        c.queues.clear();
        for (name, timeout, limit) in queues {
            let id = c.slices.id(&name);
            c.queues.insert(id, (timeout, limit));
        }
        c.retry_after = retry_after;
        let python_only = router.python_only;
        c.router = router;
        Ok(!python_only)
    }

    // -- sessions -------------------------------------------------------------------------
    /// `session::Adopted`, field by field: pyo3 parameters are the Python call's
    /// positional arguments (`nativepool`'s `_wrap`).
    #[allow(clippy::too_many_arguments)]
    fn add_session(
        &self,
        sid: i64,
        fd: i32,
        service: &str,
        registrant: i64,
        key_service: &str,
        key_slice: &str,
        lease_slice: &str,
        epoch: u64,
    ) -> PyResult<u64> {
        self.lock()?
            .add_session(Adopted { sid, fd, service, registrant, key_service, key_slice, lease_slice, epoch })
            .map_err(|e| PyOSError::new_err(e.to_string()))
    }

    /// A clean, free session (just adopted): recall, waiter or idle; one granted for an
    /// ask (`asked`) to the oldest asking request first.
    #[pyo3(signature = (handle, asked=false))]
    fn settle(&self, py: Python<'_>, handle: u64, asked: bool) -> PyResult<()> {
        {
            let mut c = self.lock()?;
            if let Some(slot) = Self::slot(&c, handle) {
                c.settle_as(slot, asked);
            }
        }
        self.deliver(py)
    }

    /// `LeasePool.try_acquire` for the Python path: (handle, RETIRE prefix) checked out.
    fn take(&self, service: &str, slice: &str) -> PyResult<Option<(u64, Py<PyBytes>)>> {
        let mut c = self.lock()?;
        let svc = c.services.id(service);
        let sl = c.slices.id(slice);
        let key = c.key(svc, sl);
        let slot = match c.take(key) {
            Some(s) => s,
            None => return Ok(None),
        };
        let (handle, pre) = c.checkout(slot);
        Python::with_gil(|py| Ok(Some((handle, PyBytes::new(py, &pre).unbind()))))
    }

    /// A session the Python path used comes back (`LeasePool.release`).
    fn release(&self, py: Python<'_>, handle: u64, state: &str, pre: Vec<u8>) -> PyResult<()> {
        let rel = release_of(state, pre)?;
        {
            let mut c = self.lock()?;
            if let Some(slot) = Self::slot(&c, handle) {
                if c.sessions.at(slot).state == SState::Out {
                    c.checkin(slot);
                }
                c.release(slot, rel);
            }
        }
        self.deliver(py)
    }

    fn close_session(&self, py: Python<'_>, handle: u64) -> PyResult<()> {
        {
            let mut c = self.lock()?;
            if let Some(slot) = Self::slot(&c, handle) {
                let busy = c.sessions.at(slot).state == SState::Busy;
                if busy {
                    c.session_failed(slot);
                } else {
                    if matches!(c.sessions.at(slot).state, SState::Out | SState::Discard) {
                        c.busy -= 1;
                    }
                    c.drop_session(slot);
                }
            }
        }
        self.deliver(py)
    }

    /// Up to `n` idle sessions of `service` leased for `slice` ("" = any) for Python to
    /// give back; the rest of `n` is owed by the next such sessions to come free
    /// (`LeaseBook.recall_idle`).
    fn recall_idle(&self, service: &str, slice: &str, n: u32) -> PyResult<Vec<u64>> {
        let out = self.idle_now(service, slice, n)?;
        let mut c = self.lock()?;
        if (out.len() as u32) < n {
            *c.book.recall.entry((service.to_string(), slice.to_string())).or_insert(0) += n - out.len() as u32;
        }
        Ok(out)
    }

    /// A RECALL `now` (control revision 3, a probe for another worker's ASK): up to `n`
    /// idle sessions of `service` leased for `slice` ("" = any); nothing is owed for the rest.
    fn idle_now(&self, service: &str, slice: &str, n: u32) -> PyResult<Vec<u64>> {
        self.take_idle_where(|s| s.service == service && (slice.is_empty() || s.slice == slice), n as usize)
    }

    /// The acceptor answers ASK (control revision 3) and the control connection is up: a
    /// request that finds no idle session and no room in its slice's queue asks for one now.
    fn set_asking(&self, asking: bool) -> PyResult<()> {
        self.lock()?.asking = asking;
        Ok(())
    }

    // -- asking (control revision 3; `LeaseBook.ask` ... `forget_asks`) ----------------------
    /// A Python request that may not wait joins the key's asking requests: (id, whether a
    /// flush of ASK units is now due).
    fn ask(&self, service: &str, slice: &str, ticket: Py<PyAny>, started: f64, timeout: f64) -> PyResult<(u64, bool)> {
        let mut c = self.lock()?;
        let key = Self::key_of(&mut c, service, slice);
        let sl = c.key_names[key].1;
        let got = c.book.ask(key, sl, Who::Ticket(ticket), started, timeout);
        c.arm_queue_timer();
        Ok(got)
    }

    /// The ASK units to send now, [(service, slice, n)], counted as sent.
    fn take_unsent(&self) -> PyResult<Vec<(String, String, u32)>> {
        let mut c = self.lock()?;
        let units = c.book.take_unsent();
        Ok(units
            .into_iter()
            .map(|(key, n)| {
                let (svc, sl) = c.key_names[key];
                (c.services.names[svc].clone(), c.slices.names[sl].clone(), n)
            })
            .collect())
    }

    /// A GRANT entry for the key (`asked`: it answers one ask unit); its session is on its way.
    fn granted(&self, service: &str, slice: &str, asked: bool) -> PyResult<()> {
        let mut c = self.lock()?;
        let key = Self::key_of(&mut c, service, slice);
        c.book.granted(key, asked);
        Ok(())
    }

    /// A REFUSE of `n` units: the asking requests left without cover get an idle session
    /// of the key, else 503 `queue_full`.
    fn ask_refused(&self, py: Python<'_>, service: &str, slice: &str, n: u32) -> PyResult<()> {
        {
            let mut c = self.lock()?;
            let key = Self::key_of(&mut c, service, slice);
            let out = c.book.ask_refused(key, n);
            c.finish_asks(out.into_iter().map(|w| (key, w)).collect());
        }
        self.deliver(py)
    }

    /// A session granted for the key was settled (or could not be used).
    fn adopted(&self, py: Python<'_>, service: &str, slice: &str) -> PyResult<()> {
        {
            let mut c = self.lock()?;
            let key = Self::key_of(&mut c, service, slice);
            let out = c.book.adopted(key);
            c.finish_asks(out.into_iter().map(|w| (key, w)).collect());
        }
        self.deliver(py)
    }

    /// The acceptor is gone: asking is off until the next CONFIG says it may, and no ask or
    /// grant of the old connection will be answered: every asking request is finished.
    fn forget_asks(&self, py: Python<'_>) -> PyResult<()> {
        {
            let mut c = self.lock()?;
            c.asking = false;
            let out = c.book.forget_asks();
            c.finish_asks(out);
        }
        self.deliver(py)
    }

    /// {(service, slice): asking requests} for keys with any.
    fn asking_counts(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let c = self.lock()?;
        Self::counts(py, &c, &c.book.asks)
    }

    /// A session given back unasked (idle release, a removed slice) still answers a
    /// pending recall of its slice (`LeaseBook.returned`).
    fn returned(&self, service: &str, slice: &str) -> PyResult<bool> {
        Ok(self.lock()?.book.owe(service, slice))
    }

    /// Pending recalls, {(service, slice): n} (`LeaseBook.recall`).
    fn recalls(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let c = self.lock()?;
        let d = PyDict::new(py);
        for ((service, slice), &n) in &c.book.recall {
            d.set_item((service, slice), n)?;
        }
        Ok(d.unbind())
    }

    fn idle_since_before(&self, cutoff: f64) -> PyResult<Vec<u64>> {
        self.take_idle_where(|s| s.idle_since < cutoff, usize::MAX)
    }

    /// The acceptor reclaimed our leases: idle ones go now (Python closes them); busy ones
    /// stay until their request ends, then go as broken (their epoch is stale).
    fn orphans(&self) -> PyResult<Vec<u64>> {
        let out = self.take_idle_where(|_| true, usize::MAX)?;
        let mut c = self.lock()?;
        for slot in c.sessions.slots() {
            if c.sessions.at(slot).state != SState::Idle {
                c.sessions.at(slot).held = false;
            }
        }
        c.book.recall.clear();
        Ok(out)
    }

    fn set_epoch(&self, epoch: u64) -> PyResult<()> {
        self.lock()?.epoch = epoch;
        Ok(())
    }

    /// The pool is closing: refuse every waiter, lease nothing more.
    fn close_queues(&self, py: Python<'_>) -> PyResult<()> {
        self.lock()?.close_queues();
        self.deliver(py)
    }

    fn busy_handles(&self) -> PyResult<Vec<u64>> {
        let c = self.lock()?;
        Ok(c.sessions
            .items
            .iter()
            .flatten()
            .filter(|s| matches!(s.state, SState::Busy | SState::Out | SState::Discard))
            .map(|s| s.handle)
            .collect())
    }

    fn busy_count(&self) -> PyResult<usize> {
        Ok(self.lock()?.busy)
    }

    /// {(service, slice): idle handles}
    fn idle_map(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let c = self.lock()?;
        let d = PyDict::new(py);
        for (&key, ring) in &c.book.idle {
            if ring.len() == 0 {
                continue;
            }
            let (svc, sl) = c.key_names[key];
            let handles: Vec<u64> =
                ring.slots().iter().map(|&s| c.sessions.items[s].as_ref().map_or(0, |x| x.handle)).collect();
            d.set_item((&c.services.names[svc], &c.slices.names[sl]), handles)?;
        }
        Ok(d.unbind())
    }

    // -- waiting (Python tickets share the native FIFOs) -----------------------------------
    fn enqueue(&self, service: &str, slice: &str, ticket: Py<PyAny>, started: f64, timeout: f64) -> PyResult<u64> {
        let mut c = self.lock()?;
        let svc = c.services.id(service);
        let sl = c.slices.id(slice);
        let key = c.key(svc, sl);
        let id = c.book.enqueue(key, sl, Who::Ticket(ticket), started, timeout);
        c.arm_queue_timer();
        Ok(id)
    }

    fn cancel(&self, service: &str, slice: &str, id: u64) -> PyResult<bool> {
        let mut c = self.lock()?;
        let svc = c.services.id(service);
        let sl = c.slices.id(slice);
        let key = c.key(svc, sl);
        let found = c.book.cancel(key, id).is_some();
        c.arm_queue_timer();
        Ok(found)
    }

    fn waiting_in(&self, slice: &str) -> PyResult<usize> {
        let mut c = self.lock()?;
        let sl = c.slices.id(slice);
        Ok(c.book.waiting_in(sl))
    }

    /// {(service, slice): waiting requests} for keys with waiters.
    fn waiting_counts(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let c = self.lock()?;
        Self::counts(py, &c, &c.book.waiters)
    }

    /// Python sent the WANT records: which keys the acceptor now knows to be waiting.
    fn want_flushed(&self, reported: Vec<(String, String)>) -> PyResult<()> {
        let mut c = self.lock()?;
        c.want_dirty = false;
        c.want_urgent = false;
        c.reported.clear();
        for (svc, sl) in reported {
            let s = c.services.id(&svc);
            let l = c.slices.id(&sl);
            let k = c.key(s, l);
            c.reported.insert(k);
        }
        Ok(())
    }

    // -- the listener's life ----------------------------------------------------------------
    fn set_draining(&self, on: bool) -> PyResult<()> {
        self.lock()?.draining = on;
        Ok(())
    }

    fn draining(&self) -> PyResult<bool> {
        Ok(self.lock()?.draining)
    }

    /// Graceful stop: idle connections get `drain_idle_grace`; `Hook::Empty` when none is left.
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        self.lock()?.drain_idle();
        self.deliver(py)
    }

    fn abort_all(&self, py: Python<'_>) -> PyResult<usize> {
        let n = self.lock()?.abort_all();
        self.deliver(py)?;
        Ok(n)
    }

    fn connections(&self) -> PyResult<usize> {
        Ok(self.lock()?.clients.len)
    }

    fn set_python_fds(&self, n: usize) -> PyResult<()> {
        self.lock()?.python_fds = n;
        Ok(())
    }

    // -- counters -------------------------------------------------------------------------------
    fn counter(&self, name: &str) -> PyResult<i64> {
        let c = self.lock()?;
        Ok(c.stats.named().iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v))
    }

    fn unavailable(&self) -> PyResult<(i64, i64, i64)> {
        let c = self.lock()?;
        let u = c.stats.unavailable;
        Ok((u[0], u[1], u[2]))
    }

    /// {slice: (status {code: n}, latency (counts, sum), wait (counts, sum), rejected (3))}
    fn slice_figures(&self, py: Python<'_>) -> PyResult<Py<PyDict>> {
        let c = self.lock()?;
        let d = PyDict::new(py);
        for (i, st) in c.slice_stats.iter().enumerate() {
            let status = PyDict::new(py);
            for (code, &n) in st.status.iter().enumerate() {
                if n > 0 {
                    status.set_item(code, n)?;
                }
            }
            let lat = (st.latency.counts.to_vec(), st.latency.sum);
            let wait = (st.wait.counts.to_vec(), st.wait.sum);
            let rej = (st.rejected[0], st.rejected[1], st.rejected[2]);
            let row = PyTuple::new(
                py,
                [
                    status.into_any(),
                    lat.into_pyobject(py)?.into_any(),
                    wait.into_pyobject(py)?.into_any(),
                    rej.into_pyobject(py)?.into_any(),
                ],
            )?;
            d.set_item(&c.slices.names[i], row)?;
        }
        Ok(d.unbind())
    }

    fn budget(&self, i: usize) -> PyResult<(i64, i64, i64)> {
        let c = self.lock()?;
        let b = c.budgets.get(i).ok_or_else(|| PyValueError::new_err("budget"))?;
        Ok((b.limit, b.used, b.refused))
    }

    fn budget_set(&self, i: usize, limit: i64, used: i64, refused: i64) -> PyResult<()> {
        let mut c = self.lock()?;
        let b = c.budgets.get_mut(i).ok_or_else(|| PyValueError::new_err("budget"))?;
        b.limit = limit;
        b.used = used;
        b.refused = refused;
        Ok(())
    }

    fn budget_take(&self, i: usize, n: i64) -> PyResult<bool> {
        let mut c = self.lock()?;
        Ok(c.budgets.get_mut(i).ok_or_else(|| PyValueError::new_err("budget"))?.take(n))
    }

    fn budget_add(&self, i: usize, n: i64) -> PyResult<()> {
        let mut c = self.lock()?;
        c.budgets.get_mut(i).ok_or_else(|| PyValueError::new_err("budget"))?.used += n;
        Ok(())
    }

    /// (service, slice) the engine picks for a request head from `peer`, or None when it
    /// would hand the request to Python (the parity tests compare with `Classifier`).
    fn classify(&self, raw: &[u8], peer: &str) -> PyResult<Option<(String, String)>> {
        let c = self.lock()?;
        let limits =
            head::Limits { max_header_bytes: 65536, max_body: 65536, trusted_peer: false, wanted: &c.router.wanted };
        let h = match head::parse(raw, &limits) {
            head::Verdict::Native(h) if !c.router.python_only => h,
            _ => return Ok(None),
        };
        let ip = route::Ip::parse(peer);
        let (svc, sl) = c.router.classify(raw, &h, ip.as_ref());
        Ok(Some((c.services.names[svc].clone(), c.slices.names[sl].clone())))
    }

    // -- recording (the conformance suite's RecordingPool) ---------------------------------
    fn set_record(&self, on: bool) -> PyResult<()> {
        self.lock()?.record = on;
        Ok(())
    }

    fn recorded(&self, py: Python<'_>) -> PyResult<(Py<PyList>, Py<PyList>)> {
        let c = self.lock()?;
        let acq = PyList::new(py, c.acquires.iter().map(|(a, b)| (a.as_str(), b.as_str())))?;
        let ev = PyList::new(py, c.events.iter().map(|(k, s, st)| (*k, *s, *st)))?;
        Ok((acq.unbind(), ev.unbind()))
    }
}

#[pymodule]
fn backdial_engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VERSION", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Engine>()?;
    m.add_function(wrap_pyfunction!(parity::recognise, m)?)?;
    m.add_function(wrap_pyfunction!(parity::relay_response, m)?)?;
    Ok(())
}
