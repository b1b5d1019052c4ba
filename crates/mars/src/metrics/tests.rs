use super::*;
use mars_api::{ClusterView, LogView, MemberView, NodeView, PausedView, ResourceView, SyncView};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn page(body: &'static str) -> Render {
    Arc::new(move |f| {
        Box::pin(async move {
            Some(match f {
                Format::Prometheus => body.to_string(),
                Format::OpenMetrics => format!("{body}# EOF\n"),
            })
        })
    })
}

/// Send `request` (then close the sending side when `close`), return the whole reply.
async fn exchange(render: Render, request: &[u8], close: bool) -> String {
    let (mut client, server) = tokio::io::duplex(256 * 1024);
    let task = tokio::spawn(async move { handle(server, &render).await });
    client.write_all(request).await.unwrap();
    if close {
        client.shutdown().await.unwrap();
    }
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    task.await.unwrap();
    String::from_utf8(reply).unwrap()
}

#[test]
fn requests_are_parsed_strictly() {
    let ok = |head: &[u8]| parse_request(head);
    let get = MetricsRequest {
        format: Format::Prometheus,
        head: false,
    };
    assert_eq!(ok(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(get));
    assert_eq!(ok(b"GET /metrics?x=1 HTTP/1.0\n\n"), Ok(get));
    assert_eq!(
        ok(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
        Ok(MetricsRequest { head: true, ..get })
    );
    assert_eq!(
        ok(b"GET /metrics HTTP/1.1\r\nACCEPT: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"),
        Ok(MetricsRequest { format: Format::OpenMetrics, ..get })
    );
    for (head, want) in [
        (&b"GET / HTTP/1.1\r\n\r\n"[..], Refusal::NotFound),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", Refusal::NotFound),
        (b"GET /../metrics HTTP/1.1\r\n\r\n", Refusal::NotFound),
        (b"POST /metrics HTTP/1.1\r\n\r\n", Refusal::MethodNotAllowed),
        (
            b"DELETE /metrics HTTP/1.1\r\n\r\n",
            Refusal::MethodNotAllowed,
        ),
        (b"GET /metrics\r\n\r\n", Refusal::BadRequest),
        (b"GET /metrics HTTP/2\r\n\r\n", Refusal::BadRequest),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", Refusal::BadRequest),
        (b"GET /metrics HTTP/1.1 x\r\n\r\n", Refusal::BadRequest),
        (b"GET metrics HTTP/1.1\r\n\r\n", Refusal::BadRequest),
        (
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            Refusal::BadRequest,
        ),
        (
            b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            Refusal::BadRequest,
        ),
        (b"GET /metrics HTTP/1.1\r\n: x\r\n\r\n", Refusal::BadRequest),
        (b"GET /m\xffetrics HTTP/1.1\r\n\r\n", Refusal::BadRequest),
        (b"\r\n\r\n", Refusal::BadRequest),
        (b"", Refusal::BadRequest),
    ] {
        assert_eq!(ok(head), Err(want), "{}", String::from_utf8_lossy(head));
    }
}

#[tokio::test]
async fn metrics_are_served_and_everything_else_refused() {
    let r = exchange(page("m 1\n"), b"GET /metrics HTTP/1.1\r\n\r\n", false).await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    assert!(r.contains("Content-Length: 4\r\n"), "{r}");
    assert!(r.contains("Connection: close\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\nm 1\n"), "{r}");

    let r = exchange(
        page("m 1\n"),
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n",
        false,
    )
    .await;
    assert!(
        r.contains("Content-Type: application/openmetrics-text"),
        "{r}"
    );
    assert!(r.ends_with("m 1\n# EOF\n"), "{r}");

    let r = exchange(page("m 1\n"), b"HEAD /metrics HTTP/1.1\r\n\r\n", false).await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("Content-Length: 4\r\n"), "{r}");

    let r = exchange(page("m 1\n"), b"GET /secret HTTP/1.1\r\n\r\n", false).await;
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    assert!(!r.contains("m 1"), "{r}");
    let r = exchange(page("m 1\n"), b"PUT /metrics HTTP/1.1\r\n\r\n", false).await;
    assert!(
        r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET, HEAD\r\n"),
        "{r}"
    );

    let failing: Render = Arc::new(|_| Box::pin(async { None }));
    let r = exchange(failing, b"GET /metrics HTTP/1.1\r\n\r\n", false).await;
    assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
}

#[tokio::test]
async fn malformed_oversized_and_cut_requests_get_an_error_and_no_panic() {
    // A head that never ends: refused once the cap is reached, not read further.
    let big = vec![b'A'; 64 * 1024];
    let r = exchange(page("m 1\n"), &big, false).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    let mut long_header = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    long_header.extend(vec![b'x'; MAX_REQUEST]);
    long_header.extend(b"\r\n\r\n");
    let r = exchange(page("m 1\n"), &long_header, false).await;
    assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
    // Cut before the end of the head.
    let r = exchange(page("m 1\n"), b"GET /metrics HTTP/1.1\r\nHost", true).await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // Nothing at all: no answer.
    assert_eq!(exchange(page("m 1\n"), b"", true).await, "");
    // Binary garbage, NULs, a lone CR.
    for junk in [
        &b"\x00\x01\x02\xff\xfe\n\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\rHost: x\r\n\r\n",
        b"\n\n",
    ] {
        let r = exchange(page("m 1\n"), junk, false).await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{junk:?}: {r}");
    }
    // The end of the head split across reads.
    let (mut client, server) = tokio::io::duplex(1024);
    let render = page("m 1\n");
    let task = tokio::spawn(async move { handle(server, &render).await });
    for piece in [&b"GET /metrics HTTP/1.1\r"[..], b"\n", b"\r", b"\n"] {
        client.write_all(piece).await.unwrap();
        tokio::task::yield_now().await;
    }
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    task.await.unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 200 OK"));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sends_too_slowly_is_answered_408() {
    let (mut client, server) = tokio::io::duplex(1024);
    let render = page("m 1\n");
    let task = tokio::spawn(async move { handle(server, &render).await });
    client
        .write_all(b"GET /metrics HTTP/1.1\r\n")
        .await
        .unwrap();
    // The paused clock jumps to the timeout once every task waits.
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    task.await.unwrap();
    let r = String::from_utf8(reply).unwrap();
    assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_the_server_goes_on() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, page("m 1\n")));
    // Idle connections take every slot ...
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET").await.unwrap();
        idle.push(s);
    }
    // ... (wait until the server took them all: a further one is closed at once) ...
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let n = extra.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf));
    // ... and once they go, it serves again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut r = Vec::new();
        let _ = s.read_to_end(&mut r).await;
        if r.starts_with(b"HTTP/1.1 200 OK") {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not recover");
        tokio::task::yield_now().await;
    }
}

