//! The CNI socket's connections, registered with the runtime for reading only ([`Conn`]).
#![allow(unsafe_code)] // registrations with the runtime; each block has its SAFETY comment

use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Registers `inner` (a socket that owns its descriptor) with the runtime for reading only.
pub fn reading<T: AsRawFd + OwnsFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its open descriptor (`OwnsFd`) and is owned by the `AsyncFd` from
    // here on, which only ever hands out references to it: the descriptor stays open and the
    // same for the `AsyncFd`'s lifetime.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(|e| e.into())
}

/// A type whose descriptor it owns and closes on drop, and never exchanges for another.
pub trait OwnsFd {}
impl OwnsFd for std::os::unix::net::UnixStream {}
impl OwnsFd for std::os::unix::net::UnixListener {}

/// How long a write the socket's buffer cannot take waits before it is tried again.
const WRITE_RETRY: Duration = Duration::from_millis(1);

/// A CNI connection, registered with the runtime for reading only. Tokio's `UnixStream` also
/// asks to be told when the socket can be written again, so every time the CNI read an answer
/// the kernel woke a parked worker of the runtime, for nothing: the answers are small, and the
/// socket's buffer (over 200 KiB) takes them at once. A write that the buffer cannot take (a
/// client that does not read) is tried again every [`WRITE_RETRY`].
pub struct Conn {
    fd: AsyncFd<std::os::unix::net::UnixStream>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Conn {
    /// Registers `stream` for reading.
    pub fn new(stream: std::os::unix::net::UnixStream) -> std::io::Result<Conn> {
        stream.set_nonblocking(true)?;
        Ok(Conn {
            fd: reading(stream)?,
            retry: None,
        })
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use std::io::Read;
        loop {
            let mut ready = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match ready.try_io(|s| s.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        use std::io::Write;
        let me = self.get_mut();
        loop {
            if let Some(wait) = me.retry.as_mut() {
                ready!(wait.as_mut().poll(cx));
                me.retry = None;
            }
            match me.fd.get_ref().write(data) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    me.retry = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(self.fd.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A line in, and more than the socket's buffer takes out: the write waits for the client
    /// to read, and everything arrives.
    #[tokio::test]
    async fn a_line_is_read_and_a_write_larger_than_the_buffer_waits_for_the_reader() {
        let (mut client, served) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = BufReader::new(Conn::new(served).unwrap());
        client.write_all(b"{\"ping\":1}\nrest").unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, "{\"ping\":1}\n");

        let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            // Not reading at first: the writer finds the buffer full.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got
        });
        let w = conn.get_mut();
        w.write_all(&big).await.unwrap();
        w.shutdown().await.unwrap();
        drop(conn);
        assert!(reader.join().unwrap() == big, "every byte, in order");
    }
}
