//! marsd under systemd: readiness only once it serves (a fake
//! `$NOTIFY_SOCKET` bound by the test), watchdog pings, STOPPING at the end;
//! the node setting `primary_units` (a fake `systemctl` on PATH); and the
//! unit files, checked by `systemd-analyze verify`.

mod common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A marsd the test started itself (not through `Node::start`, which waits
/// until it serves); SIGKILLed on drop unless it was stopped.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every datagram that arrives on `sock` until `until` holds for one, or the
/// deadline passes (then it panics with what came).
fn receive_until(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    timeout: Duration,
    what: &str,
    mut until: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} within {timeout:?}; received: {got:#?}"
        );
        sock.set_read_timeout(Some(left)).expect("read timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                got.push(msg.clone());
                if until(&msg) {
                    return msg;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

/// Run `f` on a thread and give its result if it comes within `timeout`.
fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// A restarted primary asks the other nodes for metadata before it serves
/// (at most 5 s; here the other node is frozen, so it waits them out): its
/// listeners are bound then, but it does not serve. READY=1 must come after
/// that, when the control socket, the NBD export and the peer port answer at
/// once; STATUS= lines come before; WATCHDOG=1 follows while the loop runs;
/// STOPPING=1 at SIGTERM.
#[test]
fn ready_only_once_it_serves_then_watchdog_and_stopping() {
    let mut nodes = start_cluster(&["alpha", "beta"]);
    let disk = nodes[0].disk("disk-r0.img", 16 << 20);
    nodes[0].adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    nodes[0].stop();
    // Frozen: its kernel accepts alpha's connections, nothing answers.
    nodes[1].signal(libc::SIGSTOP);
    let beta = nodes[1].pid().expect("beta runs");
    wait_for("beta stopped", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{beta}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    });

    let alpha = &nodes[0];
    let sock_path = alpha.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&alpha.log)
        .expect("log");
    let started = Instant::now();
    let mut marsd = Daemon(Some(
        Command::new(MARSD)
            .arg("--dir")
            .arg(&alpha.dir)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn marsd"),
    ));

    let mut got = Vec::new();
    receive_until(&sock, &mut got, Duration::from_secs(60), "READY=1", |m| {
        m.lines().any(|l| l == "READY=1")
    });
    let ready_after = started.elapsed();
    // Serving now: each answers at once (a premature READY would find the
    // control socket and NBD unanswered for the seconds the pull waits).
    let dir = alpha.dir.clone();
    let view = within(Duration::from_secs(3), move || {
        mars::control::call(&dir, &mars_api::Request::View { name: None })
            .map(|r| r.ok)
            .map_err(|e| format!("{e:#}"))
    });
    assert_eq!(
        view,
        Some(Ok(true)),
        "READY=1 came ({ready_after:?} after start) but the control socket did not answer within 3 s:\n{}",
        alpha.log_text()
    );
    let nbd = alpha.nbd.clone();
    let export = within(Duration::from_secs(3), move || {
        NbdClient::connect(&nbd, "r0")
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    assert_eq!(
        export,
        Some(Ok(())),
        "READY=1 came but NBD export r0 did not answer within 3 s:\n{}",
        alpha.log_text()
    );
    let peer: std::net::SocketAddr = alpha.listen.parse().expect("listen address");
    std::net::TcpStream::connect_timeout(&peer, Duration::from_secs(3))
        .expect("READY=1 came but the peer port refuses connections");
    // What came before READY: status lines, and no READY.
    let before = &got[..got.len() - 1];
    assert!(
        before
            .iter()
            .any(|m| m.contains("STATUS=asking the other nodes")),
        "no STATUS line before READY=1: {got:#?}"
    );
    // The pull from the frozen node ended (it failed, or timed out) before.
    let text = alpha.log_text();
    let restart = text
        .rfind("marsd: stopped")
        .expect("alpha's first run stopped");
    assert!(
        text[restart..].contains("before serving"),
        "READY=1 before the pull from the frozen node ended:\n{text}"
    );
    assert!(got.last().unwrap().contains("STATUS=serving"), "{got:#?}");

    // The watchdog: pinged every half WATCHDOG_USEC while the loop runs.
    for _ in 0..3 {
        receive_until(
            &sock,
            &mut got,
            Duration::from_secs(10),
            "WATCHDOG=1",
            |m| m.lines().any(|l| l == "WATCHDOG=1"),
        );
    }

    // SIGTERM: STOPPING=1, then a clean exit.
    let mut child = marsd.0.take().expect("running");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    receive_until(
        &sock,
        &mut got,
        Duration::from_secs(60),
        "STOPPING=1",
        |m| m.lines().any(|l| l == "STOPPING=1"),
    );
    let status = child.wait().expect("wait marsd");
    assert!(
        status.success(),
        "marsd exit {status}:\n{}",
        alpha.log_text()
    );
    nodes[1].signal(libc::SIGCONT);
}

/// A fake `systemctl` that logs its arguments to `calls`; a `stop` marks
/// `stopping` and, while `hold` exists, waits (at most 60 s).
fn fake_systemctl(bin: &Path, calls: &Path, state: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(bin).expect("bin dir");
    let script = format!(
        r#"#!/bin/sh
echo "$*" >> '{calls}'
if [ "$1" = stop ]; then
    : > '{state}/stopping'
    i=0
    while [ -e '{state}/hold' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done
fi
exit 0
"#,
        calls = calls.display(),
        state = state.display()
    );
    let path = bin.join("systemctl");
    std::fs::write(&path, script).expect("write fake systemctl");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn set_primary_units(n: &Node, units: serde_json::Value) {
    let path = n.dir.join("node.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("node.json"))
            .expect("node.json is JSON");
    cfg["primary_units"] = units;
    std::fs::write(&path, cfg.to_string()).expect("write node.json");
}

fn calls(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `primary_units`: the unit is started once the device is served, stopped
/// (and waited for) while it still is, before it stops being served; at
/// `secondary`, `primary` again and at marsd's stop. A bad unit name keeps
/// marsd from starting.
#[test]
fn primary_units_follow_the_served_device() {
    let mut n = Node::create("alpha");
    let unit = "mars-resource@r0.service";
    set_primary_units(&n, serde_json::json!({ "r0": unit }));
    let bin = n.path("fakebin");
    let state = n.path("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let log = n.path("systemctl.log");
    fake_systemctl(&bin, &log, &state);
    let path = format!(
        "PATH={}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    n.wrapper = vec!["env".into(), path];
    n.start();
    assert!(calls(&log).is_empty(), "no unit before a device is served");

    let disk = n.disk("disk-r0.img", 16 << 20);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let start = format!("start {unit}");
    let stop = format!("stop {unit}");
    wait_for("systemctl start", Duration::from_secs(30), || {
        calls(&log).contains(&start)
    });
    n.nbd("r0");

    // `secondary`: the stop runs while the device is still served, and the
    // device goes only after it returned.
    std::fs::write(state.join("hold"), b"").expect("hold");
    let dir = n.dir.clone();
    let secondary = std::thread::spawn(move || {
        Command::new(MARSADM)
            .arg("--dir")
            .arg(&dir)
            .args(["secondary", "r0"])
            .output()
            .expect("run marsadm")
    });
    wait_for("systemctl stop", Duration::from_secs(30), || {
        state.join("stopping").exists()
    });
    assert_eq!(calls(&log).last(), Some(&stop));
    n.nbd("r0"); // still served while its unit stops
    std::fs::remove_file(state.join("hold")).expect("release");
    let out = secondary.join().expect("secondary thread");
    assert!(
        out.status.success(),
        "secondary: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        NbdClient::connect(&n.nbd, "r0").is_err(),
        "r0 still served after `secondary` returned"
    );

    n.adm_ok(&["primary", "r0"]);
    wait_for("systemctl start again", Duration::from_secs(30), || {
        calls(&log).iter().filter(|c| **c == start).count() == 2
    });
    n.nbd("r0");
    n.stop();
    assert_eq!(
        calls(&log),
        vec![start.clone(), stop.clone(), start.clone(), stop.clone()],
        "{}",
        n.log_text()
    );

    // A bad unit name: marsd refuses to start, saying why.
    set_primary_units(&n, serde_json::json!({ "r0": "--now" }));
    let out = Command::new(MARSD)
        .arg("--dir")
        .arg(&n.dir)
        .stdin(Stdio::null())
        .output()
        .expect("run marsd");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a systemd unit name"), "{err}");
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `systemd-analyze verify` on every unit in contrib/systemd (it exits 0 on
/// a directive it cannot parse, so any line about our units fails too). It
/// checks that the programs a unit runs exist and that its `man:` pages
/// resolve, so each unit is verified as a copy that runs the binaries this
/// build made (for /usr/local/bin) and a stub operator script (for
/// /etc/mars/resource.d), with MANPATH at the committed man pages.
#[test]
fn unit_files_pass_systemd_analyze_verify() {
    use std::os::unix::fs::PermissionsExt;
    require_tool("systemd-analyze", "systemd");
    require_tool("man", "man-db"); // it resolves the units' man: pages
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let hooks = root.join("resource.d");
    std::fs::create_dir_all(&hooks).expect("hook dir");
    std::fs::write(hooks.join("r0"), "#!/bin/sh\nexit 0\n").expect("stub hook");
    std::fs::set_permissions(hooks.join("r0"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    for (page, sect) in [("marsadm.1", "man1"), ("marsd.8", "man8")] {
        std::fs::create_dir_all(root.join("man").join(sect)).expect("man dir");
        std::fs::copy(
            repo().join("man").join(page),
            root.join("man").join(sect).join(page),
        )
        .expect("copy man page");
    }
    let units = repo().join("contrib/systemd");
    let mut checked = Vec::new();
    for e in std::fs::read_dir(&units).expect("contrib/systemd") {
        let path = e.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .expect("read unit")
            .replace("/usr/local/bin/marsd", MARSD)
            .replace("/usr/local/bin/marsadm", MARSADM)
            .replace("/etc/mars/resource.d/", &format!("{}/", hooks.display()));
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("Exec") && l.contains("/usr/local/")),
            "{name}: a program the test does not map"
        );
        // A template is verified as an instance.
        let file = name.replace("@.service", "@r0.service");
        std::fs::write(root.join(&file), text).expect("write copy");
        checked.push(file);
    }
    checked.sort();
    assert_eq!(checked, ["mars-resource@r0.service", "marsd.service"]);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(checked.iter().map(|f| root.join(f)))
        // The copies, and the units they name (marsd.service), are found here.
        .env("SYSTEMD_UNIT_PATH", format!("{}:", root.display()))
        .env("MANPATH", root.join("man"))
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // It may also warn about units of the host it reads on the way; lines
    // about ours count.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("mars")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {checked:?} ({}):\n{err}",
        out.status
    );
}

/// scripts/install.sh into a staging root: binaries, units pointing at the
/// PREFIX's binaries, man pages, completions.
#[test]
fn install_script_puts_everything_in_place() {
    let root = tempfile::tempdir().expect("tempdir");
    let bin_dir = Path::new(MARSD).parent().expect("binary dir");
    let out = Command::new(repo().join("scripts/install.sh"))
        .env("PREFIX", "/opt/mars")
        .env("DESTDIR", root.path())
        .env("MARS_BIN_DIR", bin_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/install.sh");
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = root.path();
    for f in [
        "opt/mars/bin/marsd",
        "opt/mars/bin/marsadm",
        "opt/mars/share/man/man1/marsadm.1",
        "opt/mars/share/man/man8/marsd.8",
        "opt/mars/share/bash-completion/completions/marsadm",
        "opt/mars/share/zsh/site-functions/_marsadm",
        "opt/mars/share/fish/vendor_completions.d/marsadm.fish",
        "etc/systemd/system/mars-resource@.service",
        "etc/mars/resource.d",
    ] {
        assert!(r.join(f).exists(), "{f} not installed");
    }
    let unit = std::fs::read_to_string(r.join("etc/systemd/system/marsd.service"))
        .expect("marsd.service installed");
    assert!(
        unit.contains("\nExecStart=/opt/mars/bin/marsd --dir /var/lib/mars\n"),
        "ExecStart not rewritten for PREFIX:\n{unit}"
    );
}

/// A primary unit that takes long to stop (a VM shutting down, an unmount
/// writing back: systemd's default stop timeout is 90 s, and marsd waits up
/// to 100 s) holds the daemon's state, but the control loop is not stuck:
/// the watchdog is still fed meanwhile. Else `WatchdogSec=` kills marsd in
/// the middle of the handover while the unit still uses the device.
#[test]
fn a_slow_primary_unit_stop_does_not_starve_the_watchdog() {
    let mut n = Node::create("alpha");
    let unit = "mars-resource@r0.service";
    set_primary_units(&n, serde_json::json!({ "r0": unit }));
    let bin = n.path("fakebin");
    let state = n.path("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let log = n.path("systemctl.log");
    fake_systemctl(&bin, &log, &state);
    let sock_path = n.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    n.wrapper = vec![
        "env".into(),
        format!(
            "PATH={}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
        format!("NOTIFY_SOCKET={}", sock_path.display()),
        "WATCHDOG_USEC=2000000".into(),
    ];
    n.start();
    let disk = n.disk("disk-r0.img", 16 << 20);
    n.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);
    let start = format!("start {unit}");
    wait_for("systemctl start", Duration::from_secs(30), || {
        calls(&log).contains(&start)
    });
    std::fs::write(state.join("hold"), b"").expect("hold");
    let dir = n.dir.clone();
    let secondary = std::thread::spawn(move || {
        Command::new(MARSADM)
            .arg("--dir")
            .arg(&dir)
            .args(["secondary", "r0"])
            .output()
            .expect("run marsadm")
    });
    wait_for("systemctl stop", Duration::from_secs(30), || {
        state.join("stopping").exists()
    });
    // The unit stops for 8 s (four watchdog limits): pings go on throughout.
    let held = Instant::now();
    let mut got = Vec::new();
    let mut late_pings = 0;
    while held.elapsed() < Duration::from_secs(8) {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        if let Ok(k) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..k]).into_owned();
            if held.elapsed() > Duration::from_secs(4) && m.lines().any(|l| l == "WATCHDOG=1") {
                late_pings += 1;
            }
            got.push(m);
        }
    }
    std::fs::remove_file(state.join("hold")).expect("release");
    let out = secondary.join().expect("secondary thread");
    assert!(
        out.status.success(),
        "secondary: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        late_pings >= 2,
        "no watchdog pings while the unit stopped (systemd would kill marsd): {got:#?}\n{}",
        n.log_text()
    );
}
