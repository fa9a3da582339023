//! The Python class `Engine`'s shared parts: the engine's state behind its lock, the
//! hooks delivered to Python once the lock is released (so Python may call back in), and
//! the conversions and look-ups its methods (`lib.rs`) share.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::book;
use crate::core::{self, Core, Hook};
use crate::response::Release;
use crate::sys;

#[pyclass(frozen, module = "backdial_engine")]
pub struct Engine {
    pub(crate) core: Mutex<Core>,
    pub(crate) hooks: Mutex<Option<Py<PyAny>>>,
}

pub(crate) fn get<'py, T: FromPyObject<'py>>(d: &Bound<'py, PyDict>, name: &str) -> PyResult<T> {
    match d.get_item(name)? {
        Some(v) => v.extract(),
        None => Err(PyValueError::new_err(format!("engine setting {name} missing"))),
    }
}

pub(crate) fn release_of(state: &str, pre: Vec<u8>) -> PyResult<Release> {
    Ok(match state {
        "idle" => Release::Idle { pre },
        "retired" => Release::Retired,
        "broken" => Release::Broken,
        _ => return Err(PyValueError::new_err(format!("unknown release state {state}"))),
    })
}

impl Engine {
    pub(crate) fn lock(&self) -> PyResult<MutexGuard<'_, Core>> {
        self.core.lock().map_err(|_| PyRuntimeError::new_err("engine state poisoned by an earlier panic"))
    }

    /// Deliver the hooks queued by the last call, with the engine unlocked.
    pub(crate) fn deliver(&self, py: Python<'_>) -> PyResult<()> {
        let mut first_err: Option<PyErr> = None;
        loop {
            let hooks = {
                let mut c = self.lock()?;
                // Sessions handed to native waiters are written now, then the hooks.
                c.deliver_handoffs();
                c.arm_tick();
                c.settle_cpu();
                std::mem::take(&mut c.hooks)
            };
            if hooks.is_empty() {
                break;
            }
            let target = match self.hooks.lock().ok().and_then(|h| h.as_ref().map(|o| o.clone_ref(py))) {
                Some(t) => t,
                None => {
                    // No Python side (unit use): close what would have been adopted.
                    for h in hooks {
                        if let Hook::Adopt { fd, .. } = h {
                            sys::close(fd);
                        }
                    }
                    continue;
                }
            };
            let t = target.bind(py);
            for h in hooks {
                let res = match h {
                    Hook::Adopt { fd, data } => t.call_method1("adopt", (fd, PyBytes::new(py, &data))),
                    Hook::GiveBack { handle, state } => t.call_method1("give_back", (handle, state)),
                    Hook::Handoff { handle, ticket, pre, waited } => {
                        t.call_method1("handoff", (handle, ticket, PyBytes::new(py, &pre), waited))
                    }
                    Hook::Refused { ticket, reason, waited } => {
                        t.call_method1("refused", (ticket, reason.name(), waited))
                    }
                    Hook::Want { urgent } => t.call_method1("want", (urgent,)),
                    Hook::Ask => t.call_method0("ask"),
                    Hook::Drained => t.call_method0("drained"),
                    Hook::Empty => t.call_method0("empty"),
                    Hook::FdRefused => t.call_method0("fd_refused"),
                };
                if let Err(e) = res {
                    if first_err.is_none() {
                        first_err = Some(e);
                    } else {
                        e.print(py);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// {(service, slice): queue length} for the non-empty queues of one of the book's FIFOs.
    pub(crate) fn counts(
        py: Python<'_>,
        c: &Core,
        queues: &HashMap<book::KeyId, VecDeque<book::Waiter>>,
    ) -> PyResult<Py<PyDict>> {
        let d = PyDict::new(py);
        for (&key, q) in queues {
            if !q.is_empty() {
                let (svc, sl) = c.key_names[key];
                d.set_item((&c.services.names[svc], &c.slices.names[sl]), q.len())?;
            }
        }
        Ok(d.unbind())
    }

    pub(crate) fn key_of(core: &mut Core, service: &str, slice: &str) -> book::KeyId {
        let svc = core.services.id(service);
        let sl = core.slices.id(slice);
        core.key(svc, sl)
    }

    pub(crate) fn slot(core: &Core, handle: u64) -> Option<usize> {
        core.by_handle.get(&handle).copied()
    }

    /// Idle sessions matching `pred`, out of the idle rings: Python gives them back
    /// (its `_give_back` closes them through `close_session`).
    pub(crate) fn take_idle_where(&self, pred: impl Fn(&core::Session) -> bool, limit: usize) -> PyResult<Vec<u64>> {
        let mut c = self.lock()?;
        let c = &mut *c;
        let mut out = Vec::new();
        for ring in c.book.idle.values_mut() {
            for slot in ring.slots() {
                let s = c.sessions.items[slot].as_ref().expect("idle session");
                if out.len() < limit && pred(s) {
                    out.push(s.handle);
                    ring.remove(s.registrant, slot);
                }
            }
        }
        Ok(out)
    }
}
