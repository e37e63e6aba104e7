//! The command table, one fact in one place: each command's name, arity, arguments and help, used by
//! the parser, `HELP` and completion.

use crate::reply::Reply;

/// What a command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Set,
    Get,
    Del,
    HSet,
    HGet,
    HDel,
    SSet,
    SHas,
    SDel,
    Lock,
    Unlock,
    ConfigGet,
    ConfigSet,
    ConfigWatch,
    QPush,
    QPop,
    QTake,
    QAck,
    Leader,
    Peers,
    Status,
    Kill,
    Restart,
    Peer,
    Help,
    Quit,
}

/// One row of the table.
pub struct Spec {
    /// What it does.
    pub cmd: Cmd,
    /// Its name, upper case; two words for the `CONFIG` subcommands.
    pub name: &'static str,
    /// Fewest arguments (after the name).
    pub min: usize,
    /// Most arguments (`None`: any number).
    pub max: Option<usize>,
    /// The arguments, for `HELP`.
    pub args: &'static str,
    /// One line of help.
    pub help: &'static str,
}

const fn spec(
    cmd: Cmd,
    name: &'static str,
    min: usize,
    max: Option<usize>,
    args: &'static str,
    help: &'static str,
) -> Spec {
    Spec {
        cmd,
        name,
        min,
        max,
        args,
        help,
    }
}

/// Every command.
pub const COMMANDS: &[Spec] = &[
    spec(Cmd::Set, "SET", 2, Some(2), "key value", "sets key (answers OK)"),
    spec(Cmd::Get, "GET", 1, Some(2), "key [--linearizable]", "the value of key (--linearizable: confirmed with the leader)"),
    spec(Cmd::Del, "DEL", 1, Some(1), "key", "deletes key (1 if it existed)"),
    spec(Cmd::HSet, "HSET", 2, None, "name k:v [k:v ...]", "sets fields of hash name, all at once (how many were new)"),
    spec(Cmd::HGet, "HGET", 2, Some(2), "name k", "field k of hash name"),
    spec(Cmd::HDel, "HDEL", 2, None, "name k [k ...]", "deletes fields of hash name, all at once (how many existed)"),
    spec(Cmd::SSet, "SSET", 2, None, "name v [v ...]", "adds members to set name (how many were new)"),
    spec(Cmd::SHas, "SHAS", 2, Some(2), "name v", "1 if v is in set name, else 0"),
    spec(Cmd::SDel, "SDEL", 2, None, "name v [v ...]", "removes members from set name (how many were there)"),
    spec(Cmd::Lock, "LOCK", 1, Some(2), "name [wait_ms]", "takes lock name for this peer, waiting up to wait_ms (default 0, at most 30000); its fencing token"),
    spec(Cmd::Unlock, "UNLOCK", 1, Some(1), "name", "releases lock name taken here (1 if it was still held)"),
    spec(Cmd::ConfigGet, "CONFIG GET", 1, Some(1), "name", "config name: its value and revision"),
    spec(Cmd::ConfigSet, "CONFIG SET", 2, Some(3), "name value [expected_revision]", "sets config name (only over expected_revision if given, 0: never set); the new revision"),
    spec(Cmd::ConfigWatch, "CONFIG WATCH", 1, Some(3), "name [n] [wait_ms]", "the next n changes of config name (default 1), waiting at most wait_ms (default 5000, at most 60000)"),
    spec(Cmd::QPush, "QPUSH", 2, None, "name v [v ...]", "appends to queue name (its length after)"),
    spec(Cmd::QPop, "QPOP", 1, Some(1), "name", "takes the head of queue name (at most once)"),
    spec(Cmd::QTake, "QTAKE", 1, Some(2), "name [lease_ms]", "leases the head of queue name to this peer for lease_ms (default 30000): its delivery id, value and delivery count"),
    spec(Cmd::QAck, "QACK", 2, Some(2), "name id", "acknowledges delivery id of queue name (1 if it was still held)"),
    spec(Cmd::Leader, "LEADER", 0, Some(0), "", "the leader this peer knows of"),
    spec(Cmd::Peers, "PEERS", 0, Some(0), "", "the peers and their roles"),
    spec(Cmd::Status, "STATUS", 0, Some(0), "", "this peer's role, term, leader, indices, members, log size"),
    spec(Cmd::Kill, "KILL", 1, Some(1), "id", "closes peer id (in-process cluster only)"),
    spec(Cmd::Restart, "RESTART", 1, Some(1), "id", "rebuilds peer id and rejoins it (in-process cluster only)"),
    spec(Cmd::Peer, "PEER", 1, Some(1), "id", "moves the prompt to peer id (in-process cluster only)"),
    spec(Cmd::Help, "HELP", 0, Some(2), "[command]", "this list, or one command's help"),
    spec(Cmd::Quit, "QUIT", 0, Some(0), "", "closes the peers and exits"),
    spec(Cmd::Quit, "EXIT", 0, Some(0), "", "same as QUIT"),
];

