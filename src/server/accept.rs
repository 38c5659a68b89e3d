//! The accept loop both protocols use: a cap on open connections, backoff when the process
//! runs out of file descriptors, `TCP_NODELAY`, and connections that close when their client
//! stops reading.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// How long accepting pauses after the process ran out of file descriptors (or memory): the
/// error repeats at once otherwise, and the loop would spin on it.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Open connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// A write that makes no progress for this long (a client that stopped reading its
    /// stream) closes the connection, which cancels its generation.
    pub write_stall: Duration,
    /// A connection that has not sent [`HANDSHAKE_BYTES`] within this long is closed (HTTP/2
    /// clients send a 24-byte preface and their settings first); `None` leaves it to the
    /// protocol.
    pub handshake: Option<Duration>,
}

/// Bytes a client must send within the handshake time: HTTP/2's connection preface.
pub(crate) const HANDSHAKE_BYTES: usize = 24;

/// An accepted connection: it holds one of the open-connection slots until dropped, and fails
/// a write that has been stuck longer than the stall limit.
pub(crate) struct Conn {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    write_stall: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    /// Until the client has sent its first [`HANDSHAKE_BYTES`]: the deadline and the count.
    handshake: Option<(Pin<Box<Sleep>>, usize)>,
}

impl Conn {
    /// Gives `Ready(Err)` once a pending write has been pending for the stall limit.
    fn check_stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let limit = self.write_stall;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client stopped reading (write stalled)",
                )))
            }
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some((deadline, received)) = &mut self.handshake else {
            return poll;
        };
        match poll {
            Poll::Ready(Ok(())) => {
                *received += buf.filled().len() - before;
                if *received >= HANDSHAKE_BYTES {
                    self.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                ready!(deadline.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not complete its handshake in time",
                )))
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.check_stall(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.check_stall(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_flush(cx);
        self.check_stall(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.check_stall(cx, poll)
    }
}

#[cfg(feature = "grpc")]
impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// Accepts connections on `listener` until `stop` turns true, handing them out through the
/// returned channel (which closes then). At most `limits.max_connections` are open at once.
pub(crate) fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        // Warn once per episode of exhaustion, not ten times a second.
        let mut exhausted = false;
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) if is_exhaustion(&err) => {
                    if !exhausted {
                        tracing::warn!(error = %err, "cannot accept connections: out of resources; retrying every 100 ms");
                        exhausted = true;
                    }
                    tokio::time::sleep(EXHAUSTED_BACKOFF).await;
                    continue;
                }
                Err(err) => {
                    // Per-connection errors (the peer reset before we accepted): nothing to do.
                    tracing::debug!(error = %err, "accept failed");
                    continue;
                }
            };
            if exhausted {
                tracing::info!("accepting connections again");
                exhausted = false;
            }
            // Replies stream one small write per token: without TCP_NODELAY, Nagle's algorithm
            // holds each one back waiting for an acknowledgement.
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY failed");
            }
            let conn = Conn {
                stream,
                _slot: slot,
                write_stall: limits.write_stall,
                stalled: None,
                handshake: limits
                    .handshake
                    .map(|limit| (Box::pin(tokio::time::sleep(limit)), 0)),
            };
            if tx.send(conn).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Errors that say the process (or system) is out of descriptors or memory.
fn is_exhaustion(err: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            err.raw_os_error(),
            Some(
                libc_codes::EMFILE | libc_codes::ENFILE | libc_codes::ENOBUFS | libc_codes::ENOMEM
            )
        )
    }
    #[cfg(not(unix))]
    {
        err.kind() == io::ErrorKind::OutOfMemory
    }
}

/// The errno values of resource exhaustion (the same on Linux and the BSDs that matter here).
#[cfg(unix)]
mod libc_codes {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    #[cfg(target_os = "linux")]
    pub const ENOBUFS: i32 = 105;
    #[cfg(not(target_os = "linux"))]
    pub const ENOBUFS: i32 = 55;
}
