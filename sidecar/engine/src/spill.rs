//! Response bytes a slow client has not taken, parked in an unlinked temporary file
//! (`spool.SpoolFile`): the session is read at its own speed and released when the
//! response is complete.  Bounded per connection (`limit` unsent bytes) and per worker
//! (the disk budget the engine keeps; the caller books and gives back).

use std::ffi::CString;
use std::io;
use std::os::unix::io::RawFd;

use crate::sys::cvt;

pub struct Spill {
    fd: RawFd,
    read: u64,
    written: u64,
    pub limit: u64,
}

impl Spill {
    pub fn open(dir: &str, limit: u64) -> io::Result<Spill> {
        let dir =
            if dir.is_empty() { std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into()) } else { dir.to_string() };
        let cdir = CString::new(dir.clone()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = unsafe { libc::open(cdir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, 0o600) };
        let fd = if fd >= 0 {
            fd
        } else {
            // No O_TMPFILE here: a named file, unlinked at once (as mkstemp + unlink does).
            let template = CString::new(format!("{}/backdial-spill-XXXXXX", dir.trim_end_matches('/')))
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let raw = template.into_raw();
            let fd = unsafe { libc::mkostemp(raw, libc::O_CLOEXEC) };
            let path = unsafe { CString::from_raw(raw) };
            let fd = cvt(fd)?;
            unsafe { libc::unlink(path.as_ptr()) };
            fd
        };
        Ok(Spill { fd, read: 0, written: 0, limit })
    }

    pub fn pending(&self) -> u64 {
        self.written - self.read
    }

    pub fn room(&self) -> bool {
        self.pending() < self.limit
    }

    /// Append `data`; false (nothing written) when it does not fit within `limit`.
    pub fn write(&mut self, data: &[u8]) -> io::Result<bool> {
        if self.pending() + data.len() as u64 > self.limit {
            return Ok(false);
        }
        let mut off = 0;
        while off < data.len() {
            let n = unsafe {
                libc::pwrite(
                    self.fd,
                    data[off..].as_ptr() as *const libc::c_void,
                    data.len() - off,
                    (self.written + off as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            off += n as usize;
        }
        self.written += data.len() as u64;
        Ok(true)
    }

    /// Up to `buf.len()` parked bytes (they stay parked until `consume`).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.pending() as usize).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = unsafe { libc::pread(self.fd, buf.as_mut_ptr() as *mut libc::c_void, want, self.read as libc::off_t) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    pub fn consume(&mut self, n: usize) {
        self.read += n as u64;
        if self.read == self.written {
            self.read = 0;
            self.written = 0;
            unsafe { libc::ftruncate(self.fd, 0) };
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        unsafe { libc::close(self.fd) };
    }
}
