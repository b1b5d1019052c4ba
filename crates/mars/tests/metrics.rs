//! Prometheus metrics of two real marsd (`--metrics` on one, the node
//! setting on the other), scraped during a replicated write load (qemu-io on
//! the primary's device), parsed by a real parser (`prometheus-parse`) and
//! checked by `promtool check metrics` (Debian's `prometheus`); the example
//! alert rules checked by `promtool check rules`, and every metric the rules
//! and the Grafana dashboard name is one marsd serves.

mod common;
use common::*;
use prometheus_parse::{Scrape, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn contrib(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib")
        .join(path)
}

/// One HTTP request to `addr`: status line and body.
fn http(addr: &str, request: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8(reply).expect("a UTF-8 reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a reply head");
    let status = head.lines().next().unwrap_or("").to_string();
    (status, body.to_string())
}

fn get_metrics(addr: &str) -> String {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// `promtool check metrics`: the exposition is well formed and follows the
/// naming conventions (its linter's complaints fail the test).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Metrics(Scrape, String);

impl Metrics {
    fn scrape(addr: &str) -> Metrics {
        let text = get_metrics(addr);
        let s = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse");
        Metrics(s, text)
    }

    /// The value of the one sample of `name` with `labels` (0 when absent).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
                Value::Histogram(h) => h.last().map(|b| b.count),
                Value::Summary(_) => None,
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?}: {found:?}");
        found.first().copied().unwrap_or(0.0)
    }

    fn names(&self) -> Vec<String> {
        self.0.samples.iter().map(|s| s.metric.clone()).collect()
    }
}

fn r0(member: &str) -> [(&str, &str); 2] {
    [("resource", "r0"), ("member", member)]
}

