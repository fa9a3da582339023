//! Accepting client connections: the listening socket, `accept4` with the descriptor
//! reserve kept as `liveness.FdGuard` keeps it, the per-peer record shared by a peer's
//! connections, and handing a connection to Python.

use std::os::unix::io::RawFd;
use std::rc::Rc;

use crate::core::{token, Client, Core, Deadline, Hook, Peer, T_CLIENT, T_LISTENER};
use crate::route::Ip;
use crate::sys;

impl Core {
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

    pub fn accept(&mut self) {
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
}
