//! When bytes reached the generator's socket, as the kernel saw it (`SO_TIMESTAMPNS`).
//!
//! The generator shares the machine with the node it measures. Under load, a frame can wait in
//! its socket while the generator itself waits for a core, and that wait lands in the delay it
//! records. The kernel stamps each packet as it arrives; a delay measured to that stamp is what
//! the node and the network took, without the generator's own lag. The summary reports both.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that remembers the arrival time of the last bytes it read.
pub struct Stamped {
    io: TcpStream,
    /// Unix µs of the newest packet of the last read (0: none yet, or not supported here).
    last: Cell<u64>,
}

impl Stamped {
    /// Asks the kernel to stamp arriving packets. Where it cannot, reads work and stamp nothing.
    /// (Linux starts stamping a moment after the first socket asks: the first reads of a run
    /// may come unstamped, and are left out of the figure.)
    pub fn new(io: TcpStream) -> Stamped {
        sys::enable(&io);
        Stamped {
            io,
            last: Cell::new(0),
        }
    }

    /// Unix µs at which the newest bytes read so far reached the socket, if the kernel said.
    /// A read that takes several frames at once stamps them all with its newest packet's time,
    /// so a delay measured to it is never shorter than the real one.
    pub fn arrived_us(&self) -> Option<u64> {
        Some(self.last.get()).filter(|&t| t > 0)
    }
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match this
                .io
                .try_io(Interest::READABLE, || sys::recv_stamped(&this.io, unfilled))
            {
                Ok((n, at)) => {
                    // Bytes without a stamp make the arrival unknown: an older stamp would
                    // make their delay look shorter than it was.
                    if n > 0 {
                        this.last.set(at.unwrap_or(0));
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::AsRawFd;

    use tokio::net::TcpStream;

    pub fn enable(io: &TcpStream) {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, an option that takes an int, and a pointer to one.
        let r = unsafe {
            libc::setsockopt(
                io.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            log::debug!("SO_TIMESTAMPNS: {}", io::Error::last_os_error());
        }
    }

    /// One `recvmsg` into `buf`: the bytes read, and the arrival time (unix µs) the kernel
    /// attached, if any.
    pub fn recv_stamped(io: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
        // Room for one control message holding a timespec, aligned for cmsghdr.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid (no name, no iov yet); the fields set point to live
        // buffers of the lengths given, which outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: the socket is valid and msg describes buffers we own (above).
        let n = unsafe { libc::recvmsg(io.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = None;
        // SAFETY: the CMSG macros walk the control buffer the kernel filled, within
        // msg_controllen; a SCM_TIMESTAMPNS message's data is one timespec.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    if ts.tv_sec > 0 {
                        at = Some(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, at))
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;

    use tokio::net::TcpStream;

    pub fn enable(_: &TcpStream) {}

    pub fn recv_stamped(io: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
        io.try_read(buf).map(|n| (n, None))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[actix_web::test]
    async fn bytes_read_carry_the_time_they_reached_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut s = Stamped::new(client);
        assert_eq!(s.arrived_us(), None);
        let mut buf = [0u8; 16];
        // The kernel turns stamping on shortly after a socket asks (deferred work): probe until
        // a read comes stamped.
        for _ in 0..100 {
            server.write_all(b".").await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 1);
            if s.arrived_us().is_some() {
                break;
            }
            actix_web::rt::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(s.arrived_us().is_some(), "linux stamps arrivals");

        let before = super::super::stats::now_us();
        server.write_all(b"hello").await.unwrap();
        // Let the bytes sit in the socket before they are read: the stamp is their arrival,
        // not the read.
        actix_web::rt::time::sleep(std::time::Duration::from_millis(50)).await;
        let read_at = super::super::stats::now_us();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        let at = s.arrived_us().expect("stamped");
        assert!(at >= before, "arrival {at} before the write {before}");
        assert!(at < read_at, "arrival {at} not before the read {read_at}");

        // Writes pass through.
        s.write_all(b"back").await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"back");

        // The end of the stream reads as 0 bytes.
        drop(server);
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }
}
