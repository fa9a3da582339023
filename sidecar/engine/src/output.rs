//! Writing responses to a client: its output buffer flushed as the socket takes it,
//! `--response-buffer` and the worker's response memory budget (`clientout.ClientOutput`'s
//! count), pausing and resuming the session behind a slow client (back-pressure), and
//! parking what exceeds either limit in the connection's spill file (`spool.SpoolFile`)
//! until the client and the budget have room for it.

use crate::core::{Core, Deadline, DISK, MEMORY_FLOOR, RESPONSE};
use crate::spill::Spill;
use crate::sys;

/// Parked response bytes moved to the client per step.
const SPILL_CHUNK: usize = 256 * 1024;

impl Core {
    // -- writing to the client --------------------------------------------------------------
    /// Response bytes for the client: behind parked ones when a spill is open.
    pub fn client_write(&mut self, slot: usize, data: &[u8]) {
        if self.clients.at(slot).spill.is_some() {
            self.park(slot, data.to_vec());
            return;
        }
        self.clients.at(slot).out.extend_from_slice(data);
        self.client_flush(slot);
    }

    /// Send what is pending; false when the client is gone.
    pub fn client_flush(&mut self, slot: usize) -> bool {
        let res = {
            let c = self.clients.at(slot);
            let mut res = Ok(());
            while c.out_off < c.out.len() {
                match sys::send(c.fd, &c.out[c.out_off..]) {
                    Ok(n) => {
                        c.out_off += n;
                        c.sent += 1;
                    }
                    Err(e) => {
                        if !sys::would_block(&e) {
                            res = Err(());
                        }
                        break;
                    }
                }
            }
            if c.out_off == c.out.len() {
                c.out.clear();
                c.out_off = 0;
                if c.out.capacity() > 256 * 1024 {
                    c.out = Vec::new();
                }
            }
            res
        };
        if res.is_err() {
            self.client_drop(slot);
            return false;
        }
        self.flow(slot);
        self.client_interest(slot);
        true
    }

    /// The transport's high and low water marks (`response_buffer`, a quarter of it), and
    /// the worker's response memory budget (`clientout.ClientOutput`): a connection over
    /// its share pauses as at the high-water mark (spill file, else back-pressure) and
    /// parks what exceeds its share; it may always keep `MEMORY_FLOOR` bytes.
    pub fn flow(&mut self, slot: usize) {
        self.account_out(slot);
        let high = self.settings.response_buffer;
        let over = self.over_memory(slot);
        let (pending, paused) = {
            let c = self.clients.at(slot);
            (c.pending(), c.write_paused)
        };
        if !paused && (pending > high || over) {
            self.pause_writing(slot);
            if over {
                self.stats.response_memory_full += 1;
                self.spill_excess(slot);
            }
        } else if paused && pending <= high / 4 && !(over && pending as i64 > MEMORY_FLOOR) {
            self.resume_writing(slot);
        }
    }

    /// Book what this connection holds in memory now (unsent output and held bytes).
    pub fn account_out(&mut self, slot: usize) {
        let c = self.clients.at(slot);
        let n = (c.pending() + c.held.iter().map(Vec::len).sum::<usize>()) as i64;
        let delta = n - c.booked_out;
        if delta != 0 {
            c.booked_out = n;
            self.budgets[RESPONSE].used += delta;
        }
    }

    pub fn over_memory(&self, slot: usize) -> bool {
        let b = &self.budgets[RESPONSE];
        let booked = self.clients.items[slot].as_ref().map_or(0, |c| c.booked_out);
        b.used > b.limit && booked > MEMORY_FLOOR
    }

    /// Bytes that may move from a spill file to the client's output now: within the budget,
    /// or up to the floor whatever the budget says (`ClientOutput.room`).
    pub fn memory_room(&self, slot: usize) -> i64 {
        let b = &self.budgets[RESPONSE];
        let pending = self.clients.items[slot].as_ref().map_or(0, |c| c.pending()) as i64;
        (MEMORY_FLOOR - pending).max(b.limit - b.used)
    }

    /// Over the budget with a fresh spill file: what exceeds this connection's share of
    /// memory leaves the output for the file (in order: nothing is parked yet).
    pub fn spill_excess(&mut self, slot: usize) {
        let share = {
            let b = &self.budgets[RESPONSE];
            let c = self.clients.at(slot);
            MEMORY_FLOOR.max(b.limit - (b.used - c.booked_out))
        };
        let tail = {
            let c = self.clients.at(slot);
            let fresh = c.held.is_empty() && c.spill.as_ref().map_or(false, |sp| sp.pending() == 0);
            if !fresh || c.pending() as i64 <= share {
                return;
            }
            let keep = c.out_off + share as usize;
            let tail = c.out.split_off(keep);
            // Give the memory back, not just the count: the buffer grew with the reads.
            c.out.drain(..c.out_off);
            c.out_off = 0;
            c.out.shrink_to_fit();
            tail
        };
        self.park(slot, tail);
        self.client_interest(slot);
    }

    pub fn pause_writing(&mut self, slot: usize) {
        let session = {
            let c = self.clients.at(slot);
            c.write_paused = true;
            c.session
        };
        if let Some(s) = session {
            let spill_max = self.settings.response_spill_max;
            let c = self.clients.at(slot);
            if c.spill.is_none() {
                let mut opened = false;
                if spill_max > 0 {
                    if let Ok(sp) = Spill::open(&self.settings.spill_dir, spill_max) {
                        self.clients.at(slot).spill = Some(sp);
                        self.spill_files += 1;
                        self.stats.responses_spilled += 1;
                        opened = true;
                    }
                }
                if !opened {
                    self.session_pause(s);
                    let c = self.clients.at(slot);
                    if !c.streamed {
                        c.streamed = true;
                        self.stats.responses_streamed += 1;
                    }
                }
            }
        }
        let t = self.settings.send_timeout;
        self.set_deadline(slot, Deadline::Send, t);
    }