/// A parsed command line.
pub struct Parsed {
    /// Its row.
    pub spec: &'static Spec,
    /// Its arguments.
    pub args: Vec<String>,
}

/// The row named `name` (one or two words, any case).
pub fn find(name: &str) -> Option<&'static Spec> {
    COMMANDS.iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// Whether some two-word command starts with `word` (`CONFIG`).
fn is_group(word: &str) -> bool {
    COMMANDS.iter().any(|s| {
        s.name
            .split_once(' ')
            .is_some_and(|(g, _)| g.eq_ignore_ascii_case(word))
    })
}

/// Parses one line: `Ok(None)` for a blank line, `Err` with the error answer.
pub fn parse(line: &str) -> Result<Option<Parsed>, Reply> {
    let mut words = split(line)?;
    if words.is_empty() {
        return Ok(None);
    }
    let mut name = words.remove(0);
    if is_group(&name) {
        if words.is_empty() {
            return Err(arity(&name.to_uppercase()));
        }
        name = format!("{name} {}", words.remove(0));
    }
    let spec = find(&name)
        .ok_or_else(|| Reply::Error(format!("unknown command '{}'", name.to_uppercase())))?;
    if words.len() < spec.min || spec.max.is_some_and(|m| words.len() > m) {
        return Err(arity(spec.name));
    }
    Ok(Some(Parsed { spec, args: words }))
}

fn arity(name: &str) -> Reply {
    Reply::Error(format!("wrong number of arguments for '{name}'"))
}

/// Splits a line into words at whitespace; `"..."` quotes a word with spaces (`\"` and `\\` inside).
pub fn split(line: &str) -> Result<Vec<String>, Reply> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(Reply::error("unbalanced quotes")),
                    Some('"') => break,
                    Some('\\') => word.push(
                        chars
                            .next()
                            .ok_or_else(|| Reply::error("unbalanced quotes"))?,
                    ),
                    Some(c) => word.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(Reply::error("closing quote must be followed by a space"));
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// `HELP` (every command) or `HELP name`.
pub fn help(args: &[String]) -> Reply {
    if args.is_empty() {
        return Reply::Lines(COMMANDS.iter().map(help_line).collect());
    }
    let name = args.join(" ");
    match find(&name) {
        Some(s) => Reply::Lines(vec![help_line(s)]),
        None => Reply::Error(format!("unknown command '{}'", name.to_uppercase())),
    }
}

fn help_line(s: &Spec) -> String {
    let usage = if s.args.is_empty() {
        s.name.to_string()
    } else {
        format!("{} {}", s.name, s.args)
    };
    format!("{usage:<44} {}", s.help)
}

/// Completions of the first word(s) of `line` (a prefix), upper case.
pub fn complete(line: &str) -> Vec<String> {
    let upper = line.trim_start().to_uppercase();
    let mut out: Vec<String> = COMMANDS
        .iter()
        .filter_map(|s| {
            let name = s.name;
            if !name.starts_with(&upper) {
                return None;
            }
            // Complete one word at a time.
            let rest = &name[upper.len()..];
            let end = rest.find(' ').map_or(name.len(), |i| upper.len() + i);
            Some(name[..end].to_string())
        })
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert!(parse("   ").unwrap().is_none());
        let p = parse("config set a \"x y\" 3").unwrap().unwrap();
        assert_eq!(p.spec.cmd, Cmd::ConfigSet);
        assert_eq!(p.args, ["a", "x y", "3"]);
        assert_eq!(
            parse("hset h").err(),
            Some(Reply::Error("wrong number of arguments for 'HSET'".into()))
        );
        assert_eq!(
            parse("foo").err(),
            Some(Reply::Error("unknown command 'FOO'".into()))
        );
        assert_eq!(complete("con"), ["CONFIG"]);
        assert_eq!(complete("CONFIG W"), ["CONFIG WATCH"]);
    }
}
