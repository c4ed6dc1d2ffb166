//! The HTTP admin listener (`[admin] listen`): `GET /metrics` for Prometheus, `GET /` the
//! dashboard page and `GET /api/state` the data it polls. Read-only, on the main thread's
//! runtime, never on the workers'; bounded connections and header time. Not meant for the
//! internet: bind it to loopback or a management network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::dashboard;
use crate::metrics;
use crate::state::LiveState;
use crate::totals::KernelCounters;

/// Connections served at once; more wait in the kernel's queue.
const MAX_CONNECTIONS: usize = 32;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIME: Duration = Duration::from_secs(5);

/// What the pages are made from: the running state, the kernel path's counters, the start.
pub struct Context {
    pub state: Arc<LiveState>,
    pub kernel: Option<Arc<dyn KernelCounters + Send + Sync>>,
    pub started: Instant,
    /// Announced VIPs, for `switchyard_service_announced`.
    pub announcer: Arc<crate::announce::Announcer>,
}

/// Binds `address` and serves until `stop`. A bind failure names the key and the address.
pub async fn serve(
    address: SocketAddr,
    context: Arc<Context>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("admin.listen {address}: cannot listen"))?;
    info!("admin listener on http://{address}/ (metrics at /metrics)");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    Ok(tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        debug!("admin listener: accept failed: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let context = context.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(context.clone(), request));
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIME)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    served = connection => if let Err(error) = served {
                        debug!("admin listener: {peer}: {error}");
                    },
                }
                drop(permit);
            });
        }
    }))
}

async fn answer(
    context: Arc<Context>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only: GET only\n",
        ));
    }
    Ok(match request.uri().path() {
        "/metrics" => {
            let accept = request.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
            let format = metrics::Format::from_accept(accept);
            body(metrics::render(&context, format), format.content_type())
        }
        "/" => body(dashboard::PAGE.to_string(), "text/html; charset=utf-8"),
        "/api/state" => body(
            dashboard::state_json(&context),
            "application/json; charset=utf-8",
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: /metrics, / (dashboard), /api/state\n",
        ),
    })
}

fn body(text: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = body(text.to_string(), "text/plain; charset=utf-8");
    *response.status_mut() = status;
    response
}
