//! The control socket: one JSON request per line in, one JSON response per line out.

use crate::daemon::Daemon;
use mars_api::{Request, Response};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let d = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, d).await {
                        tracing::debug!("control connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let resp = match serde_json::from_str::<Request>(line.trim_end()) {
            Ok(req) => {
                tracing::debug!(?req, "control request");
                daemon.handle(req).await
            }
            Err(e) => Response::err(format!(
                "malformed request (marsadm and marsd of different versions?): {e}"
            )),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

/// The node directory is initialised but no `marsd` answers on its control socket
/// (not started yet, or gone). `marsadm wait-*` keep waiting on this one.
#[derive(Debug)]
pub struct NotRunning(pub String);

impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotRunning {}

/// Client side (`marsadm`): send one request, wait for the response.
pub fn call(dir: &Path, req: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let path = dir.join(mars_api::SOCKET_NAME);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        if dir.join(crate::node::NODE_FILE).exists() {
            anyhow::Error::new(NotRunning(format!(
                "marsd is not running on {} ({}: {e}); start it with `marsd --dir {}`",
                dir.display(),
                path.display(),
                dir.display()
            )))
        } else {
            anyhow::anyhow!(
                "{} is not an initialised mars node directory; run `marsadm create-cluster` first",
                dir.display()
            )
        }
    })?;
    // A wedged daemon must not wedge scripts: give up after a generous time.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let mut body = serde_json::to_vec(req)?;
    body.push(b'\n');
    stream.write_all(&body)?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        anyhow::bail!(
            "marsd closed the control connection without answering (did it crash? see its log)"
        );
    }
    Ok(serde_json::from_str(&line)?)
}
