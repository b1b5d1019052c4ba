//! The control socket: one JSON request per line in, one JSON response per line out.
//!
//! Mode 0600 whatever the umask ([`bind`]), and every connection's caller
//! checked (`SO_PEERCRED`): root or the daemon's own effective uid; anyone
//! else gets a refusal and is logged.

use crate::daemon::Daemon;
use mars_api::{Request, Response};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

/// Bind the control socket at `path` with mode 0600 whatever the umask,
/// with no moment at which anyone else could connect: it is bound in a new
/// directory of mode 0700 beside it, set to 0600 there, and renamed into
/// place. (Connecting needs write permission on the socket.)
pub fn bind(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    // Stale from a killed marsd; the node directory's lock proves nobody uses it.
    let _ = std::fs::remove_file(path);
    let private = dir.join(format!(".s{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let inner = private.join("s");
    let bound = (|| {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let l = std::os::unix::net::UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok::<_, std::io::Error>(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound.with_context(|| format!("cannot create control socket {}", path.display()))
}

/// Whether a caller of uid `uid` may use the control socket of a daemon
/// running with effective uid `euid`: root and the daemon's own user.
pub fn caller_allowed(uid: u32, euid: u32) -> bool {
    uid == 0 || uid == euid
}

/// Refused callers are logged at most once per this long (with a count).
const REFUSAL_LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut refusals = (None::<std::time::Instant>, 0u64);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Every connection: root or the daemon's own user, nobody else.
                let cred = stream.peer_cred();
                let allowed = cred.as_ref().is_ok_and(|c| caller_allowed(c.uid(), euid));
                if !allowed {
                    refusals.1 += 1;
                    let now = std::time::Instant::now();
                    if refusals
                        .0
                        .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_PERIOD)
                    {
                        let (uid, pid) = match &cred {
                            Ok(c) => (c.uid().to_string(), format!("{:?}", c.pid())),
                            Err(e) => (format!("unknown ({e})"), "unknown".into()),
                        };
                        tracing::warn!(
                            uid,
                            pid,
                            refused = refusals.1,
                            "control socket: refused a caller that is neither root nor uid {euid}"
                        );
                        refusals = (Some(now), 0);
                    }
                    let why = match &cred {
                        Ok(c) => format!("uid {}", c.uid()),
                        Err(_) => "a caller whose uid is unknown".to_string(),
                    };
                    tokio::spawn(refuse(stream, format!("permission denied: marsd accepts commands from root and from uid {euid} only, not from {why}")));
                    continue;
                }
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

/// Answer a refused caller's request (read first, so that its write does not
/// fail before it reads the reason) with the reason, and close.
async fn refuse(stream: UnixStream, reason: String) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut input = BufReader::new(r).take(MAX_LINE as u64);
    let read = input.read_line(&mut line);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    let mut out =
        serde_json::to_vec(&Response::err(reason)).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = w.write_all(&out).await;
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
