//! The admin listener: `/live`, `/ready`, `/metrics` (OpenMetrics text) and `/status` (JSON),
//! on its own address.

pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use metrics::{EdgeMetrics, Exposition, Metrics};

use crate::relay::{self, HttpBody};

/// Tells whether the process is ready to serve.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// Describes the running process for `/status`.
pub type Status = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the admin listener reports.
#[derive(Clone)]
pub struct Report {
    /// `/metrics`.
    pub metrics: Arc<dyn Exposition>,
    /// `/ready`.
    pub ready: Readiness,
    /// The connections `/ready` lists, with their transport.
    pub connections: Status,
    /// `/status`.
    pub status: Status,
}

/// A bound admin listener.
pub struct Admin {
    listener: TcpListener,
}

impl Admin {
    /// Binds the admin listener.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Admin> {
        Ok(Admin {
            listener: TcpListener::bind(addr).await?,
        })
    }

    /// Wraps a listener bound (non-blocking) outside the runtime.
    pub fn from_std(listener: std::net::TcpListener) -> std::io::Result<Admin> {
        Ok(Admin {
            listener: TcpListener::from_std(listener)?,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, report: Report, shutdown: CancellationToken) {
        if let Some(addr) = self.addr() {
            info!(%addr, "listening for admin requests (/live, /ready, /metrics, /status)");
        }
        loop {
            let Some((tcp, _)) = crate::net::accept(&self.listener, &shutdown, "admin").await
            else {
                return;
            };
            let report = report.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let resp = answer(&req, &report);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}

fn answer(req: &Request<Incoming>, report: &Report) -> Response<HttpBody> {
    let ready = &report.ready;
    let (status, ctype, body) = match req.uri().path() {
        "/live" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "live\n".to_string(),
        ),
        "/ready" => {
            let ready = ready();
            let body = serde_json::json!({
                "ready": ready,
                "connections": (report.connections)(),
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", format!("{body}\n"))
        }
        "/metrics" => (
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            report.metrics.encode(),
        ),
        "/status" => (
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", (report.status)()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /live, /ready, /metrics or /status\n".to_string(),
        ),
    };
    let mut resp = Response::new(relay::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
