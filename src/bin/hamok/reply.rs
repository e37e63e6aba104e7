//! Answers in redis-cli style, and how they are printed.
//!
//! On a terminal (`pretty`): `OK`, `"value"` (quoted, escaped), `(nil)`, `(integer) 7`, numbered lists
//! (`1) "a"`), `(empty list or set)`, `(error) ...`. When standard output is not a terminal the values
//! are raw, as redis-cli prints them for scripts: no quotes, no `(integer)`, list items one per line
//! without numbers, `(nil)` as an empty line; errors keep their `(error)` prefix.

use std::fmt::Write as _;

/// One answer of the REPL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `OK`.
    Ok,
    /// A string value.
    Str(String),
    /// No value.
    Nil,
    /// An integer.
    Int(i64),
    /// A list of answers.
    List(Vec<Reply>),
    /// Plain lines printed as they are (`STATUS`, `HELP`).
    Lines(Vec<String>),
    /// An error, one line.
    Error(String),
}

impl Reply {
    /// An error answer from anything printable.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Reply::Error(e.to_string())
    }

    /// A count as an integer answer.
    pub fn count(n: impl TryInto<i64>) -> Self {
        Reply::Int(n.try_into().unwrap_or(i64::MAX))
    }

    /// `Str` or `Nil`.
    pub fn opt(v: Option<String>) -> Self {
        v.map_or(Reply::Nil, Reply::Str)
    }

    /// The text to print, without the final newline.
    pub fn render(&self, pretty: bool) -> String {
        let mut out = String::new();
        self.render_into(&mut out, pretty, "");
        out
    }

    fn render_into(&self, out: &mut String, pretty: bool, indent: &str) {
        match self {
            Reply::Ok => out.push_str("OK"),
            Reply::Str(s) if pretty => {
                let _ = write!(out, "{s:?}");
            }
            Reply::Str(s) => out.push_str(s),
            Reply::Nil if pretty => out.push_str("(nil)"),
            Reply::Nil => {}
            Reply::Int(n) if pretty => {
                let _ = write!(out, "(integer) {n}");
            }
            Reply::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Reply::Error(e) => {
                // One line, whatever the error text holds.
                let _ = write!(out, "(error) {}", e.replace(['\n', '\r'], " "));
            }
            Reply::Lines(lines) => out.push_str(&lines.join("\n")),
            Reply::List(items) if items.is_empty() && pretty => out.push_str("(empty list or set)"),
            Reply::List(items) => render_list(out, items, pretty, indent),
        }
    }
}

fn render_list(out: &mut String, items: &[Reply], pretty: bool, indent: &str) {
    let width = items.len().to_string().len();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if pretty {
            let head = format!("{:>width$}) ", i + 1);
            let inner = format!("{indent}{}", " ".repeat(head.len()));
            if i > 0 {
                out.push_str(indent);
            }
            out.push_str(&head);
            item.render_into(out, pretty, &inner);
        } else {
            item.render_into(out, pretty, indent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Reply;

    #[test]
    fn pretty_and_raw() {
        assert_eq!(Reply::Str("a b".into()).render(true), "\"a b\"");
        assert_eq!(Reply::Str("a b".into()).render(false), "a b");
        assert_eq!(Reply::Int(7).render(true), "(integer) 7");
        assert_eq!(Reply::Int(7).render(false), "7");
        assert_eq!(Reply::Nil.render(true), "(nil)");
        let list = Reply::List(vec![Reply::Str("a".into()), Reply::Int(2)]);
        assert_eq!(list.render(true), "1) \"a\"\n2) (integer) 2");
        assert_eq!(list.render(false), "a\n2");
        assert_eq!(Reply::error("x\ny").render(false), "(error) x y");
    }
}
