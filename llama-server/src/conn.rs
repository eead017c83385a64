//! The connection loop: accepts TCP connections and serves HTTP/1.1 on each with hyper, under
//! the limits a server on a network port needs:
//!
//! - a header-read timeout (hyper's: a request's headers, or a kept-alive connection's next
//!   request, must arrive within it; slowloris clients are cut off);
//! - a cap on open connections: at the cap the connection idle longest is closed to make room,
//!   and when every connection is busy the new one gets a 503 and is closed (open sockets never
//!   reach the process's file limit, so `/health` keeps answering);
//! - a connection whose response stopped moving (no bytes read or written, no request running)
//!   for the idle timeout is closed;
//! - graceful shutdown: connections open when it starts finish their running request and close;
//!   new connections are still accepted and answered (the handlers give 503 while the engine
//!   is closing) until the last old one is done.
//!
//! The request body's read timeout is the handlers' (see `http::read_body`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

/// Limits of the connection loop.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A request's headers (or a kept-alive connection's next request) must arrive within it.
    pub header_timeout: Duration,
    /// A connection with no request running and no bytes moving for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What the loop knows of one open connection.
struct Slot {
    /// Milliseconds since the loop started, at the last byte read or written.
    last_io: Arc<AtomicU64>,
    /// Requests whose handler is running (a streamed response counts until its head is sent;
    /// after that its bytes keep it alive).
    in_flight: Arc<AtomicUsize>,
    /// Asks the connection to close once its running request is done.
    close: Arc<Notify>,
    /// Already asked to close (to make room, or by shutdown).
    closing: AtomicBool,
    /// Opened before shutdown began.
    old: bool,
}

struct Registry {
    epoch: Instant,
    slots: Mutex<HashMap<u64, Slot>>,
    next: AtomicU64,
    /// Wakes the loop when a connection ends (shutdown waits for the old ones).
    ended: Notify,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes the connection idle longest (no request running), if any; true when one was asked
    /// to close.
    fn evict_idlest(&self) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let victim = slots
            .values()
            .filter(|s| {
                s.in_flight.load(Ordering::SeqCst) == 0 && !s.closing.load(Ordering::SeqCst)
            })
            .min_by_key(|s| s.last_io.load(Ordering::Relaxed));
        match victim {
            Some(s) => {
                s.closing.store(true, Ordering::SeqCst);
                s.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn old_left(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.old)
            .count()
    }
}

/// A socket that records when bytes last moved.
struct Tracked {
    io: TcpStream,
    last_io: Arc<AtomicU64>,
    registry: Arc<Registry>,
}

impl Tracked {
    fn touch(&self) {
        self.last_io
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The most file descriptors the process may open: the soft limit raised to the hard one.
pub fn raise_file_limit() -> Option<u64> {
    #[cfg(unix)]
    unsafe {
        // SAFETY: getrlimit/setrlimit write and read only the struct passed.
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
        Some(r.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}

/// The answer to a connection over the cap.
fn busy_response() -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "message": "the server has too many open connections; retry later",
        "type": "server_error", "param": null, "code": "too_many_connections",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `shutdown` resolves and every connection open at that
/// moment has finished (at most `drain_limit` later).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    drain_limit: Duration,
) {
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        slots: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        ended: Notify::new(),
    });
    let mut shutdown = std::pin::pin!(shutdown);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_some() && registry.old_left() == 0 {
            break;
        }
        let accepted = tokio::select! {
            _ = &mut shutdown, if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + drain_limit);
                let slots = registry.slots.lock().unwrap_or_else(|e| e.into_inner());
                for s in slots.values() {
                    s.closing.store(true, Ordering::SeqCst);
                    s.close.notify_one();
                }
                continue;
            }
            _ = registry.ended.notified(), if deadline.is_some() => continue,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                tracing::warn!(open = registry.old_left(), "connections still open at the end of shutdown: closing them");
                break;
            }
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: make room and
                // go on.
                tracing::warn!(error = %e, "accept failed");
                registry.evict_idlest();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if registry.len() >= limits.max_connections && !registry.evict_idlest() {
            tracing::warn!(%peer, max = limits.max_connections, "too many connections: refused with 503");
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(&busy_response()),
                )
                .await;
            });
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = registry.next.fetch_add(1, Ordering::Relaxed);
        let last_io = Arc::new(AtomicU64::new(registry.now_ms()));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let close = Arc::new(Notify::new());
        let old = deadline.is_none();
        registry
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Slot {
                    last_io: last_io.clone(),
                    in_flight: in_flight.clone(),
                    close: close.clone(),
                    closing: AtomicBool::new(false),
                    old,
                },
            );
        let io = Tracked {
            io: stream,
            last_io: last_io.clone(),
            registry: registry.clone(),
        };
        let app = app.clone();
        let reg = registry.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            connection(io, app, &limits, old, &reg, last_io, in_flight, close).await;
            reg.slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            reg.ended.notify_one();
        });
    }
}

/// Decrements a request counter when the handler's future ends, finished or dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    io: Tracked,
    app: Router,
    limits: &ConnLimits,
    keep_alive: bool,
    registry: &Registry,
    last_io: Arc<AtomicU64>,
    in_flight: Arc<AtomicUsize>,
    close: Arc<Notify>,
) {
    let counter = in_flight.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        counter.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(counter.clone());
        let app = app.clone();
        async move {
            let r = app.oneshot(req.map(axum::body::Body::new)).await;
            drop(guard);
            r.map_err(|e: Infallible| e)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(keep_alive);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing_since: Option<Instant> = None;
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = close.notified() => {
                if closing_since.is_none() {
                    conn.as_mut().graceful_shutdown();
                    closing_since = Some(Instant::now());
                }
            }
            _ = tokio::time::sleep(tick) => {
                let idle = Duration::from_millis(
                    registry.now_ms().saturating_sub(last_io.load(Ordering::Relaxed)),
                );
                if in_flight.load(Ordering::SeqCst) > 0 || idle < limits.idle_timeout {
                    continue;
                }
                match closing_since {
                    None => {
                        conn.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                    // A response nobody reads: close the socket.
                    Some(t) if t.elapsed() >= limits.idle_timeout => return,
                    Some(_) => {}
                }
            }
        }
    }
}