    pub fn resume_writing(&mut self, slot: usize) {
        {
            let c = self.clients.at(slot);
            c.write_paused = false;
            c.sent += 1;
        }
        if self.clients.at(slot).spill.is_some() && !self.send_spilled(slot) {
            return; // paused again with bytes still parked
        }
        let c = self.clients.at(slot);
        if let Some(s) = c.session {
            self.session_resume(s);
            let t = self.settings.upstream_timeout;
            self.set_deadline(slot, Deadline::Upstream, t);
        } else if c.close_after {
            self.client_close(slot);
        } else if c.active.is_none() {
            self.client_advance(slot);
        }
    }

    pub fn client_writable(&mut self, slot: usize, gen: u32) {
        if !self.client_flush(slot) || !self.clients.alive(slot, gen) {
            return;
        }
        let c = self.clients.at(slot);
        if c.pending() == 0 && c.spill.is_none() {
            if c.close_after {
                self.client_close(slot);
            } else if c.handover && c.active.is_none() {
                self.handover(slot);
            } else if c.active.is_none() {
                self.client_advance(slot);
            }
        }
    }

    // -- spilling (beyond response_buffer, spool.SpoolFile) ---------------------------------
    /// Append the longest prefix of `data` the spill file's limit and the disk budget
    /// allow (`SpoolFile.write_some`): the file fills up to its limit; the count written.
    pub fn spill_some(&mut self, slot: usize, data: &[u8]) -> usize {
        let disk = &mut self.budgets[DISK];
        let c = self.clients.items[slot].as_mut().expect("client");
        let sp = match c.spill.as_mut() {
            Some(sp) => sp,
            None => return 0,
        };
        let want = (data.len() as u64).min(sp.limit.saturating_sub(sp.pending()));
        let budget_room = (disk.limit - disk.used).max(0) as u64;
        if budget_room < want {
            disk.refused += 1; // the worker's disk budget keeps bytes out, not the file's limit
        }
        let n = want.min(budget_room) as usize;
        if n == 0 {
            return 0;
        }
        match sp.write(&data[..n]) {
            Ok(true) => {
                disk.used += n as i64;
                n
            }
            _ => 0, // a full disk is a spent budget: the bytes wait in memory
        }
    }

    pub fn park(&mut self, slot: usize, mut data: Vec<u8>) {
        if self.clients.at(slot).held.is_empty() {
            let n = self.spill_some(slot, &data);
            data.drain(..n);
        }
        let session = {
            let c = self.clients.at(slot);
            if !data.is_empty() {
                c.held.push(data); // over a limit: memory, one session read at most
            }
            let full = !c.held.is_empty() || !c.spill.as_ref().map_or(true, |s| s.room());
            if full {
                c.session
            } else {
                None
            }
        };
        if let Some(s) = session {
            self.session_pause(s); // full: back-pressure the session as without spilling
        }
        self.account_out(slot);
    }

    /// Feed parked bytes to the client until it pushes back; true once all are sent.
    pub fn send_spilled(&mut self, slot: usize) -> bool {
        let mut buf = vec![0u8; SPILL_CHUNK];
        loop {
            // Move from the file while the client takes it.
            loop {
                let room = self.memory_room(slot);
                let n = {
                    let c = self.clients.at(slot);
                    if c.write_paused {
                        break;
                    }
                    if room <= 0 {
                        // Memory is spent: wait paused, the next drain of this client's
                        // output tries again (it holds at least the floor).
                        c.write_paused = true;
                        break;
                    }
                    let want = (room as usize).min(SPILL_CHUNK);
                    let sp = c.spill.as_mut().expect("spill");
                    sp.peek(&mut buf[..want]).unwrap_or(0)
                };
                if n == 0 {
                    break;
                }
                {
                    let c = self.clients.at(slot);
                    c.spill.as_mut().expect("spill").consume(n);
                    c.out.extend_from_slice(&buf[..n]);
                }
                self.budgets[DISK].used -= n as i64;
                if !self.client_flush(slot) {
                    return false;
                }
            }
            // Room again: what waited in memory goes behind the file.
            let mut moved = false;
            while !self.clients.at(slot).held.is_empty() {
                let head = std::mem::take(&mut self.clients.at(slot).held[0]);
                let n = self.spill_some(slot, &head);
                let c = self.clients.at(slot);
                moved |= n > 0;
                if n == head.len() {
                    c.held.remove(0); // all of it in the file (held bytes are never empty)
                    continue;
                }
                c.held[0] = head;
                c.held[0].drain(..n); // the file is at a limit: the rest waits here
                break;
            }
            let c = self.clients.at(slot);
            if !moved || c.write_paused {
                break;
            }
        }
        let (resume, done) = {
            let c = self.clients.at(slot);
            let sp = c.spill.as_ref().expect("spill");
            let resume = c.held.is_empty() && sp.room();
            (if resume { c.session } else { None }, sp.pending() == 0 && !c.write_paused)
        };
        if let Some(s) = resume {
            self.session_resume(s);
        }
        if !done {
            return false;
        }
        let held = {
            let c = self.clients.at(slot);
            c.spill = None;
            std::mem::take(&mut c.held)
        };
        self.spill_files -= 1;
        for data in held {
            self.clients.at(slot).out.extend_from_slice(&data);
        }
        if !self.client_flush(slot) {
            return false;
        }
        !self.clients.at(slot).write_paused
    }
}