#[test]
fn metrics_follow_a_replicated_write_load() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("promtool", "prometheus");
    let (ma, mb) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    // alpha by the node setting, beta by the command line.
    let mut alpha = Node::create("alpha");
    let cfg_path = alpha.dir.join("node.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["metrics"] = ma.clone().into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    alpha.start();
    let mut beta = Node::join("beta", &alpha);
    beta.args = vec!["--metrics".into(), mb.clone()];
    beta.start();
    let nodes = [alpha, beta];
    for n in &nodes {
        n.wait_view("both alive", |v| all_alive(v, &["alpha", "beta"]));
    }
    replicate_r0(&nodes, 64 * MIB);

    // Before the load: well formed, and every family of a replicated resource there.
    let (a0, b0) = (Metrics::scrape(&ma), Metrics::scrape(&mb));
    for m in [&a0, &b0] {
        promtool_check(&m.1);
        assert_eq!(m.get("mars_cluster_peers_alive", &[]), 1.0, "{}", m.1);
        assert_eq!(m.get("mars_member_primary", &r0("alpha")), 1.0, "{}", m.1);
        assert_eq!(m.get("mars_member_primary", &r0("beta")), 0.0, "{}", m.1);
        assert_eq!(m.get("mars_member_connected", &r0("beta")), 1.0, "{}", m.1);
        assert_eq!(
            m.get(
                "mars_member_disk_state",
                &[("member", "alpha"), ("state", "uptodate")]
            ),
            1.0,
            "{}",
            m.1
        );
        assert!(m.get("mars_node_dir_filesystem_free_bytes", &[]) > 0.0);
    }
    // The device is served (and counted) on the primary only.
    assert!(
        a0.1.contains("mars_nbd_requests_in_flight{resource=\"r0\"} 0"),
        "{}",
        a0.1
    );
    assert!(!b0.1.contains("mars_nbd_"), "{}", b0.1);

    // The load: 24 MiB in 1 MiB writes through qemu-io, scraped while it runs.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &nodes[0].uri("r0")]);
    for i in 0..24u64 {
        cmd.args(["-c", &format!("write -P {} {}M 1M", i + 1, i)]);
    }
    cmd.args(["-c", "flush"]);
    let mut load = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qemu-io");
    let mut last_written = a0.get("mars_member_log_written_bytes_total", &r0("alpha"));
    let mut scrapes = 0;
    while load.try_wait().expect("qemu-io").is_none() {
        // Counters never go back while the load runs, on either node.
        let (a, b) = (Metrics::scrape(&ma), Metrics::scrape(&mb));
        let w = a.get("mars_member_log_written_bytes_total", &r0("alpha"));
        assert!(
            w >= last_written,
            "written went back: {last_written} -> {w}"
        );
        last_written = w;
        assert!(
            b.get("mars_member_log_replayed_bytes_total", &r0("beta"))
                >= b0.get("mars_member_log_replayed_bytes_total", &r0("beta"))
        );
        scrapes += 1;
    }
    let out = load.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    eprintln!("scraped {scrapes} times during the load");

    // What the load wrote shows on the primary: log bytes (data plus record
    // headers), NBD requests, bytes and the latency histogram's count.
    const LOAD: f64 = (24 * MIB) as f64;
    let written_before = a0.get("mars_member_log_written_bytes_total", &r0("alpha"));
    let write = [("resource", "r0"), ("command", "write")];
    let flush = [("resource", "r0"), ("command", "flush")];
    let a1 = Metrics::scrape(&ma);
    assert!(
        a1.get("mars_member_log_written_bytes_total", &r0("alpha")) >= written_before + LOAD,
        "{}",
        a1.1
    );
    assert_eq!(
        a1.get("mars_nbd_request_bytes_total", &write)
            - a0.get("mars_nbd_request_bytes_total", &write),
        LOAD,
        "{}",
        a1.1
    );
    let writes =
        a1.get("mars_nbd_requests_total", &write) - a0.get("mars_nbd_requests_total", &write);
    assert!(writes >= 24.0, "{writes} writes\n{}", a1.1);
    assert_eq!(
        a1.get("mars_nbd_request_duration_seconds", &write)
            - a0.get("mars_nbd_request_duration_seconds", &write),
        writes,
        "the histogram counts every write"
    );
    assert!(a1.get("mars_nbd_requests_total", &flush) > a0.get("mars_nbd_requests_total", &flush));
    assert_eq!(a1.get("mars_nbd_request_errors_total", &write), 0.0);
    assert!(
        a1.get("mars_nbd_request_duration_seconds_sum", &write)
            > a0.get("mars_nbd_request_duration_seconds_sum", &write)
    );
    assert_eq!(
        a1.get("mars_nbd_requests_in_flight", &[("resource", "r0")]),
        0.0
    );
    assert!(a1.get("mars_resource_log_used_bytes", &[("resource", "r0")]) >= LOAD);
    promtool_check(&a1.1);

    // The secondary replays all of it; the lag returns to 0 on both nodes.
    let target = a1.get("mars_member_log_written_bytes_total", &r0("alpha"));
    let mut last = (String::new(), String::new());
    let caught_up = poll(Duration::from_secs(60), || {
        let (a, b) = (Metrics::scrape(&ma), Metrics::scrape(&mb));
        let ok = b.get("mars_member_log_replayed_bytes_total", &r0("beta")) >= target
            && b.get("mars_member_lag_bytes", &r0("beta")) == 0.0
            && a.get("mars_member_lag_bytes", &r0("beta")) == 0.0
            && a.get("mars_member_log_replayed_bytes_total", &r0("beta")) >= target
            && b.get(
                "mars_member_disk_state",
                &[("member", "beta"), ("state", "uptodate")],
            ) == 1.0;
        last = (a.1, b.1);
        ok
    });
    assert!(
        caught_up,
        "beta did not catch up:\nalpha:\n{}\nbeta:\n{}",
        last.0, last.1
    );
    // A verify (issue 18) of the replicated copies: clean, and shown.
    nodes[0].adm_ok(&["verify", "r0"]);
    let (a2, b1) = (Metrics::scrape(&ma), Metrics::scrape(&mb));
    let res = [("resource", "r0")];
    assert_eq!(
        a2.get("mars_resource_verify_last_clean", &res),
        1.0,
        "{}",
        a2.1
    );
    assert_eq!(
        a2.get("mars_resource_verify_running", &res),
        0.0,
        "{}",
        a2.1
    );
    assert!(a2.get("mars_resource_verify_last_end_timestamp_seconds", &res) > 1.6e9);
    assert_eq!(
        a2.get("mars_member_bad_blocks", &r0("beta")),
        0.0,
        "{}",
        a2.1
    );
    assert!(
        b1.get("mars_member_log_fetched_bytes_total", &r0("beta"))
            >= b0.get("mars_member_log_fetched_bytes_total", &r0("beta")) + LOAD
    );
    assert!(
        b1.get("mars_member_log_replayed_bytes_total", &r0("beta"))
            >= b0.get("mars_member_log_replayed_bytes_total", &r0("beta")) + LOAD
    );
    assert!(
        a2.get(
            "mars_resource_link_sent_data_bytes_total",
            &[("resource", "r0")]
        ) >= a0.get(
            "mars_resource_link_sent_data_bytes_total",
            &[("resource", "r0")]
        ) + LOAD,
        "{}",
        a2.1
    );
    for m in [&a2, &b1] {
        assert!(m.get("mars_gossip_sent_bytes_total", &[]) > 0.0);
        assert!(m.get("mars_gossip_received_datagrams_total", &[]) > 0.0);
    }
    promtool_check(&b1.1);

    // OpenMetrics when asked for it; refusals for anything else.
    let (status, body) = http(
        &ma,
        "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n") && body.contains("# UNIT mars_member_lag_bytes bytes"));
    assert!(http(&ma, "GET / HTTP/1.1\r\n\r\n")
        .0
        .starts_with("HTTP/1.1 404"));
    assert!(http(&ma, "POST /metrics HTTP/1.1\r\n\r\n")
        .0
        .starts_with("HTTP/1.1 405"));
    assert!(http(&ma, "garbage\r\n\r\n").0.starts_with("HTTP/1.1 400"));

    // Every metric the example alerts and the dashboard use is served.
    let served = a2.names();
    let mut used = String::new();
    for f in ["prometheus/mars-alerts.yml", "grafana/mars-dashboard.json"] {
        used += &std::fs::read_to_string(contrib(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let mut names: Vec<&str> = used
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("mars_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    for n in names {
        // (The parser files a histogram's buckets under the family's name.)
        let family = n.strip_suffix("_bucket").unwrap_or(n);
        assert!(
            served.iter().any(|s| s == n || s == family),
            "contrib names {n}, which marsd does not serve"
        );
    }
}

#[test]
fn metrics_are_off_unless_asked_for_and_a_taken_port_refuses_to_start() {
    let mut alpha = Node::create("alpha");
    alpha.start();
    assert!(
        !alpha.log_text().contains("metrics: http"),
        "{}",
        alpha.log_text()
    );
    alpha.stop();
    // The address is taken: marsd refuses to start, naming it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(MARSD)
        .args(["--dir", alpha.dir.to_str().unwrap(), "--metrics", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = poll(Duration::from_secs(30), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(exited && !out.status.success(), "{err}");
    assert!(err.contains("metrics") && err.contains(&addr), "{err}");
}

#[test]
fn the_example_alert_rules_are_valid() {
    require_tool("promtool", "prometheus");
    let rules = contrib("prometheus/mars-alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tests = contrib("prometheus/mars-alerts.test.yml");
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(contrib("grafana/mars-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8));
}

/// The body of an HTTP/1.1 reply, de-chunked when it is chunked.
fn dechunk(head_and_body: &str) -> String {
    let (head, body) = head_and_body.split_once("\r\n\r\n").unwrap_or(("", ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, more)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || more.len() < n {
            break;
        }
        out.push_str(&more[..n]);
        rest = more[n..].trim_start_matches("\r\n");
    }
    out
}

/// A Prometheus query against `addr`: the result vector.
fn prom_query(addr: &str, query: &str) -> Vec<serde_json::Value> {
    prom_answer(addr, query)["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A Prometheus query against `addr`: the whole answer (Null when none).
fn prom_answer(addr: &str, query: &str) -> serde_json::Value {
    let q: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut s = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(_) => return serde_json::Value::Null,
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req =
        format!("GET /api/v1/query?query={q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return serde_json::Value::Null;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    serde_json::from_str(&dechunk(&reply)).unwrap_or_default()
}

/// Prometheus itself (Debian's `prometheus`, the server) scrapes a marsd,
/// with the example rules loaded: the target is up, the series arrive with
/// their values, and the rules evaluate without error.
#[test]
fn prometheus_scrapes_marsd() {
    require_tool("prometheus", "prometheus");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut alpha = Node::create("alpha");
    alpha.args = vec!["--metrics".into(), metrics.clone()];
    alpha.start();
    let disk = alpha.disk("a.img", 16 * MIB);
    alpha.adm_ok(&["create-resource", "r0", disk.to_str().unwrap()]);

    let dir = alpha.path("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let rules = contrib("prometheus/mars-alerts.yml");
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: mars\n    static_configs:\n      - targets: ['{metrics}']\n",
        rules.display()
    );
    std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("run prometheus");
    let ok = poll(Duration::from_secs(60), || {
        let up = prom_query(&web, "up{job=\"mars\"}");
        let primary = prom_query(
            &web,
            "mars_member_primary{resource=\"r0\",member=\"alpha\"}",
        );
        let size = prom_query(&web, "mars_resource_size_bytes{resource=\"r0\"}");
        let value = |v: &[serde_json::Value]| {
            v.first()
                .and_then(|r| r["value"][1].as_str().map(str::to_string))
                .unwrap_or_default()
        };
        value(&up) == "1" && value(&primary) == "1" && value(&size) == (16 * MIB).to_string()
    });
    let rules_ok = ok
        && poll(Duration::from_secs(30), || {
            // Every rule evaluated (the split-brain rule's expression now has a result).
            !prom_query(&web, "max by (resource, member) (mars_member_split_brain)").is_empty()
        });
    // Every query of the dashboard is one Prometheus takes (with its
    // variables filled in as Grafana would).
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(contrib("grafana/mars-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut bad = Vec::new();
    let mut queries = 0;
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let q = expr
                .replace("$resource", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let a = prom_answer(&web, &q);
            queries += 1;
            if a["status"] != "success" {
                bad.push(format!("{}: {q}: {a}", panel["title"]));
            }
        }
    }
    let _ = prom.kill();
    let _ = prom.wait();
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert!(ok && rules_ok, "prometheus did not get the metrics:\n{log}");
    assert!(
        queries > 20 && bad.is_empty(),
        "{queries} queries; refused: {bad:#?}"
    );
    assert!(!log.contains("level=error"), "{log}");
}
