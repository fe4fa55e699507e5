//! HTTP serving for the stand-ins: binds a loopback address, serves an axum
//! router over HTTP/1.1 and HTTP/2 (prior knowledge), and lets a handler close
//! its connection without a response.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::StandinError;

/// Request extension that closes the request's TCP connection when triggered.
#[derive(Clone)]
pub(crate) struct ConnectionCloser(Arc<Notify>);

impl ConnectionCloser {
    /// Closes the connection, so the request in progress gets no response.
    pub(crate) fn close(&self) {
        self.0.notify_one();
    }
}

/// A listening server; dropping it stops accepting and closes all connections.
pub(crate) struct RunningServer {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl RunningServer {
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.accept_task.abort();
    }
}

/// Binds `addr` and serves `router` on it until the returned handle is dropped.
///
/// Only loopback addresses are accepted: the stand-ins must never be reachable
/// from another machine.
pub(crate) async fn serve(
    addr: SocketAddr,
    router: Router,
    name: &'static str,
) -> Result<RunningServer, StandinError> {
    if !addr.ip().is_loopback() {
        return Err(StandinError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StandinError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StandinError::Bind { addr, source })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let accept_task = tokio::spawn(accept_loop(listener, router, shutdown_rx, name));
    tracing::info!(server = name, addr = %local, "stand-in listening");
    Ok(RunningServer {
        addr: local,
        shutdown,
        accept_task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve_connection(stream, router.clone(), shutdown.clone()));
                }
                Err(error) => {
                    tracing::warn!(server = name, %error, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    tracing::info!(server = name, "stand-in stopped");
}

async fn serve_connection(stream: TcpStream, router: Router, mut shutdown: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let close_signal = Arc::new(Notify::new());
    let closer = ConnectionCloser(close_signal.clone());
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(closer.clone());
        router.clone().oneshot(request.map(Body::new))
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        _ = close_signal.notified() => {
            tracing::debug!("connection closed without a response by a fault");
        }
        _ = shutdown.changed() => {}
    }
}