/// One address holding connections open cannot take the slots of a scraper
/// at another address.
#[tokio::test]
async fn one_address_cannot_take_every_slot() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, page("m 1\n")));
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s
    };
    // 127.0.0.2 opens as many idle connections as there are slots.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = from("127.0.0.2").connect(addr).await.unwrap();
        let _ = s.write_all(b"GET").await;
        idle.push(s);
    }
    // A scraper at 127.0.0.3 is served while they stay open (before the
    // server would time them out).
    let deadline = Instant::now() + READ_TIMEOUT / 2;
    loop {
        let mut s = from("127.0.0.3").connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut r = Vec::new();
        let _ = s.read_to_end(&mut r).await;
        if r.starts_with(b"HTTP/1.1 200 OK") {
            break;
        }
        assert!(Instant::now() < deadline, "the scraper was not served");
        tokio::task::yield_now().await;
    }
    drop(idle);
}

fn member(node: &str, role: &str, disk: &str, written: u64, replayed: u64) -> MemberView {
    MemberView {
        node: node.into(),
        role: role.into(),
        disk: disk.into(),
        connected: true,
        log: LogView {
            written,
            fetched: written,
            replayed,
        },
        paused: PausedView {
            replay: role == "secondary",
            ..Default::default()
        },
        lag_bytes: written - replayed,
        lag_seconds: 1.5,
        ..Default::default()
    }
}

