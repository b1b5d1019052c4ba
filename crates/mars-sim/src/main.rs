//! `mars-sim`: run the cluster simulator for one cluster size, or the table for several.
//!
//! ```text
//! mars-sim --nodes 1000 --seed 1
//! mars-sim --all --seed 1 --out docs/sim-results.md
//! ```
//!
//! `--all` runs each size in a child process of its own, so that the peak
//! memory reported for a size is that run's alone.

use std::process::{Command, ExitCode, Stdio};

use clap::Parser;
use mars_sim::{markdown, run, Report, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "mars-sim",
    about = "Deterministic simulator of mars cluster membership and metadata dissemination"
)]
struct Args {
    /// Cluster size.
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Run every size of --sizes, each in its own process, and print the table.
    #[arg(long)]
    all: bool,
    /// Sizes for --all.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    sizes: Vec<u32>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a datagram is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Resources (default: nodes / 2).
    #[arg(long)]
    resources: Option<u32>,
    /// Tune foca for at least this cluster size (more if a node's store knows more
    /// nodes when it starts), and do not follow the store afterwards (default: like
    /// marsd, follow the number of nodes in the store).
    #[arg(long)]
    size_hint: Option<u32>,
    /// Length of the steady-state window, virtual seconds.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Give up waiting for bootstrap convergence after this many virtual seconds.
    #[arg(long, default_value_t = 600)]
    converge_limit_secs: u64,
    /// Give up waiting for one entry to spread after this many virtual seconds.
    #[arg(long, default_value_t = 120)]
    spread_limit_secs: u64,
    /// Write the markdown tables to this file too.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Start from a converged cluster: no bootstrap, for sizes whose bootstrap
    /// does not fit (see `SimConfig::warm`).
    #[arg(long)]
    warm: bool,
    /// Print the report as one JSON line (used by --all).
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn config(args: &Args, nodes: u32) -> SimConfig {
    let mut cfg = SimConfig::new(nodes, args.seed);
    cfg.loss = args.loss;
    if let Some(r) = args.resources {
        cfg.resources = r.max(1);
    }
    cfg.size_hint = args.size_hint.map(|h| h.max(1));
    cfg.steady_ms = args.steady_secs * 1000;
    cfg.converge_limit_ms = args.converge_limit_secs * 1000;
    cfg.spread_limit_ms = args.spread_limit_secs * 1000;
    cfg.verbose = !args.quiet;
    cfg.warm = args.warm;
    cfg
}

/// Runs one size in a child process and reads its JSON report.
fn run_child(args: &Args, nodes: u32) -> Result<Report, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--json",
        "--nodes",
        &nodes.to_string(),
        "--seed",
        &args.seed.to_string(),
    ])
    .args([
        "--loss",
        &args.loss.to_string(),
        "--steady-secs",
        &args.steady_secs.to_string(),
    ])
    .args([
        "--converge-limit-secs",
        &args.converge_limit_secs.to_string(),
    ])
    .args(["--spread-limit-secs", &args.spread_limit_secs.to_string()]);
    if let Some(r) = args.resources {
        cmd.args(["--resources", &r.to_string()]);
    }
    if let Some(h) = args.size_hint {
        cmd.args(["--size-hint", &h.to_string()]);
    }
    if args.quiet {
        cmd.arg("--quiet");
    }
    if args.warm {
        cmd.arg("--warm");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("run with {nodes} nodes failed: {}", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("run with {nodes} nodes: bad report: {e}"))
}

fn command_line(args: &Args) -> String {
    let mut c =
        String::from("CARGO_TARGET_DIR=/work/target-sim cargo run --release -p mars-sim --");
    if args.all {
        let sizes: Vec<String> = args.sizes.iter().map(u32::to_string).collect();
        c.push_str(&format!(" --all --sizes {}", sizes.join(",")));
    } else {
        c.push_str(&format!(" --nodes {}", args.nodes));
    }
    c.push_str(&format!(" --seed {}", args.seed));
    if args.warm {
        c.push_str(" --warm");
    }
    if args.loss > 0.0 {
        c.push_str(&format!(" --loss {}", args.loss));
    }
    if let Some(r) = args.resources {
        c.push_str(&format!(" --resources {r}"));
    }
    if let Some(h) = args.size_hint {
        c.push_str(&format!(" --size-hint {h}"));
    }
    if args.steady_secs != 60 {
        c.push_str(&format!(" --steady-secs {}", args.steady_secs));
    }
    if args.converge_limit_secs != 600 {
        c.push_str(&format!(
            " --converge-limit-secs {}",
            args.converge_limit_secs
        ));
    }
    if args.spread_limit_secs != 120 {
        c.push_str(&format!(" --spread-limit-secs {}", args.spread_limit_secs));
    }
    if let Some(out) = &args.out {
        c.push_str(&format!(" --out {}", out.display()));
    }
    c
}

fn main() -> ExitCode {
    let args = Args::parse();
    let reports = if args.all {
        let mut reports = Vec::new();
        for &n in &args.sizes {
            match run_child(&args, n) {
                Ok(r) => reports.push(r),
                Err(e) => {
                    eprintln!("mars-sim: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        reports
    } else {
        let report = run(&config(&args, args.nodes));
        if args.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            return ExitCode::SUCCESS;
        }
        vec![report]
    };
    let text = format!(
        "{}\n\nCommand: `{}`\n",
        markdown(&reports),
        command_line(&args)
    );
    print!("{text}");
    if let Some(path) = &args.out {
        if let Err(e) = std::fs::write(path, &text) {
            eprintln!("mars-sim: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
