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
            Ok(Request::Watch { name, full }) => {
                return watch(&daemon, name, full, lines, w).await;
            }
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

/// How often a watcher's view is computed anew.
const WATCH_TICK: std::time::Duration = std::time::Duration::from_millis(100);
/// A watch asks the primary every this many ticks (once a second).
const ASK_PRIMARY_EVERY: u64 = 10;

fn line_of<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    out
}

/// `view --watch`: the view, then the events between each view and the next
/// (or, `full`, each view that differs), until the caller closes the
/// connection or a view fails.
async fn watch(
    daemon: &Arc<Daemon>,
    name: Option<String>,
    full: bool,
    mut input: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut prev: Option<mars_api::View> = None;
    let mut sink = [0u8; 256];
    let mut fresh = None;
    let mut tick = 0u64;
    loop {
        tick = tick.wrapping_add(1);
        // The primary is asked once a second, not every tick (a watch per
        // operator's terminal or script would otherwise cost it ten
        // exchanges a second each); this node's own state every tick.
        let ask = tick % ASK_PRIMARY_EVERY == 1;
        let view = match daemon.view_asking(name.as_deref(), ask, &mut fresh).await {
            Ok(v) => v,
            Err(e) => {
                return w
                    .write_all(&line_of(&Response::err(format!("{e:#}"))))
                    .await
            }
        };
        let resp = Response {
            ok: true,
            view: Some(view.clone()),
            ..Default::default()
        };
        match &prev {
            None => w.write_all(&line_of(&resp)).await?,
            Some(p) if full => {
                if *p != view {
                    w.write_all(&line_of(&resp)).await?;
                }
            }
            Some(p) => {
                for e in mars_api::events(p, &view, crate::peer::now_ms()) {
                    w.write_all(&line_of(&e)).await?;
                }
            }
        }
        prev = Some(view);
        // The caller going away ends the watch (its reads end with EOF).
        tokio::select! {
            _ = tokio::time::sleep(WATCH_TICK) => {}
            r = input.read(&mut sink) => {
                if r.map_or(true, |n| n == 0) {
                    return Ok(());
                }
            }
        }
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

/// Client side: a connection to the control socket of node directory `dir`.
fn connect(dir: &Path) -> anyhow::Result<std::os::unix::net::UnixStream> {
    let path = dir.join(mars_api::SOCKET_NAME);
    std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
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
    })
}

/// Client side (`marsadm view --watch`, `wait-*`): a watch of the view of
/// `name` (all resources: None); see `Request::Watch`.
pub struct Watch {
    stream: std::os::unix::net::UnixStream,
    input: std::io::BufReader<std::os::unix::net::UnixStream>,
    /// A line read in part when a wait ran out.
    partial: Vec<u8>,
}

impl Watch {
    pub fn open(dir: &Path, name: Option<String>, full: bool) -> anyhow::Result<Watch> {
        use std::io::Write;
        let mut stream = connect(dir)?;
        let mut body = serde_json::to_vec(&Request::Watch { name, full })?;
        body.push(b'\n');
        stream.write_all(&body)?;
        Ok(Watch {
            input: std::io::BufReader::new(stream.try_clone()?),
            stream,
            partial: Vec::new(),
        })
    }

    /// Wait at most `timeout` (None: for ever) for the next line: None when
    /// the time ran out; an error when marsd closed the connection.
    pub fn next_line(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> anyhow::Result<Option<String>> {
        use std::io::BufRead;
        let timeout = timeout.map(|t| t.max(std::time::Duration::from_millis(1)));
        self.stream.set_read_timeout(timeout)?;
        match self.input.read_until(b'\n', &mut self.partial) {
            Ok(0) => Err(anyhow::Error::new(NotRunning(
                "marsd closed the watch (it stopped?)".into(),
            ))),
            Ok(_) if self.partial.ends_with(b"\n") => {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end()
                    .to_string();
                self.partial.clear();
                Ok(Some(line))
            }
            Ok(_) => Err(anyhow::Error::new(NotRunning(
                "marsd closed the watch in a line (it stopped?)".into(),
            ))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Client side (`marsadm`): send one request, wait for the response.
pub fn call(dir: &Path, req: &Request) -> anyhow::Result<Response> {
    use std::io::{BufRead, Write};
    let mut stream = connect(dir)?;
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
