//! `natfix health`: asks a running agent's `/healthz` (for Docker's
//! HEALTHCHECK and Kubernetes probes, which need a command or a URL).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::observe::metrics::HEALTH_PATH;

/// The agent's default metrics address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9477";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Ok when the agent answers 200; its body is printed either way.
pub fn run(addr: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = runtime
        .block_on(async { tokio::time::timeout(TIMEOUT, get(addr)).await })
        .with_context(|| format!("no answer from http://{addr}{HEALTH_PATH} within {TIMEOUT:?}"))??;
    print!("{body}");
    if status != hyper::StatusCode::OK {
        bail!("the agent at {addr} is not healthy ({status})");
    }
    Ok(())
}

async fn get(addr: SocketAddr) -> Result<(hyper::StatusCode, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("cannot connect to the agent at {addr} (is `natfix agent` running with `metrics = \"{addr}\"`?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(HEALTH_PATH).header(hyper::header::HOST, addr.to_string()).body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
