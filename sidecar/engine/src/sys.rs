//! Thin wrappers over the Linux calls the engine makes: epoll, timerfd, non-blocking
//! socket IO, accept4.  Errors come back as `io::Error`; nothing here blocks.

use std::io;
use std::os::unix::io::RawFd;

pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Seconds on CLOCK_MONOTONIC: the clock of Python's `time.monotonic()` and of the loop.
pub fn now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

pub struct Epoll {
    pub fd: RawFd,
}

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const HUP: u32 = libc::EPOLLHUP as u32;
pub const ERR: u32 = libc::EPOLLERR as u32;

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        Ok(Epoll { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        cvt(unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    pub fn delete(&self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    pub fn wait(&self, events: &mut [libc::epoll_event]) -> usize {
        let n = unsafe { libc::epoll_wait(self.fd, events.as_mut_ptr(), events.len() as libc::c_int, 0) };
        if n < 0 {
            0
        } else {
            n as usize
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

pub struct Timer {
    pub fd: RawFd,
    /// When it fires next (monotonic seconds), 0 when disarmed.
    pub at: f64,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        let fd = cvt(unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) })?;
        Ok(Timer { fd, at: 0.0 })
    }

    /// Fire once at monotonic time `at` (absolute); 0 disarms.
    pub fn set(&mut self, at: f64) {
        self.at = at;
        let (sec, nsec) = if at <= 0.0 {
            (0, 0)
        } else {
            let at = at.max(1e-6);
            (
                at.trunc() as libc::time_t,
                ((at.fract() * 1e9) as libc::c_long).max(if at.trunc() == 0.0 { 1 } else { 0 }),
            )
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: sec, tv_nsec: nsec },
        };
        unsafe { libc::timerfd_settime(self.fd, libc::TFD_TIMER_ABSTIME, &spec, std::ptr::null_mut()) };
    }

    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        unsafe { libc::read(self.fd, buf.as_mut_ptr() as *mut libc::c_void, 8) };
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}

pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    cvt_size(unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) })
}

pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    cvt_size(unsafe {
        libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    })
}

pub fn close(fd: RawFd) {
    unsafe { libc::close(fd) };
}

pub fn dup(fd: RawFd) -> io::Result<RawFd> {
    cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
}

pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(|_| ())
}

pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

pub fn is_tcp(fd: RawFd) -> bool {
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let r = unsafe { libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) };
    r == 0 && (addr.ss_family as libc::c_int == libc::AF_INET || addr.ss_family as libc::c_int == libc::AF_INET6)
}

/// A client address as text, the way Python's socket module prints it.
pub fn addr_text(addr: &libc::sockaddr_storage) -> String {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).to_string()
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            if a.sin6_scope_id != 0 {
                format!("{}%{}", ip, a.sin6_scope_id)
            } else {
                ip.to_string()
            }
        }
        _ => String::new(),
    }
}

/// Accept one connection: (fd, peer address text), or None when the queue is empty.
pub fn accept(listener: RawFd) -> io::Result<Option<(RawFd, String)>> {
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let fd = unsafe {
        libc::accept4(
            listener,
            &mut addr as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            // The peer gave up before we took it: try the next one.
            Some(libc::ECONNABORTED) | Some(libc::EPROTO) => Ok(Some((-1, String::new()))),
            _ => Err(err),
        };
    }
    Ok(Some((fd, addr_text(&addr))))
}

pub fn would_block(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR))
}

/// The soft RLIMIT_NOFILE.
pub fn fd_limit() -> usize {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return usize::MAX;
    }
    if rl.rlim_cur == libc::RLIM_INFINITY {
        usize::MAX
    } else {
        rl.rlim_cur as usize
    }
}
