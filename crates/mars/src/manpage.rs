//! Man pages generated from the clap definitions (`marsadm man`, `marsd
//! --man`; `scripts/gen-man.sh` writes `man/marsadm.1` and `man/marsd.8`).
//!
//! `clap_mangen` renders the page's title, NAME, SYNOPSIS, DESCRIPTION and
//! OPTIONS. Its SUBCOMMANDS section only lists `marsadm-COMMAND(1)` pages, so
//! the COMMANDS section here puts every visible subcommand on the one page
//! instead, each with the synopsis, description and options that
//! `clap_mangen` renders for it. The extra sections (EXIT STATUS, ...) come
//! from the caller.

use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;

/// One extra section: a heading and its paragraphs (lines within a
/// paragraph are joined by the formatter).
pub struct Section<'a> {
    pub heading: &'a str,
    pub text: &'a str,
}

/// The whole page for `cmd` in manual `section` ("1", "8").
pub fn render(cmd: clap::Command, section: &str, extra: &[Section]) -> std::io::Result<Vec<u8>> {
    let title = cmd.get_name().to_uppercase();
    let man = Man::new(cmd.clone())
        .title(title)
        .section(section)
        .manual("mars");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if !subs.is_empty() {
        out.extend_from_slice(b".SH COMMANDS\n");
        for sub in subs {
            commands(&mut out, cmd.get_name(), sub)?;
        }
    }
    let mut roff = Roff::new();
    for s in extra {
        roff.control("SH", [s.heading]);
        for (i, para) in s.text.split("\n\n").enumerate() {
            if i > 0 {
                roff.control("PP", []);
            }
            for line in para.lines() {
                roff.text([roman(line)]);
            }
        }
    }
    out.extend_from_slice(roff.render().as_bytes());
    // Every part rendered on its own starts with roff's preamble: keep one.
    let text = String::from_utf8_lossy(&out);
    let preamble: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    Ok(format!("{preamble}{}", without_preamble(&text)).into_bytes())
}

/// `sub` as a subsection `.SS NAME` (its own subcommands after it, as
/// `.SS PARENT NAME`).
fn commands(out: &mut Vec<u8>, parent: &str, sub: &clap::Command) -> std::io::Result<()> {
    let name = format!("{parent} {}", sub.get_name());
    let cmd = sub
        .clone()
        .bin_name(&name)
        .disable_help_flag(true)
        .disable_help_subcommand(true);
    let shown = name.split_once(' ').map_or(name.as_str(), |(_, s)| s);
    out.extend_from_slice(format!(".SS \"{shown}\"\n").as_bytes());
    let man = Man::new(cmd.clone());
    for part in [
        Man::render_synopsis_section as fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>,
        Man::render_description_section,
    ] {
        let mut buf = Vec::new();
        part(&man, &mut buf)?;
        out.extend_from_slice(body(&String::from_utf8_lossy(&buf)).as_bytes());
        out.extend_from_slice(b".PP\n");
    }
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        let mut buf = Vec::new();
        man.render_options_section(&mut buf)?;
        out.extend_from_slice(b".RS\n");
        out.extend_from_slice(body(&String::from_utf8_lossy(&buf)).as_bytes());
        out.extend_from_slice(b".RE\n");
    }
    for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        commands(out, &name, s)?;
    }
    Ok(())
}

/// A rendered part without roff's preamble (the page's first part has it).
fn without_preamble(rendered: &str) -> String {
    rendered
        .lines()
        .filter(|l| !l.starts_with(".ie \\n(.g") && !l.starts_with(".el .ds Aq"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A rendered part without roff's preamble and its section heading.
fn body(rendered: &str) -> String {
    without_preamble(rendered)
        .lines()
        .filter(|l| !l.starts_with(".SH "))
        .map(|l| format!("{l}\n"))
        .collect()
}
