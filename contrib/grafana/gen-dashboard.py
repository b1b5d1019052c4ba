#!/usr/bin/env python3
"""Writes mars-dashboard.json (a Grafana dashboard on marsd's metrics) to stdout.

    python3 contrib/grafana/gen-dashboard.py > contrib/grafana/mars-dashboard.json

Edit the panels here rather than the JSON; crates/mars/tests/metrics.rs checks
that every metric the dashboard names is one marsd serves.
"""
import json
DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
pid = [0]
def panel(kind, title, targets, x, y, w, h, unit=None, desc=None, extra=None, overrides=None):
    pid[0] += 1
    p = {
        "id": pid[0], "type": kind, "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [dict({"datasource": DS, "refId": chr(65 + i), "expr": e, "legendFormat": l}, **({"instant": True, "range": False, "format": "table"} if kind == "table" else {}))
                    for i, (e, l) in enumerate(targets)],
        "fieldConfig": {"defaults": {}, "overrides": overrides or []},
        "options": {},
    }
    if unit: p["fieldConfig"]["defaults"]["unit"] = unit
    if desc: p["description"] = desc
    if extra:
        for k, v in extra.items():
            if k == "defaults": p["fieldConfig"]["defaults"].update(v)
            else: p[k] = v
    panels.append(p)
