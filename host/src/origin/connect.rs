//! How an HTTP origin's connections are made: TCP (`http://`, `https://`, `h2c://`) or a unix
//! socket (`unix:`, `unix+tls:`), under TLS when the origin uses it (hyper-rustls wraps this
//! connector), with the connect timeout applied to both.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

use crate::relay::BoxError;

/// Connects to an origin over TCP (to the request URI's host and port) or to a fixed unix
/// socket.
#[derive(Clone)]
pub struct OriginConnector {
    tcp: HttpConnector,
    unix: Option<Arc<PathBuf>>,
    timeout: Duration,
    /// Written first on every connection, before TLS (a PROXY protocol header).
    prefix: Option<bytes::Bytes>,
}

impl OriginConnector {
    /// TCP connections, with `timeout` and `TCP_NODELAY`.
    pub fn tcp(timeout: Duration) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(timeout));
        OriginConnector {
            tcp,
            unix: None,
            timeout,
            prefix: None,
        }
    }

    /// The same connector, writing `prefix` first on each connection it makes.
    pub fn with_prefix(&self, prefix: Vec<u8>) -> Self {
        OriginConnector {
            prefix: Some(prefix.into()),
            ..self.clone()
        }
    }

    /// Connections to the unix socket at `path`, whatever the request URI says.
    pub fn unix(path: PathBuf, timeout: Duration) -> Self {
        OriginConnector {
            unix: Some(Arc::new(path)),
            ..Self::tcp(timeout)
        }
    }
}

/// A connection to an origin.
pub enum OriginIo {
    /// Over TCP.
    Tcp(TokioIo<tokio::net::TcpStream>),
    /// Over a unix socket.
    Unix(TokioIo<tokio::net::UnixStream>),
}

impl tower_service::Service<Uri> for OriginConnector {
    type Response = OriginIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<OriginIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &self.unix {
            Some(_) => Poll::Ready(Ok(())),
            None => self.tcp.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.connect(uri);
        let Some(prefix) = self.prefix.clone() else {
            return connecting;
        };
        Box::pin(async move {
            let mut io = connecting.await?;
            use tokio::io::AsyncWriteExt;
            match &mut io {
                OriginIo::Tcp(s) => s.inner_mut().write_all(&prefix).await?,
                OriginIo::Unix(s) => s.inner_mut().write_all(&prefix).await?,
            }
            Ok(io)
        })
    }
}

impl OriginConnector {
    fn connect(&mut self, uri: Uri) -> <Self as tower_service::Service<Uri>>::Future {
        use tower_service::Service;
        match self.unix.clone() {
            Some(path) => {
                let timeout = self.timeout;
                Box::pin(async move {
                    let connect = tokio::net::UnixStream::connect(path.as_path());
                    match tokio::time::timeout(timeout, connect).await {
                        Ok(Ok(s)) => Ok(OriginIo::Unix(TokioIo::new(s))),
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {} timed out", path.display()),
                        )
                        .into()),
                    }
                })
            }
            None => {
                let connecting = self.tcp.call(uri);
                Box::pin(async move { Ok(OriginIo::Tcp(connecting.await?)) })
            }
        }
    }
}

impl Connection for OriginIo {
    fn connected(&self) -> Connected {
        match self {
            OriginIo::Tcp(io) => io.connected(),
            OriginIo::Unix(_) => Connected::new(),
        }
    }
}

impl Read for OriginIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            OriginIo::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            OriginIo::Unix(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl Write for OriginIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            OriginIo::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            OriginIo::Unix(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            OriginIo::Tcp(io) => Pin::new(io).poll_flush(cx),
            OriginIo::Unix(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            OriginIo::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            OriginIo::Unix(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