fn snapshot() -> Snapshot {
    let mut beta = member("beta", "secondary", "syncing", 4096, 1024);
    beta.sync = Some(SyncView {
        done: 10,
        total: 100,
        rate: 5,
        eta_seconds: Some(18),
    });
    beta.checksum_errors = 3;
    beta.replay_delay_seconds = 30.0;
    beta.repaired = 2;
    beta.bad_blocks = 1;
    beta.scrub = Some(mars_api::ScrubView {
        running: None,
        last: Some(mars_api::LastScrub {
            finished_ms: 1_700_000_000_500,
            scanned: 1 << 20,
            bad_blocks: 1,
            error: None,
        }),
    });
    let view = View {
        node: "alpha".into(),
        cluster: ClusterView {
            id: "c1".into(),
            nodes: vec![
                NodeView {
                    name: "alpha".into(),
                    alive: true,
                    ..Default::default()
                },
                NodeView {
                    name: "beta".into(),
                    alive: false,
                    ..Default::default()
                },
            ],
        },
        resources: vec![ResourceView {
            name: "r0".into(),
            size: 1 << 20,
            designated_primary: Some("alpha".into()),
            actual_primary: Some("alpha".into()),
            device: Some("nbd://x/r0".into()),
            members: vec![member("alpha", "primary", "uptodate", 4096, 4096), beta],
            verify: Some(mars_api::VerifyView {
                running: Some((5, 10)),
                last: Some(mars_api::LastVerify {
                    finished_ms: 1_700_000_001_000,
                    clean: false,
                    lost_blocks: 4,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }],
    };
    let stats = mars_nbd::DeviceStats::new();
    Snapshot {
        node: "alpha".into(),
        cluster_id: "c1".into(),
        view: Some(view),
        view_age: 0.0,
        devices: vec![("r0".into(), stats.snapshot())],
        log_used: vec![("r0".into(), 8192)],
        fs: Some((1 << 30, 1 << 29)),
        emergency_free_bytes: 256 << 20,
        gossip: [1, 2, 3, 4, 5],
    }
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

#[test]
fn the_exposition_names_units_and_values_follow_the_view() {
    let text = encode(&snapshot(), Format::Prometheus).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let rm = [("resource", "r0"), ("member", "beta")];
    for (name, labels, want) in [
        ("mars_member_log_written_bytes_total", &rm[..], 4096.0),
        ("mars_member_log_replayed_bytes_total", &rm, 1024.0),
        ("mars_member_lag_bytes", &rm, 3072.0),
        ("mars_member_lag_seconds", &rm, 1.5),
        ("mars_member_replay_delay_seconds", &rm, 30.0),
        ("mars_member_sync_done_bytes", &rm, 10.0),
        ("mars_member_sync_total_bytes", &rm, 100.0),
        ("mars_member_sync_rate_bytes_per_second", &rm, 5.0),
        ("mars_member_primary", &rm, 0.0),
        ("mars_member_primary", &[("member", "alpha")], 1.0),
        (
            "mars_member_designated_primary",
            &[("member", "alpha")],
            1.0,
        ),
        ("mars_member_checksum_errors_total", &rm, 3.0),
        ("mars_member_connected", &rm, 1.0),
        ("mars_member_repaired_blocks_total", &rm, 2.0),
        ("mars_member_bad_blocks", &rm, 1.0),
        ("mars_member_scrub_running", &rm, 0.0),
        (
            "mars_member_scrub_last_end_timestamp_seconds",
            &rm,
            1_700_000_000.5,
        ),
        ("mars_member_scrub_last_bad_blocks", &rm, 1.0),
        ("mars_resource_verify_running", &[("resource", "r0")], 1.0),
        (
            "mars_resource_verify_last_end_timestamp_seconds",
            &[("resource", "r0")],
            1_700_000_001.0,
        ),
        (
            "mars_resource_verify_last_clean",
            &[("resource", "r0")],
            0.0,
        ),
        (
            "mars_resource_verify_last_lost_blocks",
            &[("resource", "r0")],
            4.0,
        ),
        ("mars_member_split_brain", &rm, 0.0),
        ("mars_member_emergency", &rm, 0.0),
        (
            "mars_member_disk_state",
            &[("member", "beta"), ("state", "syncing")],
            1.0,
        ),
        (
            "mars_member_disk_state",
            &[("member", "beta"), ("state", "uptodate")],
            0.0,
        ),
        (
            "mars_member_paused",
            &[("member", "beta"), ("what", "replay")],
            1.0,
        ),
        (
            "mars_member_paused",
            &[("member", "beta"), ("what", "fetch")],
            0.0,
        ),
        ("mars_cluster_node_up", &[("node", "beta")], 0.0),
        ("mars_cluster_peers", &[], 1.0),
        ("mars_cluster_peers_alive", &[], 0.0),
        ("mars_resource_size_bytes", &[("resource", "r0")], 1048576.0),
        ("mars_resource_served", &[("resource", "r0")], 1.0),
        (
            "mars_resource_log_used_bytes",
            &[("resource", "r0")],
            8192.0,
        ),
        ("mars_node_dir_filesystem_free_bytes", &[], 536870912.0),
        ("mars_gossip_received_bytes_total", &[], 4.0),
        ("mars_gossip_dropped_datagrams_total", &[], 5.0),
        ("mars_nbd_requests_in_flight", &[("resource", "r0")], 0.0),
        (
            "mars_nbd_requests_total",
            &[("resource", "r0"), ("command", "write")],
            0.0,
        ),
    ] {
        assert_eq!(
            value(&scrape, name, labels),
            Some(want),
            "{name} {labels:?} in\n{text}"
        );
    }
    assert!(text.contains("# TYPE mars_nbd_request_duration_seconds histogram"));
    assert!(text.contains(
        "mars_nbd_request_duration_seconds_bucket{resource=\"r0\",command=\"flush\",le=\"+Inf\"} 0"
    ));
    assert!(
        text.contains("mars_node_info{node=\"alpha\",cluster=\"c1\""),
        "{text}"
    );
    // OpenMetrics: the same families, units declared, the end marked.
    let om = encode(&snapshot(), Format::OpenMetrics).unwrap();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# UNIT mars_member_lag_seconds seconds"),
        "{om}"
    );
    assert!(
        om.contains("# TYPE mars_member_log_written_bytes counter"),
        "{om}"
    );
}

#[test]
fn without_a_view_the_node_metrics_are_still_shown() {
    let snap = Snapshot {
        view: None,
        view_age: f64::NAN,
        ..snapshot()
    };
    let text = encode(&snap, Format::Prometheus).unwrap();
    assert!(text.contains("mars_gossip_sent_bytes_total 2"), "{text}");
    assert!(text.contains("mars_metrics_view_age_seconds NaN"), "{text}");
    assert!(!text.contains("mars_member_"), "{text}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever a client sends, the answer is one HTTP reply (or none when
    /// it sent nothing), never a panic; only a well-formed GET or HEAD of
    /// /metrics gets the page.
    #[test]
    fn any_bytes_get_one_reply_and_no_panic(
        junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        tail in proptest::sample::select(vec![&b""[..], b"\r\n\r\n", b"\n\n"]),
        prefix in proptest::sample::select(vec![&b""[..], b"GET /metrics HTTP/1.1\r\n", b"GET /metrics"]),
    ) {
        let mut req = prefix.to_vec();
        req.extend(&junk);
        req.extend(tail);
        let _ = parse_request(&req);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let reply = rt.block_on(exchange(page("m 1\n"), &req, true));
        proptest::prop_assert!(
            reply.is_empty() && req.is_empty() || reply.starts_with("HTTP/1.1 "),
            "{:?}",
            reply
        );
        if reply.starts_with("HTTP/1.1 200") {
            proptest::prop_assert!(req.starts_with(b"GET /metrics") || req.starts_with(b"HEAD /metrics"));
        }
    }
}