def row(title, y):
    pid[0] += 1
    panels.append({"id": pid[0], "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})

R = 'resource=~"$resource"'
I = 'instance=~"$instance"'
thr_red = {"defaults": {"thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}, "color": {"mode": "thresholds"}}}
stat_opts = {"options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"}}

row("Health", 0)
panel("stat", "Split brain", [(f'max by (resource, member) (mars_member_split_brain{{{R}}})', "{{resource}} {{member}}")], 0, 1, 6, 4,
      desc="1: the member's log diverged from the primary's (marsadm invalidate on the losing side).", extra=dict(thr_red, **stat_opts))
panel("stat", "Emergency", [(f'max by (resource, member) (mars_member_emergency{{{R}}})', "{{resource}} {{member}}")], 6, 1, 6, 4,
      desc="1: logfiles the member needed were deleted to free space.", extra=dict(thr_red, **stat_opts))
panel("stat", "Checksum errors", [(f'max by (resource, member) (mars_member_checksum_errors_total{{{R}}})', "{{resource}} {{member}}")], 12, 1, 6, 4,
      desc="Blocks found not to match their checksums since marsd started.", extra=dict(thr_red, **stat_opts))
panel("stat", "Nodes alive", [('max by (node) (mars_cluster_node_up)', "{{node}}")], 18, 1, 6, 4,
      extra={"defaults": {"thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}, "color": {"mode": "thresholds"},
             "mappings": [{"type": "value", "options": {"0": {"text": "down"}, "1": {"text": "up"}}}]}, **stat_opts})
panel("table", "Members", [
    (f'max by (resource, member, state) (mars_member_disk_state{{{R}}}) == 1', "disk"),
    (f'max by (resource, member) (mars_member_primary{{{R}}})', "primary"),
    (f'max by (resource, member) (mars_member_connected{{{R}}})', "connected"),
    (f'max by (resource, member) (mars_member_lag_bytes{{{R}}})', "lag"),
], 0, 5, 24, 7, desc="Per member, as the nodes that report it see it best: disk state, role, connection, lag.",
    extra={"transformations": [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {"excludeByName": {"Time": True, "Value #A": True},
                                       "renameByName": {"state": "disk", "Value #B": "primary", "Value #C": "connected", "Value #D": "lag"}}}]},
    overrides=[{"matcher": {"id": "byName", "options": "lag"}, "properties": [{"id": "unit", "value": "bytes"}]}])

row("Replication", 12)
panel("timeseries", "Lag (bytes)", [(f'max by (resource, member) (mars_member_lag_bytes{{{R}}})', "{{resource}} {{member}}")], 0, 13, 12, 8, unit="bytes",
      desc="Log the primary wrote that the member has not replayed.")
panel("timeseries", "Lag (seconds)", [
    (f'max by (resource, member) (mars_member_lag_seconds{{{R}}})', "{{resource}} {{member}}"),
    (f'max by (resource, member) (mars_member_replay_delay_seconds{{{R}}}) > 0', "{{resource}} {{member}} set-delay"),
], 12, 13, 12, 8, unit="s",
      desc="Age of the oldest write the member has not replayed; a delayed replica (set-delay) is kept that far behind on purpose.")
panel("timeseries", "Log written / replayed", [
    (f'max by (resource) (rate(mars_member_log_written_bytes_total{{{R}}}[$__rate_interval]) * on (resource, member) group_left max by (resource, member) (mars_member_primary{{{R}}}))', "{{resource}} written"),
    (f'max by (resource, member) (rate(mars_member_log_replayed_bytes_total{{{R}}}[$__rate_interval]))', "{{resource}} {{member}} replayed"),
    (f'max by (resource, member) (rate(mars_member_log_fetched_bytes_total{{{R}}}[$__rate_interval]))', "{{resource}} {{member}} fetched"),
], 0, 21, 12, 8, unit="Bps")
panel("timeseries", "Full sync", [
    (f'max by (resource, member) (mars_member_sync_done_bytes{{{R}}}) / max by (resource, member) (mars_member_sync_total_bytes{{{R}}} > 0)', "{{resource}} {{member}} done"),
], 12, 21, 6, 8, unit="percentunit", extra={"defaults": {"min": 0, "max": 1}})
panel("timeseries", "Sync rate", [
    (f'max by (resource, member) (mars_member_sync_rate_bytes_per_second{{{R}}})', "{{resource}} {{member}}"),
], 18, 21, 6, 8, unit="Bps")
panel("timeseries", "Data sent to members", [
    (f'sum by (resource) (rate(mars_resource_link_sent_data_bytes_total{{{R},{I}}}[$__rate_interval]))', "{{resource}} data"),
    (f'sum by (resource) (rate(mars_resource_link_sent_wire_bytes_total{{{R},{I}}}[$__rate_interval]))', "{{resource}} on the wire"),
], 0, 29, 12, 8, unit="Bps", desc="Fetch and sync data served to other members (before and after compression).")
panel("timeseries", "Paused", [
    (f'max by (resource, member, what) (mars_member_paused{{{R}}})', "{{resource}} {{member}} {{what}}"),
], 12, 29, 12, 8, extra={"defaults": {"min": 0, "max": 1}})

row("NBD devices", 37)
panel("timeseries", "Requests", [
    (f'sum by (resource, command) (rate(mars_nbd_requests_total{{{R},{I}}}[$__rate_interval]))', "{{resource}} {{command}}"),
], 0, 38, 8, 8, unit="reqps")
panel("timeseries", "Throughput", [
    (f'sum by (resource, command) (rate(mars_nbd_request_bytes_total{{{R},{I}}}[$__rate_interval]))', "{{resource}} {{command}}"),
], 8, 38, 8, 8, unit="Bps")
panel("timeseries", "Errors", [
    (f'sum by (resource, command) (rate(mars_nbd_request_errors_total{{{R},{I}}}[$__rate_interval]))', "{{resource}} {{command}}"),
], 16, 38, 8, 8, unit="reqps")
panel("timeseries", "Latency p50 / p99", [
    (f'histogram_quantile(0.5, sum by (le, resource, command) (rate(mars_nbd_request_duration_seconds_bucket{{{R},{I}}}[$__rate_interval])))', "p50 {{resource}} {{command}}"),
    (f'histogram_quantile(0.99, sum by (le, resource, command) (rate(mars_nbd_request_duration_seconds_bucket{{{R},{I}}}[$__rate_interval])))', "p99 {{resource}} {{command}}"),
], 0, 46, 12, 8, unit="s")
panel("timeseries", "Average latency", [
    (f'sum by (resource, command) (rate(mars_nbd_request_duration_seconds_sum{{{R},{I}}}[$__rate_interval])) / sum by (resource, command) (rate(mars_nbd_request_duration_seconds_count{{{R},{I}}}[$__rate_interval]))', "{{resource}} {{command}}"),
], 12, 46, 6, 8, unit="s")
panel("timeseries", "In flight / connections", [
    (f'sum by (resource) (mars_nbd_requests_in_flight{{{R},{I}}})', "{{resource}} in flight"),
    (f'sum by (resource) (mars_nbd_connections{{{R},{I}}})', "{{resource}} connections"),
], 18, 46, 6, 8)

row("Nodes", 54)
panel("timeseries", "Node directory free space", [
    (f'mars_node_dir_filesystem_free_bytes{{{I}}}', "{{instance}} free"),
    (f'mars_emergency_free_bytes{{{I}}}', "{{instance}} emergency threshold"),
], 0, 55, 8, 8, unit="bytes")
panel("timeseries", "Log space used", [
    (f'mars_resource_log_used_bytes{{{R},{I}}}', "{{instance}} {{resource}}"),
], 8, 55, 8, 8, unit="bytes")
panel("timeseries", "Gossip traffic", [
    (f'rate(mars_gossip_sent_bytes_total{{{I}}}[$__rate_interval])', "{{instance}} sent"),
    (f'rate(mars_gossip_received_bytes_total{{{I}}}[$__rate_interval])', "{{instance}} received"),
    (f'rate(mars_gossip_dropped_datagrams_total{{{I}}}[$__rate_interval])', "{{instance}} dropped datagrams/s"),
], 16, 55, 8, 8, unit="Bps")
panel("timeseries", "Peers alive", [
    (f'mars_cluster_peers_alive{{{I}}}', "{{instance}} alive"),
    (f'mars_cluster_peers{{{I}}}', "{{instance}} known"),
], 0, 63, 8, 6)
panel("timeseries", "View age", [
    (f'mars_metrics_view_age_seconds{{{I}}}', "{{instance}}"),
], 8, 63, 8, 6, unit="s", desc="0 when the scrape built a fresh view; older when marsd was busy (a long reconcile step).")

row("Checksums", 69)
panel("timeseries", "Bad blocks (unrepaired)", [
    (f'max by (resource, member) (mars_member_bad_blocks{{{R}}})', "{{resource}} {{member}}"),
], 0, 70, 8, 7)
panel("timeseries", "Blocks repaired", [
    (f'max by (resource, member) (mars_member_repaired_blocks_total{{{R}}})', "{{resource}} {{member}}"),
], 8, 70, 8, 7)
panel("stat", "Last verify clean", [
    (f'max by (resource) (mars_resource_verify_last_clean{{{R}}})', "{{resource}}"),
], 16, 70, 8, 7, extra={"defaults": {"thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}, "color": {"mode": "thresholds"},
             "mappings": [{"type": "value", "options": {"0": {"text": "differences"}, "1": {"text": "clean"}}}]}, **stat_opts})

dash = {
    "__inputs": [],
    "title": "mars",
    "uid": "mars-overview",
    "description": "mars: replicated block devices (marsd --metrics). Members are shown as the nodes that report them see them best (max over nodes).",
    "tags": ["mars", "storage", "replication"],
    "timezone": "",
    "editable": True,
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "instance", "label": "Node", "type": "query", "datasource": DS, "query": {"query": "label_values(mars_node_info, instance)", "refId": "A"},
         "definition": "label_values(mars_node_info, instance)", "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
        {"name": "resource", "label": "Resource", "type": "query", "datasource": DS, "query": {"query": "label_values(mars_resource_size_bytes, resource)", "refId": "B"},
         "definition": "label_values(mars_resource_size_bytes, resource)", "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2, "hide": 0},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
